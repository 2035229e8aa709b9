"""Inputs for the inference tests, made here so they don't wait for ingest and training:
a features/ and items/ table under a root, and a small model logged to a sqlite MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

GENRES = ["Drama", "Comedy", "Action", "Horror", "Romance", "Sci-Fi"]


def write_inputs(root: Path, n: int = 600, dim: int = 24, seed: int = 0) -> np.ndarray:
    """features/ (item_id, features list<float>) and items/ (item_id, title, genres); returns the features."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, dim), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64) * 7 + 1
    col = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x.ravel())
    )
    (root / "features").mkdir(parents=True)
    (root / "items").mkdir(parents=True)
    for part in range(2):  # two files of several row groups, so scoring runs as several tasks
        sl = slice(part * n // 2, (part + 1) * n // 2)
        table = pa.table({"item_id": ids[sl], "features": col[sl]})
        pq.write_table(table, root / "features" / f"part-{part}.parquet", row_group_size=max(1, n // 5))
    (root / "features" / "_SUCCESS").touch()  # markers a reader must skip, as Spark's jobs leave them
    (root / "features" / "_manifest.json").write_text("{}")
    titles = [f"Movie {i} ({1950 + i % 70})" for i in range(n)]
    titles[3] = "Toy Story (1995)"
    titles[4] = "Toy Story 2 (1999)"
    genres = ["|".join(GENRES[j] for j in sorted({i % 6, (i * 5) % 6})) for i in range(n)]
    pq.write_table(
        pa.table({"item_id": ids, "title": titles, "genres": genres}), root / "items" / "part-0.parquet"
    )
    return x


def log_test_model(tracking_uri: str, layers: list[int], registered: str = "sae", seed: int = 1):  # noqa: ANN201
    """A StackedAutoencoder logged (and aliased @champion) in ``tracking_uri``; returns (model, ModelInfo)."""
    import mlflow

    from sae_model.loading import log_model
    from sae_model.model import StackedAutoencoder

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("sae")
    torch.manual_seed(seed)
    model = StackedAutoencoder(layers)
    with mlflow.start_run():
        info = log_model(model, registered_model_name=registered)
    mlflow.MlflowClient().set_registered_model_alias(registered, "champion", info.registered_model_version)
    return model, info
