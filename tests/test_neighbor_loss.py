"""Parametric t-SNE / UMAP losses: exact properties, straightforward numpy references, and a
small optimisation that must separate clusters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.optimize import curve_fit

from sae_model.config import FinetuneConfig
from sae_model.evaluation import knn_accuracy
from sae_model.neighbor_loss import (
    neighbor_loss,
    tsne_affinities,
    tsne_conditional_affinities,
    tsne_loss,
    umap_ab,
    umap_fuzzy_graph,
    umap_loss,
    umap_memberships,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _clusters(n_per: int, dim: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, dim, generator=g) * 8.0
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + torch.randn(3 * n_per, dim, generator=g), labels


def _row_perplexity(p: torch.Tensor) -> torch.Tensor:
    return torch.exp(-torch.special.xlogy(p, p).sum(dim=1))


# ------------------------------------------------------------------ t-SNE affinities


@pytest.mark.parametrize("device", DEVICES)
def test_conditional_affinities_match_perplexity(device):
    x = torch.randn(60, 10, generator=torch.Generator().manual_seed(0)).to(device)
    p = tsne_conditional_affinities(x, perplexity=12.0)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(60, dtype=p.dtype, device=device))
    assert torch.all(p.diagonal() == 0)
    assert (_row_perplexity(p) - 12.0).abs().max().item() < 1e-3


def test_conditional_affinities_are_gaussian_in_squared_distance():
    # In each row, log P(j|i) = -beta_i d_ij^2 + const: the slope between any two entries is the same.
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = tsne_conditional_affinities(x, perplexity=4.0)
    d2 = torch.cdist(x, x) ** 2
    for i in range(12):
        others = [j for j in range(12) if j != i]
        slope = (torch.log(p[i, others]) - torch.log(p[i, others[0]])) / (d2[i, others] - d2[i, others[0]])
        assert torch.allclose(slope[1:], slope[1:].mean().expand(10), rtol=1e-6)
        assert slope[1] < 0


def test_perplexity_is_clamped_for_tiny_batches():
    # n = 7: perplexity 30 cannot be reached (at most 6 neighbours); (n - 1)/3 = 2 is used instead.
    x = torch.randn(7, 4, generator=torch.Generator().manual_seed(2))
    p = tsne_conditional_affinities(x, perplexity=30.0)
    assert (_row_perplexity(p) - 2.0).abs().max().item() < 1e-3


def test_joint_affinities_symmetrise_the_conditionals():
    x = torch.randn(20, 5, generator=torch.Generator().manual_seed(3))
    p_cond = tsne_conditional_affinities(x, 5.0)
    P = tsne_affinities(x, 5.0)
    assert P.dtype == torch.float32
    torch.testing.assert_close(P, ((p_cond + p_cond.T) / 40).float())
    torch.testing.assert_close(P, P.T)
    assert P.sum().item() == pytest.approx(1.0, abs=1e-6)


# ------------------------------------------------------------------ t-SNE loss


def _numpy_kl(P: np.ndarray, y: np.ndarray, dof: float) -> float:
    n = len(y)
    kernel = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                kernel[i, j] = (1 + np.sum((y[i] - y[j]) ** 2) / dof) ** (-(dof + 1) / 2)
    Q = kernel / kernel.sum()
    return sum(P[i, j] * np.log(P[i, j] / Q[i, j]) for i in range(n) for j in range(n) if P[i, j] > 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dof", [1.0, 2.5])
def test_tsne_loss_equals_numpy_kl(device, dof):
    rng = np.random.default_rng(4)
    A = rng.random((5, 5))
    A[1, 3] = A[3, 1] = 0.0  # one zero pair: contributes nothing to KL
    np.fill_diagonal(A, 0.0)
    P = (A + A.T) / (A + A.T).sum()
    y = rng.normal(size=(5, 2))
    got = tsne_loss(torch.tensor(P, device=device), torch.tensor(y, device=device), dof=dof)
    assert got.item() == pytest.approx(_numpy_kl(P, y, dof), rel=1e-10)


def test_tsne_loss_gradient_is_the_tsne_gradient():
    # van der Maaten & Hinton (2008): dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j) / (1 + |y_i - y_j|^2).
    rng = np.random.default_rng(5)
    A = rng.random((6, 6))
    np.fill_diagonal(A, 0.0)
    P = (A + A.T) / (A + A.T).sum()
    y = torch.tensor(rng.normal(size=(6, 2)), requires_grad=True)
    tsne_loss(torch.tensor(P), y).backward()
    yv = y.detach().numpy()
    diff = yv[:, None] - yv[None]
    kern = 1 / (1 + (diff**2).sum(-1))
    np.fill_diagonal(kern, 0.0)
    Q = kern / kern.sum()
    expected = 4 * (((P - Q) * kern)[:, :, None] * diff).sum(axis=1)
    np.testing.assert_allclose(y.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_tsne_loss_is_finite_for_coincident_codes():
    P = torch.full((4, 4), 1 / 12).fill_diagonal_(0)
    y = torch.zeros(4, 2, requires_grad=True)
    loss = tsne_loss(P, y)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)  # Q uniform = P
    assert torch.isfinite(y.grad).all()


def test_tsne_descent_separates_clusters():
    x, labels = _clusters(30, 10, seed=6)
    y = (torch.randn(90, 2, generator=torch.Generator().manual_seed(7)) * 1e-2).requires_grad_()
    assert knn_accuracy(y.detach().numpy(), labels, k=5) < 0.7  # the start really is random
    P = tsne_affinities(x, perplexity=10.0)
    opt = torch.optim.Adam([y], lr=0.05)
    for _ in range(250):
        opt.zero_grad()
        loss = tsne_loss(P, y)
        loss.backward()
        opt.step()
    assert knn_accuracy(y.detach().numpy(), labels, k=5) == 1.0


# ------------------------------------------------------------------ UMAP


def test_umap_graph_by_hand():
    # Points 0, 1, 3, 7 with n_neighbors=3 (self + 2 others). The nearest other gets weight 1
    # (d = rho) and sigma is set so the two weights sum to log2(3): the second gets c = log2(3) - 1.
    #   directed: 0->1 1, 0->2 c | 1->0 1, 1->2 c | 2->1 1, 2->0 c | 3->2 1, 3->1 c
    #   union a + b - ab: (0,1) 1, (0,2) 2c - c^2, (1,2) 1, (1,3) c, (2,3) 1, (0,3) 0
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    c = math.log2(3) - 1
    A = umap_memberships(x, n_neighbors=3)
    expected_a = torch.tensor([[0, 1, c, 0], [1, 0, c, 0], [c, 1, 0, 0], [0, c, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(A, expected_a, atol=1e-4, rtol=0)
    W = umap_fuzzy_graph(x, n_neighbors=3).double()
    u = 2 * c - c * c
    expected_w = torch.tensor([[0, 1, u, 0], [1, 0, 1, c], [u, 1, 0, 1], [0, c, 1, 0]], dtype=torch.float64)
    torch.testing.assert_close(W, expected_w, atol=1e-4, rtol=0)


def test_umap_memberships_calibrated_to_log2_k():
    x = torch.randn(80, 6, generator=torch.Generator().manual_seed(8))
    A = umap_memberships(x, n_neighbors=15)
    assert ((A > 0).sum(dim=1) == 14).all()
    assert (A.sum(dim=1) - math.log2(15)).abs().max().item() < 1e-3
    assert torch.allclose(A.max(dim=1).values, torch.ones(80, dtype=A.dtype))  # nearest: weight 1
    W = umap_fuzzy_graph(x, 15)
    torch.testing.assert_close(W, W.T)
    assert W.min() >= 0 and W.max() <= 1


@pytest.mark.parametrize(("min_dist", "spread"), [(0.1, 1.0), (0.0, 1.0), (0.5, 2.0)])
def test_umap_ab_matches_scipy_curve_fit(min_dist, spread):
    xs = np.linspace(0, spread * 3, 300)
    ys = np.where(xs < min_dist, 1.0, np.exp(-(xs - min_dist) / spread))
    (a_ref, b_ref), _ = curve_fit(lambda v, a, b: 1.0 / (1.0 + a * v ** (2 * b)), xs, ys)
    a, b = umap_ab(min_dist, spread)
    assert a == pytest.approx(a_ref, rel=1e-4) and b == pytest.approx(b_ref, rel=1e-4)


# umap_ab before scipy took over (a hand-written Levenberg-Marquardt, commit 34031ad), measured.
UMAP_AB_BEFORE = {
    (0.1, 1.0): (1.5769436134903303, 0.8950607193567929),
    (0.0, 1.0): (1.9328090880801343, 0.7904946609179693),
    (0.5, 2.0): (0.2588788017594292, 1.057499559085999),
}


@pytest.mark.parametrize(("min_dist", "spread"), sorted(UMAP_AB_BEFORE))
def test_umap_ab_did_not_move(min_dist, spread):
    a_before, b_before = UMAP_AB_BEFORE[(min_dist, spread)]
    a, b = umap_ab(min_dist, spread)
    # The two solvers stop at slightly different points of a flat optimum (measured rel. diff <= 4e-7).
    assert a == pytest.approx(a_before, rel=1e-6) and b == pytest.approx(b_before, rel=1e-6)


def test_umap_loss_by_hand_for_two_points():
    # Two points joined by weight 1 in both directions; the only negative of i is the other point.
    # Each edge: -log q + M * -log(1 - q), q = 1/(1 + a d^(2b)); both edges alike, weights cancel.
    a, b = 1.5, 0.9
    y = torch.tensor([[0.0, 0.0], [1.2, 0.5]], dtype=torch.float64)  # d = 1.3
    graph = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    q = 1 / (1 + a * 1.3 ** (2 * b))
    assert umap_loss(graph, y, a, b, negative_sample_rate=0).item() == pytest.approx(-math.log(q))
    got = umap_loss(graph, y, a, b, negative_sample_rate=3).item()
    assert got == pytest.approx(-math.log(q) - 3 * math.log(1 - q))


def test_umap_loss_negatives_are_reproducible_and_finite_when_codes_coincide():
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(9))
    graph = umap_fuzzy_graph(x, 10)
    y = torch.zeros(30, 2, requires_grad=True)
    loss = umap_loss(graph, y, *umap_ab(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y.grad).all()
    y2 = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    l1 = umap_loss(graph, y2, *umap_ab(), generator=torch.Generator().manual_seed(3))
    l2 = umap_loss(graph, y2, *umap_ab(), generator=torch.Generator().manual_seed(3))
    assert l1.item() == l2.item()


def test_umap_descent_gathers_clusters():
    # From a random start (umap-learn would use a spectral init) with sampled negatives, a small
    # fragment of a cluster can stay stranded for a long time: measured 0.92 kNN accuracy after
    # 150 steps on three seeds (1.0 needs ~400+ steps, too slow here). So assert a clear gain from
    # chance level (~1/3) to >= 0.85 rather than perfection.
    x, labels = _clusters(20, 10, seed=10)
    y = torch.randn(60, 2, generator=torch.Generator().manual_seed(11)).requires_grad_()
    start = knn_accuracy(y.detach().numpy(), labels, k=5)
    assert start < 0.7
    graph = umap_fuzzy_graph(x, 10)
    a, b = umap_ab()
    gen = torch.Generator().manual_seed(12)
    opt = torch.optim.Adam([y], lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        umap_loss(graph, y, a, b, generator=gen).backward()
        opt.step()
    assert knn_accuracy(y.detach().numpy(), labels, k=5) >= 0.85


def test_umap_loss_prefers_a_clustered_map():
    x, labels = _clusters(30, 10, seed=10)
    graph = umap_fuzzy_graph(x, 10)
    assert graph[labels[:, None] != labels[None, :]].sum() == 0  # far clusters: no cross edges
    g = torch.Generator().manual_seed(13)
    corners = torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]])
    clustered = corners[labels] + 0.3 * torch.randn(90, 2, generator=g)
    shuffled = clustered[torch.randperm(90, generator=g)]  # same spread, neighbours scrambled
    loss_c = umap_loss(graph, clustered, *umap_ab(), generator=torch.Generator().manual_seed(0))
    loss_s = umap_loss(graph, shuffled, *umap_ab(), generator=torch.Generator().manual_seed(0))
    assert loss_c < loss_s


# ------------------------------------------------------------------ the entry point


def test_neighbor_loss_dispatch_reads_the_finetune_config():
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(13))
    y = torch.randn(25, 2, generator=torch.Generator().manual_seed(14), requires_grad=True)
    cfg = FinetuneConfig(loss="tsne", perplexity=5.0)
    got = neighbor_loss("tsne", x, y, cfg)
    assert got.item() == pytest.approx(tsne_loss(tsne_affinities(x, 5.0), y).item())
    got.backward()
    assert y.grad is not None and torch.isfinite(y.grad).all()
    opts = SimpleNamespace(n_neighbors=8, min_dist=0.25, spread=1.0, negative_sample_rate=2)
    u = neighbor_loss("umap", x, y, opts, generator=torch.Generator().manual_seed(0))
    ref = umap_loss(
        umap_fuzzy_graph(x, 8), y, *umap_ab(0.25, 1.0), 2, generator=torch.Generator().manual_seed(0)
    )
    assert u.item() == pytest.approx(ref.item())
    with pytest.raises(ValueError, match="kind"):
        neighbor_loss("mse", x, y, cfg)  # type: ignore[arg-type]
