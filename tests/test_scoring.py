"""Spark scoring equals in-process torch; model references are pinned on the driver."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from pipelines.config import ConfigError, InferConfig
from pipelines.inference import predict_batch
from pipelines.scoring import parquet_row_groups, score, score_parquet
from sae_model.loading import Encoder
from sae_model.registry import resolve_model
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


@pytest.mark.parametrize("route", ["dataframe", "parquet"])
@pytest.mark.parametrize("layer", [-1, 2])
def test_spark_scoring_equals_torch(spark, logged, layer, route):
    tmp, x, model, info = logged
    # As the job does on a local master: artefacts downloaded once, workers load from disk.
    resolved = resolve_model(info.model_uri, download_to=str(tmp / f"dl{layer}{route}"))
    path = str(tmp / "root" / "features")
    # Batches of 64 rows: several Arrow batches per task, and a last batch that is not full.
    if route == "dataframe":
        scored = score(spark, spark.read.parquet(path), resolved, layer=layer, batch_rows=64)
    else:
        scored = score_parquet(spark, path, resolved, layer=layer, batch_rows=64)
    ids, got = _by_id(scored, 500)
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
    assert (
        r.run_id == info.run_id
        and r.local_dir
        and (tmp_path in __import__("pathlib").Path(r.local_dir).parents)
    )
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


def test_parquet_route_plans_every_row_group_of_the_pinned_version(logged, tmp_path):
    tmp, _, _, _ = logged
    # A published table is a link to a version directory; planning pins the version it saw.
    link = tmp_path / "features"
    link.symlink_to(tmp / "root" / "features")
    fs_uri, groups = parquet_row_groups(str(link))
    assert fs_uri.startswith("file://")
    assert sum(g.rows for g in groups) == 500  # markers skipped
    assert sorted(g.rows for g in groups) == [50, 50, 100, 100, 100, 100]  # 2 files of 100+100+50 rows
    assert all(g.path.startswith(str(tmp / "root" / "features")) for g in groups)
    assert parquet_row_groups("s3a://bucket/features") is None  # only Hadoop knows s3a: Spark reads it


def test_parquet_route_rejects_wrong_width(spark, logged, tmp_path):
    _, _, _, info = logged
    spark.createDataFrame([(1, [0.5] * 3)], "item_id long, features array<float>").write.parquet(
        str(tmp_path / "f")
    )
    with pytest.raises(Exception, match="every vector must have 24 values"):
        score_parquet(
            spark, str(tmp_path / "f"), resolve_model(info.model_uri, download_to=str(tmp_path / "m"))
        ).collect()


@pytest.mark.slow  # two inference runs compared
def test_rerunning_inference_with_the_same_model_reproduces_the_tables(spark, logged, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    tmp, _, _, info = logged
    root = tmp_path / "root"
    shutil.copytree(tmp / "root", root, symlinks=True)
    model = resolve_model(info.model_uri, download_to=str(tmp_path / "m"))
    infer = InferConfig(k=4, map_max_points=0, recall_sample=0)
    tables = []
    for _ in range(2):
        predict_batch(spark, model, str(root), infer, log_maps=False)
        codes = pq.read_table(root / "codes").to_pandas().drop(columns="scored_at").sort_values("item_id")
        nb = pq.read_table(root / "neighbors").to_pandas().sort_values(["item_id", "rank"])
        tables.append((codes.reset_index(drop=True), nb.reset_index(drop=True)))
    assert len(tables[0][0]) == 500 and len(tables[0][1]) == 500 * 4
    for first, second in zip(tables[0], tables[1], strict=True):
        assert first.equals(second)


def test_refine_placement_moves_only_the_items_outside_the_training_split(spark, logged, tmp_path):
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_model.placement import refine_split

    tmp, x, model, info = logged
    root = tmp_path / "root"
    shutil.copytree(tmp / "root", root, symlinks=True)
    items = pq.read_table(root / "items")
    ids = items.column("item_id").to_numpy()
    train = (ids // 7) % 5 != 0  # every fifth item is a new one
    pq.write_table(items.append_column("split", pa.array(np.where(train, "train", "test"))), root / "items" / "part-0.parquet")
    resolved = resolve_model(info.model_uri, download_to=str(tmp_path / "m"))
    infer = InferConfig(k=4, map_max_points=0, recall_sample=0, placement="refine")
    with pytest.raises(ConfigError, match="infer.placement: refine needs train.split_column"):
        predict_batch(spark, resolved, str(root), infer, log_maps=False)
    summary = predict_batch(spark, resolved, str(root), infer, log_maps=False, split=("split", "train"))
    assert summary["placement"] == "refine" and summary["items"] == 500
    got = pq.read_table(root / "codes").to_pandas().sort_values("item_id")
    codes = np.stack(got["code"].to_numpy())
    enc = Encoder(model).encode(x)  # write_inputs' rows are in item-id order
    np.testing.assert_allclose(codes[train], enc[train], atol=1e-5, rtol=0)
    assert np.abs(codes[~train] - enc[~train]).max() > 1e-3
    np.testing.assert_allclose(codes[~train], refine_split(x, enc, train)[~train], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["x"].to_numpy(), codes[:, 0], rtol=0, atol=0)
    # Settings naming no training items fail before anything is scored, as config errors (exit 2).
    with pytest.raises(ConfigError, match="train.train_value: no item has split == 'validation'"):
        predict_batch(spark, resolved, str(root), infer, log_maps=False, split=("split", "validation"))
    with pytest.raises(ConfigError, match="train.split_column: items/ has no column 'fold'"):
        predict_batch(spark, resolved, str(root), infer, log_maps=False, split=("fold", "train"))
    few = np.where(np.isin(ids, ids[:10]), "train", "test")  # 10 training items: fewer than the 15 neighbours
    pq.write_table(items.append_column("fold", pa.array(few)), root / "items" / "part-0.parquet")
    with pytest.raises(ConfigError, match="only 10 items have fold == 'train'; placing against their map needs more than 15"):
        predict_batch(spark, resolved, str(root), infer, log_maps=False, split=("fold", "train"))
    # The failed runs published nothing: the codes are the placed ones still.
    after = pq.read_table(root / "codes").to_pandas().sort_values("item_id")
    np.testing.assert_array_equal(np.stack(after["code"].to_numpy()), codes)
