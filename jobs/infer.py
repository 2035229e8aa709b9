"""Inference job: score features/ with a tracked model, publish codes/ and neighbors/, draw the maps.

    sae infer --config conf/local.yaml infer.model_uri=models:/sae@champion infer.k=20
    spark-submit jobs/infer.py --config conf/local.yaml infer.metric=cosine infer.layer=3
"""

from __future__ import annotations

import argparse
import json
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

DESCRIPTION = (
    "Score every item with a tracked model (default: models:/<registered>@champion, else the latest "
    "run), publish codes/ and neighbors/ under paths.root, and write the PNG and HTML maps."
)


def run(cfg: Config, model_uri: str | None = None) -> dict:
    """Infer with ``model_uri`` (else ``infer.model_uri``, else the default model); returns the summary."""
    from pipelines.inference import infer_from_config

    record_config(cfg, "infer")
    with spark_session(cfg) as spark:
        summary = infer_from_config(spark, cfg, model_uri)
    log.info(
        "infer done: %s items scored with %s; neighbours by %s%s -> %s",
        summary["items"], summary["model_uri"], summary["method"],
        f" (recall {summary['recall']})" if "recall" in summary else "", cfg.paths.root,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae infer", DESCRIPTION)
    return command(parser.parse_args(argv))


def command(args: argparse.Namespace) -> int:
    setup_logging()
    cfg = resolve(args)
    summary = run(cfg)
    print_summary(summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "maps"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
