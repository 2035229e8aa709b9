"""Training the stacked autoencoder: layer-wise pretraining, then fine-tuning of the unrolled net.

``train(...)`` is the one function a job calls. ``Trainer`` knows stages, epochs, optimisers,
checkpoints and callbacks; the model knows only its layers. Every epoch ends in an atomic
checkpoint; a run resumes from it (same MLflow run) to the same weights as an uninterrupted run,
because each epoch's data order and noise come from ``(seed, stage, epoch)`` and the model,
optimizer and RNG states are restored.

With ``world_size > 1`` (a process group already initialised, see ``sae_model.distributed``) every
rank runs the same stages in lock-step: each takes its share of every global batch, gradients are
summed over ranks weighted by rows (so the update equals the single-process update of the same
global batch), every rank keeps identical weights, and only rank 0 logs and checkpoints.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_model import checkpoint as ckpt
from sae_model import health
from sae_model.callbacks import Callback
from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.data import InMemorySource, StreamingSource, epoch_seed, open_source, read_labels, read_split
from sae_model.model import StackedAutoencoder, init_weights
from sae_model.neighbor_graph import GraphBatch, NeighbourGraph, RowBatch
from sae_model.neighbor_loss import (
    neighbor_loss,
    tsne_edge_loss,
    tsne_row_loss,
    umap_ab,
    umap_edge_loss,
    umap_row_loss,
)
from sae_model.pretrain import (
    DecoderBiasInit,
    autoencoder_step,
    corrupt,
    inputs_for_layer,
    rbm_params,
    rbm_step,
    reconstruct_layer,
    reduction_scale,
    tie_rbm_init,
)


def _denormals_flushed() -> bool:
    return (torch.tensor([1e-39]) * 0.5).item() == 0.0  # 1e-39 is subnormal in float32


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Subnormal floats (|x| < 1.2e-38) computed as zero on the CPU meanwhile. A sigmoid stack that
    saturates (the talk's Tag Genome settings do, on generated data) fills its backward pass with
    them, and x86 handles each in microcode: fine-tuning epochs took 46 s instead of 7.4 s."""
    before = _denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


def stage_cost(stage: Stage, layers: list[int]) -> float:
    """Relative compute of one row in one epoch of ``stage`` (weights touched, backward counted
    twice): what the ETA scales measured epochs by to guess the stages not started yet."""
    weights = [a * b for a, b in zip(layers[:-1], layers[1:], strict=True)]
    if stage.kind == "pretrain" and stage.layer is not None:
        return sum(weights[: stage.layer]) + 2 * 3 * weights[stage.layer]  # frozen layers forward only
    return 2 * 3 * sum(weights)


def eta_seconds(
    stages: list[Stage], stage: Stage, epoch: int, spent: dict[int, tuple[float, int]], layers: list[int]
) -> float:
    """Seconds left after ``epoch`` of ``stage``, from ``spent`` (stage index -> seconds, epochs run
    in this process): the stage's remaining epochs at its own measured pace, later stages at the
    pace measured so far per unit of :func:`stage_cost`. (One average over all epochs misled: the
    talk's fine-tuning epochs take 10x a pretraining epoch, and the ETA grew all through them.)"""
    secs, n = spent[stage.index]
    left = secs / n * (stage.epochs - epoch - 1)
    per_cost = sum(t for t, _ in spent.values()) / sum(k * stage_cost(stages[i], layers) for i, (_, k) in spent.items())
    return left + sum(later.epochs * stage_cost(later, layers) * per_cost for later in stages[stage.index + 1 :])

log = logging.getLogger(__name__)



class TrainingError(ValueError):
    """Settings that cannot train (the message names the key), found before any epoch runs, or for an
    input check on the data itself at the end of the first epoch that reads it."""


class TrainingDiverged(RuntimeError):
    """A loss became NaN/Inf; the last good checkpoint is kept."""


@dataclass(frozen=True)
class Stage:
    """One stage of a run: a pretraining level (``layer``) or fine-tuning (``layer`` None), with its epochs
    and batch size in rows."""

    index: int
    kind: str  # "pretrain" | "finetune"
    layer: int | None  # pretraining level, None for fine-tuning
    epochs: int
    batch_size: int

    @property
    def name(self) -> str:
        return f"pretrain/layer{self.layer}" if self.kind == "pretrain" else "finetune"


@dataclass
class EpochRecord:
    """One finished epoch of one stage: train and validation loss, and its wall time in seconds."""

    stage_index: int
    stage_name: str
    epoch: int
    train_loss: float
    val_loss: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The record as a plain dict (the entry ``Trainer.history`` and the checkpoint keep)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class MlflowSettings:
    """Plain MLflow values (the job builds them from its root config)."""

    tracking_uri: str
    experiment: str = "sae"
    registered_model: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # every resolved config value
    tags: dict[str, str] = field(default_factory=dict)
    config_text: str = ""  # the resolved config, logged as an artefact
    enabled: bool = True


@dataclass
class TrainResult:
    """What ``train`` returns: the registered model's URI, run and version (None when not logged or
    registered), the final metrics, the checkpoint directory, the model and the health verdict."""

    model_uri: str | None
    run_id: str | None
    model_version: str | None
    metrics: dict[str, float]
    checkpoint_dir: str
    model: StackedAutoencoder | None = None
    health: str = "ok"  # sae_model.health: "ok" | "unhealthy" (then the model is not registered)
    health_findings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- checks and set-up


def check_settings(model_cfg: ModelConfig, pretrain_cfg: PretrainConfig, finetune_cfg: FinetuneConfig) -> None:
    """Fail before reading data on settings this trainer cannot honour."""
    if finetune_cfg.loss == "bce" and model_cfg.output_activation != "sigmoid":
        raise TrainingError("finetune.loss=bce needs model.output_activation=sigmoid (cross-entropy of [0,1] data)")
    if pretrain_cfg.method == "rbm" and model_cfg.activation != "sigmoid":
        raise TrainingError(
            f"pretrain.method=rbm needs logistic hidden units (model.activation=sigmoid), got {model_cfg.activation}"
        )


def resolve_device(name: str) -> torch.device:
    """The torch device for ``train.device``: "auto" is CUDA when available, else CPU. Raises
    ``TrainingError`` for "cuda" without a CUDA device; torch raises RuntimeError on an unknown name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device=cuda but no CUDA device is available; use train.device=auto or cpu")
    return torch.device(name)


def build_model(model_cfg: ModelConfig, seed: int) -> StackedAutoencoder:
    """A new ``StackedAutoencoder`` for ``model_cfg``, its weights drawn by ``model.init`` from ``seed``
    (seeds torch's global RNG too). Raises ValueError on too few layers, an unknown activation or init
    scheme."""
    torch.manual_seed(seed)
    model = StackedAutoencoder(
        list(model_cfg.layers), model_cfg.activation, model_cfg.code_activation, model_cfg.output_activation
    )
    init_weights(model, model_cfg.init, torch.Generator().manual_seed(seed))
    return model


def make_optimizer(
    params: list[torch.nn.Parameter], kind: str, lr: float, momentum: float, wd: float, grads_join_later: bool = False
) -> torch.optim.Optimizer:
    """Adam when ``kind`` is "adam", else SGD with ``momentum``; ``wd`` is the L2 weight decay. Fused when
    every parameter is float32/float64 on CPU or CUDA, except SGD when ``grads_join_later`` (some
    parameters get their first gradient after others have momentum)."""
    # Fused: one multi-threaded pass over all parameters instead of a Python loop of small kernels
    # per tensor (0.6 ms of a 23 ms step for 1128-1000-500-250-2 on two cores). torch's fused SGD
    # fails (TypeError) on a step where some parameters have a momentum buffer and others not yet.
    fused = all(q.dtype in (torch.float32, torch.float64) and q.device.type in ("cpu", "cuda") for q in params)
    fused = fused and not (grads_join_later and kind != "adam")
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, fused=fused or None)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, fused=fused or None)


def reconstruction_loss(model: StackedAutoencoder, x: torch.Tensor, z: torch.Tensor, bce: bool) -> torch.Tensor:
    """Mean reconstruction loss of input ``x`` (float tensor (batch, d0)) from codes ``z`` (batch, dL): binary
    cross-entropy on the decoder's logits when ``bce``, else mean squared error. A 0-d tensor."""
    if bce:
        return F.binary_cross_entropy_with_logits(model.decode_logits(z), x)
    return F.mse_loss(model.decode(z), x)


def finetune_loss(
    model: StackedAutoencoder,
    x: torch.Tensor,
    bce: bool,
    cfg: FinetuneConfig | None = None,
    generator: torch.Generator | None = None,
    train: bool = True,
) -> torch.Tensor:
    """The fine-tuning objective of one batch.

    mse/bce: the reconstruction error. tsne/umap (``cfg.loss``): the neighbour loss of the batch's
    codes against affinities computed from the batch's own inputs (nothing outside the batch is
    needed, so a streamed table is never collected), plus ``cfg.recon_weight`` x the MSE
    reconstruction error so that the decoder stays usable; the decoder is not run at weight 0.
    In training steps the encoder sees ``cfg.corruption`` masking noise; the targets stay clean.
    """
    z = model.encode(corrupt(x, cfg.corruption, generator) if cfg is not None and train else x)
    if cfg is None or not cfg.is_neighbor_loss:
        return reconstruction_loss(model, x, z, bce)
    if x.shape[0] >= 2:
        # Affinities in float64 and the code similarities in float32, also under bf16 autocast.
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = neighbor_loss(cfg.loss, x.float(), z.float(), cfg, generator)
    else:
        loss = z.float().sum() * 0.0  # a lone leftover row has no neighbours
    if cfg.recon_weight > 0:
        loss = loss + cfg.recon_weight * reconstruction_loss(model, x, z, bce=False)
    return loss


def graph_loss(
    model: StackedAutoencoder, x_train: torch.Tensor, batch: GraphBatch, cfg: FinetuneConfig, generator: torch.Generator
) -> tuple[torch.Tensor, int]:
    """The neighbour loss of one step on a global graph (sampled edges + uniform rows), and its row count.

    Heads, tails and uniform rows go through the encoder in one pass (with ``cfg.corruption`` masking
    noise; the graph is the clean rows'); ``cfg.recon_weight`` adds the MSE reconstruction of the
    uniform rows.
    """
    rows = torch.cat([batch.head, batch.tail, batch.uniform])
    x = x_train[rows]
    z = model.encode(corrupt(x, cfg.corruption, generator))
    e = batch.head.numel()
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float()
        zh, zt, zu = zf[:e], zf[e : 2 * e], zf[2 * e :]
        if cfg.loss == "tsne":
            loss = tsne_edge_loss(zh, zt, zu, cfg.tsne_dof, cfg.tsne_exaggeration)
        else:
            a, b = umap_ab(cfg.min_dist, cfg.spread)
            loss = umap_edge_loss(zh, zt, zu, a, b, cfg.negative_sample_rate, generator)
    if cfg.recon_weight > 0:
        loss = loss + cfg.recon_weight * reconstruction_loss(model, x[2 * e :], z[2 * e :], bce=False)
    return loss, rows.numel()


def row_graph_loss(
    model: StackedAutoencoder,
    x_train: torch.Tensor,
    batch: RowBatch,
    bank: torch.Tensor,
    graph: NeighbourGraph,
    cfg: FinetuneConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, int]:
    """The neighbour loss of one ``graph_sampling=rows`` step, and its row count.

    The batch's rows go through the encoder (with ``cfg.corruption`` masking noise); their edges'
    other ends and the repelling pool are read from ``bank`` ((n, code) float32, no gradient), which
    then takes the rows' new codes. ``cfg.recon_weight`` adds the rows' MSE reconstruction.
    """
    x = x_train[batch.rows]
    z = model.encode(corrupt(x, cfg.corruption, generator))
    with torch.autocast(device_type=z.device.type, enabled=False):
        zf = z.float()
        z_tail, z_pool = bank[batch.tail], bank[batch.pool]
        self_pair = batch.rows[:, None] == batch.pool[None, :]
        if cfg.loss == "tsne":
            loss = tsne_row_loss(zf, batch.seg, z_tail, batch.weight, z_pool, self_pair, cfg.tsne_dof,
                                 cfg.tsne_exaggeration)
        else:
            a, b = umap_ab(cfg.min_dist, cfg.spread)
            loss = umap_row_loss(zf, batch.seg, z_tail, batch.weight, z_pool, self_pair, a, b,
                                 cfg.negative_sample_rate, graph.mean_degree)
        bank[batch.rows] = zf.detach()
    if cfg.recon_weight > 0:
        loss = loss + cfg.recon_weight * reconstruction_loss(model, x, z, bce=False)
    return loss, batch.rows.numel()


@torch.no_grad()
def encode_all(model: StackedAutoencoder, x: torch.Tensor, block: int = 4096) -> torch.Tensor:
    """Codes (n, code) float32 of all rows ``x`` (n, d), in blocks, without gradient or noise."""
    return torch.cat([model.encode(x[s : s + block]).float() for s in range(0, x.shape[0], block)])


# ---------------------------------------------------------------- the trainer


class Trainer:
    """Runs the stages of one model on one data source: optimizers, epochs, validation loss, divergence
    checks, checkpoints and callbacks, on one rank of ``world_size``. Raises ValueError when
    ``finetune.neighbor_graph=global`` meets streamed or distributed data."""

    def __init__(
        self,
        model: StackedAutoencoder,
        pretrain_cfg: PretrainConfig,
        finetune_cfg: FinetuneConfig,
        train_cfg: TrainConfig,
        source: InMemorySource | StreamingSource,
        device: torch.device,
        checkpoint_dir: str | Path,
        callbacks: list[Callback] | None = None,
        fingerprint: str = "",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.model = model.to(device)
        self.pre, self.fine, self.tc = pretrain_cfg, finetune_cfg, train_cfg
        self.source, self.device = source, device
        self.checkpoint_dir = Path(checkpoint_dir)
        self.callbacks = callbacks or []
        self.fingerprint = fingerprint
        self.rank, self.world_size = rank, world_size
        self.history: list[dict[str, Any]] = []
        self.run_id: str | None = None
        self.step = 0  # epochs completed over all stages
        self.optimizer: torch.optim.Optimizer | None = None
        self._val_rows = -1
        self.progress = train_cfg.progress and sys.stderr.isatty()
        self.amp = train_cfg.mixed_precision and device.type == "cuda"
        self.distributed = world_size > 1
        self.graph: NeighbourGraph | None = None
        if finetune_cfg.uses_global_graph:
            if source.streaming or self.distributed:
                raise TrainingError(
                    "finetune.neighbor_graph=global needs every training row in one process: the in-memory "
                    "data path (raise train.in_memory_max_mb) and train.distributed.num_processes=1; "
                    "use finetune.neighbor_graph=batch for streamed or distributed training"
                )

    # ---- stages

    def stages(self) -> list[Stage]:
        """The run's stages in order: one pretraining stage per layer (unless ``pretrain.method`` is "none" or
        its epochs are 0), then fine-tuning."""
        out: list[Stage] = []
        if self.pre.method != "none" and self.pre.epochs > 0:
            for layer in range(self.model.depth):
                out.append(Stage(len(out), "pretrain", layer, self.pre.epochs, self.pre.batch_size))
        out.append(Stage(len(out), "finetune", None, self.fine.epochs, self.fine.effective_batch_size))
        return out

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages())

    def _optimizer_for(self, stage: Stage) -> torch.optim.Optimizer:
        m = self.model
        if stage.kind == "finetune":
            c = self.fine
            params = list(m.parameters())
        else:
            c = self.pre
            layer = stage.layer
            params = (
                rbm_params(m, layer)
                if self.pre.method == "rbm"
                else list(m.encoders[layer].parameters()) + list(m.decoders[layer].parameters())
            )
        lr = c.lr
        if stage.kind == "pretrain" and self.pre.method == "rbm" and stage.layer == m.depth - 1:
            lr *= self.pre.rbm_linear_lr_scale
        if stage.kind == "pretrain" and self.pre.method == "autoencoder" and stage.layer == m.depth - 1 and m.code_activation == "linear":
            lr *= self.pre.linear_code_lr_scale
        # {pretrain,finetune}.loss_reduction=sum: the step of the L2 cost summed over the reconstructed dims.
        rbm = stage.kind == "pretrain" and self.pre.method == "rbm"
        scale = 1.0 if rbm else reduction_scale(c.loss_reduction, m.layers[stage.layer or 0], c.optimizer)
        if c.optimizer == "adam" and self._count_scale(stage) != 1.0:
            # The encoder holds count_scale x the RBM's weights (rbm_step). Adam's step ignores the
            # gradient's scale, so the weights' rate is count_scale x lr (their step count_scale x the
            # RBM's, as under SGD); the biases are the RBM's own.
            w, *biases = params
            opt = make_optimizer([w], c.optimizer, lr * self._count_scale(stage), c.momentum, c.weight_decay)
            opt.add_param_group({"params": biases, "lr": lr})
            return opt
        # The decoder's first gradient comes with the reconstruction term (finetune.recon_weight_after).
        later = stage.kind == "finetune" and self.fine.recon_weight_after > 0
        return make_optimizer(params, c.optimizer, lr * scale, c.momentum, c.weight_decay / scale, grads_join_later=later)

    def _decay_lr(self, stage: Stage, epoch: int) -> None:
        """finetune.lr_decay: this epoch's rate, a function of the epoch alone (resume-safe)."""
        if stage.kind != "finetune" or self.fine.lr_decay == "none":
            return
        after = self.fine.lr_decay_after
        t = max(0, epoch - after) / (stage.epochs - after)
        factor = 1.0 - t if self.fine.lr_decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * t))
        for group in self.optimizer.param_groups:
            group["lr"] = self.fine.lr * factor

    # ---- checkpoints

    def _state(self) -> dict[str, Any]:
        return {
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else {},
            "rng": ckpt.rng_state(self.device),
        }

    def save(self, stage: Stage, epoch: int, finished: bool = False) -> None:
        """Write the atomic checkpoint after ``epoch`` of ``stage`` (weights, optimizer, RNG, history,
        fingerprint) and call each callback's ``on_checkpoint``; only rank 0 writes, the others return."""
        if self.rank != 0:
            return
        meta = {
            "step": self.step,
            "stage_index": stage.index,
            "stage_name": stage.name,
            "epoch": epoch,
            "run_id": self.run_id,
            "seed": self.tc.seed,
            "fingerprint": self.fingerprint,
            "history": self.history,
            "finished": finished,
            "spec": self.model.spec(),
        }
        ckpt.save_checkpoint(self.checkpoint_dir, self._state(), meta)
        for cb in self.callbacks:
            cb.on_checkpoint(self, stage, epoch, finished)

    def restore(self) -> tuple[int, int] | None:
        """Load the last checkpoint; returns ``(stage_index, next_epoch)`` to continue from, or None."""
        found = ckpt.load_checkpoint(self.checkpoint_dir)
        if found is None:
            return None
        state, meta = found
        if self.fingerprint and meta.get("fingerprint") not in ("", None, self.fingerprint):
            raise TrainingError(
                f"checkpoint in {self.checkpoint_dir} is from another configuration "
                f"({meta.get('fingerprint')} != {self.fingerprint}); remove it or choose another directory"
            )
        self.model.load_state_dict(state["model"])
        self.history = list(meta.get("history", []))
        self.run_id = meta.get("run_id")
        self.step = int(meta["step"])
        stages = self.stages()
        si, ep = int(meta["stage_index"]), int(meta["epoch"])
        ckpt.set_rng_state(state["rng"], self.device)
        if ep + 1 < stages[si].epochs:
            self.optimizer = self._optimizer_for(stages[si])
            if state["optimizer"]:
                self.optimizer.load_state_dict(state["optimizer"])
            return si, ep + 1
        self.optimizer = None
        return si + 1, 0

    # ---- epochs

    def _batches(self, stage: Stage, seed: int) -> Iterator[torch.Tensor]:
        shard = (self.rank, self.world_size) if self.distributed else None
        it = self.source.batches("train", stage.batch_size, shuffle=self.tc.shuffle, seed=seed, shard=shard)
        if not self.progress or self.rank != 0:
            return it
        from tqdm import tqdm

        n = self.source.n_train
        total = math.ceil(n / stage.batch_size) if n else None
        return tqdm(it, total=total, desc=f"{stage.name} epoch", unit="batch", leave=False, file=sys.stderr)

    def _graph(self) -> NeighbourGraph | None:
        """The global neighbour graph, built on first use (and again after a resume: it is exact)."""
        if self.graph is None and self.fine.uses_global_graph:
            t0 = time.monotonic()
            try:
                self.graph = NeighbourGraph(self.source.train, self.fine.loss, self.fine)
            except ValueError as exc:  # too few training rows for a graph: a setting that cannot train
                raise TrainingError(str(exc)) from exc
            log.info("neighbour graph: %d edges in %.1fs", self.graph.n_edges, time.monotonic() - t0)
        return self.graph

    def _autocast(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp)

    def train_epoch(self, stage: Stage, epoch: int) -> float:
        """One epoch of ``stage``; returns the mean training loss per row (over all ranks' rows).

        The one epoch loop, for one process and for ``world_size > 1``: there every rank takes its
        share of each global batch, the gradients are summed over ranks weighted by rows before each
        optimizer step, and a rank whose shard ran out (streaming shards are whole row groups, hence
        uneven) still joins each all-reduce with zero gradients until all are done.
        """
        seed = epoch_seed(self.tc.seed, stage.index, epoch)
        # Rank 0 (and a single process) draws the single-process noise; the others their own.
        gen = torch.Generator(device=self.device).manual_seed(seed + 7919 * self.rank)
        m = self.model
        m.train()
        total = torch.zeros((), device=self.device, dtype=torch.float64)  # summed on the device:
        count = torch.zeros((), device=self.device, dtype=torch.float64)  # one host sync per epoch
        bce = self.fine.loss == "bce"
        fine_cfg = self.fine.at_epoch(epoch)
        opt = self.optimizer
        rbm = stage.kind == "pretrain" and self.pre.method == "rbm"
        # The constrained Poisson unit's rates are shares of a row's total: a negative input has no
        # meaning there. Checked on the device and read with the epoch's loss (no extra host sync).
        counts = self._counts_stage(stage)
        negative = torch.zeros((), device=self.device, dtype=torch.long)
        graph = self._graph() if stage.kind == "finetune" else None
        bank = None
        if graph is None:
            batches = self._batches(stage, seed)
        elif fine_cfg.graph_sampling == "rows":
            bank = encode_all(m, self.source.train)  # the epoch's codes; each step refreshes its rows
            batches = graph.row_batches(stage.batch_size, seed)
        else:
            batches = graph.batches(stage.batch_size, seed)
        for xb, scale in self._lockstep(batches):
            sync = None if not self.distributed else functools.partial(self._sync_grads, scale)
            if xb is None:  # nothing here this step: join the all-reduce with zero gradients
                opt.zero_grad(set_to_none=True)
                sync()
                opt.step()
                if rbm:
                    with torch.no_grad():
                        m.decoders[stage.layer].weight.copy_(m.encoders[stage.layer].weight.t())
                continue
            if stage.kind == "finetune":
                with self._autocast():
                    if isinstance(xb, GraphBatch):  # row indices of sampled edges and uniform rows
                        loss, n = graph_loss(m, self.source.train, xb, fine_cfg, gen)
                    elif isinstance(xb, RowBatch):  # rows with all their edges, the rest from the bank
                        loss, n = row_graph_loss(m, self.source.train, xb, bank, graph, fine_cfg, gen)
                    else:
                        # Neighbour losses: affinities within this rank's part of the global batch.
                        loss, n = finetune_loss(m, xb, bce, fine_cfg, gen), xb.shape[0]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if sync is not None:
                    sync()
                opt.step()
                loss = loss.detach()
            else:
                n = xb.shape[0]
                x = inputs_for_layer(m, xb, stage.layer)
                if counts:
                    negative += (x < 0).any(1).sum()
                if rbm:
                    loss = rbm_step(m, stage.layer, x, opt, self.pre.cd_k, gen, before_step=sync,
                                    visible_units=self.pre.rbm_visible, count_scale=self._count_scale(stage))
                else:
                    with self._autocast():
                        loss = autoencoder_step(m, stage.layer, x, opt, self.pre.corruption, bce, gen, before_step=sync)
            total += loss.double() * n
            count += n
        if self.distributed:
            import torch.distributed as dist

            stats = torch.stack([total, count, negative.double()])
            dist.all_reduce(stats)
            total, count, negative = stats[0], stats[1], stats[2].long()
        if counts and int(negative.item()):
            raise self._negative_inputs(int(negative.item()), "training")
        return float(total.item() / max(count.item(), 1))

    def _counts_stage(self, stage: Stage) -> bool:
        """Whether ``stage`` is the first RBM with constrained Poisson visible units (``pretrain.rbm_visible``):
        its training and validation inputs are checked for negatives, and it models them x
        ``pretrain.rbm_count_scale`` (``rbm_step``)."""
        return (stage.kind == "pretrain" and stage.layer == 0 and self.pre.method == "rbm"
                and self.pre.rbm_visible == "constrained_poisson")

    def _count_scale(self, stage: Stage) -> float:
        return self.pre.rbm_count_scale if self._counts_stage(stage) else 1.0

    def _negative_inputs(self, rows: int, where: str) -> TrainingError:
        return TrainingError(
            f"pretrain.rbm_visible=constrained_poisson needs non-negative inputs (counts or their weights): "
            f"{rows} {where} rows have a negative value; use pretrain.rbm_visible=model"
        )

    def _lockstep(self, batches: Iterator[Any]) -> Iterator[tuple[Any, float]]:
        """``(batch, this rank's share of the global batch's rows)``; in one process every batch with
        share 1. Distributed: each step first sums the ranks' row counts, so every rank takes the
        same number of steps; a rank with no rows left gets ``(None, 0.0)`` until all are done."""
        if not self.distributed:
            for xb in batches:
                yield xb, 1.0
            return
        import torch.distributed as dist

        it = iter(batches)
        n_t = torch.zeros(1, device=self.device, dtype=torch.int64)
        while True:
            xb = next(it, None)
            n = 0 if xb is None else xb.shape[0]
            n_t.fill_(n)
            dist.all_reduce(n_t)
            n_all = int(n_t.item())
            if n_all == 0:
                return
            yield xb, n / n_all

    # ---- distributed (world_size > 1)

    def _sync_grads(self, scale: float) -> None:
        """Sum ``scale * grad`` over ranks in one flat all-reduce: the row-weighted mean gradient."""
        import torch.distributed as dist

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]) * scale
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            k = p.numel()
            p.grad.copy_(flat[offset : offset + k].view_as(p.grad))
            offset += k

    def broadcast_weights(self) -> None:
        """Make every rank start from rank 0's weights (they are equal by seed; this makes it certain)."""
        if not self.distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for t in self.model.state_dict().values():
                dist.broadcast(t, src=0)

    @torch.no_grad()
    def evaluate(self, stage: Stage | None, epoch: int | None = None) -> float:
        """Validation loss of ``stage`` (its shallow autoencoder, or the whole net; None = whole net, MSE), with
        fine-tuning's settings of ``epoch`` (``FinetuneConfig.at_epoch``)."""
        m = self.model
        m.eval()
        total, count = 0.0, 0
        bce = self.fine.loss == "bce"
        fine = stage is not None and stage.kind == "finetune"
        # A neighbour loss is validated on batches of the training size: its value depends on it.
        size = self.fine.effective_batch_size if fine and self.fine.is_neighbor_loss else 4096
        gen = torch.Generator(device=self.device).manual_seed(self.tc.seed)
        fine_cfg = self.fine.at_epoch(epoch) if fine else None
        for xb in self.source.batches("val", size, shuffle=False):
            if stage is None or stage.kind == "finetune":
                loss = finetune_loss(m, xb, bce and fine, fine_cfg, gen, train=False)
            else:
                layer = stage.layer
                x = inputs_for_layer(m, xb, layer)
                if self._counts_stage(stage) and (negative := int((x < 0).any(1).sum())):
                    raise self._negative_inputs(negative, "validation")
                loss = F.mse_loss(reconstruct_layer(m, layer, x, self.pre.rbm_visible), x)
            total += float(loss) * xb.shape[0]
            count += xb.shape[0]
        self._val_rows = count
        return total / count if count else float("nan")

    def fit(self, start: tuple[int, int] | None = None) -> None:
        """Run every stage from ``start`` (stage index, epoch; None: the beginning) with subnormals flushed to
        zero, checkpointing after each epoch and once more when finished. Raises ``TrainingDiverged`` when
        a train or validation loss is NaN/Inf."""
        with flush_denormals():
            self._fit(start)

    def _fit(self, start: tuple[int, int] | None = None) -> None:
        stages = self.stages()
        si0, ep0 = start or (0, 0)
        spent: dict[int, tuple[float, int]] = {}  # stage index -> (seconds, epochs) in this process
        for cb in self.callbacks:
            cb.on_fit_start(self)
        self.broadcast_weights()
        for stage in stages[si0:]:
            first = ep0 if stage.index == si0 else 0
            if stage.epochs == 0:
                continue
            if first == 0 or self.optimizer is None:
                if stage.kind == "pretrain" and self.pre.method == "rbm" and first == 0:
                    tie_rbm_init(self.model, stage.layer, torch.Generator().manual_seed(self.tc.seed + stage.index),
                                 self._count_scale(stage))
                self.optimizer = self._optimizer_for(stage)
            for cb in self.callbacks:
                cb.on_stage_start(self, stage)
            for epoch in range(first, stage.epochs):
                t0 = time.monotonic()
                self._decay_lr(stage, epoch)
                train_loss = self.train_epoch(stage, epoch)
                val_loss = self.evaluate(stage, epoch)
                # No validation rows (train.val_fraction=0) gives a NaN validation loss: not a divergence.
                val_ok = math.isfinite(val_loss) or (math.isnan(val_loss) and self._val_rows == 0)
                if not (math.isfinite(train_loss) and val_ok):
                    where = f"layer {stage.layer}, " if stage.layer is not None else ""
                    raise TrainingDiverged(
                        f"training diverged in {stage.kind} ({where}epoch {epoch + 1}/{stage.epochs}): "
                        f"train loss {train_loss}, validation loss {val_loss}. The last good checkpoint is kept in "
                        f"{self.checkpoint_dir}; lower {stage.kind}.lr (now "
                        f"{self.pre.lr if stage.kind == 'pretrain' else self.fine.lr})"
                    )
                rec = EpochRecord(stage.index, stage.name, epoch, train_loss, val_loss, time.monotonic() - t0)
                self.history.append(rec.as_dict())
                self.step += 1
                for cb in self.callbacks:
                    cb.on_epoch_end(self, stage, rec)
                secs, n = spent.get(stage.index, (0.0, 0))
                spent[stage.index] = (secs + time.monotonic() - t0, n + 1)
                val_text = "no validation rows" if self._val_rows == 0 else f"validation {val_loss:.6g}"
                log.info(
                    "%s epoch %d/%d: train %.6g, %s (%.1fs; ETA %.0fs)",
                    stage.name, epoch + 1, stage.epochs, train_loss, val_text, rec.seconds,
                    eta_seconds(stages, stage, epoch, spent, self.model.layers),
                )
                self.save(stage, epoch, finished=False)
        self.save(stages[-1], stages[-1].epochs - 1, finished=True)

    @torch.no_grad()
    def validation_report(self) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
        """Hinton's measure (mean over validation items of the summed squared error), codes, ids, inputs."""
        m = self.model.eval()
        ids, x = self.source.validation_arrays()
        codes, sq = [], []
        for s in range(0, x.shape[0], 4096):
            xb = x[s : s + 4096]
            z = m.encode(xb)
            sq.append(((m.decode(z) - xb) ** 2).sum(1).double().cpu())
            codes.append(z.float().cpu())
        if not sq:
            return {}, np.zeros((0, m.code_width), np.float32), ids, x.cpu().numpy()
        err = torch.cat(sq)
        metrics = {"val_sq_error_per_item": float(err.mean()), "val_mse": float(err.mean() / m.input_width)}
        return metrics, torch.cat(codes).numpy(), ids, x[:2].float().cpu().numpy()


# ---------------------------------------------------------------- callbacks


class MlflowCallback(Callback):
    """Per-epoch train/validation loss per stage (``pretrain/layer0/train_loss``, ``finetune/val_loss``)."""

    def on_epoch_end(self, trainer: Trainer, stage: Stage, record: EpochRecord) -> None:
        """Log the epoch's train and validation loss under the stage's name, step = epoch + 1."""
        import mlflow

        mlflow.log_metrics(
            {f"{stage.name}/train_loss": record.train_loss, f"{stage.name}/val_loss": record.val_loss},
            step=record.epoch + 1,
        )


class FunctionCallback(Callback):
    """A callback that calls ``fn(trainer, stage, record)`` at the end of each epoch."""

    def __init__(self, fn: Callable[[Trainer, Stage, EpochRecord], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, stage: Stage, record: EpochRecord) -> None:
        """Call ``fn`` with this epoch's trainer, stage and record."""
        self.fn(trainer, stage, record)


# ---------------------------------------------------------------- the entry point


def warm_start(model: StackedAutoencoder, init_from: str) -> None:
    """Copy the weights of the model at ``init_from`` into ``model`` (a resumed run restores over them)."""
    from sae_model.loading import load_encoder

    source = load_encoder(init_from).model
    if list(source.layers) != list(model.layers):
        raise TrainingError(
            f"warm start from {init_from}: its layers {list(source.layers)} differ from model.layers "
            f"{list(model.layers)}; train from scratch or match model.layers"
        )
    model.load_state_dict(source.state_dict())
    log.info("warm start: weights from %s", init_from)


@dataclass(frozen=True)
class TrainRequest:
    """One training run, as a job composes it from the root config (``pipelines.training``); what
    ``fit`` runs and what distributed training hands every rank (so every field must pickle)."""

    model_cfg: ModelConfig
    pretrain_cfg: PretrainConfig
    finetune_cfg: FinetuneConfig
    train_cfg: TrainConfig
    features_uri: str
    items_uri: str | None
    mlflow_settings: MlflowSettings
    checkpoint_dir: str | Path
    resume: bool = False
    fingerprint: str = ""  # which checkpoints this run may resume (e.g. the config hash)
    callbacks: tuple[Callback, ...] = ()
    init_from: str | None = None  # warm start: a model URI or saved-model directory


def train(
    model_cfg: ModelConfig,
    pretrain_cfg: PretrainConfig,
    finetune_cfg: FinetuneConfig,
    train_cfg: TrainConfig,
    features_uri: str,
    items_uri: str | None,
    mlflow_settings: MlflowSettings,
    checkpoint_dir: str | Path,
    resume: bool = False,
    fingerprint: str = "",
    callbacks: list[Callback] | None = None,
    rank: int = 0,
    world_size: int = 1,
    init_from: str | None = None,
) -> TrainResult:
    """``fit`` of the ``TrainRequest`` these arguments make (a convenience for scripts and tests)."""
    request = TrainRequest(
        model_cfg, pretrain_cfg, finetune_cfg, train_cfg, features_uri, items_uri, mlflow_settings, checkpoint_dir,
        resume=resume, fingerprint=fingerprint, callbacks=tuple(callbacks or ()), init_from=init_from,
    )
    return fit(request, rank=rank, world_size=world_size)


def fit(request: TrainRequest, rank: int = 0, world_size: int = 1) -> TrainResult:
    """Train on ``request.features_uri``, log the run to MLflow and register the model.

    ``world_size > 1``: call it on every rank of an initialised process group (``sae_model.distributed``);
    only rank 0 logs to MLflow and checkpoints, and only rank 0's result names the model.

    ``init_from`` (a model URI or saved-model directory) warm-starts: its weights replace the fresh
    initialisation (same layer widths required). Set ``pretrain.epochs=0`` to skip pretraining then.

    ``resume=True`` continues from the checkpoint in ``checkpoint_dir`` (an error if there is none);
    with ``train.auto_resume`` an unfinished checkpoint of the same ``fingerprint`` is continued too.
    A finished checkpoint is never resumed: the run starts afresh.
    """
    r = request
    model_cfg, pretrain_cfg, finetune_cfg, train_cfg = r.model_cfg, r.pretrain_cfg, r.finetune_cfg, r.train_cfg
    features_uri, items_uri, mlflow_settings = r.features_uri, r.items_uri, r.mlflow_settings
    resume, fingerprint, init_from = r.resume, r.fingerprint, r.init_from
    check_settings(model_cfg, pretrain_cfg, finetune_cfg)
    device = resolve_device(train_cfg.device)
    if train_cfg.threads > 0:
        torch.set_num_threads(train_cfg.threads)
    checkpoint_dir = Path(r.checkpoint_dir)
    meta = ckpt.load_meta(checkpoint_dir)
    if resume and meta is None:
        raise TrainingError(f"--resume: no checkpoint in {checkpoint_dir}")
    if meta is not None and meta.get("finished") and resume:
        raise TrainingError(f"--resume: the run in {checkpoint_dir} already finished (run {meta.get('run_id')})")
    do_resume = meta is not None and not meta.get("finished") and (resume or train_cfg.auto_resume)
    if meta is not None and not do_resume and rank == 0:
        for f in checkpoint_dir.glob("*"):
            if f.is_file():
                f.unlink()
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has read the checkpoint's meta before rank 0 writes a new one

    # train.split_column: only the training split's rows are ever read into training (issue 19's protocol).
    split = read_split(items_uri, train_cfg.split_column, train_cfg.train_value, train_cfg.val_fraction)
    source = open_source(
        features_uri, model_cfg.layers[0], train_cfg.val_fraction, device, train_cfg.in_memory_max_mb, train_cfg.reader_workers,
        train_cfg.reader_cache_mb, split=split,
    )
    model = build_model(model_cfg, train_cfg.seed)
    if init_from:
        warm_start(model, init_from)
    checkup = health.HealthCallback()
    inits = [DecoderBiasInit()] if pretrain_cfg.decoder_bias == "data_mean" and pretrain_cfg.method == "autoencoder" else []
    trainer = Trainer(
        model, pretrain_cfg, finetune_cfg, train_cfg, source, device, checkpoint_dir,
        callbacks=[*inits, *r.callbacks, checkup], fingerprint=fingerprint, rank=rank, world_size=world_size,
    )
    try:
        start = trainer.restore() if do_resume else None
    except ckpt.CheckpointError as exc:
        if not train_cfg.restart_on_bad_checkpoint:
            raise TrainingError(
                f"{exc}; set train.restart_on_bad_checkpoint=true to start this training afresh "
                f"(or remove {checkpoint_dir})"
            ) from None
        log.warning("%s; starting afresh (train.restart_on_bad_checkpoint=true)", exc)
        trainer.run_id, trainer.step, trainer.history = None, 0, []
        start = None
    if start is not None:
        log.info("resuming from %s at stage %d epoch %d (run %s)", checkpoint_dir, start[0], start[1] + 1, trainer.run_id)

    logging_on = mlflow_settings.enabled and rank == 0
    if not logging_on:
        trainer.fit(start)
        verdict = health.end_of_run(trainer, checkup)
        metrics, _, _, _ = trainer.validation_report()
        return TrainResult(
            None, None, None, metrics, str(checkpoint_dir), trainer.model, verdict.status,
            [f.message() for f in verdict.findings],
        )

    import mlflow

    from sae_model import tracking
    from sae_model.loading import log_model

    tracking.use_experiment(mlflow_settings.experiment, mlflow_settings.tracking_uri)
    trainer.callbacks.append(MlflowCallback())
    fresh = trainer.run_id is None
    with mlflow.start_run(run_id=trainer.run_id) as run:
        try:
            trainer.run_id = run.info.run_id
            if fresh:
                tracking.log_params(mlflow_settings.params)
                if mlflow_settings.config_text:
                    tracking.log_text(mlflow_settings.config_text, "config/resolved.yaml")
            mlflow.set_tags(
                dict(mlflow_settings.tags, device=str(device), data_path="in-memory" if not source.streaming else "petastorm")
            )
            trainer.fit(start)
            verdict = health.end_of_run(trainer, checkup)
            health.log_verdict(verdict)
            metrics, codes, ids, example = trainer.validation_report()
            mlflow.log_metrics(metrics)
            labels = read_labels(items_uri, ids) if codes.shape[1] == 2 else None
            tracking.log_figures(trainer.history, codes, labels)
            info = log_model(
                trainer.model.cpu(),
                name="model",
                # An unhealthy run keeps its logged model for inspection but is never registered.
                registered_model_name=(mlflow_settings.registered_model or None) if verdict.ok else None,
                input_example=example if len(example) else None,
            )
        except BaseException as exc:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"
            mlflow.set_tag("failure", str(exc)[:5000])
            mlflow.end_run(status=status)
            raise
    version = getattr(info, "registered_model_version", None)
    log.info("run %s: model %s (version %s), %s", run.info.run_id, info.model_uri, version, metrics)
    return TrainResult(
        info.model_uri, run.info.run_id, None if version is None else str(version), metrics, str(checkpoint_dir), trainer.model,
        verdict.status, [f.message() for f in verdict.findings],
    )
