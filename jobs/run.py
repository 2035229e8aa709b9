"""The whole pipeline in one command: ingest -> train -> infer.

    sae run --config conf/local.yaml
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import (
    guarded,
    log,
    new_parser,
    print_summary,
    record_config,
    resolve,
    setup_logging,
    spark_session,
)
from pipelines.config import Config

DESCRIPTION = "Run ingest, training and inference in turn; print where the tables, maps and MLflow store are."


def run(cfg: Config) -> dict:
    """The library's ingest, training (with its evaluation) and inference in turn, on one SparkSession;
    returns the inference summary. Each stage's resolved config is recorded as its own job does."""
    from pipelines.inference import infer_from_config
    from pipelines.ingest import check_inputs, run_ingest
    from pipelines.training import train_and_evaluate

    check_inputs(cfg)  # missing files / wrong headers fail before Spark starts or outputs are touched
    with spark_session(cfg) as spark:
        record_config(cfg, "ingest")
        manifest = run_ingest(spark, cfg)
        log.info("ingest: %s items", manifest.get("items_out"))
        record_config(cfg, "train")
        trained = train_and_evaluate(cfg, spark)
        log.info(
            "train: model %s (run %s, version %s)", trained["model_uri"], trained.get("run_id"), trained.get("model_version")
        )
        # Infer with exactly the model this run trained, not whatever the alias points at; by its
        # registered version when there is one, so the tables name a version downstream can look up.
        model_uri = trained["model_uri"]
        if trained.get("model_version") and cfg.mlflow.registered_model:
            model_uri = f"models:/{cfg.mlflow.registered_model}/{trained['model_version']}"
        record_config(cfg, "infer")
        return infer_from_config(spark, cfg, model_uri)


def main(argv: list[str] | None = None) -> int:
    return command(new_parser("sae run", DESCRIPTION).parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from sae_model.health import UnhealthyModel

    setup_logging()
    try:
        summary = run(resolve(args))
    except UnhealthyModel as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
