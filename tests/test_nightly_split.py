"""`sae nightly` with `train.split_column` (issue 19's protocol): the challenger trains on the training
split only, and champion and challenger are scored on the same held-out rows, the test items.

No Spark: the ingest set is written directly (the legacy layout ``paths.root/features``, ``items``)
and the nightly runs its train, evaluate and promote steps; two tiny nights (32-8-2, 2 epochs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.nightly import NightState, holdout_rule, report_text, run_steps, set_champion
from sae_model.data import DataError
from tests.train_data import manifold

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")

N, DIM = 240, 32
IDS = np.arange(N, dtype=np.int64) * 11 + 2
IS_TEST = np.arange(N) % 4 == 0  # 60 test items


def write_ingest(root: Path, x: np.ndarray, labels: np.ndarray) -> None:
    """``features/`` (with its manifest) and ``items/`` (item_id, label, split) under ``root``."""
    for name in ("features", "items"):
        (root / name).mkdir(parents=True, exist_ok=True)
    feats = pa.table({"item_id": pa.array(IDS, pa.int64()), "features": pa.array(list(x), pa.list_(pa.float32()))})
    pq.write_table(feats, root / "features" / "part-0.parquet", row_group_size=50)
    manifest = {"dim": DIM, "feature_names": [f"f{i}" for i in range(DIM)], "source": "test"}
    (root / "features" / "_manifest.json").write_text(json.dumps(manifest))
    split = np.where(IS_TEST, "test", "train")
    items = pa.table({"item_id": pa.array(IDS, pa.int64()), "label": pa.array(labels, pa.int64()),
                      "split": pa.array(split, pa.string())})
    pq.write_table(items, root / "items" / "part-0.parquet")


def night(root: Path, date: str, *extra: str):
    cfg = load_config(None, [
        f"paths.root={root}", "model.layers=[32,8,2]", "pretrain.method=none", "finetune.epochs=2",
        "finetune.batch_size=25", "finetune.optimizer=adam", "finetune.lr=0.01", "train.progress=false",
        "train.device=cpu", "train.val_fraction=0.2", "nightly.metric=ae_knn_accuracy", f"nightly.date={date}",
        *extra,
    ])
    state = NightState.load(str(root), date)
    state.completed, state.results["ingest"] = ["ingest"], {}  # the ingest set is written by hand
    return cfg, state


def test_split_nightly_trains_on_the_training_split_and_scores_both_models_on_the_test_items(tmp_path):
    from pipelines.training import train_from_config

    x, labels = manifold(N, DIM, seed=7)
    poisoned = x.copy()
    poisoned[IS_TEST] = np.nan  # a test row read by training fails the run (the control below)
    write_ingest(tmp_path, poisoned, labels)

    # Control: without the key the NaN rows are training rows and training refuses them.
    cfg, _ = night(tmp_path, "2024-01-01")
    with pytest.raises(DataError, match="NaN"):
        train_from_config(cfg, checkpoint_dir=str(tmp_path / "control"))

    # Night 1 trains with the key on the poisoned table: it never reads a test row.
    key = ("train.split_column=split", "train.train_value=train")
    cfg, st1 = night(tmp_path, "2024-01-02", *key)
    run_steps(None, cfg, st1, only=["train"])
    assert np.isfinite(st1.results["train"]["train_metrics"]["val_sq_error_per_item"])

    # Then the test rows' vectors are clean, and the night scores the challenger on exactly them.
    write_ingest(tmp_path, x, labels)
    run_steps(None, cfg, st1, only=["evaluate", "promote"])
    ev1 = st1.results["evaluate"]
    snap = np.load(tmp_path / "nightly" / "holdout.npz")
    assert sorted(snap["item_id"].tolist()) == sorted(IDS[IS_TEST].tolist())
    np.testing.assert_array_equal(snap["features"], x[np.isin(IDS, snap["item_id"])])
    assert str(snap["rule"]) == holdout_rule(cfg) == "split:split!=train"
    ch = ev1["challenger"]
    assert ev1["holdout_items"] == ch["n_test"] == IS_TEST.sum() == 60
    assert ch["n_train"] == (~IS_TEST).sum() == 180 and "n_val" not in ch  # the kNN classifier's training rows
    assert {"ae_squared_error", "ae_trustworthiness", "ae_knn_accuracy", "ae_knn1_accuracy"} <= ch.keys()
    assert 0.25 < ch["ae_knn_accuracy"] <= 1.0  # four quadrant labels: a map better than chance
    assert st1.results["promote"]["promoted"] is True
    assert "(60 items, rule split:split!=train)" in report_text(st1, cfg)
    set_champion(cfg, st1.results["train"]["version"])  # the publish step's last act (it needs Spark)

    # Night 2: the champion is scored on the same frozen rows, with the same numbers as last night.
    cfg, st2 = night(tmp_path, "2024-01-03", *key)
    run_steps(None, cfg, st2, only=["train", "evaluate", "promote"])
    ev2 = st2.results["evaluate"]
    assert ev2["holdout_frozen_now"] is False and ev2["champion_version"] == st1.results["train"]["version"]
    assert ev2["champion"] == ch
    assert ev2["challenger"]["n_test"] == 60 and ev2["challenger"].keys() == ch.keys()
