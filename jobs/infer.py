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




def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="publish even a model whose training run is marked unhealthy (infer.force=true)"
    )


def run(cfg: Config, model_uri: str | None = None, force: bool = False) -> dict:
    """Infer with ``model_uri`` (else ``infer.model_uri``, else the default model); returns the summary.

    Raises ``sae_model.health.UnhealthyModel`` (nothing published) when the model's training run is
    tagged unhealthy, unless ``force`` or ``infer.force``.
    """
    from pipelines.inference import infer_from_config

    record_config(cfg, "infer")
    with spark_session(cfg) as spark:
        summary = infer_from_config(spark, cfg, model_uri, force=force)
    log.info(
        "infer done: %s items scored with %s; neighbours by %s%s -> %s",
        summary["items"], summary["model_uri"], summary["method"],
        f" (recall {summary['recall']})" if "recall" in summary else "", cfg.paths.root,
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae infer", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from sae_model.health import UnhealthyModel

    setup_logging()
    cfg = resolve(args)
    try:
        summary = run(cfg, force=getattr(args, "force", False))
    except UnhealthyModel as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_summary(summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "maps"}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
