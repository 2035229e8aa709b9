"""Map-quality metrics: how well a low-dimensional map keeps the data's structure.

PCA, trustworthiness/continuity (up to ``SKLEARN_MAX_ITEMS`` items, beyond which its n x n arrays
would not fit and a blocked numpy version giving the same number takes over) and the train -> test
kNN classifier of the split protocol (``evaluate_protocol``) are scikit-learn's; the leave-one-out
exact kNN lists are computed here in float64 row blocks, so that n=10,000 x d=784 needs a few
hundred MB at most and never an n x n matrix at once.

Conventions used throughout:
- Distances are Euclidean; neighbours exclude the point itself.
- Ties in distance are broken by the lower item index, everywhere (kNN lists and ranks use
  the same rule, so "j is among i's k nearest" and "rank of j from i <= k" always agree).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.decomposition import PCA as _SklearnPCA

from sae_model.knn import topk

log = logging.getLogger(__name__)

# Budget for one block of temporaries, in elements (64M booleans = 64 MB; the float64 distance
# block next to it is k+1 times smaller). Row blocks are sized from it, so memory stays bounded
# (a few hundred MB at n=10,000) instead of growing with n^2.
_BLOCK_ELEMENTS = 64_000_000
# scikit-learn's trustworthiness holds three n x n arrays at once (distances, their argsort, the
# inverse ranks: 24 n^2 bytes, 600 MB at n=5,000 and 2.4 GB at n=10,000). Above this many items the
# blocked implementation here takes over (a few hundred MB at n=10,000).
SKLEARN_MAX_ITEMS = 5_000


def _as_2d_float64(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (items x dims), got shape {arr.shape}")
    return arr


def _row_blocks(n: int, per_row: int, block_size: int | None) -> Iterator[slice]:
    rows = block_size if block_size is not None else max(1, _BLOCK_ELEMENTS // max(1, per_row))
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def _sq_dists_block(
    a_block: np.ndarray, a_sq_block: np.ndarray, b: np.ndarray, b_sq: np.ndarray
) -> np.ndarray:
    """Squared Euclidean distances of a block of rows to all rows of ``b`` (float64, >= 0)."""
    d = a_sq_block[:, None] + b_sq[None, :] - 2.0 * (a_block @ b.T)
    np.maximum(d, 0.0, out=d)
    return d


# --------------------------------------------------------------------------------------------
# Reconstruction
# --------------------------------------------------------------------------------------------


def squared_error_per_item(x: Any, x_hat: Any) -> float:
    """Mean over items of the summed squared error over dims (Hinton's "squared error per image")."""
    x = _as_2d_float64(x, "x")
    x_hat = _as_2d_float64(x_hat, "x_hat")
    if x.shape != x_hat.shape:
        raise ValueError(f"x_hat: shape {x_hat.shape} does not match x {x.shape}")
    if x.shape[0] == 0:
        raise ValueError("x: no items")
    total = 0.0
    for sl in _row_blocks(x.shape[0], x.shape[1], None):
        diff = x[sl] - x_hat[sl]
        total += float(np.einsum("ij,ij->", diff, diff))
    return total / x.shape[0]


# --------------------------------------------------------------------------------------------
# PCA
# --------------------------------------------------------------------------------------------


class PCA(_SklearnPCA):
    """scikit-learn's exact PCA of the centred data, in float64: by SVD (``svd_solver="full"``), or, for
    tall data (at least 10 items per dimension and at most 1,000 dimensions, scikit-learn's own rule for
    its ``auto`` choice), by the eigendecomposition of the d x d covariance (``"covariance_eigh"``),
    which gives the same components (to rounding) ~100x faster at MNIST's 60,000 x 784.

    Sign convention (scikit-learn's ``svd_flip`` on the components): each component's entry of
    largest magnitude is positive, so fitting the same data twice, or its negation, gives the same
    axes. ``fit`` raises ``ValueError`` when ``n_components`` exceeds min(n_items, n_dims).
    """

    def __init__(self, n_components: int) -> None:
        if n_components < 1:
            raise ValueError(f"n_components: must be >= 1, got {n_components}")
        super().__init__(n_components=int(n_components), svd_solver="full")

    def fit(self, x: Any, y: Any = None) -> PCA:
        """Fit on ``x`` (array-like (n_items, n_dims), taken as float64); ``y`` is ignored. Raises ValueError
        when ``x`` is not 2-D or ``n_components`` exceeds min(n_items, n_dims)."""
        x = _as_2d_float64(x, "x")
        if self.n_components > min(x.shape):
            raise ValueError(f"n_components={self.n_components} exceeds min(n_items, n_dims)={min(x.shape)}")
        n, d = x.shape
        self.svd_solver = "covariance_eigh" if d <= 1000 and n >= 10 * d else "full"
        return super().fit(x)

    def transform(self, x: Any) -> np.ndarray:
        """Project ``x`` (array-like (n, n_dims)) onto the components: float64 array (n, n_components). Raises
        ValueError when ``x`` is not 2-D."""
        return super().transform(_as_2d_float64(x, "x"))

    def inverse_transform(self, z: Any) -> np.ndarray:
        """Map ``z`` (array-like (n, n_components)) back to the input space: float64 array (n, n_dims). Raises
        ValueError when ``z`` is not 2-D."""
        return super().inverse_transform(_as_2d_float64(z, "z"))

    def fit_transform(self, x: Any, y: Any = None) -> np.ndarray:
        """``fit(x)`` then ``transform(x)``: float64 array (n_items, n_components)."""
        return self.fit(x).transform(x)


# --------------------------------------------------------------------------------------------
# Neighbours
# --------------------------------------------------------------------------------------------


def _check_k(k: int, n: int, name: str = "k") -> None:
    if k < 1:
        raise ValueError(f"{name}: must be >= 1, got {k}")
    if k > n - 1:
        raise ValueError(f"{name}={k}: needs at least k+1 items, got {n}")


def knn_indices(x: Any, k: int, *, block_size: int | None = None) -> np.ndarray:
    """Exact k nearest neighbours of every row of ``x`` (n x d), self excluded, nearest first;
    int64 row indices of shape (n, k). ``sae_model.knn.topk``: ties go to the lower index.
    Raises ``ValueError`` unless 1 <= k <= n - 1.
    """
    x = _as_2d_float64(x, "x")
    n = x.shape[0]
    _check_k(k, n)
    ids = np.arange(n, dtype=np.int64)
    return topk(ids, x, ids, x, k, block_rows=block_size)[0]


def _encode_labels(labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"labels: expected {n} labels in a 1-D array, got shape {labels.shape}")
    _, codes = np.unique(labels, return_inverse=True)
    return codes.reshape(-1)


def knn_accuracy(codes: Any, labels: Any, k: int = 5, *, block_size: int | None = None) -> float:
    """Leave-one-out k-NN classification accuracy on the map.

    Each item is classified by a majority vote of its k nearest other items. A tie between
    labels goes to the tied label whose nearest voter is closest (so k=1 behaviour is recovered
    and the result is deterministic). scikit-learn's ``KNeighborsClassifier`` gives such ties to
    the lowest class instead, so only the neighbour lists are shared (``knn_indices``).
    """
    codes = _as_2d_float64(codes, "codes")
    n = codes.shape[0]
    y = _encode_labels(labels, n)
    nn = knn_indices(codes, k, block_size=block_size)
    neigh = y[nn]  # (n, k), nearest first
    votes = (neigh[:, :, None] == neigh[:, None, :]).sum(axis=2)  # votes for the label at each slot
    score = votes * (k + 1) - np.arange(k)[None, :]  # more votes first, then the nearer slot
    pred = neigh[np.arange(n), np.argmax(score, axis=1)]
    return float(np.mean(pred == y))


def knn_label_share(
    codes: Any, label_sets: Sequence[Any], k: int = 5, *, block_size: int | None = None
) -> float:
    """Mean share of each item's k nearest neighbours that share at least one label with it.

    For multi-label items (e.g. Tag Genome genres). Items with no labels cannot share one, so
    they are left out as queries (they still count as neighbours of others).
    """
    codes = _as_2d_float64(codes, "codes")
    n = codes.shape[0]
    if len(label_sets) != n:
        raise ValueError(f"label_sets: expected {n} label sets, got {len(label_sets)}")
    sets = [frozenset([s] if isinstance(s, str) else s) for s in label_sets]
    queries = [i for i in range(n) if sets[i]]
    if not queries:
        raise ValueError("label_sets: every item has an empty label set")
    nn = knn_indices(codes, k, block_size=block_size)
    shares = [sum(1 for j in nn[i] if not sets[i].isdisjoint(sets[j])) / k for i in queries]
    return float(np.mean(shares))


def retrieval_precision(
    query_codes: Any,
    query_labels: Any,
    base_codes: Any,
    base_labels: Any,
    recall_levels: Sequence[float] = (0.001, 0.01, 0.05, 0.1, 0.2, 0.5),
    *,
    block_elements: int = 20_000_000,
) -> dict[float, float]:
    """Hinton's document-retrieval measure: mean precision of the same-label base items at each recall
    level, when every query retrieves base items nearest first (Hinton & Salakhutdinov 2006, fig. 4A;
    the 10-D autoencoder codes against LSA's).

    ``query_codes`` (m, d) and ``base_codes`` (n, d): e.g. test documents' codes and training
    documents' codes; labels are 1-D arrays of m and n. For a query of label c with R_c base items of
    label c, recall level r is reached at the first rank t where ceil(r * R_c) (at least 1) of them
    have been retrieved; the precision there is ceil(r * R_c) / t. The result maps each level to the
    mean over queries (queries whose label no base item has are left out). Exact Euclidean ranking
    of every base item with ``sae_model.knn``'s tie rule (equal distances: the lower base index
    first), query block by query block so that at most ``block_elements`` floats of differences are
    held at once (7,466 test x 11,233 training posts: 18-172 s on two busy shared cores).
    Raises ``ValueError`` for mismatched shapes, a level outside (0, 1], or no query with a label
    the base has.
    """
    q = _as_2d_float64(query_codes, "query_codes")
    c = _as_2d_float64(base_codes, "base_codes")
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"query_codes: {q.shape[1]} dims but base_codes has {c.shape[1]}")
    yq, yc = np.asarray(query_labels), np.asarray(base_labels)
    if yq.shape != (q.shape[0],) or yc.shape != (c.shape[0],):
        raise ValueError(f"labels: expected 1-D arrays of {q.shape[0]} and {c.shape[0]}, got {yq.shape} and {yc.shape}")
    levels = [float(r) for r in recall_levels]
    if not levels or any(not 0.0 < r <= 1.0 for r in levels):
        raise ValueError(f"recall_levels: each must be in (0, 1], got {levels}")
    # Labels as small integers: comparing (block x n) strings would cost n x the label's bytes each.
    _, codes = np.unique(np.concatenate([yc, yq]), return_inverse=True)
    yc, yq = codes[: yc.shape[0]].reshape(-1), codes[yc.shape[0] :].reshape(-1)
    relevant = np.bincount(yc, minlength=int(codes.max()) + 1)
    keep = np.flatnonzero(relevant[yq] > 0)
    if keep.size == 0:
        raise ValueError("query_labels: no query has a label that any base item has")
    n = c.shape[0]
    sums = np.zeros(len(levels))
    rows = max(1, block_elements // (n * max(1, c.shape[1])))
    for s in range(0, keep.size, rows):
        blk = keep[s : s + rows]
        # Every base item ranked: direct squared distances, and a stable sort of the index-ordered
        # columns puts equal distances in index order (topk's rule; its candidate search and lexsort
        # only pay off for a few neighbours, not for all n).
        d2 = ((q[blk][:, None, :] - c[None, :, :]) ** 2).sum(axis=-1)
        order = np.argsort(d2, axis=1, kind="stable")
        hits = np.cumsum(yc[order] == yq[blk][:, None], axis=1)
        r_c = relevant[yq[blk]]
        for i, r in enumerate(levels):
            need = np.maximum(1, np.ceil(r * r_c - 1e-9)).astype(np.int64)
            rank = 1 + np.argmax(hits >= need[:, None], axis=1)
            sums[i] += float((need / rank).sum())
    return {r: sums[i] / keep.size for i, r in enumerate(levels)}


def knn_classifier_accuracy(train_codes: Any, train_labels: Any, test_codes: Any, test_labels: Any, k: int = 5) -> float:
    """Accuracy on the test items of a k-NN classifier fitted on the training items: the published
    protocol of the map tables (van der Maaten 2009; Sainburg, McInnes & Gentner 2021).

    ``train_codes`` (n_train x w) with ``train_labels`` (n_train,), ``test_codes`` (n_test x w) with
    ``test_labels`` (n_test,); any hashable labels. scikit-learn's ``KNeighborsClassifier`` (uniform
    votes, exact Euclidean search). Its tie rules: a tie in votes goes to the smallest tied class
    (in sorted label order; scipy's mode), and which of several training items equidistant at the
    k-th place votes is its search's choice. Returns a float in [0, 1]. Raises ``ValueError`` when
    ``k`` exceeds the training items or the shapes disagree.
    """
    from sklearn.neighbors import KNeighborsClassifier

    train_codes = _as_2d_float64(train_codes, "train_codes")
    test_codes = _as_2d_float64(test_codes, "test_codes")
    if not 1 <= k <= train_codes.shape[0]:
        raise ValueError(f"k={k}: needs 1 <= k <= the {train_codes.shape[0]} training items")
    y_train, y_test = np.asarray(train_labels), np.asarray(test_labels)
    if y_train.shape != (train_codes.shape[0],) or y_test.shape != (test_codes.shape[0],):
        raise ValueError(f"labels: shapes {y_train.shape}, {y_test.shape} do not match the codes' rows")
    clf = KNeighborsClassifier(n_neighbors=k).fit(train_codes, y_train)
    return float(clf.score(test_codes, y_test))


def knn_label_share_to(
    train_codes: Any, train_sets: Sequence[Any], test_codes: Any, test_sets: Sequence[Any], k: int = 5
) -> float:
    """``knn_label_share`` across a split: the mean share of each test item's k nearest training items
    (scikit-learn's exact ``NearestNeighbors``) sharing a label with it; test items without labels are
    left out. Raises ``ValueError`` when no test item has a label or k exceeds the training items."""
    from sklearn.neighbors import NearestNeighbors

    train_codes = _as_2d_float64(train_codes, "train_codes")
    test_codes = _as_2d_float64(test_codes, "test_codes")
    if not 1 <= k <= train_codes.shape[0]:
        raise ValueError(f"k={k}: needs 1 <= k <= the {train_codes.shape[0]} training items")
    tr = [frozenset([v] if isinstance(v, str) else v) for v in train_sets]
    te = [frozenset([v] if isinstance(v, str) else v) for v in test_sets]
    queries = [i for i, t in enumerate(te) if t]
    if not queries:
        raise ValueError("test_sets: every test item has an empty label set")
    nn = NearestNeighbors(n_neighbors=k).fit(train_codes).kneighbors(test_codes[queries], return_distance=False)
    return float(np.mean([sum(1 for j in row if not te[i].isdisjoint(tr[j])) / k for i, row in zip(queries, nn, strict=True)]))


# --------------------------------------------------------------------------------------------
# Trustworthiness and continuity (Venna & Kaski)
# --------------------------------------------------------------------------------------------


def _rank_penalty(
    rank_space: np.ndarray, neighbor_space: np.ndarray, k: int, block_size: int | None
) -> float:
    """Sum over i and over j in i's k-NN in ``neighbor_space`` of max(0, r(i, j) - k), where r is
    the 1-based rank of j among i's neighbours in ``rank_space`` (ties: lower index first)."""
    n = rank_space.shape[0]
    nn = knn_indices(neighbor_space, k, block_size=block_size)
    sq = np.einsum("ij,ij->i", rank_space, rank_space)
    total = 0
    # Each block holds (rows x k x n) booleans: size the rows from that.
    for sl in _row_blocks(n, n * (k + 1), block_size):
        rows = np.arange(sl.stop - sl.start)
        d = _sq_dists_block(rank_space[sl], sq[sl], rank_space, sq)
        d[rows, rows + sl.start] = np.inf  # self never ranks before anyone
        j = nn[sl]  # (b, k)
        dj = d[rows[:, None], j]  # (b, k)
        rank = 1 + np.count_nonzero(d[:, None, :] < dj[:, :, None], axis=2)
        # Exact distance ties (j itself always equals): the lower index ranks first. Rare in
        # real data, so only the affected (row, neighbour) pairs pay for the index comparison.
        n_equal = np.count_nonzero(d[:, None, :] == dj[:, :, None], axis=2)
        for r, c in zip(*np.nonzero(n_equal > 1), strict=True):
            rank[r, c] += np.count_nonzero((d[r] == dj[r, c]) & (np.arange(n) < j[r, c]))
        total += int(np.maximum(rank - k, 0).sum())
    return float(total)


def _venna_kaski(rank_space: Any, neighbor_space: Any, k: int, block_size: int | None) -> float:
    a = _as_2d_float64(rank_space, "x")
    b = _as_2d_float64(neighbor_space, "codes")
    n = a.shape[0]
    if b.shape[0] != n:
        raise ValueError(f"codes: {b.shape[0]} rows but x has {n}")
    if k < 1 or not k < n / 2:
        raise ValueError(f"k={k}: trustworthiness/continuity need 1 <= k < n/2 (n={n})")
    if block_size is None and n <= SKLEARN_MAX_ITEMS:
        from sklearn.manifold import trustworthiness as sk_trustworthiness

        return float(sk_trustworthiness(a, b, n_neighbors=k))
    penalty = _rank_penalty(a, b, k, block_size)
    return 1.0 - 2.0 / (n * k * (2.0 * n - 3.0 * k - 1.0)) * penalty


def trustworthiness(x: Any, codes: Any, k: int = 12, *, block_size: int | None = None) -> float:
    """Venna & Kaski trustworthiness: are the map's neighbours real neighbours? (1 = perfect)

    T(k) = 1 - 2/(n k (2n - 3k - 1)) * sum_i sum_{j in U_k(i)} (r(i, j) - k), where U_k(i) are
    the map neighbours of i that are not among its k input-space neighbours and r(i, j) is the
    rank of j from i in input space. ``sklearn.manifold.trustworthiness`` up to
    ``SKLEARN_MAX_ITEMS`` items; beyond (or with ``block_size``) the blocked version, whose
    exact-distance ties go to the lower index. Raises ``ValueError`` unless 1 <= k < n/2.
    """
    return _venna_kaski(x, codes, k, block_size)


def continuity(x: Any, codes: Any, k: int = 12, *, block_size: int | None = None) -> float:
    """Venna & Kaski continuity: are the real neighbours kept as map neighbours? (1 = perfect)

    Trustworthiness with the roles of input space and map swapped.
    """
    return _venna_kaski(codes, x, k, block_size)


# --------------------------------------------------------------------------------------------
# The evaluation report
# --------------------------------------------------------------------------------------------


def _is_multilabel(labels: Any) -> bool:
    if isinstance(labels, np.ndarray) and labels.dtype != object:
        return labels.ndim == 2  # a 2-D array cannot be a list of labels; treat rows as sets
    return len(labels) > 0 and all(isinstance(v, list | tuple | set | frozenset | np.ndarray) for v in labels)


def label_kind(labels: Any) -> str:
    """``"none"`` (no labels), ``"genres"`` (a label set per item) or ``"label"`` (one label each)."""
    if labels is None:
        return "none"
    return "genres" if _is_multilabel(labels) else "label"


def map_metrics(
    prefix: str, x: np.ndarray, codes: np.ndarray, labels: Any, k_knn: int, k_tw: int, kind: str | None = None
) -> dict[str, float]:
    """kNN label accuracy (``kind="label"``) or label share (``"genres"``), trustworthiness and
    continuity of one map ``codes`` (n x width) of ``x`` (n x d), keyed ``<prefix>_<metric>``.
    ``kind=None``: from the labels (``label_kind``)."""
    kind = label_kind(labels) if kind is None else kind
    out: dict[str, float] = {}
    if kind == "label":
        out[f"{prefix}_knn_accuracy"] = knn_accuracy(codes, labels, k_knn)
    elif kind == "genres":
        out[f"{prefix}_knn_label_share"] = knn_label_share(codes, list(labels), k_knn)
    out[f"{prefix}_trustworthiness"] = trustworthiness(x, codes, k_tw)
    out[f"{prefix}_continuity"] = continuity(x, codes, k_tw)
    return out


def evaluate_map(
    x_train: Any,
    x_val: Any,
    codes_val: Any,
    labels_val: Any = None,
    recon_val: Any = None,
    k_knn: int = 5,
    k_tw: int = 12,
) -> dict[str, float]:
    """Score an autoencoder map of ``x_val`` against PCA of the same width fitted on ``x_train``.

    Returns flat float metrics (ready for ``mlflow.log_metrics``) with ``ae_`` and ``pca_``
    prefixes: squared error per item (AE only if ``recon_val`` is given), kNN accuracy (or the
    kNN label share when ``labels_val`` holds label sets), trustworthiness and continuity.
    """
    x_train = _as_2d_float64(x_train, "x_train")
    x_val = _as_2d_float64(x_val, "x_val")
    codes_val = _as_2d_float64(codes_val, "codes_val")
    if x_val.shape[1] != x_train.shape[1]:
        raise ValueError(f"x_val: {x_val.shape[1]} dims but x_train has {x_train.shape[1]}")
    if codes_val.shape[0] != x_val.shape[0]:
        raise ValueError(f"codes_val: {codes_val.shape[0]} rows but x_val has {x_val.shape[0]}")
    width = codes_val.shape[1]
    metrics: dict[str, float] = {
        "n_train": float(x_train.shape[0]),
        "n_val": float(x_val.shape[0]),
        "code_dim": float(width),
    }
    if recon_val is not None:
        metrics["ae_squared_error"] = squared_error_per_item(x_val, recon_val)
    metrics.update(map_metrics("ae", x_val, codes_val, labels_val, k_knn, k_tw))

    pca = PCA(width).fit(x_train)
    pca_codes = pca.transform(x_val)
    metrics["pca_squared_error"] = squared_error_per_item(x_val, pca.inverse_transform(pca_codes))
    metrics["pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())
    metrics.update(map_metrics("pca", x_val, pca_codes, labels_val, k_knn, k_tw))
    return metrics


def format_metrics_table(metrics: Mapping[str, float], by: str = "metric") -> str:
    """Plain-text table of flat ``ae_``/``pca_``/``umap_`` metrics, other keys listed above it.

    ``by="metric"``: one row per metric, columns autoencoder | PCA (| UMAP when it was scored).
    ``by="method"`` (the split protocol's report): one row per method (AE, PCA, UMAP), one column
    per metric, missing values as a dash."""
    columns = [("ae", "autoencoder"), ("pca", "PCA")]
    if any(key.startswith("umap_") for key in metrics):
        columns.append(("umap", "UMAP"))
    prefixes = {c for c, _ in columns}
    rows: dict[str, dict[str, float]] = {}
    other: list[str] = []
    for key, value in metrics.items():
        prefix, _, name = key.partition("_")
        if prefix in prefixes and name:
            rows.setdefault(name, {})[prefix] = value
        else:
            other.append(f"{key}: {value:g}")
    if by == "method":
        titles = {"ae": "AE", "pca": "PCA", "umap": "UMAP"}
        widths = [max(10, len(name)) for name in rows]
        lines = list(other)
        lines.append("  ".join([f"{'method':<6}"] + [f"{name:>{w}}" for name, w in zip(rows, widths, strict=True)]))
        lines.append("  ".join(["-" * 6] + ["-" * w for w in widths]))
        for c, _ in columns:
            cells = [f"{rows[n][c]:{w}.4f}" if c in rows[n] else f"{'-':>{w}}" for n, w in zip(rows, widths, strict=True)]
            lines.append("  ".join([f"{titles[c]:<6}"] + cells))
        return "\n".join(lines)
    width = max([len("metric")] + [len(name) for name in rows])
    lines = list(other)
    lines.append("  ".join([f"{'metric':<{width}}"] + [f"{title:>12}" for _, title in columns]))
    lines.append("  ".join(["-" * width] + ["-" * 12] * len(columns)))
    for name, cols in rows.items():
        cells = [f"{cols[c]:12.4f}" if c in cols else f"{'-':>12}" for c, _ in columns]
        lines.append("  ".join([f"{name:<{width}}"] + cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Pictures and optional UMAP baseline
# --------------------------------------------------------------------------------------------


def _panel_title(name: str, width: int) -> str:
    return name if width <= 2 else f"{name} (PCA of {width}-D codes)"


def plot_maps_side_by_side(maps: Mapping[str, Any], labels: Any, path: str | Path, title: str = "") -> Path:
    """Write a PNG with one scatter panel per map, points coloured by label.

    Codes wider than 2 are shown through a 2-D PCA of themselves (the panel title says so).
    Multi-label items are coloured by their first label. Uses the Agg canvas directly, so it
    never touches pyplot's global state or needs a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not maps:
        raise ValueError("maps: need at least one map to plot")
    path = Path(path)
    fig = Figure(figsize=(5 * len(maps), 5), dpi=100)
    FigureCanvasAgg(fig)
    colour_idx = None
    classes: np.ndarray | None = None
    if labels is not None:
        flat = [
            (sorted(v)[0] if len(v) else "") if isinstance(v, list | tuple | set | frozenset) else v
            for v in labels
        ]
        classes, colour_idx = np.unique(np.asarray(flat, dtype=object).astype(str), return_inverse=True)
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (name, raw_codes) in zip(axes, maps.items(), strict=True):
        codes = _as_2d_float64(raw_codes, f"maps[{name!r}]")
        width = codes.shape[1]
        xy = PCA(2).fit_transform(codes) if width > 2 else codes
        if xy.shape[1] == 1:
            xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
        if colour_idx is not None and classes is not None:
            cmap = "tab10" if len(classes) <= 10 else "tab20" if len(classes) <= 20 else "viridis"
            sc = ax.scatter(
                xy[:, 0],
                xy[:, 1],
                c=colour_idx,
                cmap=cmap,
                s=4,
                alpha=0.7,
                vmin=0,
                vmax=max(len(classes) - 1, 1),
            )
            if len(classes) <= 20:
                handles, _ = sc.legend_elements(num=list(range(len(classes))))
                ax.legend(handles, list(classes), fontsize=6, markerscale=0.6, loc="best")
        else:
            ax.scatter(xy[:, 0], xy[:, 1], s=4, alpha=0.7)
        ax.set_title(_panel_title(name, width))
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def _fit_umap(x_train: Any, dim: int, seed: int) -> tuple[Any, float] | None:
    """umap-learn's ``UMAP`` fitted on ``x_train`` and the fit's seconds; None (logged) without umap-learn."""
    try:
        import umap  # type: ignore[import-not-found]
    except ImportError:
        log.info("umap-learn is not installed: skipping the UMAP baseline")
        return None
    reducer = umap.UMAP(n_components=dim, random_state=seed)
    t0 = time.perf_counter()
    reducer.fit(np.asarray(x_train, dtype=np.float32))
    return reducer, time.perf_counter() - t0


def umap_codes(x_train: Any, x_val: Any, dim: int = 2, seed: int = 0) -> tuple[np.ndarray, float] | None:
    """UMAP baseline codes for ``x_val`` (fitted on ``x_train``) and the fit's seconds, or None if
    umap-learn is missing."""
    fitted = _fit_umap(x_train, dim, seed)
    if fitted is None:
        return None
    reducer, fit_seconds = fitted
    return np.asarray(reducer.transform(np.asarray(x_val, dtype=np.float32)), dtype=np.float64), fit_seconds


# --------------------------------------------------------------------------------------------
# Evaluating a trained model: arrays in, metrics (and a picture) out; from the tables; into MLflow
# --------------------------------------------------------------------------------------------


MAPS_PNG = "maps.png"


@dataclass
class Evaluation:
    """What ``evaluate`` returns: flat metrics for MLflow, the path of the side-by-side maps PNG (None when
    not drawn) and the kind of labels used."""

    metrics: dict[str, float]  # flat, ready for MLflow: ae_*, pca_*, umap_*, n_*
    figure: Path | None  # the side-by-side maps PNG
    label_kind: str  # "label" | "genres" | "none"


def read_label_sets(items_uri: str | None, item_ids: np.ndarray) -> tuple[np.ndarray | list | None, str]:
    """Labels of ``item_ids`` from ``items/``: ``label`` (one class each, e.g. the MNIST digit), else
    ``genres`` as sets (an array column or a ``|``-joined string); ``(None, "none")`` when neither.
    Raises ``DataError`` when some but not all of the items have no ``label``."""
    from sae_model.data import DataError, read_label_column

    table, col = read_label_column(items_uri)
    if table is None:
        return None, "none"
    s = table.reindex(item_ids)
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


def protocol_labels(items_uri: str | None, fit_ids: np.ndarray, test_ids: np.ndarray) -> tuple[Any, Any, str]:
    """``(labels_fit, labels_test, kind)`` for ``evaluate_protocol``: ``read_label_sets`` of the training
    rows' items ``fit_ids`` and of the test rows' items ``test_ids`` (int64 arrays), or
    ``(None, None, "none")`` when either side has no labels (no genre at all counts as none). Raises
    ``DataError`` as ``read_label_sets`` does."""
    labels_fit, kind = read_label_sets(items_uri, fit_ids)
    labels_test, kind_test = read_label_sets(items_uri, test_ids)
    if "none" in (kind, kind_test) or (kind == "genres" and not (any(labels_fit) and any(labels_test))):
        return None, None, "none"
    return labels_fit, labels_test, kind


def _sample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of at most ``limit`` of ``n`` rows (all of them when n <= limit)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(rng.choice(n, size=limit, replace=False))


def _batched(fn: Any, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    return np.concatenate([fn(x[s : s + batch]) for s in range(0, x.shape[0], batch)])


def evaluate(
    encoder: Any,
    x_fit: np.ndarray,
    x_val: np.ndarray,
    labels: Any = None,
    cfg: Any = None,
    *,
    kind: str | None = None,
    out_dir: str | Path | None = None,
    title: str = "",
) -> Evaluation:
    """Score ``encoder`` (``encode``/``reconstruct`` of float32 rows, e.g. ``sae_model.loading.Encoder``)
    on the validation rows ``x_val`` (n x d) against PCA of the code width fitted on ``x_fit``.

    Metrics (flat floats, ready for MLflow): ``n_train``/``n_val``/``code_dim``; squared error per
    item (Hinton's measure) of the autoencoder and of PCA on every row of ``x_val``; kNN label
    accuracy (``kind="label"``) or label share (``"genres"``), trustworthiness and continuity of each
    map on a seeded sample of at most ``cfg.max_items`` rows (``n_eval``; those are O(n^2)), with
    ``cfg.k_knn``/``cfg.k_tw`` neighbours; UMAP too with ``cfg.umap``. ``labels`` (one per row of
    ``x_val``) may be None; ``kind=None`` infers it from them. ``x_fit`` is subsampled to
    ``cfg.max_fit_items`` rows. ``out_dir`` receives ``maps.png`` (None: no figure).

    Raises ``DataError`` when ``x_val`` has at most ``2 * cfg.k_tw`` rows or ``x_fit`` fewer rows
    than the code width.
    """
    from sae_model.config import EvaluateConfig
    from sae_model.data import DataError

    cfg = cfg or EvaluateConfig()
    kind = label_kind(labels) if kind is None else kind
    n_val, n_train = int(x_val.shape[0]), int(x_fit.shape[0])
    if n_val <= 2 * cfg.k_tw:
        raise DataError(f"evaluation needs more than {2 * cfg.k_tw} validation items, got {n_val}")
    if n_train < encoder.code_width:
        raise DataError(f"PCA of width {encoder.code_width} needs at least that many training items, got {n_train}")
    rng = np.random.default_rng(cfg.seed)
    x_fit = x_fit[_sample(n_train, cfg.max_fit_items, rng)]

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
    if labels is not None:
        labels = [labels[i] for i in sub] if kind == "genres" else np.asarray(labels)[sub]
    xs = x_val[sub].astype(np.float64)
    maps: dict[str, np.ndarray] = {"autoencoder": codes[sub], "PCA": pca_codes[sub]}
    if cfg.umap:
        u = umap_codes(x_fit, xs, dim=encoder.code_width, seed=cfg.seed)
        if u is not None:
            maps["UMAP"], metrics["umap_fit_seconds"] = u
    names = {"autoencoder": "ae", "PCA": "pca", "UMAP": "umap"}
    for name, m in maps.items():
        metrics.update(map_metrics(names[name], xs, m, labels, cfg.k_knn, cfg.k_tw, kind))

    figure = None
    if out_dir is not None:
        sub_title = title or f"validation items ({len(sub)} of {n_val}), code width {encoder.code_width}"
        plot_labels = None if labels is None else list(labels) if kind == "genres" else labels
        figure = plot_maps_side_by_side(maps, plot_labels, Path(out_dir) / MAPS_PNG, sub_title)
    log.info("evaluation on %d validation items (%d for neighbourhoods): %s", n_val, len(sub), metrics)
    return Evaluation(metrics, figure, kind)


def _label_metrics(prefix: str, kind: str, train_codes: np.ndarray, labels_fit: Any, test_codes: np.ndarray,
                   labels_test: Any, k: int) -> dict[str, float]:
    """The kNN classifier's accuracy (``kind="label"``) or the kNN label share (``"genres"``) from the
    training codes to the test codes, at k and at 1; nothing without labels."""
    out: dict[str, float] = {}
    for name, kk in (("knn", k), ("knn1", 1)):
        if kind == "label":
            out[f"{prefix}_{name}_accuracy"] = knn_classifier_accuracy(train_codes, labels_fit, test_codes, labels_test, kk)
        elif kind == "genres":
            out[f"{prefix}_{name}_label_share"] = knn_label_share_to(train_codes, labels_fit, test_codes, labels_test, kk)
    return out


def evaluate_protocol(
    encoder: Any,
    x_fit: np.ndarray,
    x_test: np.ndarray,
    labels_fit: Any = None,
    labels_test: Any = None,
    cfg: Any = None,
    *,
    kind: str | None = None,
    fit_seconds: float | None = None,
    out_dir: str | Path | None = None,
    title: str = "",
) -> Evaluation:
    """Score ``encoder`` on held-out test rows the field's way (``train.split_column``): every method
    is fitted on training rows only and scored on test rows it never saw.

    ``x_fit`` (n_train x d, float32): the training split's rows, subsampled (seeded) to
    ``cfg.max_fit_items``; PCA of the code width and, with ``cfg.umap`` and umap-learn importable, UMAP
    are fitted on them. ``x_test`` (n_test x d): the test rows. ``labels_fit``/``labels_test``: one
    label (or label set, ``kind="genres"``) per row, or None. Metrics per method m in ae, pca, umap:
    ``m_squared_error`` (ae, pca: per test item, summed over dims, mean over every test item),
    ``m_knn_accuracy``/``m_knn1_accuracy`` (``knn_classifier_accuracy`` with k = ``cfg.k_knn`` and 1,
    fitted on the training codes, scored on every test item; ``_label_share`` for genres),
    ``m_trustworthiness``/``m_continuity`` (k = ``cfg.k_tw``, a seeded sample of at most
    ``cfg.max_items`` test items), ``m_trustworthiness_train`` (the same on as many training items;
    UMAP's training codes are its fitted embedding), ``m_fit_seconds`` (ae: ``fit_seconds``, the
    training's, when given); plus ``n_train`` (training rows before subsampling), ``n_test``,
    ``n_eval`` (the test sample) and ``code_dim``. ``out_dir`` receives ``maps.png`` of the test sample.

    Raises ``DataError`` when there are at most ``2 * cfg.k_tw`` test or training rows, or fewer
    training rows than the code width or ``cfg.k_knn``.
    """
    from sae_model.config import EvaluateConfig
    from sae_model.data import DataError

    cfg = cfg or EvaluateConfig()
    kind = label_kind(labels_test) if kind is None else kind
    if labels_fit is None or labels_test is None:
        labels_fit, labels_test, kind = None, None, "none"
    n_train, n_test, width = int(x_fit.shape[0]), int(x_test.shape[0]), int(encoder.code_width)
    if n_test <= 2 * cfg.k_tw:
        raise DataError(f"evaluation needs more than {2 * cfg.k_tw} test items (evaluate.k_tw={cfg.k_tw}), got {n_test}")
    if n_train <= max(2 * cfg.k_tw, cfg.k_knn) or n_train < width:
        raise DataError(
            f"evaluation needs more than {max(2 * cfg.k_tw, cfg.k_knn)} training items and at least the code width "
            f"{width}, got {n_train}"
        )
    rng = np.random.default_rng(cfg.seed)
    fit_rows = _sample(n_train, cfg.max_fit_items, rng)
    xf = x_fit[fit_rows]
    if labels_fit is not None:
        labels_fit = [labels_fit[i] for i in fit_rows] if kind == "genres" else np.asarray(labels_fit)[fit_rows]
    test_sub = _sample(n_test, cfg.max_items, rng)
    train_sub = _sample(len(fit_rows), cfg.max_items, rng)

    # method -> (training codes, test codes, test reconstructions or None, fit seconds or None)
    methods: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, float | None]] = {
        "ae": (_batched(encoder.encode, xf), _batched(encoder.encode, x_test), _batched(encoder.reconstruct, x_test), fit_seconds),
    }
    t0 = time.perf_counter()
    pca = PCA(width).fit(xf)
    pca_seconds = time.perf_counter() - t0
    pca_test = pca.transform(x_test)
    methods["pca"] = (pca.transform(xf), pca_test, pca.inverse_transform(pca_test), pca_seconds)
    if cfg.umap:
        fitted = _fit_umap(xf, width, cfg.seed)
        if fitted is not None:
            reducer, umap_seconds = fitted
            umap_test = np.asarray(reducer.transform(np.asarray(x_test, dtype=np.float32)), dtype=np.float64)
            methods["umap"] = (np.asarray(reducer.embedding_, dtype=np.float64), umap_test, None, umap_seconds)

    metrics: dict[str, float] = {
        "n_train": float(n_train), "n_test": float(n_test), "n_eval": float(len(test_sub)), "code_dim": float(width),
    }
    xs_test = np.asarray(x_test[test_sub], dtype=np.float64)
    xs_train = np.asarray(xf[train_sub], dtype=np.float64)
    for m, (train_codes, test_codes, recon, seconds) in methods.items():
        if recon is not None:
            metrics[f"{m}_squared_error"] = squared_error_per_item(x_test, recon)
        metrics.update(_label_metrics(m, kind, train_codes, labels_fit, test_codes, labels_test, cfg.k_knn))
        metrics[f"{m}_trustworthiness"] = trustworthiness(xs_test, test_codes[test_sub], cfg.k_tw)
        metrics[f"{m}_continuity"] = continuity(xs_test, test_codes[test_sub], cfg.k_tw)
        metrics[f"{m}_trustworthiness_train"] = trustworthiness(xs_train, train_codes[train_sub], cfg.k_tw)
        if seconds is not None:
            metrics[f"{m}_fit_seconds"] = float(seconds)
    metrics["pca_explained_variance"] = float(pca.explained_variance_ratio_.sum())

    figure = None
    if out_dir is not None:
        names = {"ae": "autoencoder", "pca": "PCA", "umap": "UMAP"}
        maps = {names[m]: v[1][test_sub] for m, v in methods.items()}
        plot_labels = None
        if labels_test is not None:
            plot_labels = [labels_test[i] for i in test_sub] if kind == "genres" else np.asarray(labels_test)[test_sub]
        sub_title = title or f"test items ({len(test_sub)} of {n_test}), code width {width}"
        figure = plot_maps_side_by_side(maps, plot_labels, Path(out_dir) / MAPS_PNG, sub_title)
    log.info("evaluation on %d test items (fitted on %d training items): %s", n_test, len(fit_rows), metrics)
    return Evaluation(metrics, figure, kind)


def evaluate_split(
    encoder: Any,
    features_uri: str,
    items_uri: str | None,
    val_fraction: float,
    cfg: Any = None,
    out_dir: str | Path | None = None,
    title: str = "",
    *,
    split_column: str = "",
    train_value: str = "train",
    fit_seconds: float | None = None,
) -> Evaluation:
    """``evaluate`` on the validation split of the ``features/`` table (the training split: the same
    hash of ``item_id`` and ``val_fraction``), with the labels of ``items/`` (``read_label_sets``).

    ``val_fraction`` must be the one the model was trained with, or training rows leak into the
    scores. Raises ``DataError`` as ``evaluate`` does (naming ``train.val_fraction``).

    With ``split_column`` (``train.split_column``; ``sae_model.data.read_split``) it is
    ``evaluate_protocol`` instead: fitted on the training split's rows (those whose ``items/``
    column equals ``train_value``, validation hold-out included), scored on every other row;
    ``fit_seconds`` is then reported as the autoencoder's. Raises ``DataError`` as ``read_split``
    and ``evaluate_protocol`` do.
    """
    from sae_model.config import EvaluateConfig
    from sae_model.data import DataError, is_validation, load_table, read_split

    cfg = cfg or EvaluateConfig()
    if split_column:
        split = read_split(items_uri, split_column, train_value, val_fraction)
        ids, x = load_table(features_uri, encoder.input_width)
        member = split.in_training_split(ids)
        labels_fit, labels_test, kind = protocol_labels(items_uri, ids[member], ids[~member])
        x_fit, x_test = x[member], x[~member]
        del x
        return evaluate_protocol(
            encoder, x_fit, x_test, labels_fit, labels_test, cfg, kind=kind, fit_seconds=fit_seconds,
            out_dir=out_dir, title=title,
        )
    ids, x = load_table(features_uri, encoder.input_width)
    val = is_validation(ids, val_fraction)
    n_val = int(val.sum())
    if n_val <= 2 * cfg.k_tw:
        raise DataError(
            f"evaluation needs more than {2 * cfg.k_tw} validation items, got {n_val} "
            f"(train.val_fraction={val_fraction}); raise train.val_fraction"
        )
    labels, kind = read_label_sets(items_uri, ids[val])
    if kind == "genres" and not any(labels):
        labels, kind = None, "none"
    x_fit, x_val = x[~val], x[val]
    del x
    return evaluate(encoder, x_fit, x_val, labels, cfg, kind=kind, out_dir=out_dir, title=title)


def evaluate_and_log(
    encoder: Any,
    features_uri: str,
    items_uri: str | None,
    val_fraction: float,
    cfg: Any,
    run_id: str | None,
    experiment: str,
    train_seconds: float | None = None,
    *,
    split_column: str = "",
    train_value: str = "train",
) -> dict[str, Any]:
    """``evaluate_split``, logged into MLflow run ``run_id`` (None: a new ``evaluate`` run in
    ``experiment``, on the tracking store already set); returns ``run_id``, ``metrics``, ``table``.
    ``train_seconds`` (the training that just made ``encoder``) is shown beside PCA's and UMAP's fits.
    With ``split_column`` the held-out test rows are scored (``evaluate_protocol``) and the table has
    a row per method and a column per metric."""
    import tempfile

    import mlflow

    from sae_model import tracking
    from sae_model.evaluation import format_metrics_table

    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate_split(
            encoder, features_uri, items_uri, val_fraction, cfg, tmp,
            split_column=split_column, train_value=train_value, fit_seconds=train_seconds,
        )
        if train_seconds is not None:
            result.metrics["ae_fit_seconds"] = train_seconds
        table = format_metrics_table(result.metrics, by="method" if split_column else "metric")
        if run_id is None:
            tracking.use_experiment(experiment)
            with mlflow.start_run(tags={"stage": "evaluate"}) as run:
                run_id = run.info.run_id
                mlflow.log_param("train.val_fraction", val_fraction)
                if split_column:
                    mlflow.log_params({"train.split_column": split_column, "train.train_value": train_value})
        tracking.log_evaluation(run_id, result.metrics, result.figure, table)
    log.info("evaluation (run %s):\n%s", run_id, table)
    return {"run_id": run_id, "metrics": result.metrics, "table": table}
