"""Train job: features/ -> a trained stacked autoencoder, logged and registered in MLflow.

    sae train --config conf/local.yaml --preset tag_genome paths.root=out/tg
    sae train --config conf/local.yaml --resume          # continue after a crash or kill
    spark-submit jobs/train.py --config conf/local.yaml finetune.epochs=10

The work is ``pipelines.training.train_and_evaluate`` (also what ``sae nightly`` and ``sae sweep``
train with). One process (``train.distributed.num_processes=1``) needs no SparkSession; more
processes start one and hand ``sae_model.distributed.train_worker`` to TorchDistributor
(``pipelines.distributed``), on the driver (``local_mode``) or as barrier tasks on the executors.
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import guarded, new_parser, record_config, resolve, setup_logging, training_session
from pipelines.config import Config, ConfigError

DESCRIPTION = "Pretrain layer by layer, fine-tune the unrolled autoencoder, log and register the model in MLflow."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint (same MLflow run)")
    parser.add_argument("--checkpoint-dir", default=None, help="default: <paths.root>/checkpoints/<config hash>/")




def run(
    cfg: Config, resume: bool = False, checkpoint_dir: str | None = None, extra_tags: dict[str, str] | None = None
) -> dict:
    """Train, then (``evaluate.after_train``) evaluate into the same run: ``pipelines.training``.
    A SparkSession is started only for distributed training (``train.distributed.num_processes > 1``)."""
    from pipelines.training import train_and_evaluate

    record_config(cfg, "train")
    with training_session(cfg) as spark:
        return train_and_evaluate(cfg, spark, resume=resume, checkpoint_dir=checkpoint_dir, extra_tags=extra_tags)


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae train", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from sae_model.data import DataError
    from sae_model.health import UnhealthyTraining
    from sae_model.trainer import TrainingDiverged

    setup_logging()
    cfg = resolve(args)
    try:
        out = run(cfg, resume=args.resume, checkpoint_dir=args.checkpoint_dir)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, UnhealthyTraining) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    if out.get("health") not in (None, "ok"):
        print(f"warning: the run is unhealthy and its model was not registered: {' | '.join(out['health_findings'])}",
              file=sys.stderr)
    if out.get("table"):
        print(out.pop("table"))  # the evaluation's table, before the summary line
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
