"""Training from the root config: the one entry that ``sae train``, ``sae nightly`` and ``sae sweep`` use.

``train_from_config`` turns the root config into the trainer's arguments and the MLflow settings
(one copy of them), and trains in one process or, with ``train.distributed.num_processes > 1``,
through TorchDistributor (``pipelines.distributed``) on the SparkSession the caller passes in.
``train_and_evaluate`` adds the evaluation of the new model into its own run
(``evaluate.after_train``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from pipelines.config import Config, ConfigError, tracking_uri
from pipelines.publish import Pinned, is_local, local_path, pin

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent


def manifest_hash(features_uri: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``features/_manifest.json``; ``"none"`` without one."""
    path = local_path(features_uri) / "_manifest.json" if is_local(features_uri) else None
    if path is None or not path.exists():
        return "none"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def checkpoint_dir_for(cfg: Config, resume: bool) -> str:
    """``paths.root/checkpoints/<config hash>``; on ``--resume`` with none there, the newest unfinished
    checkpoint of the same training under another hash (only the run length or reporting changed:
    ``Config.resume_fingerprint``)."""
    from sae_model.checkpoint import load_meta

    base = local_path(cfg.paths.root) / "checkpoints"
    own = base / cfg.hash()
    if resume and load_meta(own) is None and base.is_dir():
        fingerprint = cfg.resume_fingerprint()
        for d in sorted((p for p in base.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True):
            meta = load_meta(d)
            if meta is not None and not meta.get("finished") and meta.get("fingerprint") == fingerprint:
                log.info("resuming the checkpoint in %s (the same training with another run length)", d)
                return str(d)
    return str(own)


def mlflow_settings(
    cfg: Config, stage: str, extra_tags: dict[str, str] | None = None, ingest: Pinned | None = None
) -> Any:
    """The trainer's ``MlflowSettings`` for ``cfg``: store, experiment, registered model, every
    resolved config value as a param, the resolved YAML, and the tags git commit, data manifest
    hash, config hash and ``stage`` (``extra_tags`` added last). ``ingest``: the pinned ingest version
    whose manifest is hashed (default: the current one)."""
    from sae_model.tracking import git_commit
    from sae_model.trainer import MlflowSettings

    return MlflowSettings(
        tracking_uri=tracking_uri(cfg),
        experiment=cfg.mlflow.experiment,
        registered_model=cfg.mlflow.registered_model,
        params=cfg.flat(),
        tags={
            "git_commit": git_commit(REPO),
            "data_manifest_hash": manifest_hash((ingest or pin(cfg.paths.root, "ingest")).uri("features")),
            "config_hash": cfg.hash(),
            "stage": stage,
            **(extra_tags or {}),
        },
        config_text=cfg.to_yaml(),
    )


def train_from_config(
    cfg: Config,
    spark: Any = None,
    *,
    resume: bool = False,
    checkpoint_dir: str | None = None,
    fingerprint: str | None = None,
    init_from: str | None = None,
    stage: str = "train",
    extra_tags: dict[str, str] | None = None,
    ingest: Pinned | None = None,
) -> dict[str, Any]:
    """Train the model ``cfg`` describes on ``paths.root/features``; returns rank 0's summary
    (``model_uri``, ``run_id``, ``model_version``, ``metrics``, ``checkpoint_dir``, ``train_seconds``).

    ``train.distributed.num_processes > 1`` trains through TorchDistributor on ``spark`` (the active
    session, which the caller owns); one process needs no session. ``checkpoint_dir`` defaults to
    :func:`checkpoint_dir_for`, ``fingerprint`` (which checkpoints may be resumed) to
    ``Config.resume_fingerprint()`` (the config less its run-length and reporting keys). ``init_from`` warm-starts from that model's weights and then skips pretraining.
    ``ingest``: the version of the ingest set to train on (default: the current one, resolved once
    here, so ingests that publish meanwhile do not change what this run reads).

    Raises ``ConfigError`` for settings that cannot train (``TrainingError``) or for a distributed
    run without ``spark``; ``TrainingDiverged``, ``DataError`` and
    ``pipelines.distributed.DistributedTrainingError`` pass through.
    """
    from sae_model.distributed import result_summary
    from sae_model.trainer import TrainingError, TrainRequest, fit

    dist_cfg = cfg.train.distributed
    if dist_cfg.num_processes > 1 and spark is None:
        raise ConfigError(
            f"train.distributed.num_processes={dist_cfg.num_processes}: distributed training needs a "
            "SparkSession, and none was passed in"
        )
    if dist_cfg.num_processes > 1 and cfg.finetune.uses_global_graph:
        raise ConfigError(
            f"train.distributed.num_processes={dist_cfg.num_processes}: finetune.neighbor_graph=global needs every "
            "training row in one process; use finetune.neighbor_graph=batch or train.distributed.num_processes=1"
        )
    ingest = ingest or pin(cfg.paths.root, "ingest")
    request = TrainRequest(
        model_cfg=cfg.model,
        pretrain_cfg=replace(cfg.pretrain, epochs=0) if init_from else cfg.pretrain,
        finetune_cfg=cfg.finetune,
        train_cfg=cfg.train,
        features_uri=ingest.uri("features"),
        items_uri=ingest.uri("items"),
        mlflow_settings=mlflow_settings(cfg, stage, extra_tags, ingest),
        checkpoint_dir=checkpoint_dir or checkpoint_dir_for(cfg, resume),
        resume=resume,
        fingerprint=cfg.resume_fingerprint() if fingerprint is None else fingerprint,
        init_from=init_from,
    )
    started = time.perf_counter()
    try:
        if dist_cfg.num_processes > 1:
            from pipelines.distributed import run_distributed

            out = run_distributed(spark, dist_cfg, request)
        else:
            out = result_summary(fit(request))
    except TrainingError as exc:
        raise ConfigError(str(exc)) from exc
    out["train_seconds"] = time.perf_counter() - started
    log.info("train done in %.0f s: run %s, model %s version %s", out["train_seconds"], out["run_id"], out["model_uri"],
             out["model_version"])
    return out


def train_and_evaluate(
    cfg: Config,
    spark: Any = None,
    *,
    resume: bool = False,
    checkpoint_dir: str | None = None,
    extra_tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``train_from_config``, then (``evaluate.after_train``) the evaluation of the new model logged
    into the same run; its metrics are merged into the summary's ``metrics``. Too little data to
    evaluate (``DataError``) is logged as a warning: the model is still good."""
    import mlflow

    from sae_model.data import DataError
    from sae_model.evaluation import evaluate_and_log
    from sae_model.loading import load_encoder

    ingest = pin(cfg.paths.root, "ingest")  # training and its evaluation read the same version
    out = train_from_config(
        cfg, spark, resume=resume, checkpoint_dir=checkpoint_dir, extra_tags=extra_tags, ingest=ingest
    )
    if cfg.evaluate.after_train and out.get("run_id") and out.get("model_uri"):
        # Distributed training logged from other processes: this one has not pointed MLflow anywhere yet.
        mlflow.set_tracking_uri(tracking_uri(cfg))
        try:
            ev = evaluate_and_log(
                load_encoder(out["model_uri"]), ingest.uri("features"), ingest.uri("items"),
                cfg.train.val_fraction, cfg.evaluate, out["run_id"], cfg.mlflow.experiment, out["train_seconds"],
                split_column=cfg.train.split_column, train_value=cfg.train.train_value,
            )
            out["table"] = ev["table"]
            out["metrics"] = {**out.get("metrics", {}), **ev["metrics"]}
        except DataError as exc:  # e.g. too few validation items
            log.warning("evaluation after training skipped: %s", exc)
    return out
