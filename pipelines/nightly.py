"""Nightly retraining, one function per step: ingest -> train -> evaluate -> promote -> publish -> report.

Each step takes ``(spark, cfg, state)`` and returns a small JSON-able dict that the caller stores in
the night's state file (``paths.root/nightly/DATE.json``) before the next step starts, so a re-run
skips what is done and continues where the last attempt failed. ``STEPS`` is the order; the job
(``jobs/nightly.py``), the Airflow DAG (``jobs/nightly_dag.py``) and the tests all read it.

The fixed holdout: the items of the training split's own hash holdout (``train.val_fraction``; the
trainer never fits them and does not select on them), or, with ``train.split_column``, every item
outside the training split (the protocol's test items, scored as ``sae train`` scores them:
``sae_model.evaluation.evaluate_protocol``), with their vectors frozen the first night into
``paths.root/nightly/holdout.npz``. Champion and challenger are scored on exactly those rows every
night, so a damaged feed (which also damages today's vectors) cannot flatter the model trained on
it. The snapshot is re-frozen only when the feature set (vocabulary) or that choice of rows
changes, since old vectors then no longer fit the models' input or the question asked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from pipelines.alignment import Alignment, procrustes
from pipelines.config import Config, tracking_uri
from pipelines.publish import Pinned, local_path, pin, restore
from sae_model.registry import CHAMPION_ALIAS, PREVIOUS_ALIAS

log = logging.getLogger(__name__)

STEPS = ["ingest", "train", "evaluate", "promote", "publish", "report"]
CHAMPION, PREVIOUS = CHAMPION_ALIAS, PREVIOUS_ALIAS  # one owner: sae_model.registry
ALIGNMENT_TAG = "map_alignment"  # model-version tag: the transform its codes are published with
FEATURES_TAG = "feature_names_sha"  # model-version tag: which feature set the model was trained on
LOWER_IS_BETTER = ("ae_squared_error",)


class NightlyError(RuntimeError):
    """A step cannot go on; the message says why and what to do."""


# ---------------------------------------------------------------- the per-night state file


@dataclass
class NightState:
    """What one night has done so far; saved atomically after every step."""

    path: Path
    date: str
    status: str = "new"  # new | running | failed | succeeded
    completed: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    failed_step: str | None = None
    error: str | None = None
    attempts: int = 0
    tracking_uri: str = ""

    @classmethod
    def load(cls, root: str, date: str) -> NightState:
        """The state of night ``date`` from ``<root>/nightly/<date>.json``, or a new one when the file does
        not exist. ``root`` must be local."""
        path = local_path(root) / "nightly" / f"{date}.json"
        if not path.exists():
            return cls(path=path, date=date)
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("path", None)
        return cls(path=path, **data)

    def save(self) -> None:
        """Write the state as JSON to ``path`` atomically (a temporary file, then ``os.replace``)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {k: v for k, v in asdict(self).items() if k != "path"}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        os.replace(tmp, self.path)

    def pending(self) -> list[str]:
        """The steps of ``STEPS`` not completed yet, in order."""
        return [s for s in STEPS if s not in self.completed]


def lock_path(cfg: Config) -> str:
    """The one-run-at-a-time lock of ``sae nightly`` (and ``sae rollback``): ``paths.root/nightly/nightly.lock``."""
    return str(local_path(cfg.paths.root) / "nightly" / "nightly.lock")


def night_date(cfg: Config) -> str:
    """The night's date as ``YYYY-MM-DD``: ``nightly.date`` if set, else today in UTC."""
    return cfg.nightly.date or dt.datetime.now(dt.UTC).date().isoformat()




def run_steps(
    spark: SparkSession | None,
    cfg: Config,
    state: NightState,
    only: list[str] | None = None,
    after_step: Callable[[str], None] | None = None,
) -> NightState:
    """Run the pending steps (or just ``only``) in order, saving the state after each.

    A failing step marks the state failed with the step's name and re-raises. ``after_step`` is
    called once a step is recorded (the job's test hook uses it to die there).
    """
    import mlflow

    mlflow.set_tracking_uri(state.tracking_uri or tracking_uri(cfg))
    for name in only or []:
        if name not in STEPS:
            raise NightlyError(f"no step {name!r}; the steps are {STEPS}")
        missing = [s for s in STEPS[: STEPS.index(name)] if s not in state.completed and s not in only]
        if missing:
            raise NightlyError(f"step {name!r} needs {missing} done first (night {state.date})")
    for step in STEPS:
        if only is not None and step not in only:
            continue
        if step in state.completed:
            log.info("night %s: step %s already done, skipped", state.date, step)
            continue
        state.status = "running"
        state.save()
        log.info("night %s: step %s", state.date, step)
        try:
            state.results[step] = STEP_FUNCTIONS[step](spark, cfg, state)
        except BaseException as exc:
            state.status, state.failed_step, state.error = "failed", step, f"{type(exc).__name__}: {exc}"[:2000]
            state.save()
            raise
        state.completed.append(step)
        state.failed_step = state.error = None
        if not state.pending():
            state.status = "succeeded"
        state.save()
        if after_step is not None:
            after_step(step)
    return state


# ---------------------------------------------------------------- helpers


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def champion(cfg: Config) -> Any | None:
    """The registered model's @champion version, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(cfg.mlflow.registered_model, CHAMPION)
    except MlflowException:
        return None


def ingest_version(cfg: Config, state: NightState | None) -> Pinned:
    """The ingest set's version this night reads: the one its ingest step published (recorded in
    the state file, so a resumed night reads the same data), else the current one."""
    version = ((state.results.get("ingest") or {}).get("version")) if state is not None else None
    if version and Pinned(cfg.paths.root, "ingest", version).exists("features"):
        return Pinned(cfg.paths.root, "ingest", version)
    if version:
        log.warning("ingest version %s of this night is gone (publish.keep); reading the current one", version)
    return pin(cfg.paths.root, "ingest")


def _manifest(cfg: Config, state: NightState | None = None) -> dict[str, Any]:
    path = local_path(ingest_version(cfg, state).path("features")) / "_manifest.json"
    if not path.exists():
        raise NightlyError(f"{path}: no features manifest; the ingest step has not published features/")
    return json.loads(path.read_text(encoding="utf-8"))


def _names_sha(names: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(names)).encode()).hexdigest()[:16]


def _model_uri(cfg: Config, version: Any) -> str:
    return f"models:/{cfg.mlflow.registered_model}/{version}"


# ---------------------------------------------------------------- 1. ingest


def step_ingest(spark: SparkSession, cfg: Config, state: NightState) -> dict[str, Any]:
    """Incremental ingest: the log sources skip the partitions (or, for a flat file, the records up
    to the watermark) that earlier nights loaded, so this reads only what is new since then."""
    from pipelines.ingest import check_inputs, run_ingest

    check_inputs(cfg)
    manifest = run_ingest(spark, cfg)
    keys = ("rows_in", "rows_used", "rows_quarantined", "items_out", "dim", "loads", "source")
    return {k: manifest.get(k) for k in keys} | {
        "feature_names_sha": _names_sha(manifest["feature_names"]),
        "version": manifest["publication"]["version"],
    }


# ---------------------------------------------------------------- 2. train


def step_train(spark: SparkSession | None, cfg: Config, state: NightState) -> dict[str, Any]:
    """Train the challenger (``pipelines.training.train_from_config``, so ``train.distributed.*`` holds
    as for ``sae train``: more than one process trains on ``spark``), warm-started from the
    champion's weights when configured and possible.

    Checkpoints go to ``checkpoints/nightly-DATE``: a re-run after a crash continues the same MLflow
    run. The challenger is registered (a new version) but gets no alias here."""
    from pipelines.training import train_from_config

    data = ingest_version(cfg, state)
    manifest = _manifest(cfg, state)
    names_sha = _names_sha(manifest["feature_names"])
    champ = champion(cfg)
    init_from, why = None, "nightly.warm_start=false"
    if cfg.nightly.warm_start:
        if champ is None:
            why = "no champion yet"
        elif champ.tags.get(FEATURES_TAG) not in (None, names_sha):
            why = "the feature set changed since the champion was trained"
        else:
            init_from, why = _model_uri(cfg, champ.version), f"champion version {champ.version}"
    log.info("challenger: %s (%s)", "warm start" if init_from else "from scratch", why)
    result = train_from_config(
        cfg, spark,
        checkpoint_dir=str(local_path(cfg.paths.root) / "checkpoints" / f"nightly-{state.date}"),
        fingerprint=f"{cfg.hash()}-{state.date}", init_from=init_from, stage="nightly-challenger",
        extra_tags={"nightly_date": state.date, "warm_start_from": init_from or ""},
        ingest=data,
    )
    if result.get("health", "ok") != "ok":  # sae_model.health kept it unregistered: never a champion
        findings = " | ".join(result.get("health_findings") or [])
        raise NightlyError(f"the challenger's training is unhealthy, not registered or promoted: {findings}")
    if result["model_version"] is None:
        raise NightlyError("the challenger was not registered: set mlflow.registered_model")
    _client().set_model_version_tag(cfg.mlflow.registered_model, result["model_version"], FEATURES_TAG, names_sha)
    return {
        "model_uri": _model_uri(cfg, result["model_version"]),
        "run_id": result["run_id"],
        "version": result["model_version"],
        "warm_start": bool(init_from),
        "warm_start_reason": why,
        "train_metrics": result["metrics"],
    }


# ---------------------------------------------------------------- 3. evaluate


def holdout_rule(cfg: Config) -> str:
    """Which rows the nightly holds out, as recorded with the frozen snapshot: ``"hash"`` (the
    training split's ``train.val_fraction`` hold-out) or, with ``train.split_column``,
    ``"split:COLUMN!=VALUE"`` (every item outside the training split: the protocol's test items)."""
    t = cfg.train
    return f"split:{t.split_column}!={t.train_value}" if t.split_column else "hash"


def holdout(
    cfg: Config, manifest: dict[str, Any], data: Pinned | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(held-out ids, their frozen vectors, ids and vectors of a training sample (PCA baseline; kNN
    classifier under the split), whether the snapshot was (re)frozen now). ``data``: the ingest version
    to read (default: the current one).

    Which rows: ``sae_model.data.read_split``'s one rule. Without ``train.split_column`` the
    validation hold-out of the hash split (``train.val_fraction``); with it, every row outside the
    training split (the rows ``sae train`` never reads and ``evaluate_split`` scores). The snapshot
    is frozen again when the feature set or that rule changes. Raises ``NightlyError`` for fewer
    than 3 held-out rows, ``DataError`` as ``read_split`` does."""
    from sae_model.data import load_table, read_split

    data = data or pin(cfg.paths.root, "ingest")
    ids, x = load_table(data.uri("features"), int(manifest["dim"]))
    t = cfg.train
    split = read_split(data.uri("items"), t.split_column, t.train_value, t.val_fraction)
    if split.has_test:
        fit = split.in_training_split(ids)
        held = ~fit
    else:
        held = split.roles(ids)[1]  # the validation rows of the hash split
        fit = ~held
    rng = np.random.default_rng(0)
    train_rows = np.flatnonzero(fit)
    if len(train_rows) > cfg.nightly.baseline_max_items:
        train_rows = np.sort(rng.choice(train_rows, cfg.nightly.baseline_max_items, replace=False))
    sha, rule = _names_sha(manifest["feature_names"]), holdout_rule(cfg)
    path = local_path(cfg.paths.root) / "nightly" / "holdout.npz"
    if path.exists():
        snap = np.load(path)
        snap_rule = str(snap["rule"]) if "rule" in snap.files else "hash"  # snapshots before the split key
        if str(snap["feature_names_sha"]) == sha and snap_rule == rule:
            return snap["item_id"], snap["features"], ids[train_rows], x[train_rows], False
        what = "feature set" if snap_rule == rule else f"holdout rule ({snap_rule} -> {rule})"
        log.warning("%s changed: the holdout snapshot is frozen again from today's vectors", what)
    if held.sum() < 3:
        why = (f"items outside the training split ({t.split_column} != {t.train_value!r})" if split.has_test
               else f"train.val_fraction={t.val_fraction} of {len(ids)}")
        raise NightlyError(
            f"the holdout has {int(held.sum())} items ({why}); at least 3 are needed to compare models"
            + ("" if split.has_test else ": raise train.val_fraction")
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".holdout.tmp.npz")
    np.savez(tmp, item_id=ids[held], features=x[held], feature_names_sha=np.array(sha), rule=np.array(rule))
    os.replace(tmp, path)
    return ids[held], x[held], ids[train_rows], x[train_rows], True


def _holdout_eval_cfg(n_hold: int, n_fit: int) -> Any:
    """``EvaluateConfig`` for a holdout of ``n_hold`` rows: k scaled down for a small one, every row scored."""
    from sae_model.config import EvaluateConfig

    n = n_hold
    return EvaluateConfig(
        k_knn=min(5, n - 1), k_tw=max(1, min(12, (n - 1) // 2)), max_items=n, max_fit_items=n_fit, umap=False
    )


def holdout_metrics(encoder: Any, x_hold: np.ndarray, x_train: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    """``sae_model.evaluation.evaluate`` of one model on every holdout row (PCA fitted on ``x_train``,
    k scaled down for a small holdout): its ``ae_*`` metrics and ``n_train``/``n_val``. Raises
    ``ValueError`` when the model cannot score the rows (another input width)."""
    from sae_model.evaluation import evaluate

    metrics = evaluate(encoder, x_train, x_hold, labels, _holdout_eval_cfg(len(x_hold), len(x_train))).metrics
    return {k: float(v) for k, v in metrics.items() if k.startswith("ae_") or k in ("n_train", "n_val")}


def protocol_holdout_metrics(
    encoder: Any, x_test: np.ndarray, x_fit: np.ndarray, labels_test: Any, labels_fit: Any, kind: str
) -> dict[str, float]:
    """``sae_model.evaluation.evaluate_protocol`` of one model on every held-out test row
    (``train.split_column``): the kNN classifier and PCA fitted on the training sample ``x_fit``, k
    scaled down for a small holdout; its ``ae_*`` metrics (the names ``sae train``'s evaluation logs)
    and ``n_train``/``n_test``. Raises ``ValueError`` when the model cannot score the rows (another
    input width), ``DataError`` as ``evaluate_protocol`` does."""
    from sae_model.evaluation import evaluate_protocol

    ecfg = _holdout_eval_cfg(len(x_test), len(x_fit))
    metrics = evaluate_protocol(encoder, x_fit, x_test, labels_fit, labels_test, ecfg, kind=kind).metrics
    return {k: float(v) for k, v in metrics.items() if k.startswith("ae_") or k in ("n_train", "n_test")}


def step_evaluate(spark: SparkSession | None, cfg: Config, state: NightState) -> dict[str, Any]:
    """Challenger and champion on the same frozen holdout rows (``holdout``): with
    ``train.split_column`` the test items, scored by ``evaluate_protocol`` as ``sae train`` scores them."""
    from sae_model.data import read_labels
    from sae_model.evaluation import protocol_labels
    from sae_model.loading import load_encoder

    data = ingest_version(cfg, state)
    manifest = _manifest(cfg, state)
    ids, x_hold, fit_ids, x_train, frozen = holdout(cfg, manifest, data)
    if cfg.train.split_column:
        labels_fit, labels, kind = protocol_labels(data.uri("items"), fit_ids, ids)

        def score(uri: str) -> dict[str, float]:
            return protocol_holdout_metrics(load_encoder(uri), x_hold, x_train, labels, labels_fit, kind)
    else:
        labels = read_labels(data.uri("items"), ids)
        if labels is not None and any(v is None or v != v for v in labels):
            labels = None  # labels only when every holdout item has one

        def score(uri: str) -> dict[str, float]:
            return holdout_metrics(load_encoder(uri), x_hold, x_train, labels)

    challenger = state.results["train"]
    out: dict[str, Any] = {
        "holdout_items": int(len(ids)),
        "holdout_rule": holdout_rule(cfg),
        "holdout_frozen_now": frozen,
        "challenger": score(challenger["model_uri"]),
        "champion": None,
        "champion_version": None,
    }
    champ = champion(cfg)
    if champ is not None and str(champ.version) != str(challenger["version"]):
        out["champion_version"] = str(champ.version)
        if champ.tags.get(FEATURES_TAG) not in (None, _names_sha(manifest["feature_names"])):
            out["champion_note"] = "the champion was trained on another feature set and cannot score today's"
        else:
            try:
                out["champion"] = score(_model_uri(cfg, champ.version))
            except ValueError as exc:  # input width differs
                out["champion_note"] = f"the champion cannot score the holdout: {exc}"
    return out


# ---------------------------------------------------------------- 4. promote


def decide(challenger: dict[str, float], champ: dict[str, float] | None, metric: str, margin: float) -> tuple[bool, str]:
    """Promote unless the challenger is worse than the champion by more than ``margin`` (relative)."""
    if champ is None:
        return True, "no comparable champion"
    if metric not in challenger or metric not in champ:
        raise NightlyError(f"nightly.metric={metric}: not measured on the holdout (no labels?); measured: {sorted(challenger)}")
    new, old = challenger[metric], champ[metric]
    if metric in LOWER_IS_BETTER:
        limit = old * (1 + margin)
        ok = new <= limit
        rel = "at most" if ok else "above"
    else:
        limit = old - abs(old) * margin
        ok = new >= limit
        rel = "at least" if ok else "below"
    verdict = "promoted" if ok else "kept the champion"
    return ok, f"{verdict}: challenger {metric} {new:.6g} is {rel} the limit {limit:.6g} (champion {old:.6g}, margin {margin:g})"


def step_promote(spark: SparkSession | None, cfg: Config, state: NightState) -> dict[str, Any]:
    """Decide which version serves tonight. The alias swap itself (@champion -> challenger, the old
    one kept as @previous) is the last act of ``publish``, right after the tables are swapped, so a
    failure in between leaves yesterday's champion and yesterday's tables serving together."""
    ev, ch = state.results["evaluate"], state.results["train"]
    ok, reason = decide(ev["challenger"], ev["champion"], cfg.nightly.metric, cfg.nightly.margin)
    current = champion(cfg)
    if not ok and current is None:
        raise NightlyError(f"no champion and the challenger was not promoted ({reason})")
    log.info("night %s: %s", state.date, reason)
    return {
        "promoted": ok,
        "reason": reason,
        "serving_version": str(ch["version"]) if ok else str(current.version),
        "previous_version": (None if current is None else str(current.version)) if ok else None,
    }


def set_champion(cfg: Config, version: str) -> None:
    """@champion -> ``version``, the old champion kept as @previous (a no-op when already so)."""
    client, name = _client(), cfg.mlflow.registered_model
    current = champion(cfg)
    if current is not None and str(current.version) == str(version):
        return
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS, current.version)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("@%s -> version %s (@%s -> %s)", CHAMPION, version, PREVIOUS, current and current.version)


# ---------------------------------------------------------------- 5. publish


def alignment_to_json(al: Alignment) -> str:
    """``al`` as JSON (rotation and translation as nested lists), for the night's state file."""
    return json.dumps(
        {
            "rotation": al.rotation.tolist(), "scale": al.scale, "translation": al.translation.tolist(),
            "residual": al.residual, "shared": al.shared,
        }
    )


def alignment_from_json(text: str) -> Alignment:
    """The ``Alignment`` ``alignment_to_json`` wrote (rotation and translation as float64 arrays). Raises
    KeyError on a missing field."""
    d = json.loads(text)
    return Alignment(np.array(d["rotation"]), float(d["scale"]), np.array(d["translation"]), float(d["residual"]), int(d["shared"]))


def published_version(spark: SparkSession, cfg: Config, scores: Pinned | None = None) -> str | None:
    """The model version the published codes/ (of ``scores``, default the current version) were
    scored with (None: no codes yet): from the publication history, else from the table."""
    from pipelines.publish import history

    scores = scores or pin(cfg.paths.root, "scores", spark)
    if scores.version is not None:
        for e in reversed(history(cfg.paths.root, "scores", spark)):
            if e["version"] == scores.version and e.get("model_version") is not None:
                return str(e["model_version"])
    if not scores.exists("codes", spark):
        return None
    row = spark.read.parquet(scores.path("codes")).select("model_version").first()
    return None if row is None else row[0]


def fit_alignment(
    spark: SparkSession, cfg: Config, model_uri: str, scores: Pinned | None = None, data: Pinned | None = None
) -> tuple[Alignment | None, str]:
    """Procrustes of the model's codes onto the published codes/ on a sample of the shared items.
    ``scores``/``data``: the scores and ingest versions to read (default: the current ones)."""
    from sae_model.loading import load_encoder

    root = cfg.paths.root
    scores = scores or pin(root, "scores", spark)
    data = data or pin(root, "ingest", spark)
    if scores.version is None and not scores.exists("codes", spark):
        return None, "no published map yet"
    old = spark.read.parquet(scores.path("codes")).select("item_id", F.col("code").alias("old"))
    feats = spark.read.parquet(data.path("features")).select("item_id", "features")
    shared = old.join(feats, "item_id")
    n = shared.count()
    if n > cfg.nightly.align_max_items:
        shared = shared.sample(fraction=min(1.0, 1.2 * cfg.nightly.align_max_items / n), seed=0)
    rows = shared.limit(cfg.nightly.align_max_items).toPandas()
    if rows.empty:
        return None, "no item shared with the published map"
    old_codes = np.stack(rows["old"].to_numpy()).astype(np.float64)
    new_codes = load_encoder(model_uri).encode(np.stack(rows["features"].to_numpy()).astype(np.float32))
    if old_codes.shape[1] != new_codes.shape[1]:
        return None, f"code width changed ({old_codes.shape[1]} -> {new_codes.shape[1]})"
    try:
        al = procrustes(new_codes, old_codes, scaling=cfg.nightly.align_scaling)
    except ValueError as exc:
        return None, str(exc)
    unaligned = float(np.sqrt(((new_codes - old_codes) ** 2).sum(axis=1).mean()))
    log.info("alignment on %d shared items: residual %.4g (unaligned %.4g), scale %.4g", al.shared, al.residual, unaligned, al.scale)
    return al, f"aligned on {al.shared} shared items (RMS drift unaligned {unaligned:.4g})"


def step_publish(spark: SparkSession, cfg: Config, state: NightState) -> dict[str, Any]:
    """Score with the serving version and publish codes/ and neighbors/ atomically (one version of
    the ``scores`` set), aligned to the last map; then, if promoted, move the aliases."""
    decision = state.results["promote"]
    version = decision["serving_version"]
    out = score_and_publish(spark, cfg, version, job="nightly", date=state.date, data=ingest_version(cfg, state))
    if decision["promoted"]:
        set_champion(cfg, version)
    return out


def protected_models(cfg: Config) -> list[str]:
    """Model versions whose published tables retention keeps: @champion's and @previous's."""
    from mlflow.exceptions import MlflowException

    out = []
    for alias in (CHAMPION, PREVIOUS):
        try:
            out.append(str(_client().get_model_version_by_alias(cfg.mlflow.registered_model, alias).version))
        except MlflowException:
            pass
    return out


def score_and_publish(
    spark: SparkSession, cfg: Config, version: str, job: str, date: str | None = None, data: Pinned | None = None
) -> dict[str, Any]:
    """Score ``data`` (an ingest version; default the current one) with model ``version`` and
    publish the scores set; retention keeps the tables of @champion and @previous.

    The alignment belongs to the model version (tag ``map_alignment``, also an artefact of its run):
    it is fitted once, when the version is first published, and reused whenever that version scores
    again, so a kept champion keeps its orientation and re-scoring reproduces the published map."""
    from pipelines.inference import pinned_model, predict_batch

    data = data or pin(cfg.paths.root, "ingest", spark)
    scores = pin(cfg.paths.root, "scores", spark)
    client = _client()
    mv = client.get_model_version(cfg.mlflow.registered_model, version)
    uri = _model_uri(cfg, version)
    al, note = None, "alignment off (nightly.align=false)"
    if mv.tags.get(ALIGNMENT_TAG):
        al, note = alignment_from_json(mv.tags[ALIGNMENT_TAG]), "the model's stored alignment"
    elif published_version(spark, cfg, scores) == str(version):
        note = "model unchanged since the published map"
    elif cfg.nightly.align:
        al, note = fit_alignment(spark, cfg, uri, scores, data)
        if al is not None:
            text = alignment_to_json(al)
            client.set_model_version_tag(cfg.mlflow.registered_model, version, ALIGNMENT_TAG, text)
            if mv.run_id:
                client.log_text(mv.run_id, text, f"alignment/{date or dt.date.today().isoformat()}.json")
    publish = {
        "keep": cfg.publish.keep,
        "protect_models": protected_models(cfg),
        "meta": {"job": job, "config_hash": cfg.hash()},
    }
    with pinned_model(spark, cfg, uri) as model:
        summary = predict_batch(
            spark, model, cfg.paths.root, cfg.infer, log_maps=True, alignment=al, publish=publish, ingest=data,
            split=(cfg.train.split_column, cfg.train.train_value),
        )
    return {
        "model_uri": uri,
        "version": str(version),
        "scores_version": summary["scores_version"],
        "items": summary["items"],
        "method": summary["method"],
        "alignment": json.loads(alignment_to_json(al)) if al is not None else None,
        "alignment_note": note,
        "map_drift_rms": al.residual if al is not None else None,
    }


# ---------------------------------------------------------------- 6. report


def report_text(state: NightState, cfg: Config) -> str:
    """The night's Markdown report from ``state.results``: what was ingested, both models' holdout metrics,
    the promotion decision and the map drift."""
    r = state.results
    ing, tr, ev, pr, pub = (r.get(s, {}) for s in ("ingest", "train", "evaluate", "promote", "publish"))
    lines = [
        f"# Nightly {state.date}",
        "",
        "## Ingested",
        f"- loads: {', '.join(ing.get('loads') or []) or 'none new'}",
        f"- records in {ing.get('rows_in')}, used {ing.get('rows_used')}, quarantined {ing.get('rows_quarantined')};"
        f" items {ing.get('items_out')}, dim {ing.get('dim')}",
        "",
        "## Models on the fixed holdout" + f" ({ev.get('holdout_items')} items"
        + ("" if ev.get("holdout_rule", "hash") == "hash" else f", rule {ev['holdout_rule']}") + ")",
        f"- challenger: version {tr.get('version')} ({'warm start' if tr.get('warm_start') else 'from scratch'}:"
        f" {tr.get('warm_start_reason')})",
        f"- champion: version {ev.get('champion_version')}" + (f" ({ev['champion_note']})" if ev.get("champion_note") else ""),
        "",
        "| metric | challenger | champion |",
        "|---|---|---|",
    ]
    champ_m = ev.get("champion") or {}
    for k, v in sorted((ev.get("challenger") or {}).items()):
        c = champ_m.get(k)
        lines.append(f"| {k} | {v:.6g} | {'' if c is None else f'{c:.6g}'} |")
    drift = pub.get("map_drift_rms")
    lines += [
        "",
        "## Decision",
        f"- metric {cfg.nightly.metric}, margin {cfg.nightly.margin:g}: {pr.get('reason')}",
        f"- serving: version {pub.get('version')} ({pub.get('items')} items, neighbours by {pub.get('method')})",
        "",
        "## Map drift",
        f"- {pub.get('alignment_note')}" + ("" if drift is None else f"; residual RMS {drift:.6g}"),
        "",
    ]
    return "\n".join(lines)


def step_report(spark: SparkSession | None, cfg: Config, state: NightState) -> dict[str, Any]:
    """The report to ``paths.root/reports/DATE.md`` and to a ``nightly-DATE`` MLflow run."""
    import mlflow

    from sae_model.tracking import use_experiment

    text = report_text(state, cfg)
    path = local_path(cfg.paths.root) / "reports" / f"{state.date}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    use_experiment(cfg.mlflow.experiment)
    r = state.results
    metrics = {f"challenger_{k}": v for k, v in r["evaluate"]["challenger"].items()}
    metrics |= {f"champion_{k}": v for k, v in (r["evaluate"]["champion"] or {}).items()}
    if r["publish"].get("map_drift_rms") is not None:
        metrics["map_drift_rms"] = r["publish"]["map_drift_rms"]
    metrics["promoted"] = float(r["promote"]["promoted"])
    with mlflow.start_run(run_name=f"nightly-{state.date}", tags={"stage": "nightly", "nightly_date": state.date}) as run:
        mlflow.log_metrics(metrics)
        mlflow.log_text(text, f"reports/{state.date}.md")
        mlflow.log_text(json.dumps(state.results, indent=1, default=str), "nightly_state.json")
    return {"report": str(path), "run_id": run.info.run_id}


STEP_FUNCTIONS: dict[str, Callable[[Any, Config, NightState], dict[str, Any]]] = {
    "ingest": step_ingest,
    "train": step_train,
    "evaluate": step_evaluate,
    "promote": step_promote,
    "publish": step_publish,
    "report": step_report,
}


# ---------------------------------------------------------------- rollback


def scores_of(cfg: Config, model_version: str) -> str | None:
    """The latest published version of the scores set that ``model_version`` scored and that is
    still on disk (None: none left)."""
    from pipelines.publish import history, published_versions

    alive = set(published_versions(cfg.paths.root, "scores"))
    mine = [e["version"] for e in history(cfg.paths.root, "scores") if str(e.get("model_version")) == str(model_version)]
    mine = [v for v in mine if v in alive]
    return mine[-1] if mine else None


def rollback_target(cfg: Config) -> tuple[str, str | None, str | None]:
    """(@previous's version, @champion's version, the scores version @previous published or None
    when they are gone). Raises NightlyError when there is no @previous to roll back to."""
    from mlflow.exceptions import MlflowException

    client, name = _client(), cfg.mlflow.registered_model
    try:
        prev = client.get_model_version_by_alias(name, PREVIOUS)
    except MlflowException:
        raise NightlyError(f"registered model {name!r} has no @{PREVIOUS} version to roll back to") from None
    cur = champion(cfg)
    return str(prev.version), (None if cur is None else str(cur.version)), scores_of(cfg, str(prev.version))


def rollback_champion(cfg: Config, spark: SparkSession | None = None) -> dict[str, Any]:
    """Roll back to @previous as a consistent pair: its model becomes @champion again *and* the
    codes/neighbours it published become current (one pointer swap), or, when retention has
    removed them, it scores the current features again (needs ``spark``). The tables move first and
    the aliases last, so a crash in between is repaired by running the rollback again.

    Returns ``{"champion", "rolled_back_from", "scores_version", "rescored"}``. Raises NightlyError
    (nothing changed) when there is no @previous, or its tables are gone and cannot be re-scored:
    no ``spark`` given, or the current features are not the feature set the model was trained on."""
    client, name = _client(), cfg.mlflow.registered_model
    prev, cur, scores = rollback_target(cfg)
    rescored = False
    if scores is not None:
        restore(cfg.paths.root, "scores", scores, meta={"job": "rollback"})
    else:
        why = f"the codes/ and neighbors/ that version {prev} published are gone (publish.keep={cfg.publish.keep})"
        if spark is None:
            raise NightlyError(f"{why}; re-scoring needs a SparkSession")
        trained_on = client.get_model_version(name, prev).tags.get(FEATURES_TAG)
        now = _names_sha(_manifest(cfg)["feature_names"])
        if trained_on not in (None, now):
            raise NightlyError(
                f"{why}, and version {prev} was trained on another feature set than the current features/ "
                f"({trained_on} vs {now}), so it cannot score them again; nothing was changed"
            )
        log.warning("%s: scoring the current features with version %s again", why, prev)
        scores = score_and_publish(spark, cfg, prev, job="rollback")["scores_version"]
        rescored = True
    client.set_registered_model_alias(name, CHAMPION, prev)
    if cur is not None and cur != prev:
        client.set_registered_model_alias(name, PREVIOUS, cur)
    log.info("rolled back: @%s -> version %s (was %s), scores version %s", CHAMPION, prev, cur, scores)
    return {"champion": prev, "rolled_back_from": cur or "", "scores_version": scores, "rescored": rescored}
