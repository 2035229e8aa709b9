"""Inference job: score features/ with a tracked model, publish codes/ and neighbors/, draw the maps.

    sae infer --config conf/local.yaml infer.model_uri=models:/sae@champion infer.k=20
    spark-submit jobs/infer.py --config conf/local.yaml infer.metric=cosine infer.layer=3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

from jobs.common import log, new_parser, record_config, resolve, setup_logging, spark_session
from pipelines.config import Config, tracking_uri

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
    import mlflow

    from pipelines.inference import predict_batch
    from pipelines.scoring import resolve_model
    from sae_model.health import refuse_unhealthy

    mlflow.set_tracking_uri(tracking_uri(cfg))
    record_config(cfg, "infer")
    with tempfile.TemporaryDirectory(prefix="sae-model-") as tmp, spark_session(cfg) as spark:
        # On one machine the artefacts are downloaded once and every worker loads them from disk.
        local = spark.sparkContext.master.startswith("local")
        model = resolve_model(
            model_uri or cfg.infer.model_uri,
            registered_model=cfg.mlflow.registered_model,
            experiment=cfg.mlflow.experiment,
            download_to=tmp if local else None,
        )
        refuse_unhealthy(model.run_id, model.uri, force or cfg.infer.force)
        summary = predict_batch(spark, model, cfg.paths.root, cfg.infer)
    summary["tracking_uri"] = mlflow.get_tracking_uri()
    log.info(
        "infer done: %s items scored with %s; neighbours by %s%s -> %s",
        summary["items"], summary["model_uri"], summary["method"],
        f" (recall {summary['recall']})" if "recall" in summary else "", cfg.paths.root,
    )
    return summary


def print_summary(summary: dict) -> None:
    print(f"codes:      {summary['codes']}  ({summary['items']:,} items, code width {summary['code_width']})")
    rec = f", recall@k against exact {summary['recall']:.4f}" if "recall" in summary else ""
    print(f"neighbours: {summary['neighbors']}  (method {summary['method']}{rec})")
    for path in summary.get("maps", []):
        print(f"map:        {path}")
    print(f"model:      {summary['model_uri']} (run {summary['run_id']}, version {summary['model_version']})")
    uri = summary.get("tracking_uri", "")
    print(f"MLflow:     {uri}")
    if uri.startswith("sqlite:"):
        print(f"            open the UI with: mlflow ui --backend-store-uri {uri}")


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
    sys.exit(main())
