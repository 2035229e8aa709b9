"""The global kNN graph behind ``finetune.neighbor_graph=global``: exact neighbours, the same
affinities as the per-batch maths when the graph spans everything, edge-sampled batches, and
the sampled-edge losses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sae_model.neighbor_graph import NeighbourGraph, exact_knn
from sae_model.neighbor_loss import (
    perplexity_rows,
    tsne_affinities,
    tsne_edge_loss,
    tsne_loss,
    tsne_row_loss,
    umap_ab,
    umap_edge_loss,
    umap_fuzzy_graph,
    umap_loss,
    umap_row_loss,
)


def _points(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, dim, generator=torch.Generator().manual_seed(seed))


def test_exact_knn_matches_brute_force_across_blocks():
    x = _points(300, 7)
    idx, d2 = exact_knn(x, 6, block=64)  # several blocks, one partial
    full = torch.cdist(x.double(), x.double()) ** 2
    full.fill_diagonal_(math.inf)
    want_d2, want_idx = torch.sort(full, dim=1, stable=True)
    assert torch.equal(idx, want_idx[:, :6])
    torch.testing.assert_close(d2, want_d2[:, :6])
    assert not (idx == torch.arange(300)[:, None]).any()  # never itself
    with pytest.raises(ValueError, match="k"):
        exact_knn(x[:5], 5)


def test_perplexity_rows_hit_the_perplexity_by_hand():
    # Two neighbours at squared distances 0 and 1: P = (1, e^-b)/(1 + e^-b); perplexity 1.5 pins b.
    p = perplexity_rows(torch.tensor([[0.0, 1.0]], dtype=torch.float64), 1.5)
    entropy = -(p * p.log()).sum()
    assert float(entropy) == pytest.approx(math.log(1.5), abs=1e-6)
    assert float(p.sum()) == pytest.approx(1.0)
    assert p[0, 0] > p[0, 1]


def test_graph_over_all_rows_equals_the_batch_affinities():
    """With every other row a neighbour, the global graph is the per-batch maths over all rows."""
    x = _points(40, 5, seed=1)
    tsne = NeighbourGraph(x, "tsne", SimpleNamespace(perplexity=13.0))  # 3 x 13 = 39 neighbours = all
    p = tsne.joint.to_dense().double()
    torch.testing.assert_close(p / p.sum(), tsne_affinities(x.double(), 13.0), rtol=1e-5, atol=1e-9)
    umap = NeighbourGraph(x, "umap", SimpleNamespace(n_neighbors=8))
    torch.testing.assert_close(umap.joint.to_dense().double(), umap_fuzzy_graph(x.double(), 8), rtol=1e-6, atol=1e-9)


def test_edges_are_drawn_in_proportion_to_their_affinity_and_seeded():
    x = _points(60, 4, seed=2)
    g = NeighbourGraph(x, "umap", SimpleNamespace(n_neighbors=6))
    batches = list(g.batches(4000, seed=7))
    assert len(batches) == 1 and batches[0].head.numel() == 2000 and batches[0].uniform.numel() == 60
    again = next(iter(g.batches(4000, seed=7)))
    assert torch.equal(again.head, batches[0].head) and torch.equal(again.tail, batches[0].tail)
    assert not torch.equal(next(iter(g.batches(4000, seed=8))).head, batches[0].head)
    dense = g.joint.to_dense().double()
    assert (dense[batches[0].head, batches[0].tail] > 0).all()  # only real edges
    counts = torch.zeros_like(dense)
    for b in g.batches(200_000, seed=1):
        counts.index_put_((b.head, b.tail), torch.ones(b.head.numel(), dtype=counts.dtype), accumulate=True)
    share, want = counts / counts.sum(), dense / dense.sum()
    # L1 distance of 100,000 draws from the affinities (~0.05 by chance), far from drawing edges uniformly.
    uniform_edges = (dense > 0).double() / (dense > 0).sum()
    assert float((share - want).abs().sum()) < 0.08 < 0.15 < float((uniform_edges - want).abs().sum())
    assert len(list(g.batches(25, seed=0))) == math.ceil(60 / 25)  # an epoch: n / batch_size steps


def test_a_saved_graph_draws_the_same_batches(tmp_path):
    g = NeighbourGraph(_points(60, 4, seed=2), "umap", SimpleNamespace(n_neighbors=6))
    torch.save(g.joint, tmp_path / "graph.pt")
    h = NeighbourGraph.from_joint(torch.load(tmp_path / "graph.pt"), torch.device("cpu"))
    assert (h.n, h.n_edges) == (60, g.n_edges)
    for a, b in zip(g.batches(50, seed=3), h.batches(50, seed=3), strict=True):
        assert torch.equal(a.head, b.head) and torch.equal(a.tail, b.tail) and torch.equal(a.uniform, b.uniform)


def test_global_graph_refuses_streamed_training(tmp_path):
    import numpy as np

    from sae_model.config import FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig
    from sae_model.trainer import MlflowSettings, train
    from tests.train_data import write_features

    write_features(tmp_path, np.random.default_rng(0).random((60, 8), dtype=np.float32))
    fine = FinetuneConfig(epochs=1, loss="umap", neighbor_graph="global", n_neighbors=5)
    with pytest.raises(ValueError, match="finetune.neighbor_graph=global"):
        train(ModelConfig(layers=[8, 2]), PretrainConfig(method="none"), fine, TrainConfig(progress=False, in_memory_max_mb=0),
              "file://" + str(tmp_path / "features"), None, MlflowSettings("", enabled=False), tmp_path / "ck")


def test_tsne_edge_loss_is_the_kl_when_edges_follow_p_exactly():
    """Edges listed in proportion to an integer-valued P and every row as the uniform sample: the
    sampled form equals KL(P || Q) minus P's entropy term and the log pair count."""
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.5], [-0.5, 2.0], [3.0, -1.0]], dtype=torch.float64)
    counts = {(0, 1): 3, (1, 0): 3, (1, 2): 1, (2, 1): 1, (2, 3): 2, (3, 2): 2, (0, 3): 1, (3, 0): 1}
    P = torch.zeros(4, 4, dtype=torch.float64)
    head, tail = [], []
    for (i, j), c in counts.items():
        P[i, j] = c
        head += [i] * c
        tail += [j] * c
    P /= P.sum()
    for dof in (1.0, 2.5):
        got = tsne_edge_loss(codes[head], codes[tail], codes, dof)
        want = tsne_loss(P, codes, dof) - torch.special.xlogy(P, P).sum() - math.log(4 * 3)
        torch.testing.assert_close(got, want)


def test_tsne_edge_loss_by_hand():
    zh, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]])  # d^2 = 2
    zu = torch.tensor([[0.0, 0.0], [0.0, 1.0]])  # one pair, d^2 = 1, both orders
    # -log k(2) + log k(1) with k(d2) = 1 / (1 + d2): log 3 - log 2.
    assert float(tsne_edge_loss(zh, zt, zu)) == pytest.approx(math.log(3) - math.log(2))
    with pytest.raises(ValueError, match="z_uniform"):
        tsne_edge_loss(zh, zt, zu[:1])


def test_umap_edge_loss_by_hand():
    a, b = 1.5, 0.8
    zh, zt = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 2.0]])  # d^2 = 4
    q_pos = 1.0 / (1.0 + a * 4.0**b)
    assert float(umap_edge_loss(zh, zt, zt, a, b, 0)) == pytest.approx(-math.log(q_pos))
    far = torch.tensor([[3.0, 0.0]])  # the only negative: d^2 = 9, drawn 3 times
    q_neg = 1.0 / (1.0 + a * 9.0**b)
    got = umap_edge_loss(zh, zt, far, a, b, 3, generator=torch.Generator().manual_seed(0))
    assert float(got) == pytest.approx(-math.log(q_pos) - 3 * math.log(1.0 - q_neg))


# ---- graph_sampling=rows: a batch of rows with all their edges, the other ends from a code bank


def test_row_batches_cover_every_row_once_with_all_its_edges():
    x = _points(70, 4, seed=5)
    g = NeighbourGraph(x, "umap", SimpleNamespace(n_neighbors=6))
    batches = list(g.row_batches(16, seed=3))
    assert len(batches) == math.ceil(70 / 16)
    rows = torch.cat([b.rows for b in batches])
    assert torch.equal(torch.sort(rows).values, torch.arange(70))  # each row once per epoch
    dense = torch.zeros(70, 70)
    for b in batches:
        dense.index_put_((b.rows[b.seg], b.tail), b.weight, accumulate=True)
        assert b.pool.numel() == 16 and int(b.pool.min()) >= 0 and int(b.pool.max()) < 70
        assert (b.pool != b.rows[torch.arange(16) % b.rows.numel()]).all()  # each drawn against one batch row
    torch.testing.assert_close(dense, g.joint.to_dense().float())  # every edge, its weight, once
    again = list(g.row_batches(16, seed=3))
    assert all(torch.equal(a.rows, b.rows) and torch.equal(a.pool, b.pool) for a, b in zip(again, batches, strict=True))
    assert not torch.equal(next(iter(g.row_batches(16, seed=4))).rows, batches[0].rows)
    assert g.mean_degree == pytest.approx(float(g.joint.values().sum()) / 70)
    assert next(iter(g.row_batches(1000, seed=0))).pool.numel() == 70  # never more repelling rows than rows
    # Three rows in batches of two: the last batch is one row, and its pool is never only itself
    # (a pool of the row alone has no pair to estimate t-SNE's normaliser from).
    tiny = NeighbourGraph(_points(3, 2), "tsne", SimpleNamespace(perplexity=1.0))
    for seed in range(200):
        last = list(tiny.row_batches(2, seed=seed))[-1]
        assert last.rows.numel() == 1 and (last.pool != last.rows[0]).all()


def _all_rows(g: NeighbourGraph):  # noqa: ANN202
    """One batch of every row in order, with every other row as the pool."""
    b = next(iter(g.row_batches(g.n, seed=0)))
    order = torch.argsort(b.rows)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(g.n)
    return rank[b.seg], b.rows[order], b.tail, b.weight


@pytest.mark.parametrize("exaggeration", [1.0, 4.0])
def test_tsne_row_loss_gradient_is_half_the_tsne_gradient(exaggeration):
    """Every row in the batch, all rows in the pool: d(row loss)/dy_i = 1/2 dKL/dy_i (t-SNE's
    gradient, van der Maaten 2009), with the attraction x the exaggeration."""
    x = _points(30, 5, seed=6)
    g = NeighbourGraph(x, "tsne", SimpleNamespace(perplexity=10.0))  # 30 neighbours: all other rows
    seg, rows, tail, weight = _all_rows(g)
    codes = torch.randn(30, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = codes.clone().requires_grad_(True)
    pool = torch.arange(30)
    loss = tsne_row_loss(y, seg, codes[tail], weight.double() * 30 / float(g.joint.values().sum()), codes,
                         rows[:, None] == pool[None, :], exaggeration=exaggeration)
    loss.backward()
    P = g.joint.to_dense().double()
    P = P / P.sum()
    d2 = torch.cdist(codes, codes) ** 2
    k = 1.0 / (1.0 + d2)
    k.fill_diagonal_(0.0)
    q = k / k.sum()
    diff = codes[:, None, :] - codes[None, :, :]
    want = 4.0 * (((exaggeration * P - q) * k)[:, :, None] * diff).sum(dim=1)  # dKL/dy, exaggerated
    torch.testing.assert_close(y.grad, want / 2.0)
    # the same on the dense form: tsne_loss's gradient (both ends move there) is twice the row loss's
    z = codes.clone().requires_grad_(True)
    tsne_loss(P, z, exaggeration=exaggeration).backward()
    torch.testing.assert_close(z.grad, want)


def test_tsne_row_loss_by_hand_and_refuses_an_empty_pool():
    z = torch.tensor([[0.0, 0.0]])
    tail, pool = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])  # d^2 2; pool d^2 1, self
    self_pair = torch.tensor([[False, True]])
    got = tsne_row_loss(z, torch.tensor([0]), tail, torch.tensor([2.0]), pool, self_pair, exaggeration=3.0)
    # 3 x 2 x log(1 + 2) + log k(1) = 6 log 3 - log 2
    assert float(got) == pytest.approx(6 * math.log(3) - math.log(2))
    with pytest.raises(ValueError, match="pool"):
        tsne_row_loss(z, torch.tensor([0]), tail, torch.tensor([2.0]), pool[1:], self_pair[:, 1:])


def test_umap_row_loss_is_the_graph_loss_over_all_rows():
    """With every row in the batch: the attraction equals umap_loss's over the whole graph, and the
    repulsion is negative_sample_rate x w_i x the mean -log(1 - q) over the other rows."""
    x = _points(25, 3, seed=8)
    g = NeighbourGraph(x, "umap", SimpleNamespace(n_neighbors=6))
    seg, rows, tail, weight = _all_rows(g)
    codes = torch.randn(25, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    a, b = umap_ab(0.1, 1.0)
    pool = torch.arange(25)
    self_pair = rows[:, None] == pool[None, :]
    attract = umap_row_loss(codes, seg, codes[tail], weight.double(), codes, self_pair, a, b, 0, g.mean_degree)
    dense = g.joint.to_dense().double()
    torch.testing.assert_close(attract, umap_loss(dense, codes, a, b, 0))
    both = umap_row_loss(codes, seg, codes[tail], weight.double(), codes, self_pair, a, b, 3, g.mean_degree)
    q = 1.0 / (1.0 + a * (torch.cdist(codes, codes) ** 2) ** b)
    rep = -torch.log1p(-q.clamp_max(1 - 1e-12))
    rep.fill_diagonal_(0.0)
    want = 3 * (dense.sum(dim=1) * rep.sum(dim=1) / 24).sum() / dense.sum()
    torch.testing.assert_close(both - attract, want)
