"""Training health: one mechanism that says whether a run trained at all, and what to change if not.

A stacked sigmoid autoencoder can "finish" without learning: a pretraining stage whose loss is worse
than predicting each input's mean (the step exploded or saturated the units), a fine-tuning loss that
never moves from its first epoch, or codes that all sit on one point (the talk's Tag Genome settings
on the real slice: 177 movies within 0.00017 of one code). The checks here are pure functions of
numbers the trainer already has (loss histories, a sample of codes, the spread of a stage's input);
each failing check is a :class:`Finding` naming the stage, the measure, its value and the config keys
to try. :class:`HealthCallback` runs them while training: a pretraining stage that saturated or
exploded stops the run (:class:`UnhealthyTraining`); the rest end in a :class:`Verdict` that the
trainer logs to MLflow (tag ``health``, metrics ``health/*``) and that keeps the model from being
registered. ``sae infer`` refuses a model whose run is tagged unhealthy unless forced.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sae_model.callbacks import Callback

log = logging.getLogger(__name__)

HEALTH_TAG = "health"  # MLflow run tag: "ok" | "unhealthy"
FINDINGS_TAG = "health_findings"  # the findings' messages, one a line
OK, UNHEALTHY = "ok", "unhealthy"

# Codes whose spread is under this share of their distance from the origin sit on one point in float32
# terms: the collapsed Tag Genome run measured 2e-6 (sd 0.00017 at (-75, 69)) and 0.002 (sd 0.00016
# at 0.07); spread maps measured 0.05 and more.
MIN_RELATIVE_SPREAD = 1e-2
# Codes closer than this share of the map's scale to the median code count as "the same code".
SAME_CODE_TOLERANCE = 1e-4
MAX_SHARED_CODE_SHARE = 0.5
# A loss whose every later epoch is within this relative distance of its first never moved.
UNMOVED_RTOL = 1e-3
# A pretraining stage whose training made its loss worse than where it started, and worse than this
# multiple of the constant predictor's (each input's mean), overshot or saturated its units
# (pretrain.lr=1e38: 0.99 vs 0.01). "Worse than where it started" keeps short honest runs going: a
# linear 16-2 stage after one epoch can sit at 3-13x the mean predictor while still improving.
WORSE_THAN_MEAN_FACTOR = 2.0

PRETRAIN_KEYS = ("pretrain.lr", "pretrain.loss_reduction", "pretrain.decoder_bias", "model.init")
FINETUNE_KEYS = ("finetune.lr", "finetune.loss_reduction", "finetune.loss", "pretrain.lr")
COLLAPSE_KEYS = ("model.init", "pretrain.loss_reduction", "pretrain.lr", "finetune.lr", "finetune.loss")


class UnhealthyModel(ValueError):
    """A model whose training run is tagged unhealthy was about to be published."""


class UnhealthyTraining(RuntimeError):
    """A stage failed a health check badly enough that training cannot go on; carries the verdict."""

    def __init__(self, verdict: Verdict) -> None:
        super().__init__(verdict.summary())
        self.verdict = verdict


@dataclass(frozen=True)
class Finding:
    """One failed check: where (``stage``, e.g. ``pretrain/layer1``), what (``measure``), how much."""

    stage: str
    measure: str  # code_spread | shared_code | loss_unmoved | loss_worse_than_mean | loss_not_finite
    value: float
    threshold: float
    keys: tuple[str, ...]  # config keys to try
    detail: str

    def message(self) -> str:
        """One line: stage, measure, its value against the threshold, what it means, and the config
        keys to try."""
        return f"{self.stage}: {self.measure} {self.value:.3g} (threshold {self.threshold:.3g}): {self.detail}; try {', '.join(self.keys)}"


@dataclass(frozen=True)
class Verdict:
    """All findings of a run (none = healthy) and the measured values (``measures``, for MLflow)."""

    findings: tuple[Finding, ...] = ()
    measures: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def status(self) -> str:
        return OK if self.ok else UNHEALTHY

    def summary(self) -> str:
        """``training health: ok``, or every finding's :meth:`Finding.message` joined by `` | ``."""
        if self.ok:
            return "training health: ok"
        return "training health: " + " | ".join(f.message() for f in self.findings)

    def merged(self, other: Verdict) -> Verdict:
        """A new verdict with both verdicts' findings (``self``'s first) and measures (``other``'s win)."""
        return Verdict(self.findings + other.findings, {**self.measures, **other.measures})

    def mlflow_tags(self) -> dict[str, str]:
        """The run tags: ``health`` = ok|unhealthy and ``health_findings`` (the messages, at most 5,000
        characters, MLflow's tag limit)."""
        return {HEALTH_TAG: self.status, FINDINGS_TAG: "\n".join(f.message() for f in self.findings)[:5000]}

    def mlflow_metrics(self) -> dict[str, float]:
        """The finite measures as MLflow metrics named ``health/<measure>`` (NaN/inf are left out:
        MLflow stores them badly)."""
        return {f"health/{k}": v for k, v in self.measures.items() if math.isfinite(v)}


# ---------------------------------------------------------------- the pure checks


def relative_spread(codes: Any) -> float:
    """Spread of ``codes`` (n x d) relative to where they sit: sqrt(sum of per-dim variances) /
    (||mean|| + that). 1 = centred on the origin; near 0 = every item on one point far from it.

    Raises ValueError on fewer than 2 rows or a non-2-D array.
    """
    z = np.asarray(codes, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 2:
        raise ValueError(f"codes: need a 2-D array of at least 2 rows, got shape {z.shape}")
    sd = float(np.sqrt(z.var(axis=0).sum()))
    centre = float(np.linalg.norm(z.mean(axis=0)))
    return sd / (centre + sd) if centre + sd > 0 else 0.0


def shared_code_share(codes: Any, tolerance: float = SAME_CODE_TOLERANCE) -> float:
    """Share of rows within ``tolerance`` x (1 + ||median||) of the coordinate-wise median code.

    When more than half the rows hold one code the median is that code, so a share above 0.5 means
    exactly "most items share one code" (dead ReLU or saturated sigmoid codes, a collapsed map).
    """
    z = np.asarray(codes, dtype=np.float64)
    if z.ndim != 2 or z.shape[0] < 1:
        raise ValueError(f"codes: need a 2-D array of at least 1 row, got shape {z.shape}")
    med = np.median(z, axis=0)
    tol = tolerance * (1.0 + float(np.linalg.norm(med)))
    return float(np.mean(np.linalg.norm(z - med, axis=1) <= tol))


def check_codes(codes: Any, stage: str = "finetune") -> Verdict:
    """Collapse checks on a sample of codes (validation items, else training items)."""
    z = np.asarray(codes, dtype=np.float64)
    if z.shape[0] < 2:
        return Verdict()
    if not np.isfinite(z).all():
        return Verdict(
            (Finding(stage, "codes_not_finite", float(np.mean(~np.isfinite(z))), 0.0, COLLAPSE_KEYS,
                     "some codes are NaN or infinite"),),
        )
    spread, shared = relative_spread(z), shared_code_share(z)
    found = []
    if spread < MIN_RELATIVE_SPREAD:
        found.append(Finding(
            stage, "code_spread", spread, MIN_RELATIVE_SPREAD, COLLAPSE_KEYS,
            f"the {z.shape[0]} sampled codes have sd {np.sqrt(z.var(axis=0).sum()):.3g} around "
            f"{np.round(z.mean(axis=0), 4).tolist()}: the map is one point",
        ))
    if shared > MAX_SHARED_CODE_SHARE:
        found.append(Finding(
            stage, "shared_code", shared, MAX_SHARED_CODE_SHARE, COLLAPSE_KEYS,
            f"{shared:.0%} of the {z.shape[0]} sampled items share one code",
        ))
    return Verdict(tuple(found), {"code_relative_spread": spread, "shared_code_share": shared})


def loss_unmoved(losses: Sequence[float], rtol: float = UNMOVED_RTOL) -> bool:
    """True when there are at least 3 epochs and every later loss is within ``rtol`` of the first."""
    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    if len(vals) < 3:
        return False
    first = vals[0]
    return all(abs(v - first) <= rtol * max(abs(first), 1e-12) for v in vals[1:])


def check_history(history: Sequence[dict[str, Any]], finetune_keys: tuple[str, ...] = FINETUNE_KEYS) -> Verdict:
    """Loss checks on the trainer's epoch records (``stage_name``, ``train_loss``, ``val_loss``):
    a fine-tuning loss that never moved from its first epoch (train and validation alike)."""
    ft = [h for h in history if h.get("stage_name") == "finetune"]
    if not ft:
        return Verdict()
    train, val = [h["train_loss"] for h in ft], [h["val_loss"] for h in ft]
    unmoved = loss_unmoved(train) and (loss_unmoved(val) or not any(math.isfinite(v) for v in val))
    change = abs(train[-1] - train[0]) / max(abs(train[0]), 1e-12) if train else float("nan")
    measures = {"finetune_loss_change": float(change)}
    if not unmoved:
        return Verdict((), measures)
    return Verdict(
        (Finding("finetune", "loss_unmoved", float(change), UNMOVED_RTOL, finetune_keys,
                 f"the loss stayed at {train[0]:.6g} for {len(ft)} epochs"),),
        measures,
    )


def check_pretrain_stage(layer: int, val_loss: float, constant_loss: float) -> Verdict:
    """A pretraining stage against the constant predictor of its input (each dimension's mean).

    ``val_loss`` is the stage's MSE, ``constant_loss`` the MSE of predicting the column means (the mean
    per-dimension variance of the layer's input). Worse than ``WORSE_THAN_MEAN_FACTOR`` times that, or
    not finite, means the step overshot or saturated the units.
    """
    stage = f"pretrain/layer{layer}"
    keys = PRETRAIN_KEYS
    measures = {f"layer{layer}_loss_vs_mean": val_loss / constant_loss if constant_loss > 0 else float("nan")}
    if not math.isfinite(val_loss):
        return Verdict((Finding(stage, "loss_not_finite", val_loss, 0.0, keys, "the loss is NaN or infinite"),), measures)
    if constant_loss > 0 and val_loss > WORSE_THAN_MEAN_FACTOR * constant_loss:
        return Verdict(
            (Finding(stage, "loss_worse_than_mean", val_loss / constant_loss, WORSE_THAN_MEAN_FACTOR, keys,
                     f"validation loss {val_loss:.4g} against {constant_loss:.4g} for predicting each input's "
                     f"mean: the layer's step exploded or saturated its units (lower pretrain.lr)"),),
            measures,
        )
    return Verdict((), measures)


# ---------------------------------------------------------------- wiring into training and MLflow


def refuse_unhealthy(run_id: str | None, model_uri: str, force: bool) -> None:
    """Raise :class:`UnhealthyModel` when ``run_id``'s MLflow run is tagged ``health=unhealthy``,
    unless ``force``; a run without the tag (trained before these checks) passes."""
    if not run_id:
        return
    from mlflow import MlflowClient

    tags = MlflowClient().get_run(run_id).data.tags
    if tags.get(HEALTH_TAG) != UNHEALTHY:
        return
    findings = tags.get(FINDINGS_TAG, "").replace("\n", " | ")
    if force:
        log.warning("publishing %s although its training run %s is unhealthy (forced): %s", model_uri, run_id, findings)
        return
    raise UnhealthyModel(
        f"model {model_uri} (run {run_id}) is marked unhealthy by its training, not published: {findings}. "
        "Retrain with the keys named, or publish anyway with --force (infer.force=true)"
    )


def log_verdict(verdict: Verdict) -> None:
    """Tag and meter the active MLflow run (nothing when there is none)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.set_tags(verdict.mlflow_tags())
    metrics = verdict.mlflow_metrics()
    if metrics:
        mlflow.log_metrics(metrics)


class HealthCallback(Callback):
    """The trainer's callback: after each pretraining
    stage's last epoch it compares the stage's validation loss with the constant predictor of the
    stage's input and stops the run on a stage that exploded or saturated (:class:`UnhealthyTraining`).
    The findings so far are kept in ``verdict`` for the end-of-run check."""

    def __init__(self, sample_rows: int = 2048) -> None:
        self.sample_rows = sample_rows
        self.verdict = Verdict()
        self.start_loss: dict[int, float] = {}

    def on_stage_start(self, trainer: Any, stage: Any) -> None:
        """Remember an autoencoder pretraining stage's loss before its first epoch (or at the
        checkpoint it resumes from), on the same input sample the end of the stage is judged on."""
        if stage.kind != "pretrain" or trainer.pre.method != "autoencoder":
            return
        x = layer_input_sample(trainer, stage.layer, self.sample_rows)
        if x is not None and x.shape[0] >= 2:
            self.start_loss[stage.layer] = stage_mse(trainer, stage.layer, x)

    def on_epoch_end(self, trainer: Any, stage: Any, record: Any) -> None:
        """At an autoencoder pretraining stage's last epoch: compare its validation loss (else its
        training loss) with predicting each input's mean on a sample of the stage's input; a stage
        worse than that stops the run.

        Raises ``UnhealthyTraining`` (its message from :func:`check_pretrain_stage`, naming the layer
        and ``pretrain.lr``) when the stage failed."""
        # Only the autoencoder's stages minimise this loss; an RBM's reconstruction is a by-product.
        if stage.kind != "pretrain" or record.epoch != stage.epochs - 1 or trainer.pre.method != "autoencoder":
            return
        x = layer_input_sample(trainer, stage.layer, self.sample_rows)
        if x is None or x.shape[0] < 2:
            return
        constant = float(x.var(axis=0).mean())
        # No validation rows (train.val_fraction=0) give a NaN validation loss: judge the training loss.
        loss = float(record.val_loss) if math.isfinite(record.val_loss) else float(record.train_loss)
        if math.isfinite(loss) and stage_mse(trainer, stage.layer, x) <= self.start_loss.get(stage.layer, math.inf):
            return  # not worse than where the stage started: slow, perhaps, but learning
        v = check_pretrain_stage(stage.layer, loss, constant)
        self.verdict = self.verdict.merged(v)
        if not v.ok:
            if getattr(trainer, "rank", 0) == 0:
                log_verdict(self.verdict)
            raise UnhealthyTraining(self.verdict)


def _first_rows(trainer: Any, rows: int) -> Any:
    """Up to ``rows`` validation rows as a tensor, else the first training rows; None when neither has 2."""
    for split in ("val", "train"):
        xb = next(iter(trainer.source.batches(split, rows, shuffle=False)), None)
        if xb is not None and xb.shape[0] >= 2:
            return xb
    return None


def layer_input_sample(trainer: Any, layer: int, rows: int) -> np.ndarray | None:
    """What feeds pretraining level ``layer`` (0 = the data) for a sample of rows, float32 (n, width)."""
    import torch

    from sae_model.pretrain import inputs_for_layer

    xb = _first_rows(trainer, rows)
    if xb is None:
        return None
    with torch.no_grad():
        return inputs_for_layer(trainer.model.eval(), xb, layer).float().cpu().numpy()


def stage_mse(trainer: Any, layer: int, x: np.ndarray) -> float:
    """Mean squared error per dimension of pretraining level ``layer``'s shallow autoencoder
    (encoder, its activation, decoder, its activation) on ``x``, float32 (n, level input width)."""
    import torch

    m = trainer.model
    with torch.no_grad():
        xt = torch.as_tensor(x, device=next(m.parameters()).device)
        out = m.dec_acts[layer](m.decoders[layer](m.enc_acts[layer](m.encoders[layer](xt))))
        return float(torch.mean((out.float() - xt.float()) ** 2))


def code_sample(trainer: Any, rows: int = 2048) -> np.ndarray:
    """Codes of the validation rows (at most ``rows``), else of the first training rows; (n, code width)."""
    import torch

    xb = _first_rows(trainer, rows)
    if xb is None:
        return np.zeros((0, trainer.model.code_width), np.float32)
    with torch.no_grad():
        return trainer.model.eval().encode(xb).float().cpu().numpy()


def end_of_run(trainer: Any, callback: HealthCallback | None) -> Verdict:
    """The whole run's verdict: the pretraining findings, the fine-tuning loss, the codes' collapse."""
    verdict = callback.verdict if callback is not None else Verdict()
    verdict = verdict.merged(check_history(trainer.history)).merged(check_codes(code_sample(trainer)))
    if verdict.ok:
        log.info("%s (codes' relative spread %.3g)", verdict.summary(), verdict.measures.get("code_relative_spread", float("nan")))
    else:
        log.warning("%s; the model is not registered", verdict.summary())
    return verdict
