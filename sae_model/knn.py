"""Exact k nearest neighbours in numpy: the one implementation, with the one tie rule.

Used for the map metrics (``sae_model.evaluation``) and the neighbour tables (``pipelines.neighbors``).
Neighbours are ordered by (Euclidean distance, id): of equally distant items the smaller id comes
first, whatever BLAS blocking or ``argpartition`` would pick. The training graph's kNN runs on the
training device in torch (``sae_model.neighbor_graph.exact_knn``) with the same rule.
"""

from __future__ import annotations

import numpy as np

# Rows of distances per block: about 2e7 float64 (160 MB) with the temporaries beside them.
_BLOCK_ELEMENTS = 20_000_000


def topk(
    q_ids: np.ndarray,
    q: np.ndarray,
    c_ids: np.ndarray,
    c: np.ndarray,
    k: int,
    margin: int = 8,
    block_rows: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest of each query row of ``q`` (m x d) among the rows of ``c`` (n x d), a query's
    own id excluded, ordered by (distance, id); ``q_ids`` (m,) and ``c_ids`` (n,) are int64 ids.

    Candidates come from the fast ``|q|²+|c|²-2q·c`` form, ``k + 1 + margin`` per row; their
    distances are then recomputed directly (float64), so the reported figures do not depend on BLAS
    blocking. Where the fast form ties at the candidates' boundary (more rows as close as the last
    candidate), the row is ranked in full, so a tie never depends on ``argpartition``'s choice.
    Returns ``(ids, dists)`` of shape ``(m, k)`` (int64, float64 Euclidean distances), padded with
    -1 / inf where there are fewer than k others.
    """
    q = np.asarray(q, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    m, n = len(q_ids), len(c_ids)
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_d = np.full((m, k), np.inf)
    if m == 0 or n == 0:
        return out_ids, out_d
    kk = min(n, k + 1 + margin)
    c_sq = (c * c).sum(1)
    step = block_rows or max(1, _BLOCK_ELEMENTS // max(n, 1))
    for s in range(0, m, step):
        qb, qi = q[s : s + step], q_ids[s : s + step]
        d2 = (qb * qb).sum(1)[:, None] + c_sq[None, :] - 2.0 * (qb @ c.T)
        d2[qi[:, None] == c_ids[None, :]] = np.inf
        if kk < n:
            idx = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
            boundary = np.take_along_axis(d2, idx, 1).max(axis=1)
            crowded = np.flatnonzero((d2 <= boundary[:, None]).sum(axis=1) > kk)
        else:
            idx, crowded = np.broadcast_to(np.arange(n), (len(qb), n)), np.array([], dtype=np.int64)
        ids, dd = _rank(qb, qi, c, c_ids, idx, k)
        for r in crowded:  # rare: rank every candidate of this row
            ids[r], dd[r] = _rank(qb[r : r + 1], qi[r : r + 1], c, c_ids, np.arange(n)[None, :], k)
        w = ids.shape[1]
        out_ids[s : s + step, :w], out_d[s : s + step, :w] = ids, dd
    return out_ids, out_d


def _rank(
    qb: np.ndarray, qi: np.ndarray, c: np.ndarray, c_ids: np.ndarray, idx: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of the candidate columns ``idx`` by (direct distance, id); -1/inf past the others."""
    cand_ids = c_ids[idx]
    d = np.sqrt(((qb[:, None, :] - c[idx]) ** 2).sum(-1))
    d[cand_ids == qi[:, None]] = np.inf
    order = np.lexsort((cand_ids, d), axis=-1)[:, :k]
    ids = np.take_along_axis(cand_ids, order, 1)
    dd = np.take_along_axis(d, order, 1)
    ids[~np.isfinite(dd)] = -1
    return ids, dd
