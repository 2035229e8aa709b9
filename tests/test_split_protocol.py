"""Split-aware training and evaluation (issue 19): `train.split_column` keeps test rows out of training,
and the held-out metrics are scikit-learn's."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from sklearn.manifold import trustworthiness as sk_trustworthiness
from sklearn.neighbors import KNeighborsClassifier

from sae_model import checkpoint as ckpt
from sae_model.config import EvaluateConfig, FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
from sae_model.data import DataError, read_split
from sae_model.evaluation import (
    evaluate_protocol,
    evaluate_split,
    format_metrics_table,
    knn_classifier_accuracy,
)
from sae_model.trainer import MlflowSettings, train
from tests.linear_encoder import LinearEncoder
from tests.train_data import manifold

OFF = MlflowSettings("", enabled=False)

pytestmark = pytest.mark.usefixtures("one_thread", "mlflow_reset")


def write_split_table(root: Path, ids: np.ndarray, x: np.ndarray, labels: np.ndarray, split: np.ndarray | None) -> str:
    """``features/`` (2 files, row groups of 40) and ``items/`` (item_id, label[, split]); returns features' URI."""
    (root / "features").mkdir(parents=True)
    (root / "items").mkdir(parents=True)
    for k, part in enumerate(np.array_split(np.arange(len(ids)), 2)):
        t = pa.table({"item_id": pa.array(ids[part], pa.int64()), "features": pa.array(list(x[part]), pa.list_(pa.float32()))})
        pq.write_table(t, root / "features" / f"part-{k}.parquet", row_group_size=40)
    items = {"item_id": pa.array(ids, pa.int64()), "label": pa.array(labels, pa.int64())}
    if split is not None:
        items["split"] = pa.array(split, pa.string())
    pq.write_table(pa.table(items), root / "items" / "part-0.parquet")
    return "file://" + str(root / "features")


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory) -> dict:
    """300 rows, every 4th a test row whose features are NaN; and the same training rows alone, clean."""
    x, labels = manifold(300, 32, seed=5)
    ids = np.arange(300, dtype=np.int64) * 7 + 3
    is_test = np.arange(300) % 4 == 0
    split = np.where(is_test, "test", "train")
    poison = x.copy()
    poison[is_test] = np.nan
    root = tmp_path_factory.mktemp("poisoned")
    clean = tmp_path_factory.mktemp("train-only")
    return {
        "poisoned": write_split_table(root, ids, poison, labels, split),
        "items": "file://" + str(root / "items"),
        "train_only": write_split_table(clean, ids[~is_test], x[~is_test], labels[~is_test], split[~is_test]),
        "n_test": int(is_test.sum()),
    }


def configs(**train_kw) -> tuple:
    return (
        ModelConfig(layers=[32, 16, 2]),
        PretrainConfig(method="autoencoder", epochs=2, lr=3.0, batch_size=20),
        FinetuneConfig(epochs=2, lr=3.0, batch_size=20),
        TrainConfig(seed=1, progress=False, shuffle=False, **train_kw),
    )


@pytest.mark.parametrize("in_memory_max_mb", [2048, 0], ids=["in-memory", "streamed"])
def test_split_training_never_touches_a_test_row(poisoned, tmp_path, in_memory_max_mb):
    # Without the key the NaN rows are training rows, and the run refuses them: the poison is noticed.
    with pytest.raises(DataError, match="NaN"):
        train(*configs(in_memory_max_mb=in_memory_max_mb), poisoned["poisoned"], poisoned["items"], OFF, tmp_path / "off")
    keyed = configs(in_memory_max_mb=in_memory_max_mb, split_column="split", train_value="train")
    r = train(*keyed, poisoned["poisoned"], poisoned["items"], OFF, tmp_path / "on")
    assert np.isfinite(r.metrics["val_sq_error_per_item"])
    # The same model as one trained on a table that holds the training rows only (the same items,
    # so the same validation hold-out): the test rows changed nothing.
    train(*configs(), poisoned["train_only"], None, OFF, tmp_path / "ref")
    got, _ = ckpt.load_checkpoint(tmp_path / "on")
    want, _ = ckpt.load_checkpoint(tmp_path / "ref")
    for key, w in want["model"].items():
        assert torch.isfinite(got["model"][key]).all(), key
        torch.testing.assert_close(got["model"][key], w, atol=1e-6, rtol=0)


def test_global_neighbour_graph_is_built_on_training_rows_only(poisoned, tmp_path):
    # A NaN row in the exact kNN graph would make every distance to it NaN and the UMAP loss with it.
    r = train(
        ModelConfig(layers=[32, 8, 2]), PretrainConfig(method="none"),
        FinetuneConfig(epochs=2, lr=0.01, optimizer="adam", loss="umap", neighbor_graph="global", neighbor_batch_size=100),
        TrainConfig(seed=1, progress=False, split_column="split"), poisoned["poisoned"], poisoned["items"], OFF, tmp_path / "ck",
    )
    assert np.isfinite(r.metrics["val_sq_error_per_item"])
    assert all(np.isfinite(h["train_loss"]) for h in ckpt.load_meta(tmp_path / "ck")["history"])


def test_split_column_errors_name_the_column_and_the_values(poisoned):
    with pytest.raises(DataError, match=r"train.split_column=fold: .* has no column 'fold' \(columns: item_id, label, split\)"):
        read_split(poisoned["items"], "fold", "train", 0.1)
    with pytest.raises(DataError, match=r"no item .* has split == 'training' .*values found: 'test', 'train'"):
        read_split(poisoned["items"], "split", "training", 0.1)
    with pytest.raises(DataError, match="no items table"):
        read_split(None, "split", "train", 0.1)
    s = read_split(poisoned["items"], "split", "train", 0.1)
    assert len(s.train_ids) == 300 - poisoned["n_test"]


# ------------------------------------------------------------------ metrics: scikit-learn's numbers


def test_knn_classifier_accuracy_is_a_majority_vote_of_training_neighbours():
    rng = np.random.default_rng(0)
    tr, te = rng.normal(size=(80, 3)), rng.normal(size=(40, 3))
    y_tr, y_te = rng.integers(0, 3, 80), rng.integers(0, 3, 40)
    for k in (1, 5):
        # By hand: the k nearest training items vote; a tie goes to the smallest label (bincount's argmax).
        d = ((te[:, None, :] - tr[None, :, :]) ** 2).sum(-1)
        nn = np.argsort(d, axis=1)[:, :k]
        pred = np.array([np.bincount(y_tr[row], minlength=3).argmax() for row in nn])
        want = float(np.mean(pred == y_te))
        assert knn_classifier_accuracy(tr, y_tr, te, y_te, k) == want
        assert want == KNeighborsClassifier(n_neighbors=k).fit(tr, y_tr).score(te, y_te)
    # A tie of votes (one each): the smaller label wins.
    assert knn_classifier_accuracy([[0.0], [1.0]], ["b", "a"], [[0.4]], ["a"], k=2) == 1.0
    with pytest.raises(ValueError, match="k=3"):
        knn_classifier_accuracy([[0.0], [1.0]], [0, 1], [[0.4]], [0], k=3)


def test_protocol_metrics_equal_scikit_learns_on_random_inputs():
    rng = np.random.default_rng(4)
    x_fit, x_test = rng.normal(size=(120, 8)), rng.normal(size=(60, 8))
    y_fit, y_test = rng.integers(0, 4, 120), rng.integers(0, 4, 60)
    enc = LinearEncoder(np.linalg.qr(rng.normal(size=(8, 2)))[0])
    m = evaluate_protocol(enc, x_fit, x_test, y_fit, y_test, EvaluateConfig(k_knn=5, k_tw=5, max_items=1000),
                          fit_seconds=7.0).metrics
    assert (m["n_train"], m["n_test"], m["n_eval"], m["code_dim"]) == (120, 60, 60, 2)
    pca = SkPCA(2, svd_solver="full").fit(x_fit)
    for prefix, f_codes, t_codes in (("ae", enc.encode(x_fit), enc.encode(x_test)),
                                     ("pca", pca.transform(x_fit), pca.transform(x_test))):
        for name, k in (("knn", 5), ("knn1", 1)):
            want = KNeighborsClassifier(n_neighbors=k).fit(f_codes, y_fit).score(t_codes, y_test)
            assert m[f"{prefix}_{name}_accuracy"] == pytest.approx(want, abs=1e-12), (prefix, name)
        assert m[f"{prefix}_trustworthiness"] == pytest.approx(sk_trustworthiness(x_test, t_codes, n_neighbors=5), abs=1e-12)
        assert m[f"{prefix}_continuity"] == pytest.approx(sk_trustworthiness(t_codes, x_test, n_neighbors=5), abs=1e-12)
        assert m[f"{prefix}_trustworthiness_train"] == pytest.approx(
            sk_trustworthiness(x_fit, f_codes, n_neighbors=5), abs=1e-12)
    want_se = ((x_test - pca.inverse_transform(pca.transform(x_test))) ** 2).sum(1).mean()
    assert m["pca_squared_error"] == pytest.approx(want_se, rel=1e-9)
    assert m["ae_fit_seconds"] == 7.0 and m["pca_fit_seconds"] > 0
    # The report: a row per method, a column per metric.
    lines = format_metrics_table(m, by="method").splitlines()
    header = lines.index(next(line for line in lines if line.startswith("method")))
    assert lines[header].split()[:4] == ["method", "squared_error", "knn_accuracy", "knn1_accuracy"]
    assert [line.split()[0] for line in lines[header + 2:]] == ["AE", "PCA"]


def test_evaluation_with_the_key_scores_every_test_row(poisoned, tmp_path):
    # The clean twin of the poisoned table: its items/ carry the split; 75 test rows are scored.
    x, labels = manifold(300, 32, seed=5)
    ids = np.arange(300, dtype=np.int64) * 7 + 3
    split = np.where(np.arange(300) % 4 == 0, "test", "train")
    feats = write_split_table(tmp_path, ids, x, labels, split)
    enc = LinearEncoder(np.linalg.qr(np.random.default_rng(1).normal(size=(32, 2)))[0])
    cfg = EvaluateConfig(k_knn=5, k_tw=5, max_items=50)
    res = evaluate_split(enc, feats, str(tmp_path / "items"), 0.1, cfg, tmp_path / "fig", split_column="split")
    m = res.metrics
    assert m["n_test"] == poisoned["n_test"] == 75 and m["n_train"] == 225 and m["n_eval"] == 50
    assert "n_val" not in m and res.label_kind == "label" and res.figure.exists()
    # Every test row is scored by the classifier fitted on the 225 training codes.
    want = KNeighborsClassifier(n_neighbors=5).fit(enc.encode(x[split == "train"]), labels[split == "train"])
    assert m["ae_knn_accuracy"] == pytest.approx(want.score(enc.encode(x[split == "test"]), labels[split == "test"]))


def test_train_and_evaluate_jobs_use_the_split_and_record_it(poisoned, tmp_path, capsys):
    from jobs import evaluate
    from jobs import train as train_job

    x, labels = manifold(300, 32, seed=5)
    ids = np.arange(300, dtype=np.int64) * 7 + 3
    split = np.where(np.arange(300) % 4 == 0, "test", "train")
    write_split_table(tmp_path, ids, x, labels, split)
    base = [f"paths.root={tmp_path}", "model.layers=[32,8,2]", "pretrain.method=none", "finetune.epochs=2",
            "finetune.batch_size=25", "train.progress=false", "mlflow.registered_model=", "evaluate.k_tw=5",
            "evaluate.umap=false"]
    assert train_job.main([*base, "train.split_column=split"]) == 0
    printed = capsys.readouterr().out
    assert any(line.split()[:1] == ["AE"] for line in printed.splitlines()), printed
    # `sae evaluate` without the key uses the model's own split, from its run's params.
    assert evaluate.main(base) == 0
    printed = capsys.readouterr().out
    assert "n_test: 75" in printed and any(line.split()[:1] == ["PCA"] for line in printed.splitlines()), printed
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = mlflow.search_runs(experiment_names=["sae"], output_format="list")
    assert run.data.params["train.split_column"] == "split" and run.data.params["train.train_value"] == "train"
    assert run.data.metrics["n_test"] == 75 and run.data.metrics["ae_fit_seconds"] > 0
