"""The one exact kNN and its tie rule, (distance, id): numpy (``sae_model.knn.topk``) and its torch
twin for the training graph (``sae_model.neighbor_graph.exact_knn``)."""

from __future__ import annotations

import numpy as np
import torch

from sae_model.knn import topk
from sae_model.neighbor_graph import exact_knn


def brute(ids: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    order = np.lexsort((np.broadcast_to(ids, d.shape), d), axis=-1)[:, :k]
    return ids[order]


def test_crowded_ties_go_to_the_smaller_id_beyond_the_candidate_margin():
    # 40 points on 4 positions: 9 others sit at distance 0 from each, more than k + 1 + margin = 5
    # candidates, so argpartition's pick alone would decide; the rule must not depend on it.
    x = np.repeat(np.arange(4.0), 10)[:, None]
    ids = np.random.default_rng(0).permutation(1000)[:40].astype(np.int64)
    got, d = topk(ids, x, ids, x, 3, margin=1, block_rows=7)
    np.testing.assert_array_equal(got, brute(ids, x, 3))
    assert (d == 0).all()


def test_torch_twin_keeps_the_same_rule():
    x = np.repeat(np.arange(5.0), 6)[:, None] + np.zeros((30, 2))
    idx, d2 = exact_knn(torch.tensor(x, dtype=torch.float32), 4, block=8, margin=2)
    ids = np.arange(30, dtype=np.int64)
    np.testing.assert_array_equal(idx.numpy(), brute(ids, x, 4))
    np.testing.assert_array_equal(d2.numpy(), np.zeros((30, 4)))
