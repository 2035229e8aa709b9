"""Train job: features/ -> a trained stacked autoencoder, logged and registered in MLflow.

    sae train --config conf/local.yaml --preset tag_genome paths.root=out/tg
    sae train --config conf/local.yaml --resume          # continue after a crash or kill
    spark-submit jobs/train.py --config conf/local.yaml finetune.epochs=10

One process (``train.distributed.num_processes=1``) needs no SparkSession: the job only composes
the root config into the plain arguments of ``sae_model.trainer.train``. More processes start a
SparkSession and hand ``sae_model.distributed.train_worker`` to TorchDistributor
(``pipelines.distributed``), on the driver (``local_mode``) or as barrier tasks on the executors.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from jobs.common import guarded, log, new_parser, record_config, resolve, setup_logging, spark_session
from pipelines.config import Config, ConfigError, tracking_uri
from pipelines.publish import is_local, local_path, table_uri

DESCRIPTION = "Pretrain layer by layer, fine-tune the unrolled autoencoder, log and register the model in MLflow."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint (same MLflow run)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <paths.root>/checkpoints/<config hash>/")




def manifest_hash(features_uri: str) -> str:
    path = local_path(features_uri) / "_manifest.json" if is_local(features_uri) else None
    if path is None or not path.exists():
        return "none"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def checkpoint_dir_for(cfg: Config, resume: bool) -> str:
    """``paths.root/checkpoints/<config hash>``; on ``--resume`` with none there, the newest unfinished
    checkpoint of the same training under another hash (only the run length or reporting changed)."""
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


def run(
    cfg: Config, resume: bool = False, checkpoint_dir: str | None = None, extra_tags: dict[str, str] | None = None
) -> dict:
    """Train, then (``evaluate.after_train``) evaluate into the same run; ``extra_tags`` go on the run
    (``sae sweep`` sets ``mlflow.parentRunId`` there to make it a child run)."""
    from sae_model.data import DataError
    from sae_model.distributed import result_summary
    from sae_model.loading import load_encoder
    from sae_model.tracking import git_commit
    from sae_model.trainer import MlflowSettings, TrainingError, train

    features = table_uri(cfg.paths.root, "features")
    items = table_uri(cfg.paths.root, "items")
    ckpt = checkpoint_dir or checkpoint_dir_for(cfg, resume)
    record_config(cfg, "train")
    settings = MlflowSettings(
        tracking_uri=tracking_uri(cfg),
        experiment=cfg.mlflow.experiment,
        registered_model=cfg.mlflow.registered_model,
        params=cfg.flat(),
        tags={
            "git_commit": git_commit(Path(__file__).resolve().parent.parent),
            "data_manifest_hash": manifest_hash(features),
            "config_hash": cfg.hash(),
            "stage": "train",
            **(extra_tags or {}),
        },
        config_text=cfg.to_yaml(),
    )
    kwargs = dict(
        model_cfg=cfg.model, pretrain_cfg=cfg.pretrain, finetune_cfg=cfg.finetune, train_cfg=cfg.train,
        features_uri=features, items_uri=items, mlflow_settings=settings, checkpoint_dir=ckpt,
        resume=resume, fingerprint=cfg.resume_fingerprint(),
    )
    dist_cfg = cfg.train.distributed
    started = time.perf_counter()
    try:
        if dist_cfg.num_processes > 1:
            from pipelines.distributed import run_distributed

            with spark_session(cfg) as spark:
                out = run_distributed(spark, dist_cfg, kwargs)
        else:
            out = result_summary(train(**kwargs))
    except TrainingError as exc:
        raise ConfigError(str(exc)) from exc
    train_seconds = time.perf_counter() - started
    log.info("train done in %.0f s: run %s, model %s version %s", train_seconds, out["run_id"], out["model_uri"],
             out["model_version"])
    if cfg.evaluate.after_train and out.get("run_id") and out.get("model_uri"):
        import mlflow

        from jobs.evaluate import evaluate_and_log

        # Distributed training logged from other processes: this one has not pointed MLflow anywhere yet.
        mlflow.set_tracking_uri(settings.tracking_uri)
        try:
            ev = evaluate_and_log(cfg, load_encoder(out["model_uri"]), out["run_id"], cfg.train.val_fraction, train_seconds)
            out["metrics"] = {**out.get("metrics", {}), **ev["metrics"]}
        except DataError as exc:  # e.g. too few validation items: the model is still good
            log.warning("evaluation after training skipped: %s", exc)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae train", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_args(argv))


def command(args: argparse.Namespace) -> int:
    from sae_model.data import DataError
    from sae_model.trainer import TrainingDiverged

    setup_logging()
    cfg = resolve(args)
    try:
        out = run(cfg, resume=args.resume, checkpoint_dir=args.checkpoint_dir)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
