"""Generated ``features/`` and ``items/`` tables for the training tests (written with pyarrow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def manifold(n: int, dim: int, seed: int = 0, latent: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Points on a smooth ``latent``-dim manifold in [0,1]^dim, and a label per point (its quadrant)."""
    rng = np.random.default_rng(seed)
    z = rng.uniform(-1, 1, (n, latent))
    a = rng.normal(0, 3, (latent, dim))
    b = rng.normal(0, 1, (1, dim))
    x = 1 / (1 + np.exp(-(np.sin(2 * z) @ a + b)))
    labels = (z[:, 0] > 0).astype(int) * 2 + (z[:, 1] > 0).astype(int)
    return x.astype(np.float32), labels


def write_features(root: Path, x: np.ndarray, labels: np.ndarray | None = None, files: int = 2, row_group: int = 50) -> str:
    """``root/features`` (+ ``items``) as the ingest contract has them; returns the features URI."""
    feats = root / "features"
    feats.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    ids = np.arange(n, dtype=np.int64) * 13 + 5
    for k, part in enumerate(np.array_split(np.arange(n), files)):
        t = pa.table(
            {
                "item_id": pa.array(ids[part], pa.int64()),
                "features": pa.array(list(x[part]), type=pa.list_(pa.float32())),
            }
        )
        pq.write_table(t, feats / f"part-{k:05d}.parquet", row_group_size=row_group)
    (feats / "_manifest.json").write_text(json.dumps({"dim": d, "source": "test", "config_hash": "t"}))
    if labels is not None:
        items = root / "items"
        items.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"item_id": ids, "label": labels.astype(np.int64)}), items / "part-0.parquet")
    return "file://" + str(feats)



def clusters(n: int, dim: int, n_clusters: int = 10, seed: int = 0, nuisance_scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters riding on a wide 2-D nuisance manifold, in [0,1]^dim, and the cluster labels.

    Most of the variance is the nuisance (shared by all clusters), so a 2-D code fitted for
    reconstruction spends itself on it and overlaps the clusters, while every item's nearest
    neighbours in input space are of its own cluster.
    """
    rng = np.random.default_rng(seed)
    nuisance = rng.uniform(-1, 1, (n, 2)) @ rng.normal(0, nuisance_scale, (2, dim))
    centres = rng.normal(0, 1, (n_clusters, dim))
    labels = rng.integers(0, n_clusters, n)
    x = 1 / (1 + np.exp(-(nuisance + centres[labels] + rng.normal(0, 0.2, (n, dim)))))
    return x.astype(np.float32), labels
