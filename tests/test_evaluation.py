"""Map-quality metrics: hand-worked tiny cases, then independent references (numpy SVD, sklearn)."""

from __future__ import annotations

import sys
import time
import types

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sk_trustworthiness

from sae_model.evaluation import (
    PCA,
    _panel_title,
    continuity,
    evaluate_map,
    format_metrics_table,
    knn_accuracy,
    knn_indices,
    knn_label_share,
    plot_maps_side_by_side,
    retrieval_precision,
    squared_error_per_item,
    trustworthiness,
    umap_codes,
)
from tests.linear_encoder import LinearEncoder


def _col(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)[:, None]


def _clusters(n_per: int, dim: int, seed: int, sep: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * sep
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.normal(size=(3 * n_per, dim)), labels


# ------------------------------------------------------------------ reconstruction, PCA


def test_squared_error_per_item_by_hand():
    # Item 0 errs by 1 in one dim (1); item 1 by 2 in one dim (4): mean over items = 2.5.
    x = np.array([[0.0, 0.0], [1.0, 1.0]])
    x_hat = np.array([[1.0, 0.0], [1.0, 3.0]])
    assert squared_error_per_item(x, x_hat) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="does not match"):
        squared_error_per_item(x, x_hat[:, :1])


@pytest.mark.parametrize("n, solver", [(60, "full"), (400, "covariance_eigh")])  # wide-ish, and tall data
def test_pca_matches_numpy_svd_reconstruction(n, solver):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 8)) @ rng.normal(size=(8, 8)) + 3.0
    assert PCA(2).fit(x).svd_solver == solver
    mean = x.mean(axis=0)
    u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    for k in (1, 3, 8):
        pca = PCA(k).fit(x)
        expected = (u[:, :k] * s[:k]) @ vt[:k] + mean  # rank-k reconstruction (sign-free)
        np.testing.assert_allclose(pca.inverse_transform(pca.transform(x)), expected, atol=1e-10)
        np.testing.assert_allclose(pca.explained_variance_ratio_, s[:k] ** 2 / np.sum(s**2), rtol=1e-12)
        # Codes are orthogonal projections: their squared norms carry the captured variance.
        np.testing.assert_allclose(np.sum(pca.transform(x) ** 2), np.sum(s[:k] ** 2), rtol=1e-10)
    assert PCA(8).fit(x).explained_variance_ratio_.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n", [40, 400])
def test_pca_sign_convention_is_deterministic(n):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 5)) * np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    a = PCA(3).fit(x).components_
    b = PCA(3).fit(-x).components_  # same axes, SVD may return them flipped
    np.testing.assert_allclose(a, b, atol=1e-12)
    biggest = a[np.arange(3), np.argmax(np.abs(a), axis=1)]
    assert np.all(biggest > 0)


def test_pca_rejects_too_many_components():
    with pytest.raises(ValueError, match="exceeds"):
        PCA(4).fit(np.zeros((3, 10)))


# ------------------------------------------------------------------ neighbours


def test_knn_indices_by_hand_with_tie():
    # 1-D points 0, 1, 3, 7: from 3 the distances are 3, 2, -, 4 -> [1, 0].
    np.testing.assert_array_equal(knn_indices(_col([0, 1, 3, 7]), 2), [[1, 2], [0, 2], [1, 0], [2, 1]])
    # From 0, points 1 and -1 are both at distance 1: the lower index comes first.
    assert knn_indices(_col([0, 1, -1]), 1)[0].tolist() == [1]
    assert knn_indices(_col([0, -1, 1]), 1)[0].tolist() == [1]


def test_knn_indices_blockwise_matches_brute_force_with_ties():
    rng = np.random.default_rng(2)
    x = rng.integers(0, 4, size=(50, 2)).astype(float)  # grid points: many exact ties
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    expected = np.argsort(d, axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(knn_indices(x, 6, block_size=7), expected)
    np.testing.assert_array_equal(knn_indices(x, 6), expected)


def test_knn_accuracy_by_hand():
    # x: 0, 1, 2, 10, 11, 13 with labels a a b b b a; k=2, nearest first:
    #   0 -> [1 a, 2 b]  vote tie -> nearer voter a  (right)
    #   1 -> [0 a, 2 b]  equal distances: lower index 0 first; vote tie -> a (right)
    #   2 -> [1 a, 0 a]  a (wrong)
    #   3 -> [4 b, 5 a]  tie -> b (right);  4 -> [3 b, 5 a] -> b (right);  5 -> [4 b, 3 b] -> b (wrong)
    x = _col([0, 1, 2, 10, 11, 13])
    labels = np.array(list("aabbba"))
    assert knn_accuracy(x, labels, k=2) == pytest.approx(4 / 6)
    # k=1 is plain nearest-neighbour: 2 and 5 are wrong again.
    assert knn_accuracy(x, labels, k=1) == pytest.approx(4 / 6)
    # k=5 sees everyone else: 0,1,5 (label a) see 2 a vs 3 b -> b; 2,3,4 (b) see 3 a vs 2 b -> a.
    assert knn_accuracy(x, labels, k=5) == 0.0


def test_knn_label_share_by_hand():
    # codes 0, 1, 2, 10; genres {drama}, {drama, comedy}, {comedy}, {} (item 3: no query).
    # k=2: 0 -> [1, 2] shares 1/2; 1 -> [0, 2] 2/2; 2 -> [1, 0] 1/2: mean 2/3.
    # k=3 adds item 3 (no labels) to every list: 1/3, 2/3, 1/3: mean 4/9.
    codes = _col([0, 1, 2, 10])
    genres = [["drama"], ["drama", "comedy"], {"comedy"}, []]
    assert knn_label_share(codes, genres, k=2) == pytest.approx(2 / 3)
    assert knn_label_share(codes, genres, k=3) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match="empty"):
        knn_label_share(codes, [[], [], [], []], k=1)


# ------------------------------------------------------------------ trustworthiness / continuity


def test_trustworthiness_and_continuity_by_hand():
    # n=5, k=1: normaliser 2/(n k (2n-3k-1)) = 2/(5*1*6) = 1/15.
    # Input 0, 1, 3, 7, 15; map 0, 10, 1, 21, 3 (items in the same order).
    # Trust: map NN of 0,1,2,3,4 = 2,4,0,1,2 with input ranks 2,4,2,2,2 -> penalty 1+3+1+1+1 = 7.
    # Continuity: input NN = 1,0,1,2,3 with map ranks 3,3,3,3,4 -> penalty 2+2+2+2+3 = 11.
    x = _col([0, 1, 3, 7, 15])
    y = _col([0, 10, 1, 21, 3])
    assert trustworthiness(x, y, k=1) == pytest.approx(1 - 7 / 15)
    assert continuity(x, y, k=1) == pytest.approx(1 - 11 / 15)
    # A map that keeps every rank is perfect on both.
    assert trustworthiness(x, 2 * x + 5, k=2) == 1.0
    assert continuity(x, 2 * x + 5, k=2) == 1.0


@pytest.mark.parametrize("k", [1, 5, 12])
def test_trustworthiness_and_continuity_match_sklearn(k):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(150, 12))
    y = x[:, :2] + 0.7 * rng.normal(size=(150, 2))
    t = trustworthiness(x, y, k)
    assert t == pytest.approx(sk_trustworthiness(x, y, n_neighbors=k), abs=1e-12)
    assert continuity(x, y, k) == pytest.approx(sk_trustworthiness(y, x, n_neighbors=k), abs=1e-12)
    # Small row blocks give the same sum.
    assert trustworthiness(x, y, k, block_size=11) == pytest.approx(t, abs=1e-12)


def test_blocked_trustworthiness_takes_over_above_the_sklearn_size(monkeypatch):
    from sae_model import evaluation

    rng = np.random.default_rng(8)
    x = rng.normal(size=(40, 6))
    y = x[:, :2] + 0.5 * rng.normal(size=(40, 2))
    calls = []
    monkeypatch.setattr(evaluation, "_rank_penalty", lambda *a: calls.append(a) or 0.0)
    trustworthiness(x, y, 5)
    assert calls == []  # 40 items: scikit-learn's
    monkeypatch.setattr(evaluation, "SKLEARN_MAX_ITEMS", 39)
    assert trustworthiness(x, y, 5) == 1.0 and len(calls) == 1  # the (stubbed) blocked penalty


def test_trustworthiness_rejects_large_k():
    with pytest.raises(ValueError, match="k < n/2"):
        trustworthiness(np.zeros((10, 3)), np.zeros((10, 2)), k=5)


# ------------------------------------------------------------------ the report


def test_evaluate_map_prefers_a_map_that_keeps_clusters():
    x, labels = _clusters(40, 20, seed=4)
    x_train, x_val = x[::2], x[1::2]
    y_val = labels[1::2]
    rng = np.random.default_rng(5)
    good = np.eye(3)[y_val] * 10 + rng.normal(size=(len(y_val), 3))  # one blob per cluster
    good = good[:, :2] + good[:, 2:] * 0.5
    bad = rng.normal(size=(len(y_val), 2))
    m_good = evaluate_map(x_train, x_val, good, y_val, recon_val=x_val + 0.1, k_knn=5, k_tw=5)
    m_bad = evaluate_map(x_train, x_val, bad, y_val, k_knn=5, k_tw=5)
    assert m_good["ae_knn_accuracy"] > 0.95 > 0.6 > m_bad["ae_knn_accuracy"]
    assert m_good["ae_trustworthiness"] > m_bad["ae_trustworthiness"] + 0.1
    # 0.1 added to each of 20 dims: 20 * 0.01 per item.
    assert m_good["ae_squared_error"] == pytest.approx(0.2)
    # PCA of 2 components separates 3 far-apart clusters, and is the same for both maps.
    assert m_good["pca_knn_accuracy"] == m_bad["pca_knn_accuracy"] > 0.95
    assert 0 < m_good["pca_explained_variance"] <= 1
    assert "ae_squared_error" not in m_bad
    table = format_metrics_table(m_good)
    assert "trustworthiness" in table and "autoencoder" in table and "PCA" in table


# evaluate_map on fixed data before scikit-learn took over PCA and trustworthiness (commit 34031ad),
# measured; the numbers must not move.
METRICS_BEFORE = {
    "n_train": 60.0, "n_val": 60.0, "code_dim": 2.0,
    "ae_squared_error": 0.9161435289965145, "ae_knn_accuracy": 0.75,
    "ae_trustworthiness": 0.6709426627793975, "ae_continuity": 0.7566083576287658,
    "pca_squared_error": 43.74622702573755, "pca_explained_variance": 0.6363169662440015,
    "pca_knn_accuracy": 0.38333333333333336, "pca_trustworthiness": 0.8442662779397473,
    "pca_continuity": 0.9201652089407192,
}


def test_evaluate_map_numbers_did_not_move():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(120, 10)) @ rng.normal(size=(10, 10))
    labels = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0)
    codes = x[60:, :2] + 0.3 * rng.normal(size=(60, 2))
    m = evaluate_map(x[:60], x[60:], codes, labels[60:], recon_val=x[60:] * 0.9, k_knn=5, k_tw=7)
    assert m.keys() == METRICS_BEFORE.keys()
    for key, before in METRICS_BEFORE.items():
        assert m[key] == pytest.approx(before, rel=1e-9, abs=1e-12), key


def test_evaluate_map_multilabel_uses_label_share():
    x, labels = _clusters(15, 6, seed=6)
    sets = [["g" + str(c), "all"] if i % 2 else ["g" + str(c)] for i, c in enumerate(labels)]
    m = evaluate_map(x, x, x[:, :2], sets, k_knn=3, k_tw=3)
    assert "ae_knn_label_share" in m and "ae_knn_accuracy" not in m
    assert m["pca_knn_label_share"] > 0.9


def test_plot_maps_side_by_side_writes_png(tmp_path):
    x, labels = _clusters(10, 5, seed=7)
    out = plot_maps_side_by_side(
        {"autoencoder": x[:, :2], "wide": x[:, :4]}, labels, tmp_path / "m" / "maps.png", "t"
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _panel_title("wide", 4) == "wide (PCA of 4-D codes)"
    assert _panel_title("autoencoder", 2) == "autoencoder"


def test_umap_codes_is_none_without_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # makes `import umap` raise ImportError
    assert umap_codes(np.zeros((5, 3)), np.zeros((2, 3))) is None


def test_umap_baseline_gets_its_fit_time_and_its_own_table_column(monkeypatch):
    class FakeUMAP:  # the umap-learn surface umap_codes uses
        def __init__(self, n_components, random_state):
            self.k = n_components

        def fit(self, x):
            time.sleep(0.05)
            return self

        def transform(self, x):
            return x[:, : self.k] * 2

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=FakeUMAP))
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    codes, seconds = umap_codes(x, x[:4], dim=2)
    assert np.allclose(codes, x[:4, :2] * 2) and seconds >= 0.05

    metrics = {"n_val": 4.0, "ae_trustworthiness": 0.9, "pca_trustworthiness": 0.8, "umap_trustworthiness": 0.95,
               "ae_fit_seconds": 12.0, "pca_fit_seconds": 0.25, "umap_fit_seconds": 3.5}
    lines = format_metrics_table(metrics).splitlines()
    assert lines[0] == "n_val: 4"
    assert lines[1].split() == ["metric", "autoencoder", "PCA", "UMAP"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[3:]}
    assert rows == {"trustworthiness": ["0.9000", "0.8000", "0.9500"], "fit_seconds": ["12.0000", "0.2500", "3.5000"]}
    # Without UMAP metrics there is no UMAP column, and a missing value is a dash.
    lines = format_metrics_table({"ae_fit_seconds": 1.0, "pca_trustworthiness": 0.5}).splitlines()
    assert lines[0].split() == ["metric", "autoencoder", "PCA"]
    assert [line.split() for line in lines[2:]] == [["fit_seconds", "1.0000", "-"], ["trustworthiness", "-", "0.5000"]]


def test_nightly_holdout_metrics_are_evaluate_map_s():
    """The nightly holdout score goes through ``evaluate``; before, it called ``evaluate_map``
    directly with k scaled to the holdout: the numbers are the same."""
    from pipelines.nightly import holdout_metrics

    x, labels = _clusters(20, 8, seed=9)
    x_train, x_hold, y_hold = x[::2], x[1::2], labels[1::2].astype(str).astype(object)
    enc = LinearEncoder(np.linalg.qr(np.random.default_rng(1).normal(size=(8, 2)))[0])
    n = len(x_hold)
    before = evaluate_map(x_train, x_hold, enc.encode(x_hold), y_hold, enc.reconstruct(x_hold),
                          k_knn=min(5, n - 1), k_tw=max(1, min(12, (n - 1) // 2)))
    before = {k: v for k, v in before.items() if k.startswith("ae_") or k.startswith("n_")}
    after = holdout_metrics(enc, x_hold, x_train, y_hold)
    assert after.keys() == before.keys() and "ae_knn_accuracy" in after
    for key, value in before.items():
        assert after[key] == pytest.approx(value, rel=1e-12), key


def test_retrieval_precision_by_hand():
    # Base items on a line at 0..4 with labels A B A A B (R_A = 3, R_B = 2).
    base, base_y = _col([0, 1, 2, 3, 4]), np.array(list("ABAAB"))
    # Query A at -0.1 ranks 0A 1B 2A 3A 4B: level 0.3 needs ceil(0.9)=1 hit (rank 1), 0.5 needs 2
    # (rank 3), 1.0 needs 3 (rank 4). Query B at 4.1 ranks 4B 3A 2A 1B 0A: 1, 1, then 2 hits at rank 4.
    # Query C: no base item has C, so it is left out.
    queries, query_y = _col([-0.1, 4.1, 2.0]), np.array(list("ABC"))
    levels = (0.3, 0.5, 1.0)
    want = {0.3: 1.0, 0.5: (2 / 3 + 1) / 2, 1.0: (3 / 4 + 2 / 4) / 2}
    got = retrieval_precision(queries, query_y, base, base_y, levels)
    assert got == pytest.approx(want)
    # One query per block, at most 5 base items x 1 dim of distances each: the same figures.
    assert retrieval_precision(queries, query_y, base, base_y, levels, block_elements=5) == pytest.approx(want)
    # A tie (query A at 1.5: items 1B and 2A both at 0.5) goes to the lower index: 1B first, so the
    # first A comes at rank 2.
    assert retrieval_precision(_col([1.5]), ["A"], base, base_y, (0.3,)) == pytest.approx({0.3: 0.5})
    with pytest.raises(ValueError, match="recall_levels"):
        retrieval_precision(queries, query_y, base, base_y, (0.0,))
    with pytest.raises(ValueError, match="no query"):
        retrieval_precision(_col([1.0]), ["C"], base, base_y)
