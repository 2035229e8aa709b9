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

from jobs.common import guarded, log, new_parser, record_config, resolve, setup_logging
from pipelines.config import Config, ConfigError, tracking_uri
from pipelines.publish import pin

DESCRIPTION = (
    "Score a trained map on the validation split (with train.split_column: on the held-out test items): "
    "squared error per item, kNN label accuracy, trustworthiness and continuity, against PCA of the same width; "
    "log them and a side-by-side PNG to MLflow."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-uri", default=None,
        help="runs:/ID/model, models:/NAME/VERSION, models:/NAME@ALIAS (default: infer.model_uri, else the "
        "experiment's latest finished training run)",
    )


def find_run(model_uri: str | None, experiment: str) -> tuple[str, str | None]:
    """``(model URI, the MLflow run it came from or None)``; with no URI, the latest finished train run.
    A URI is resolved by ``sae_model.registry.resolve_model`` (ModelURIError when it does not exist)."""
    from mlflow import MlflowClient

    from sae_model.registry import resolve_model

    if not model_uri:
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], "attributes.status = 'FINISHED' and tags.stage = 'train'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if not runs:
            raise ConfigError(f"no finished training run in MLflow experiment {experiment!r}; run `sae train` or pass --model-uri")
        return f"runs:/{runs[0].info.run_id}/model", runs[0].info.run_id
    resolved = resolve_model(model_uri, experiment=experiment)
    return (resolved.local_dir or resolved.uri), resolved.run_id


def run(cfg: Config, model_uri: str | None = None) -> dict:
    import mlflow

    from sae_model.evaluation import evaluate_and_log
    from sae_model.loading import load_encoder

    record_config(cfg, "evaluate")
    mlflow.set_tracking_uri(tracking_uri(cfg))
    uri, run_id = find_run(model_uri or cfg.infer.model_uri or None, cfg.mlflow.experiment)
    split = {"train.val_fraction": cfg.train.val_fraction, "train.split_column": cfg.train.split_column,
             "train.train_value": cfg.train.train_value}
    train_seconds = None
    if run_id is not None:
        data = mlflow.MlflowClient().get_run(run_id).data
        for key, value in split.items():  # the model's own split, whatever the config says now
            trained_with = data.params.get(key)
            differs = trained_with is not None and (
                float(trained_with) != value if key == "train.val_fraction" else trained_with != value
            )
            if differs:
                log.info("using the model's own split: %s=%r (config has %r)", key, trained_with, value)
                split[key] = float(trained_with) if key == "train.val_fraction" else trained_with
        train_seconds = data.metrics.get("ae_fit_seconds")  # its training's time, logged after `sae train`
    encoder = load_encoder(uri)
    ingest = pin(cfg.paths.root, "ingest")  # one version of features/ and items/ for the whole evaluation
    out = evaluate_and_log(
        encoder, ingest.uri("features"), ingest.uri("items"), float(split["train.val_fraction"]), cfg.evaluate,
        run_id, cfg.mlflow.experiment, train_seconds,
        split_column=str(split["train.split_column"]), train_value=str(split["train.train_value"]),
    )
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
    sys.exit(guarded(main))
