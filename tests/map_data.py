"""A small published map for the map tests: codes/, items/, neighbors/ (exact, k=4) and features/
with a manifest under a root, as `sae infer` leaves them, made without training or scoring."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = ["Drama", "Comedy", "Horror"]
FEATURES = ["tearjerker", "funny", "gory", "slow", "violent", "witty"]
K = 4


def publish_small_map(spark, root: Path, n: int = 60, width: int = 2, seed: int = 0, run_id: str = "r123") -> dict:  # noqa: ANN001
    """Three well separated clusters, one genre each; feature c (and c+3, weaker) is an item's
    strongest in cluster c. Returns ids, titles, codes and genres as written."""
    from pipelines.neighbors import exact_neighbors
    from pipelines.schemas import CODES, NEIGHBORS, conform
    from pipelines.schemas import FEATURES as FEATURES_SCHEMA

    rng = np.random.default_rng(seed)
    cluster = np.arange(n) % 3
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 9.0]])
    code = centres[cluster] + rng.normal(scale=1.2, size=(n, 2))
    if width > 2:
        code = np.column_stack([code, rng.normal(scale=0.1, size=(n, width - 2))])
    ids = np.arange(n, dtype=np.int64) * 7 + 1
    titles = [f"Film {i:03d}" for i in range(n)]
    titles[3] = "Toy Story (1995)"
    genres = [f"{GENRES[c]}|{GENRES[(c + 1) % 3]}" for c in cluster]
    feats = rng.random((n, len(FEATURES))) * 0.2
    feats[np.arange(n), cluster] = 1.0
    feats[np.arange(n), cluster + 3] = 0.6
    scored = datetime(2026, 1, 1, tzinfo=UTC)
    two = width == 2
    codes = spark.createDataFrame(
        [(int(i), [float(v) for v in c], float(c[0]) if two else None, float(c[1]) if two else None,
          "models:/sae/3", run_id, "3", scored) for i, c in zip(ids, code, strict=True)],
        CODES,
    )
    codes.write.parquet(str(root / "codes"))
    codes = spark.read.parquet(str(root / "codes"))
    conform(exact_neighbors(spark, codes, K), NEIGHBORS).write.parquet(str(root / "neighbors"))
    spark.createDataFrame(pd.DataFrame({"item_id": ids, "title": titles, "genres": genres})).write.parquet(
        str(root / "items")
    )
    features = spark.createDataFrame([(int(i), [float(v) for v in f]) for i, f in zip(ids, feats, strict=True)], FEATURES_SCHEMA)
    features.write.parquet(str(root / "features"))
    (root / "features" / "_manifest.json").write_text(json.dumps({"feature_names": FEATURES, "dim": len(FEATURES)}))
    return {"ids": ids, "titles": titles, "code": code, "genres": genres, "cluster": cluster}
