"""Model and training settings, owned by the model package.

Plain frozen dataclasses so they can be built without Spark; the root config in
``pipelines.config`` composes them and does the loading and validation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# The fine-tuning losses that place neighbours (t-SNE's and UMAP's) rather than reconstruct.
NeighbourLoss = Literal["tsne", "umap"]
NEIGHBOUR_LOSSES: tuple[str, ...] = get_args(NeighbourLoss)


@dataclass(frozen=True)
class ModelConfig:
    """``model.*``: layer widths and activations of the stacked autoencoder, and its weight init."""

    # Input width first, code width last; the decoder mirrors the encoder.
    layers: list[int] = field(default_factory=lambda: [784, 1000, 500, 250, 2])
    activation: Literal["sigmoid", "relu", "gelu"] = "sigmoid"
    # Hinton & Salakhutdinov keep the code layer linear so the map is not squashed into a box.
    code_activation: Literal["linear", "sigmoid"] = "linear"
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"
    # Initial weights: "default" = PyTorch's U(+-1/sqrt(fan_in)); "glorot4" = U(+-4 sqrt(6/(fan_in+fan_out)))
    # with zero biases, the Theano-era init for logistic units (Glorot & Bengio 2010, section 4.2.2).
    init: Literal["default", "glorot4"] = "default"

    def __post_init__(self) -> None:
        if len(self.layers) < 2:
            raise ValueError("model.layers: need at least an input and a code width, e.g. [784, 2]")
        if any(int(w) <= 0 for w in self.layers):
            raise ValueError(f"model.layers: every width must be positive, got {self.layers}")


@dataclass(frozen=True)
class PretrainConfig:
    """``pretrain.*``: layer-wise pretraining (autoencoders, or RBMs as Hinton & Salakhutdinov 2006) and its
    optimiser."""

    method: Literal["autoencoder", "rbm", "none"] = "autoencoder"
    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: int = 100
    weight_decay: float = 0.0
    # Denoising pretraining: fraction of inputs zeroed (0 = plain autoencoder).
    corruption: float = 0.0
    # Contrastive-divergence steps for pretrain.method=rbm.
    cd_k: int = 1
    # The RBM with linear (Gaussian) code units needs a smaller step: Hinton's code uses 0.001 vs 0.1.
    rbm_linear_lr_scale: float = 0.01
    # The L2 cost the lr applies to (SGD): "mean" = squared error averaged over the batch and the dims,
    # "sum" = summed over each item's dims, averaged over the batch (the Theano-era cost; lr x width).
    loss_reduction: Literal["mean", "sum"] = "mean"
    # "data_mean": each pretraining stage starts its decoder's bias at the logit of its input's mean
    # (sigmoid outputs), so the first steps are not spent on the offset every output shares.
    decoder_bias: Literal["default", "data_mean"] = "default"
    # pretrain.method=autoencoder: lr factor for the stage whose code units are linear (unbounded), as
    # rbm_linear_lr_scale for the RBM. The talk's lr 1 on the summed cost blew 250-2-250 up (issue 22).
    linear_code_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        _check_phase("pretrain", self.epochs, self.lr, self.batch_size)
        if not 0.0 <= self.corruption < 1.0:
            raise ValueError(f"pretrain.corruption: must be in [0, 1), got {self.corruption}")
        if self.cd_k < 1:
            raise ValueError(f"pretrain.cd_k: must be >= 1, got {self.cd_k}")


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune.*``: fine-tuning of the unrolled net: optimiser, and the reconstruction or neighbour loss
    (parametric t-SNE, van der Maaten 2009; UMAP, McInnes et al. 2018)."""

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: int = 100
    weight_decay: float = 0.0
    # Learning rate over the fine-tuning epochs: constant, or decayed per epoch from lr towards 0
    # (linear, as UMAP's optimiser; or cosine). Set from the epoch number, so a resume continues it.
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    # As pretrain.loss_reduction, for the mse/bce reconstruction with SGD (not the neighbour losses).
    loss_reduction: Literal["mean", "sum"] = "mean"
    loss: Literal["mse", "bce", NeighbourLoss] = "mse"
    # Weight of the reconstruction term when loss is a neighbour loss (tsne/umap).
    recon_weight: float = 0.0
    # Fraction of the encoder's inputs zeroed in each fine-tuning step (0 = none); the targets
    # (reconstruction, neighbour affinities or graph) stay those of the clean inputs.
    corruption: float = 0.0
    # Batch size of fine-tuning with a neighbour loss: the affinities are computed within each batch,
    # so it must be large (van der Maaten 2009 used 5,000); batch_size applies to mse/bce only.
    neighbor_batch_size: int = 2000
    # t-SNE: perplexity of the input-space affinities; degrees of freedom of the Student-t on codes.
    perplexity: float = 30.0
    tsne_dof: float = 1.0
    # UMAP: kNN graph size (counting the point itself), the curve of the code-space similarity,
    # and repelling samples per edge.
    n_neighbors: int = 15
    min_dist: float = 0.1
    spread: float = 1.0
    negative_sample_rate: int = 5
    # Where tsne/umap affinities come from: "batch" = each batch's own rows (any size, streamed or
    # distributed); "global" = an exact kNN graph of all training rows built once, each step sampling
    # edges by affinity plus uniform rows (in-memory, single-process training only; O(n^2) to build).
    neighbor_graph: Literal["batch", "global"] = "batch"

    def __post_init__(self) -> None:
        _check_phase("finetune", self.epochs, self.lr, self.batch_size, allow_zero_epochs=True)
        if self.recon_weight < 0:
            raise ValueError(f"finetune.recon_weight: must be >= 0, got {self.recon_weight}")
        if self.loss_reduction == "sum" and self.loss in ("tsne", "umap"):
            raise ValueError(f"finetune.loss_reduction=sum: only for the reconstruction losses (mse, bce), not {self.loss}")
        if not 0.0 <= self.corruption < 1.0:
            raise ValueError(f"finetune.corruption: must be in [0, 1), got {self.corruption}")
        if self.neighbor_batch_size < 2:
            raise ValueError(f"finetune.neighbor_batch_size: must be >= 2, got {self.neighbor_batch_size}")
        if self.perplexity <= 0:
            raise ValueError(f"finetune.perplexity: must be > 0, got {self.perplexity}")
        if self.tsne_dof <= 0:
            raise ValueError(f"finetune.tsne_dof: must be > 0, got {self.tsne_dof}")
        if self.n_neighbors < 2:
            raise ValueError(f"finetune.n_neighbors: must be >= 2 (it counts the item itself), got {self.n_neighbors}")
        if self.spread <= 0 or not 0 <= self.min_dist < 3 * self.spread:
            raise ValueError(
                f"finetune.min_dist/spread: need spread > 0 and 0 <= min_dist < 3*spread, got {self.min_dist}, {self.spread}"
            )
        if self.negative_sample_rate < 0:
            raise ValueError(f"finetune.negative_sample_rate: must be >= 0, got {self.negative_sample_rate}")

    @property
    def is_neighbor_loss(self) -> bool:
        return self.loss in NEIGHBOUR_LOSSES

    @property
    def uses_global_graph(self) -> bool:
        return self.is_neighbor_loss and self.neighbor_graph == "global"

    @property
    def effective_batch_size(self) -> int:
        """Rows per fine-tuning step: ``neighbor_batch_size`` for tsne/umap, else ``batch_size``."""
        return self.neighbor_batch_size if self.is_neighbor_loss else self.batch_size


@dataclass(frozen=True)
class DistributedConfig:
    """``train.distributed.*``: how many training processes, where they run, and the collective timeout in
    seconds."""

    # > 1: TorchDistributor runs that many training processes (gloo on CPU, nccl on GPUs).
    num_processes: int = 1
    use_gpu: bool = False
    # True: all processes on the driver; False: one per Spark task (barrier mode, needs that many free slots).
    local_mode: bool = True
    # How long a collective waits for a silent rank before the run fails (a dead rank usually fails it at once).
    timeout_s: int = 600

    def __post_init__(self) -> None:
        if self.num_processes < 1:
            raise ValueError(f"train.distributed.num_processes: must be >= 1, got {self.num_processes}")
        if self.timeout_s < 1:
            raise ValueError(f"train.distributed.timeout_s: must be >= 1, got {self.timeout_s}")


@dataclass(frozen=True)
class TrainConfig:
    """``train.*``: seed, validation split, device, data path (in memory or streamed) and resume behaviour."""

    seed: int = 42
    # Share of items (by a hash of item_id) held out for validation.
    val_fraction: float = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = False
    # Datasets up to this size are loaded once and kept on the device; larger ones stream.
    in_memory_max_mb: int = 2048
    # Parallel Petastorm reader workers when streaming.
    reader_workers: int = 2
    # Streaming only: > 0 keeps Petastorm's decoded row groups in a local-disk cache of at most this
    # many MB for the later epochs (Parquet's list decoding is the reader's main cost); 0 = off.
    reader_cache_mb: int = 0
    threads: int = 0  # 0 = torch default (all cores)
    progress: bool = True
    # Reshuffle training rows every epoch (seeded by train.seed, the stage and the epoch).
    shuffle: bool = True
    # Continue an unfinished checkpoint of the same config without --resume (after a crash or kill).
    auto_resume: bool = True
    # When no checkpoint to resume can be read (all truncated or corrupt): start afresh (true) or stop
    # with an error naming the files (false). A readable older checkpoint is always used first.
    restart_on_bad_checkpoint: bool = False
    # Split-aware training, the field's protocol (MNIST's 60,000 training / 10,000 test images): when
    # set, only items whose column of this name in `items/` equals `train_value` are trained on (and
    # PCA/UMAP fitted on, and the val_fraction hold-out drawn from); every other item is held out and
    # is what evaluation scores. Empty: the hash split by val_fraction alone.
    split_column: str = ""
    train_value: str = "train"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self) -> None:
        if self.split_column and not self.train_value:
            raise ValueError("train.train_value: must be non-empty when train.split_column is set")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"train.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.reader_cache_mb < 0:
            raise ValueError(f"train.reader_cache_mb: must be >= 0, got {self.reader_cache_mb}")
        if self.in_memory_max_mb < 0:
            raise ValueError(f"train.in_memory_max_mb: must be >= 0, got {self.in_memory_max_mb}")


def _check_phase(name: str, epochs: int, lr: float, batch_size: int, allow_zero_epochs: bool = True) -> None:
    if epochs < 0 or (epochs == 0 and not allow_zero_epochs):
        raise ValueError(f"{name}.epochs: must be >= 0, got {epochs}")
    if lr <= 0:
        raise ValueError(f"{name}.lr: must be > 0, got {lr}")
    if batch_size < 1:
        raise ValueError(f"{name}.batch_size: must be >= 1, got {batch_size}")


@dataclass(frozen=True)
class EvaluateConfig:
    """Map-quality evaluation on the validation split (``sae evaluate``, and after training)."""

    # k of the kNN label accuracy (or genre share) and of trustworthiness/continuity.
    k_knn: int = 5
    k_tw: int = 12
    # The kNN and rank metrics are O(n^2): at most this many validation items (a seeded sample) are
    # scored; the squared errors always use every validation item.
    max_items: int = 2000
    # PCA is fitted on at most this many training items (a seeded sample).
    max_fit_items: int = 20000
    seed: int = 0
    # The UMAP baseline, when umap-learn is installed (an optional extra; skipped with a note if not).
    umap: bool = False
    # Evaluate at the end of `sae train`, into the same MLflow run.
    after_train: bool = True

    def __post_init__(self) -> None:
        if self.k_knn < 1 or self.k_tw < 1:
            raise ValueError(f"evaluate.k_knn and evaluate.k_tw: must be >= 1, got {self.k_knn}, {self.k_tw}")
        if self.max_items <= 2 * self.k_tw:
            raise ValueError(f"evaluate.max_items: must exceed 2 * evaluate.k_tw = {2 * self.k_tw}, got {self.max_items}")
        if self.max_fit_items < 1:
            raise ValueError(f"evaluate.max_fit_items: must be >= 1, got {self.max_fit_items}")
