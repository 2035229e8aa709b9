"""MLflow helpers and plots for training runs (the trainer calls these through a callback)."""

from __future__ import annotations

import logging
import math
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
    """Log ``params`` to the active MLflow run, each value as a string cut to ``MAX_PARAM_LEN`` characters,
    100 per call."""
    import mlflow

    clean = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items()}
    items = list(clean.items())
    for s in range(0, len(items), 100):
        mlflow.log_params(dict(items[s : s + 100]))


def loss_curves_png(history: list[dict[str, Any]], path: Path) -> Path:
    """One panel per stage (each pretraining layer, fine-tuning): train and validation loss per epoch.

    ``history``: the trainer's epoch records (``stage_name``, ``epoch``, ``train_loss``, ``val_loss``,
    None when there are no validation rows). A panel's y axis is logarithmic when all its losses are
    positive, linear otherwise. Writes a PNG to ``path`` and returns it."""
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
        # The neighbour losses drop constant terms and go negative (the t-SNE edge loss: about -1.3
        # on 20 Newsgroups); a log axis only fits a stage whose losses are all positive.
        plotted = [v for h in rows for v in (h["train_loss"], h["val_loss"]) if v is not None and math.isfinite(v)]
        if plotted and min(plotted) > 0:
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
    """Log ``text`` as the artefact ``name`` of the active MLflow run."""
    import mlflow

    mlflow.log_text(text, name)


def log_figures(history: list[dict[str, Any]], codes: np.ndarray | None, labels: np.ndarray | None) -> None:
    """Log the loss curves of ``history`` and, when ``codes`` is a non-empty float array (n, 2), their scatter
    coloured by ``labels`` (n,), as PNGs under ``plots/`` of the active MLflow run."""
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


def sqlite_uri(db: str | Path) -> str:
    """The MLflow tracking URI of the sqlite file ``db``.

    SQLAlchemy percent-decodes the path and cuts it at ``?``, while MLflow creates the database's
    folder from the undecoded text; so only what SQLAlchemy would misread is quoted (``?`` and a
    ``%`` before two hex digits), and paths with spaces, ``#`` or non-ASCII stay as they are.
    """
    import re

    path = re.sub(r"%(?=[0-9A-Fa-f]{2})", "%25", str(Path(db).absolute()))
    return "sqlite:///" + path.replace("?", "%3F")


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (percent-decoded), else None."""
    from urllib.parse import unquote

    if not uri.startswith("sqlite:///"):
        return None
    return Path(unquote(uri[len("sqlite:///") :].split("?", 1)[0]))


ARTEFACTS_DIR = "mlartifacts"  # beside mlflow.db: the pipeline's own store keeps its artefacts here
# Where MLflow's sqlite schema records absolute artefact locations (MLflow 3).
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def relocate_store(db: str | Path) -> list[str]:
    """Repoint a moved or copied sqlite store at the artefacts beside it; returns the stale locations.

    MLflow records every artefact location as an absolute path, so a ``paths.root`` moved from ``a/``
    to ``b/`` (mlflow.db and mlartifacts/ together) still sends readers and new runs to
    ``a/mlartifacts``, which is gone, or, for a copy, belongs to another store. MLflow has no API to
    move a store; its sqlite schema holds the locations in five columns, rewritten here by prefix in
    one transaction. A store whose own ``mlartifacts/`` is missing while the old one still exists
    (the database copied alone) is left as it is, with a warning. Stores this pipeline did not
    create (artefacts not in an ``mlartifacts`` folder) are never touched.
    """
    import sqlite3
    from urllib.parse import unquote, urlparse

    db = Path(db).absolute()
    if not db.is_file():
        return []
    here = db.parent / ARTEFACTS_DIR
    con = sqlite3.connect(db, timeout=60)
    try:
        try:
            rows = con.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # a new, empty store
            return []
        stale = sorted(
            {
                loc.rstrip("/")
                for (loc,) in rows
                if loc and loc.startswith("file://") and loc.rstrip("/").endswith("/" + ARTEFACTS_DIR)
                and Path(unquote(urlparse(loc).path)) != here
            }
        )
        moved = []
        for old in stale:
            old_path = Path(unquote(urlparse(old).path))
            if not here.exists() and old_path.exists():
                log.warning(
                    "MLflow store %s records its artefacts in %s, not beside it: copy that folder to %s to "
                    "make this store independent of the original", db, old_path, here,
                )
                continue
            if not here.exists():
                log.warning(
                    "MLflow store %s was moved: its artefacts were in %s, which no longer exists, and there is no "
                    "%s/ beside it; models logged before the move cannot be loaded until that folder is copied to %s",
                    db, old_path, ARTEFACTS_DIR, here,
                )
            with con:
                for old_prefix, new_prefix in ((old, here.as_uri()), (str(old_path), str(here))):
                    for table, column in _LOCATION_COLUMNS:
                        columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
                        if column in columns:
                            con.execute(
                                f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                                (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix),
                            )
            log.warning("MLflow store %s was moved or copied: artefact locations %s -> %s", db, old_path, here)
            moved.append(str(old_path))
        return moved
    finally:
        con.close()


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
        db = sqlite_path(uri)
        if db is not None:
            location = (db.parent / "mlartifacts").absolute().as_uri()
        try:
            exp_id = client.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            exp_id = client.get_experiment_by_name(name).experiment_id
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id
