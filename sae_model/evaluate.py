"""Evaluate a trained map on the validation split: the autoencoder against PCA (and UMAP if installed).

``evaluate_model`` reads ``features/`` once, splits it with the training split (the same hash of
``item_id`` and ``train.val_fraction``), fits PCA of the code width on the training rows and scores
the validation rows: squared error per item (Hinton's measure, on every validation item), kNN label
accuracy (or, for multi-label items such as Tag Genome genres, the share of neighbours sharing a
label), trustworthiness and continuity (on a seeded sample of at most ``evaluate.max_items``,
since those are O(n^2)). It writes one PNG with the maps side by side. No MLflow here: the caller
logs the result (``sae_model.tracking.log_evaluation``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sae_model.config import EvaluateConfig
from sae_model.data import ID_COL, DataError, _files, is_validation, load_table, local_dir
from sae_model.evaluation import (
    PCA,
    continuity,
    knn_accuracy,
    knn_label_share,
    plot_maps_side_by_side,
    squared_error_per_item,
    trustworthiness,
    umap_codes,
)

log = logging.getLogger(__name__)

MAPS_PNG = "maps.png"


@dataclass
class Evaluation:
    metrics: dict[str, float]  # flat, ready for MLflow: ae_*, pca_*, umap_*, n_*
    figure: Path | None  # the side-by-side maps PNG
    label_kind: str  # "label" | "genres" | "none"


def read_label_sets(items_uri: str | None, item_ids: np.ndarray) -> tuple[np.ndarray | list | None, str]:
    """Labels of ``item_ids`` from ``items/``: ``label`` (one class each, e.g. the MNIST digit), else
    ``genres`` as sets (an array column or a ``|``-joined string); ``(None, "none")`` when neither."""
    if not items_uri:
        return None, "none"
    root = local_dir(items_uri)
    files = _files(root) if root.exists() else []
    if not files:
        return None, "none"
    names = pq.read_schema(files[0]).names
    col = "label" if "label" in names else "genres" if "genres" in names else None
    if col is None or ID_COL not in names:
        return None, "none"
    t = pa.concat_tables(pq.read_table(f, columns=[ID_COL, col]) for f in files).to_pandas()
    s = t.drop_duplicates(ID_COL).set_index(ID_COL)[col].reindex(item_ids)
    if s.isna().all() and len(s):
        return None, "none"
    if col == "label":
        if s.isna().any():
            raise DataError(f"items table {items_uri}: {int(s.isna().sum())} validation items have no label")
        return s.to_numpy(), "label"

    def as_set(v: Any) -> frozenset[str]:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return frozenset()
        parts = v.split("|") if isinstance(v, str) else list(v)
        return frozenset(p for p in parts if p and p != "(no genres listed)")

    return [as_set(v) for v in s.tolist()], "genres"


def _sample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``n`` rows (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def map_metrics(prefix: str, x: np.ndarray, codes: np.ndarray, labels: Any, kind: str, k_knn: int, k_tw: int) -> dict[str, float]:
    """kNN label accuracy (or label share), trustworthiness and continuity of one map of ``x``."""
    out: dict[str, float] = {}
    if kind == "label":
        out[f"{prefix}_knn_accuracy"] = knn_accuracy(codes, labels, k_knn)
    elif kind == "genres":
        out[f"{prefix}_knn_label_share"] = knn_label_share(codes, labels, k_knn)
    out[f"{prefix}_trustworthiness"] = trustworthiness(x, codes, k_tw)
    out[f"{prefix}_continuity"] = continuity(x, codes, k_tw)
    return out


def _batched(fn: Any, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([fn(x[s : s + batch]) for s in range(0, x.shape[0], batch)])


def evaluate_model(
    encoder: Any,
    features_uri: str,
    items_uri: str | None,
    val_fraction: float,
    cfg: EvaluateConfig | None = None,
    out_dir: str | Path | None = None,
    title: str = "",
) -> Evaluation:
    """Score ``encoder`` (``sae_model.loading.Encoder``: ``encode``/``reconstruct``) on the validation split.

    ``val_fraction`` must be the one the model was trained with, or training rows leak into the
    scores. ``out_dir`` receives ``maps.png`` (None: no figure).
    """
    cfg = cfg or EvaluateConfig()
    ids, x = load_table(features_uri, encoder.input_width)
    val = is_validation(ids, val_fraction)
    n_val, n_train = int(val.sum()), int((~val).sum())
    if n_val <= 2 * cfg.k_tw:
        raise DataError(
            f"evaluation needs more than {2 * cfg.k_tw} validation items, got {n_val} "
            f"(train.val_fraction={val_fraction}); raise train.val_fraction"
        )
    if n_train < encoder.code_width:
        raise DataError(f"PCA of width {encoder.code_width} needs at least that many training items, got {n_train}")
    rng = np.random.default_rng(cfg.seed)
    x_fit = x[~val][_sample(n_train, cfg.max_fit_items, rng)]
    val_ids, x_val = ids[val], x[val]
    del x

    # Reconstruction: every validation item.
    codes = _batched(encoder.encode, x_val)
    recon = _batched(encoder.reconstruct, x_val)
    t0 = time.perf_counter()
    pca = PCA(encoder.code_width).fit(x_fit)
    pca_seconds = time.perf_counter() - t0
    pca_codes = pca.transform(x_val)
    metrics: dict[str, float] = {
        "n_train": float(n_train),
        "n_val": float(n_val),
        "code_dim": float(encoder.code_width),
        "ae_squared_error": squared_error_per_item(x_val, recon),
        "pca_squared_error": squared_error_per_item(x_val, pca.inverse_transform(pca_codes)),
        "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
        "pca_fit_seconds": pca_seconds,
    }

    # Neighbourhoods: a seeded sample of at most max_items.
    sub = _sample(n_val, cfg.max_items, rng)
    metrics["n_eval"] = float(len(sub))
    labels, kind = read_label_sets(items_uri, val_ids[sub])
    if kind == "genres" and not any(labels):
        labels, kind = None, "none"
    xs = x_val[sub].astype(np.float64)
    maps: dict[str, np.ndarray] = {"autoencoder": codes[sub], "PCA": pca_codes[sub]}
    if cfg.umap:
        u = umap_codes(x_fit, xs, dim=encoder.code_width, seed=cfg.seed)
        if u is not None:
            maps["UMAP"], metrics["umap_fit_seconds"] = u
    names = {"autoencoder": "ae", "PCA": "pca", "UMAP": "umap"}
    for name, m in maps.items():
        metrics.update(map_metrics(names[name], xs, m, labels, kind, cfg.k_knn, cfg.k_tw))

    figure = None
    if out_dir is not None:
        sub_title = title or f"validation items ({len(sub)} of {n_val}), code width {encoder.code_width}"
        plot_labels = None if labels is None else list(labels) if kind == "genres" else labels
        figure = plot_maps_side_by_side(maps, plot_labels, Path(out_dir) / MAPS_PNG, sub_title)
    log.info("evaluation on %d validation items (%d for neighbourhoods): %s", n_val, len(sub), metrics)
    return Evaluation(metrics, figure, kind)


def evaluate_and_log(
    encoder: Any,
    features_uri: str,
    items_uri: str | None,
    val_fraction: float,
    cfg: EvaluateConfig,
    run_id: str | None,
    experiment: str,
    train_seconds: float | None = None,
) -> dict[str, Any]:
    """``evaluate_model``, logged into MLflow run ``run_id`` (None: a new ``evaluate`` run in
    ``experiment``, on the tracking store already set); returns ``run_id``, ``metrics``, ``table``.
    ``train_seconds`` (the training that just made ``encoder``) is shown beside PCA's and UMAP's fits."""
    import tempfile

    import mlflow

    from sae_model import tracking
    from sae_model.evaluation import format_metrics_table

    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_model(encoder, features_uri, items_uri, val_fraction, cfg, tmp)
        if train_seconds is not None:
            result.metrics["ae_fit_seconds"] = train_seconds
        table = format_metrics_table(result.metrics)
        if run_id is None:
            tracking.use_experiment(experiment)
            with mlflow.start_run(tags={"stage": "evaluate"}) as run:
                run_id = run.info.run_id
                mlflow.log_param("train.val_fraction", val_fraction)
        tracking.log_evaluation(run_id, result.metrics, result.figure, table)
    log.info("evaluation (run %s):\n%s", run_id, table)
    return {"run_id": run_id, "metrics": result.metrics, "table": table}
