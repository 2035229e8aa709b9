"""Ingest job: raw sources -> features/, items/, quarantine/ Parquet under paths.root.

    sae ingest --config conf/local.yaml data.source=tag_genome data.input=/data/ml-25m
    spark-submit jobs/ingest.py --config conf/local.yaml data.source=mnist
"""

from __future__ import annotations

import argparse
import json
import sys

from jobs.common import guarded, log, new_parser, record_config, resolve, setup_logging, spark_session
from pipelines.config import Config

DESCRIPTION = "Turn raw data (Tag Genome, MNIST, synthetic, logs, JDBC) into validated Parquet feature vectors."


def run(cfg: Config) -> dict:
    from pipelines.ingest import check_inputs, run_ingest

    check_inputs(cfg)  # missing files / wrong headers fail before Spark starts or outputs are touched
    record_config(cfg, "ingest")
    with spark_session(cfg) as spark:
        manifest = run_ingest(spark, cfg)
    log.info(
        "ingest done: %s rows in, %s items out, %s rows quarantined, dim %s -> %s",
        manifest["rows_in"], manifest["items_out"], manifest["rows_quarantined"], manifest["dim"], cfg.paths.root,
    )
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae ingest", DESCRIPTION)
    args = parser.parse_intermixed_args(argv)
    return command(args)


def command(args: argparse.Namespace) -> int:
    from pipelines.sources import InputError

    setup_logging()
    cfg = resolve(args)
    try:
        manifest = run(cfg)
    except InputError as exc:
        # Bad input is the user's to fix: one line naming the file, no stack trace, nothing published.
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("rows_in", "items_out", "rows_quarantined", "dim")}))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
