"""The whole pipeline in one command: ingest -> train -> infer.

    sae run --config conf/local.yaml
"""

from __future__ import annotations

import argparse
import sys

from jobs.common import log, new_parser, resolve, setup_logging, spark_session
from pipelines.config import Config

DESCRIPTION = "Run ingest, training and inference in turn; print where the tables, maps and MLflow store are."


def run(cfg: Config) -> dict:
    from jobs import infer, ingest, train

    # One SparkSession for the ingest and inference stages (training itself needs none locally).
    with spark_session(cfg):
        manifest = ingest.run(cfg)
        log.info("ingest: %s items", manifest.get("items_out"))
        trained = train.run(cfg)
        log.info(
            "train: model %s (run %s, version %s)", trained["model_uri"], trained.get("run_id"), trained.get("model_version")
        )
        # Infer with exactly the model this run trained, not whatever the alias points at; by its
        # registered version when there is one, so the tables name a version downstream can look up.
        model_uri = trained["model_uri"]
        if trained.get("model_version") and cfg.mlflow.registered_model:
            model_uri = f"models:/{cfg.mlflow.registered_model}/{trained['model_version']}"
        return infer.run(cfg, model_uri=model_uri)


def main(argv: list[str] | None = None) -> int:
    return command(new_parser("sae run", DESCRIPTION).parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from jobs.infer import print_summary
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
    sys.exit(main())
