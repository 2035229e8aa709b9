"""`sae evaluate` and evaluation after training, on generated clusters where the right answer is known."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_model.config import EvaluateConfig, ModelConfig
from sae_model.data import DataError
from sae_model.evaluation import evaluate_split, read_label_sets
from sae_model.loading import Encoder
from sae_model.trainer import build_model
from tests.train_data import write_features

VAL = 0.3


pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")


@pytest.fixture(autouse=True)
def _no_umap(monkeypatch):
    """umap-learn may be installed (benchmarks/reproduce_tag_genome.py uses it): import it as absent in
    every test here, as ``trained`` does. No test here asserts a UMAP number, and a real UMAP fit (numba
    compiling first) cost more than the rest of the module together; the baseline's own code is
    tested with a stand-in in test_evaluation.py."""
    monkeypatch.setitem(sys.modules, "umap", None)


def clusters(n: int, dim: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` tight, well separated clusters in [0,1]^dim: a good 2-D map keeps them apart."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.1, 0.9, (k, dim))
    labels = rng.integers(0, k, n)
    x = np.clip(centres[labels] + rng.normal(0, 0.04, (n, dim)), 0, 1)
    return x.astype(np.float32), labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One small model trained by the real job (with evaluation after training) on 16 clusters.

    16 clusters: too many for a random 2-D projection to keep apart (an untrained net gets
    0.72-0.82 5-NN accuracy over init seeds), while the trained map separates them."""
    from jobs.train import run
    from pipelines.config import load_config

    root = tmp_path_factory.mktemp("root")
    x, labels = clusters(600, 32, 16, seed=4)
    write_features(root, x, labels)
    overrides = [
        f"paths.root={root}", "model.layers=[32,16,2]", "pretrain.method=autoencoder", "pretrain.epochs=4",
        "pretrain.lr=1.0", "pretrain.batch_size=20", "finetune.epochs=20",
        "finetune.batch_size=20", "finetune.optimizer=adam", "finetune.lr=0.01",
        f"train.val_fraction={VAL}", "train.seed=1", "train.progress=false", "mlflow.registered_model=",
        "evaluate.umap=true",  # umap-learn made absent below: skipped with a note, nothing fails
    ]
    cfg = load_config(None, overrides)
    with pytest.MonkeyPatch.context() as mp:
        # umap-learn may be installed (benchmarks/reproduce_tag_genome.py uses it): import it as absent.
        mp.setitem(sys.modules, "umap", None)
        out = run(cfg)
    return {"root": root, "cfg": cfg, "overrides": overrides, "out": out}


def test_training_ends_with_an_evaluation_logged_into_its_run(trained):
    out, root = trained["out"], trained["root"]
    m = out["metrics"]
    # 600 items, ~30% by the hash split; the clusters are the known answer.
    assert 150 < m["n_val"] < 210 and m["n_val"] + m["n_train"] == 600 and m["code_dim"] == 2
    assert m["ae_knn_accuracy"] >= 0.9, m
    assert m["ae_trustworthiness"] > 0.8 and m["ae_continuity"] > 0.8, m
    assert not any(k.startswith("umap_") for k in m)  # optional extra, made absent above
    # The training's own time is reported beside PCA's fit (and UMAP's, when it runs).
    assert m["ae_fit_seconds"] > m["pca_fit_seconds"] > 0
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run = client.get_run(out["run_id"])
    for key in ("ae_squared_error", "pca_squared_error", "ae_knn_accuracy", "pca_knn_accuracy",
                "ae_trustworthiness", "pca_continuity", "val_sq_error_per_item"):
        assert run.data.metrics[key] == pytest.approx(m[key]), key
    arts = {a.path for a in client.list_artifacts(out["run_id"], "evaluation")}
    assert {"evaluation/maps.png", "evaluation/metrics.txt"} <= arts
    png = Path(client.download_artifacts(out["run_id"], "evaluation/maps.png", str(root / "dl")))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The AE's own squared error agrees with the trainer's measure of the same validation items.
    assert m["ae_squared_error"] == pytest.approx(m["val_sq_error_per_item"], rel=1e-4)


def test_trained_map_beats_an_untrained_random_init_model(trained):
    cfg, root = trained["cfg"], trained["root"]
    feats, items = "file://" + str(root / "features"), "file://" + str(root / "items")
    good = trained["out"]["metrics"]
    random_net = Encoder(build_model(ModelConfig(layers=[32, 16, 2]), seed=1))
    bad = evaluate_split(random_net, feats, items, VAL, cfg.evaluate).metrics
    assert bad["n_val"] == good["n_val"]
    # PCA is the same fit on the same rows in both reports.
    assert bad["pca_squared_error"] == pytest.approx(good["pca_squared_error"])
    assert good["ae_squared_error"] < 0.5 * bad["ae_squared_error"], (good, bad)
    assert good["ae_knn_accuracy"] > bad["ae_knn_accuracy"] + 0.1, (good, bad)
    assert good["ae_trustworthiness"] > bad["ae_trustworthiness"], (good, bad)


def test_sae_evaluate_defaults_to_the_latest_run_and_uses_its_split(trained, capsys):
    from jobs import evaluate

    root = trained["root"]
    # The command line says another split; the model's run recorded 0.3 and that one is used.
    rc = evaluate.main([*trained["overrides"], "train.val_fraction=0.5", "evaluate.k_knn=3"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "knn_accuracy" in printed and "autoencoder" in printed and trained["out"]["run_id"] in printed
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run = mlflow.MlflowClient().get_run(trained["out"]["run_id"])
    assert run.data.metrics["n_val"] == trained["out"]["metrics"]["n_val"]
    # And by an explicit URI, into the same run.
    out = evaluate.run(trained["cfg"], f"runs:/{trained['out']['run_id']}/model")
    assert out["run_id"] == trained["out"]["run_id"]
    assert out["metrics"]["ae_knn_accuracy"] == pytest.approx(trained["out"]["metrics"]["ae_knn_accuracy"])


def test_evaluate_without_a_trained_model_says_what_to_do(tmp_path, capsys):
    from jobs import evaluate

    write_features(tmp_path, *clusters(60, 8, 2))
    rc = evaluate.main([f"paths.root={tmp_path}", "mlflow.experiment=empty"])
    assert rc == 2
    assert "no finished training run" in capsys.readouterr().err


def test_genres_give_the_label_share_and_too_few_validation_items_fail(tmp_path):
    x, labels = clusters(200, 8, 4, seed=2)
    write_features(tmp_path, x)
    ids = np.arange(200, dtype=np.int64) * 13 + 5  # write_features' ids
    names = np.array(["Drama", "Comedy", "Horror", "Sci-Fi"])
    genres = [[names[lab], "Drama"] if i % 3 == 0 else [names[lab]] for i, lab in enumerate(labels)]
    genres[1] = []
    items = tmp_path / "items"
    items.mkdir()
    pq.write_table(pa.table({"item_id": ids, "genres": pa.array(genres, pa.list_(pa.string()))}), items / "p.parquet")
    sets, kind = read_label_sets(str(items), ids[:3])
    assert kind == "genres" and sets[1] == frozenset() and sets[0] == {names[labels[0]], "Drama"}
    # MovieLens's own text form reads the same.
    pq.write_table(pa.table({"item_id": ids, "genres": ["|".join(g) or "(no genres listed)" for g in genres]}),
                   items / "p.parquet")
    assert read_label_sets(str(items), ids[:3]) == (sets, "genres")

    enc = Encoder(build_model(ModelConfig(layers=[8, 2]), seed=0))
    res = evaluate_split(enc, str(tmp_path / "features"), str(items), 0.5, EvaluateConfig(max_items=50, k_tw=5), tmp_path)
    m = res.metrics
    assert res.label_kind == "genres" and 0 <= m["ae_knn_label_share"] <= 1 and "ae_knn_accuracy" not in m
    assert m["n_eval"] == 50 and m["n_val"] > 50  # neighbourhood metrics on a sample, errors on all
    assert res.figure.exists()
    with pytest.raises(DataError, match="needs more than 24 validation items"):
        evaluate_split(enc, str(tmp_path / "features"), None, 0.05, EvaluateConfig())


def test_sweep_child_runs_can_be_nested_under_a_parent_without_touching_the_trainer(trained, tmp_path):
    # `extra_tags` is how `sae sweep` makes a training run a child: the tag MLflow's nested runs carry.
    from jobs.train import run
    from pipelines.config import load_config

    root = tmp_path / "r"
    shutil.copytree(trained["root"] / "features", root / "features")
    cfg = load_config(None, [f"paths.root={root}", "model.layers=[32,2]", "pretrain.method=none",
                             "finetune.epochs=1", "train.progress=false", "evaluate.after_train=false"])
    out = run(cfg, extra_tags={"mlflow.parentRunId": "p123"})
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run_ = mlflow.MlflowClient().get_run(out["run_id"])
    assert run_.data.tags["mlflow.parentRunId"] == "p123"
    assert "ae_knn_accuracy" not in run_.data.metrics  # evaluate.after_train=false
