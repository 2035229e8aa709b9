"""MLflow helpers and plots for training runs (the trainer calls these through a callback)."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000


def git_commit(cwd: str | Path | None = None) -> str:
    """The checked-out commit (with ``-dirty`` when there are local changes), or ``unknown``."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, check=True, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def log_params(params: dict[str, Any]) -> None:
    import mlflow

    clean = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
    items = list(clean.items())
    for s in range(0, len(items), 100):
        mlflow.log_params(dict(items[s : s + 100]))


def loss_curves_png(history: list[dict[str, Any]], path: Path) -> Path:
    """One panel per stage (each pretraining layer, fine-tuning): train and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = list(dict.fromkeys(h["stage_name"] for h in history))
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(3.2 * max(1, len(stages)), 3), squeeze=False)
    for ax, name in zip(axes[0], stages, strict=False):
        rows = [h for h in history if h["stage_name"] == name]
        ep = [h["epoch"] + 1 for h in rows]
        ax.plot(ep, [h["train_loss"] for h in rows], label="train")
        ax.plot(ep, [h["val_loss"] for h in rows], label="validation")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def codes_scatter_png(codes: np.ndarray, labels: np.ndarray | None, path: Path, title: str) -> Path:
    """The validation items' 2-D codes, coloured by label (MNIST digit) or first genre."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    if labels is None:
        ax.scatter(codes[:, 0], codes[:, 1], s=3, alpha=0.6)
    else:
        labels = np.asarray(labels).astype(str)
        uniq, idx = np.unique(labels, return_inverse=True)
        cmap = plt.get_cmap("tab10" if len(uniq) <= 10 else "tab20")
        for k, name in enumerate(uniq[:20]):
            m = idx == k
            ax.scatter(codes[m, 0], codes[m, 1], s=3, alpha=0.6, color=cmap(k % cmap.N), label=name)
        if len(uniq) <= 20:
            ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def log_figures(history: list[dict[str, Any]], codes: np.ndarray | None, labels: np.ndarray | None) -> None:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        if history:
            mlflow.log_artifact(str(loss_curves_png(history, Path(tmp) / "loss_curves.png")), "plots")
        if codes is not None and codes.shape[1] == 2 and len(codes):
            p = codes_scatter_png(codes, labels, Path(tmp) / "validation_codes.png", "validation codes")
            mlflow.log_artifact(str(p), "plots")


def log_evaluation(run_id: str, metrics: dict[str, float], figure: Path | None, table: str) -> None:
    """Log an evaluation into run ``run_id`` (open or finished): metrics, the table, the maps PNG."""
    import time

    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient()
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    for s in range(0, len(items), 500):
        client.log_batch(run_id, metrics=items[s : s + 500])
    client.log_text(run_id, table + "\n", "evaluation/metrics.txt")
    if figure is not None:
        client.log_artifact(run_id, str(figure), "evaluation")


def use_experiment(name: str, tracking_uri: str | None = None) -> str:
    """Make ``name`` the active experiment (created if missing) and return its id.

    With a local sqlite store, a new experiment keeps its artefacts in ``mlartifacts/`` beside the
    database instead of ``./mlruns`` of whichever process logs first: training ranks on executors,
    the driver and ``sae evaluate`` must all find the same model files.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        location = None
        if uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            location = (db.parent / "mlartifacts").absolute().as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
