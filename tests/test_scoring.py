"""Spark scoring equals in-process torch; model references are pinned on the driver."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from pipelines.scoring import resolve_model, score
from sae_model.loading import Encoder
from tests.infer_data import log_test_model, write_inputs


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    x = write_inputs(tmp / "root", n=500, dim=24)
    model, info = log_test_model(f"sqlite:///{tmp}/mlflow.db", [24, 16, 8, 2])
    yield tmp, x, model, info
    mlflow.set_tracking_uri("")


def _by_id(df, n):
    rows = sorted(df.collect(), key=lambda r: r.item_id)
    assert len(rows) == n
    return np.array([r.item_id for r in rows]), np.array([r.code for r in rows], dtype=np.float32)


@pytest.mark.parametrize("layer", [-1, 2])
def test_spark_scoring_equals_torch(spark, logged, layer):
    tmp, x, model, info = logged
    # As the job does on a local master: artefacts downloaded once, workers load from disk.
    resolved = resolve_model(info.model_uri, download_to=str(tmp / f"dl{layer}"))
    features = spark.read.parquet(str(tmp / "root" / "features"))
    # Batches of 64 rows: several Arrow batches per task, and a last batch that is not full.
    ids, got = _by_id(score(spark, features, resolved, layer=layer, batch_rows=64), 500)
    np.testing.assert_array_equal(ids, np.arange(500) * 7 + 1)
    want = Encoder(model).encode(x, layer=layer)
    assert got.shape == (500, 2 if layer == -1 else 8)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_default_and_alias_resolve_to_a_pinned_version(logged, tmp_path):
    _, _, _, info = logged
    for uri in ("", "models:/sae@champion"):
        r = resolve_model(uri, registered_model="sae", experiment="sae")
        assert r.uri == f"models:/sae/{info.registered_model_version}"
        assert r.run_id == info.run_id and r.version == str(info.registered_model_version)
    r = resolve_model(f"runs:/{info.run_id}/model", download_to=str(tmp_path))
    assert r.run_id == info.run_id and r.local_dir and (tmp_path in __import__("pathlib").Path(r.local_dir).parents)
    # No alias: the newest model logged in the experiment.
    r = resolve_model("", registered_model="no-such-model", experiment="sae")
    assert r.run_id == info.run_id
    with pytest.raises(ValueError, match="no model to score with"):
        resolve_model("", registered_model="no-such-model", experiment="no-such-experiment")


def test_scoring_rejects_wrong_width(spark, logged, tmp_path):
    _, _, _, info = logged
    df = spark.createDataFrame([(1, [0.5] * 3)], "item_id long, features array<float>")
    with pytest.raises(Exception, match="every vector must have 24 values"):
        score(spark, df, resolve_model(info.model_uri, download_to=str(tmp_path))).collect()
