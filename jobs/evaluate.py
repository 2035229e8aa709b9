"""Evaluate job: a trained model's map against PCA on the validation split, logged into its MLflow run.

    sae evaluate --config conf/local.yaml                         # the experiment's latest training run
    sae evaluate --config conf/local.yaml --model-uri runs:/ID/model evaluate.max_items=5000
    sae evaluate --config conf/local.yaml infer.model_uri=models:/sae@champion

``sae train`` runs the same evaluation at its end (``evaluate.after_train=true``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from typing import Any

from jobs.common import log, new_parser, record_config, resolve, setup_logging
from pipelines.config import Config, ConfigError
from pipelines.publish import table_uri

DESCRIPTION = (
    "Score a trained map on the validation split: squared error per item, kNN label accuracy, "
    "trustworthiness and continuity, against PCA of the same width; log them and a side-by-side PNG to MLflow."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-uri", default=None,
        help="runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS (default: infer.model_uri, else the "
        "experiment's latest finished training run)",
    )


def find_run(model_uri: str | None, experiment: str) -> tuple[str, str | None]:
    """``(model URI, the MLflow run it came from or None)``; with no URI, the latest finished train run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if not model_uri:
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], "attributes.status = 'FINISHED' and tags.stage = 'train'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not runs:
            raise ConfigError(f"no finished training run in MLflow experiment {experiment!r}; run `sae train` or pass --model-uri")
        return f"runs:/{runs[0].info.run_id}/model", runs[0].info.run_id
    try:
        if model_uri.startswith("runs:/"):
            return model_uri, model_uri[len("runs:/"):].split("/")[0]
        if model_uri.startswith("models:/"):
            rest = model_uri[len("models:/"):].strip("/")
            if "@" in rest:
                name, alias = rest.split("@", 1)
                return model_uri, client.get_model_version_by_alias(name, alias).run_id
            if "/" in rest:
                name, version = rest.split("/", 1)
                return model_uri, client.get_model_version(name, version).run_id
            return model_uri, client.get_logged_model(rest).source_run_id
    except MlflowException as exc:
        raise ConfigError(f"--model-uri {model_uri}: {exc.message}") from exc
    return model_uri, None  # a local saved-model directory: evaluated into a new run


def evaluate_and_log(
    cfg: Config, encoder: Any, run_id: str | None, val_fraction: float, train_seconds: float | None = None
) -> dict:
    """Evaluate ``encoder`` on ``paths.root``'s tables; log into ``run_id`` (or a new ``evaluate`` run).
    ``train_seconds`` (the training that just made ``encoder``) is shown beside PCA's and UMAP's fits."""
    import mlflow

    from sae_model import tracking
    from sae_model.evaluate import evaluate_model
    from sae_model.evaluation import format_metrics_table

    features = table_uri(cfg.paths.root, "features")
    items = table_uri(cfg.paths.root, "items")
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_model(encoder, features, items, val_fraction, cfg.evaluate, tmp)
        if train_seconds is not None:
            result.metrics["ae_fit_seconds"] = train_seconds
        table = format_metrics_table(result.metrics)
        if run_id is None:
            tracking.use_experiment(cfg.mlflow.experiment)
            with mlflow.start_run(tags={"stage": "evaluate"}) as run:
                run_id = run.info.run_id
                mlflow.log_param("train.val_fraction", val_fraction)
        tracking.log_evaluation(run_id, result.metrics, result.figure, table)
    log.info("evaluation (run %s):\n%s", run_id, table)
    return {"run_id": run_id, "metrics": result.metrics, "table": table}


def run(cfg: Config, model_uri: str | None = None) -> dict:
    import mlflow

    from jobs.train import tracking_uri
    from sae_model.loading import load_encoder

    record_config(cfg, "evaluate")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    uri, run_id = find_run(model_uri or cfg.infer.model_uri or None, cfg.mlflow.experiment)
    val_fraction = cfg.train.val_fraction
    if run_id is not None:
        trained_with = mlflow.MlflowClient().get_run(run_id).data.params.get("train.val_fraction")
        if trained_with is not None and float(trained_with) != val_fraction:
            log.info("using the model's own split: train.val_fraction=%s (config has %s)", trained_with, val_fraction)
            val_fraction = float(trained_with)
    encoder = load_encoder(uri)
    out = evaluate_and_log(cfg, encoder, run_id, val_fraction)
    out["model_uri"] = uri
    return out


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae evaluate", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from sae_model.data import DataError

    setup_logging()
    cfg = resolve(args)
    try:
        out = run(cfg, args.model_uri)
    except (ConfigError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out["table"])
    print(json.dumps({"run_id": out["run_id"], "model_uri": out["model_uri"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
