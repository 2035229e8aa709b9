"""Model and training settings, owned by the model package, and the pydantic glue every config section
uses.

Each section is a frozen pydantic dataclass (``@section("finetune")``): pydantic coerces and checks
every value against the field's type and constraints (``Field(ge=...)``, ``Literal``), rejects unknown
keys, and a failure becomes one ``ConfigError`` line naming the dotted key
(``finetune.perplexity: must be > 0, got 0``). Plain dataclasses to the rest of the code
(``dataclasses.replace``/``asdict`` work), buildable without Spark; the root config in
``pipelines.config`` composes them and does the YAML layering and the dotted overrides.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import field
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

# The fine-tuning losses that place neighbours (t-SNE's and UMAP's) rather than reconstruct.
NeighbourLoss = Literal["tsne", "umap"]
NEIGHBOUR_LOSSES: tuple[str, ...] = get_args(NeighbourLoss)


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


class FieldError(ValueError):
    """Raised by a cross-field validator: ``key`` (relative to its section) is the field the message is
    about, so the error names ``finetune.min_dist`` rather than the section."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _not_bool(expected: str) -> Callable[[Any], Any]:
    # pydantic reads true as 1; YAML's true in a number's place is a mistake, not a 1.
    def check(value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected {expected}, got {value!r}")
        return value

    return check


def _text(value: Any) -> Any:
    # YAML reads `driver_memory: 4`, `since: 2024-01-31` or `ansi: false` as a number, a date or a
    # boolean; a text setting keeps what was written as text (str(), so the config hash stays as before).
    if isinstance(value, (dict, list)):
        raise ValueError(f"expected a string, got {value!r}")
    return "" if value is None else str(value)


# Value types of the config fields (pydantic's lax coercion, booleans refused as numbers).
Int = Annotated[int, BeforeValidator(_not_bool("an integer"))]
Float = Annotated[float, BeforeValidator(_not_bool("a number"))]
Text = Annotated[str, BeforeValidator(_text)]
Count = Annotated[Int, Field(ge=1)]
NonNegative = Annotated[Int, Field(ge=0)]
PositiveFloat = Annotated[Float, Field(gt=0)]
Share = Annotated[Float, Field(ge=0, lt=1)]  # a fraction in [0, 1)

_SECTION = ConfigDict(extra="forbid")
T = TypeVar("T")


def section(prefix: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``cls`` as a frozen pydantic dataclass whose unknown keys are refused, and whose
    construction (``cls(...)``, ``dataclasses.replace``) raises ``ConfigError`` with one line naming the
    first bad key under the dotted ``prefix`` (``""`` for the root config). Nested sections are validated
    by the root's pydantic validator, so their errors carry the full dotted key too."""

    def wrap(cls: type[T]) -> type[T]:
        cls = pydantic_dataclass(frozen=True, config=_SECTION)(cls)
        init = cls.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except ValidationError as exc:
                raise ConfigError(describe(exc.errors()[0], cls, prefix)) from None

        cls.__init__ = __init__  # type: ignore[method-assign]
        return cls

    return wrap


# A key no field has (invalid_key: YAML's `1: x`, a key that is not even a string).
UNKNOWN_KEY_ERRORS = ("unexpected_keyword_argument", "extra_forbidden", "invalid_key")


def describe(err: Any, cls: type, prefix: str = "") -> str:
    """One error of pydantic's ``ValidationError.errors()`` (validating section ``cls`` at dotted
    ``prefix``) as one line: ``KEY: what is wrong, got VALUE``, or ``unknown config key 'KEY'; known keys
    here: [...]``."""
    loc = list(err["loc"])
    ctx = err.get("ctx") or {}
    kind, got = err["type"], err.get("input")
    if kind in UNKNOWN_KEY_ERRORS:
        known = sorted(f.name for f in dataclasses.fields(type_at(cls, loc[:-1])))
        return f"unknown config key {_dotted(prefix, [*loc[:-1], str(loc[-1])])!r}; known keys here: {known}"
    if kind == "value_error" and isinstance(ctx.get("error"), FieldError):
        loc.append(ctx["error"].key)
    tp = type_at(cls, loc)
    if kind == "value_error":
        what = str(ctx["error"])
    else:
        if kind in ("too_short", "string_too_short") and isinstance(got, str):
            wrong = "must be set"
        elif kind == "literal_error" and typing.get_origin(tp) is Literal:
            wrong = f"must be one of {list(get_args(tp))}"
        else:
            wrong = _MESSAGES[kind].format(**ctx) if kind in _MESSAGES else err["msg"]
        what = f"{wrong}, got {got!r}"
    return f"{_dotted(prefix, loc)}: {what}"


# pydantic's error types in our words; the value follows (", got VALUE").
_MESSAGES = {
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "expected an integer"),
    **dict.fromkeys(("float_parsing", "float_type"), "expected a number"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "expected true or false"),
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "dataclass_type": "expected a mapping of settings",
    "literal_error": "must be one of {expected}",
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} items",
}


def _dotted(prefix: str, loc: list[Any]) -> str:
    key = prefix
    for part in loc:  # list positions as [i]: model.layers[1]
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key or "top level"


def type_at(cls: Any, loc: list[Any]) -> Any:
    """The declared type at ``loc`` (field names, list positions, mapping keys) below section ``cls``,
    without its ``Annotated`` constraints (``Text`` -> ``str``); None where no field is declared."""
    tp = cls
    for part in loc:
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(part)
        elif typing.get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            return None
    return tp


@section("model")
class ModelConfig:
    """``model.*``: layer widths and activations of the stacked autoencoder, and its weight init."""

    # Input width first, code width last (at least those two); the decoder mirrors the encoder.
    layers: Annotated[list[Count], Field(min_length=2)] = field(default_factory=lambda: [784, 1000, 500, 250, 2])
    activation: Literal["sigmoid", "relu", "gelu"] = "sigmoid"
    # Hinton & Salakhutdinov keep the code layer linear so the map is not squashed into a box.
    code_activation: Literal["linear", "sigmoid"] = "linear"
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"
    # Initial weights: "default" = PyTorch's U(+-1/sqrt(fan_in)); "glorot4" = U(+-4 sqrt(6/(fan_in+fan_out)))
    # with zero biases, the Theano-era init for logistic units (Glorot & Bengio 2010, section 4.2.2).
    init: Literal["default", "glorot4"] = "default"


@section("pretrain")
class PretrainConfig:
    """``pretrain.*``: layer-wise pretraining (autoencoders, or RBMs as Hinton & Salakhutdinov 2006) and its
    optimiser."""

    method: Literal["autoencoder", "rbm", "none"] = "autoencoder"
    epochs: NonNegative = 15
    lr: PositiveFloat = 0.1
    momentum: Float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: Count = 100
    weight_decay: Float = 0.0
    # Denoising pretraining: fraction of inputs zeroed (0 = plain autoencoder).
    corruption: Share = 0.0
    # Contrastive-divergence steps for pretrain.method=rbm.
    cd_k: Count = 1
    # pretrain.method=rbm, the first RBM's visible units: "model" = as model.output_activation (logistic
    # for [0,1] data, linear for unbounded); "constrained_poisson" = Hinton & Salakhutdinov 2006's unit
    # for word counts (their document model): rate N * softmax(W'h + b), N the row's total, so the RBM
    # models each row's word shares whatever its length. Needs non-negative inputs.
    rbm_visible: Literal["model", "constrained_poisson"] = "model"
    # constrained_poisson: the first RBM models each input x this factor, as a pseudo word count. The
    # unit learns from counts (rows of tens to hundreds of words); on unit-length rows (summing to ~5) its
    # weights barely move (20 Newsgroups, measured; x20 with pretrain.lr=0.01 learns). The encoder holds
    # the factor in its weights from the start, so the model takes the features as published.
    rbm_count_scale: Annotated[Float, Field(ge=1e-4, le=1e4)] = 1.0
    # The RBM with linear (Gaussian) code units needs a smaller step: Hinton's code uses 0.001 vs 0.1.
    rbm_linear_lr_scale: Float = 0.01
    # The L2 cost the lr applies to (SGD): "mean" = squared error averaged over the batch and the dims,
    # "sum" = summed over each item's dims, averaged over the batch (the Theano-era cost; lr x width).
    loss_reduction: Literal["mean", "sum"] = "mean"
    # "data_mean": each pretraining stage starts its decoder's bias at the logit of its input's mean
    # (sigmoid outputs), so the first steps are not spent on the offset every output shares.
    decoder_bias: Literal["default", "data_mean"] = "default"
    # pretrain.method=autoencoder: lr factor for the stage whose code units are linear (unbounded), as
    # rbm_linear_lr_scale for the RBM. The talk's lr 1 on the summed cost blew 250-2-250 up (issue 22).
    linear_code_lr_scale: Float = 1.0

    @model_validator(mode="after")
    def _cross_field(self) -> PretrainConfig:
        if self.rbm_visible != "model" and self.method != "rbm":
            raise FieldError("rbm_visible", f"{self.rbm_visible} is a visible unit of an RBM: needs pretrain.method=rbm, "
                             f"got {self.method}")
        if self.rbm_count_scale != 1.0 and self.rbm_visible != "constrained_poisson":
            raise FieldError("rbm_count_scale", "scales the inputs of the constrained Poisson unit: needs "
                             f"pretrain.rbm_visible=constrained_poisson, got {self.rbm_visible}")
        return self


@section("finetune")
class FinetuneConfig:
    """``finetune.*``: fine-tuning of the unrolled net: optimiser, and the reconstruction or neighbour loss
    (parametric t-SNE, van der Maaten 2009; UMAP, McInnes et al. 2018)."""

    epochs: NonNegative = 5
    lr: PositiveFloat = 0.01
    momentum: Float = 0.9
    optimizer: Literal["sgd", "adam"] = "sgd"
    batch_size: Count = 100
    weight_decay: Float = 0.0
    # Learning rate over the fine-tuning epochs: constant, or decayed per epoch from lr towards 0
    # (linear, as UMAP's optimiser; or cosine). Set from the epoch number, so a resume continues it.
    lr_decay: Literal["none", "linear", "cosine"] = "none"
    # Epochs at the full lr before the decay starts (a constant-then-decay schedule: the map forms at
    # the full rate, the decay then settles it); 0 = decay from the first epoch.
    lr_decay_after: NonNegative = 0
    # As pretrain.loss_reduction, for the mse/bce reconstruction with SGD (not the neighbour losses).
    loss_reduction: Literal["mean", "sum"] = "mean"
    loss: Literal["mse", "bce", NeighbourLoss] = "mse"
    # Weight of the reconstruction term when loss is a neighbour loss (tsne/umap).
    recon_weight: Annotated[Float, Field(ge=0)] = 0.0
    # Epochs of the neighbour loss alone before the reconstruction term joins it (0 = from the start):
    # the map forms first, then the term refines it (on MNIST it raised trustworthiness without the cost
    # to 5-NN accuracy that it has from the start: docs/mnist_protocol_results.md).
    recon_weight_after: NonNegative = 0
    # Fraction of the encoder's inputs zeroed in each fine-tuning step (0 = none); the targets
    # (reconstruction, neighbour affinities or graph) stay those of the clean inputs.
    corruption: Share = 0.0
    # Batch size of fine-tuning with a neighbour loss: the affinities are computed within each batch,
    # so it must be large (van der Maaten 2009 used 5,000); batch_size applies to mse/bce only.
    neighbor_batch_size: Annotated[Int, Field(ge=2)] = 2000
    # t-SNE: perplexity of the input-space affinities; degrees of freedom of the Student-t on codes.
    perplexity: PositiveFloat = 30.0
    tsne_dof: PositiveFloat = 1.0
    # UMAP: kNN graph size (counting the point itself, so >= 2), the curve of the code-space similarity
    # (min_dist < 3 * spread), and repelling samples per edge.
    n_neighbors: Annotated[Int, Field(ge=2)] = 15
    min_dist: Annotated[Float, Field(ge=0)] = 0.1
    spread: PositiveFloat = 1.0
    negative_sample_rate: NonNegative = 5
    # Where tsne/umap affinities come from: "batch" = each batch's own rows (any size, streamed or
    # distributed); "global" = an exact kNN graph of all training rows built once, each step sampling
    # edges by affinity plus uniform rows (in-memory, single-process training only; O(n^2) to build).
    neighbor_graph: Literal["batch", "global"] = "batch"
    # How a step samples the global graph: "edges" = edges drawn by affinity, both ends through the
    # encoder, plus uniform rows for the repulsion; "rows" = a batch of rows, each with all its edges,
    # whose other ends (and the repelling rows) are read from a bank of every training row's code,
    # refreshed each epoch (more edges per encoder pass: the batch's rows carry all their graph).
    graph_sampling: Literal["edges", "rows"] = "edges"
    # graph_sampling of the epochs before recon_weight_after (the map's formation; None = graph_sampling
    # throughout). On MNIST edge sampling forms the better-separated map (5-NN accuracy) and rows with
    # the reconstruction term raise trustworthiness: docs/mnist_protocol_results.md.
    formation_sampling: Literal["edges", "rows"] | None = None
    # t-SNE: the attraction term x this factor (1 = t-SNE; > 1 = exaggerated t-SNE, tighter clusters:
    # Kobak & Berens 2019; Damrich et al. 2023 show UMAP-like maps at large factors).
    tsne_exaggeration: Annotated[Float, Field(ge=1, le=1000)] = 1.0

    @model_validator(mode="after")
    def _cross_field(self) -> FinetuneConfig:
        if self.loss_reduction == "sum" and self.is_neighbor_loss:
            raise FieldError("loss_reduction", f"sum is only for the reconstruction losses (mse, bce), not {self.loss}")
        if self.lr_decay_after and self.lr_decay_after >= self.epochs:
            raise FieldError("lr_decay_after", f"must be < finetune.epochs = {self.epochs}, got {self.lr_decay_after} "
                             "(shortening a preset's epochs? set it too, or to 0 to decay from the first epoch)")
        if self.recon_weight_after and self.recon_weight_after >= self.epochs:
            raise FieldError("recon_weight_after", f"must be < finetune.epochs = {self.epochs}, got {self.recon_weight_after} "
                             "(shortening a preset's epochs? set it too, or to 0 for the term from the first epoch)")
        if self.recon_weight_after and not (self.is_neighbor_loss and self.recon_weight > 0):
            raise FieldError("recon_weight_after", "needs finetune.recon_weight > 0 with loss tsne or umap")
        if self.tsne_exaggeration != 1.0 and self.loss != "tsne":
            raise FieldError("tsne_exaggeration", f"only applies to finetune.loss=tsne, not {self.loss}")
        if self.graph_sampling == "rows" and not self.uses_global_graph:
            raise FieldError("graph_sampling", "rows needs finetune.neighbor_graph=global with loss tsne or umap")
        if self.formation_sampling is not None and not (self.uses_global_graph and self.recon_weight_after):
            raise FieldError("formation_sampling", "needs finetune.neighbor_graph=global with loss tsne or umap and "
                             "finetune.recon_weight_after > 0 (it is the sampling of the epochs before it)")
        if self.min_dist >= 3 * self.spread:
            raise FieldError("min_dist", f"must be < 3 * finetune.spread = {3 * self.spread}, got {self.min_dist}")
        return self

    @property
    def is_neighbor_loss(self) -> bool:
        return self.loss in NEIGHBOUR_LOSSES

    @property
    def uses_global_graph(self) -> bool:
        return self.is_neighbor_loss and self.neighbor_graph == "global"

    def at_epoch(self, epoch: int | None) -> FinetuneConfig:
        """The settings in force in fine-tuning epoch ``epoch`` (0-based; None = the last): without the
        reconstruction term before ``recon_weight_after``, and with ``formation_sampling`` (when set) as
        their ``graph_sampling``."""
        if epoch is None or epoch >= self.recon_weight_after or not self.recon_weight:
            return self
        return dataclasses.replace(self, recon_weight=0.0, recon_weight_after=0, formation_sampling=None,
                                   graph_sampling=self.formation_sampling or self.graph_sampling)

    @property
    def effective_batch_size(self) -> int:
        """Rows per fine-tuning step: ``neighbor_batch_size`` for tsne/umap, else ``batch_size``."""
        return self.neighbor_batch_size if self.is_neighbor_loss else self.batch_size


@section("train.distributed")
class DistributedConfig:
    """``train.distributed.*``: how many training processes, where they run, and the collective timeout in
    seconds."""

    # > 1: TorchDistributor runs that many training processes (gloo on CPU, nccl on GPUs).
    num_processes: Count = 1
    use_gpu: bool = False
    # True: all processes on the driver; False: one per Spark task (barrier mode, needs that many free slots).
    local_mode: bool = True
    # How long a collective waits for a silent rank before the run fails (a dead rank usually fails it at once).
    timeout_s: Count = 600


@section("train")
class TrainConfig:
    """``train.*``: seed, validation split, device, data path (in memory or streamed) and resume behaviour."""

    seed: Int = 42
    # Share of items (by a hash of item_id) held out for validation.
    val_fraction: Share = 0.1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = False
    # Datasets up to this size are loaded once and kept on the device; larger ones stream.
    in_memory_max_mb: NonNegative = 2048
    # Parallel Petastorm reader workers when streaming.
    reader_workers: Int = 2
    # Streaming only: > 0 keeps Petastorm's decoded row groups in a local-disk cache of at most this
    # many MB for the later epochs (Parquet's list decoding is the reader's main cost); 0 = off.
    reader_cache_mb: NonNegative = 0
    threads: Int = 0  # 0 = torch default (all cores)
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
    split_column: Text = ""
    train_value: Text = "train"
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> TrainConfig:
        if self.split_column and not self.train_value:
            raise FieldError("train_value", "must be non-empty when train.split_column is set")
        return self


@section("evaluate")
class EvaluateConfig:
    """Map-quality evaluation on the validation split (``sae evaluate``, and after training)."""

    # k of the kNN label accuracy (or genre share) and of trustworthiness/continuity.
    k_knn: Count = 5
    k_tw: Count = 12
    # The kNN and rank metrics are O(n^2): at most this many validation items (a seeded sample) are
    # scored; the squared errors always use every validation item. Must exceed 2 * k_tw.
    max_items: Int = 2000
    # PCA is fitted on at most this many training items (a seeded sample).
    max_fit_items: Count = 20000
    seed: Int = 0
    # The UMAP baseline, when umap-learn is installed (an optional extra; skipped with a note if not).
    umap: bool = False
    # Evaluate at the end of `sae train`, into the same MLflow run.
    after_train: bool = True

    @model_validator(mode="after")
    def _cross_field(self) -> EvaluateConfig:
        if self.max_items <= 2 * self.k_tw:
            raise FieldError("max_items", f"must exceed 2 * evaluate.k_tw = {2 * self.k_tw}, got {self.max_items}")
        return self
