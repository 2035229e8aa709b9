"""Neighbour-preserving losses for fine-tuning the encoder: parametric t-SNE and parametric UMAP.

Both work per mini-batch: input affinities come from the batch's inputs (no gradient, float64
on the batch's device) and the loss compares them with similarities of the batch's codes
(differentiable, in the codes' dtype). CPU and CUDA alike.

References: van der Maaten (2009) "Learning a parametric embedding by preserving local
structure"; McInnes et al. (2018) UMAP; Sainburg et al. (2021) parametric UMAP.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_model.config import NeighbourLoss

# UMAP's floor on sigma, relative to the mean neighbour distance (umap-learn MIN_K_DIST_SCALE).
_MIN_K_DIST_SCALE = 1e-3


def _sq_dists64(x: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances in float64 (no grad), clamped at 0."""
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    sq = (x * x).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)


def _code_sq_dists(codes: torch.Tensor) -> torch.Tensor:
    """Differentiable pairwise squared distances of codes; exact differences for narrow codes."""
    if codes.shape[1] <= 16:
        diff = codes[:, None, :] - codes[None, :, :]
        return (diff * diff).sum(dim=-1)
    sq = (codes * codes).sum(dim=1)
    return (sq[:, None] + sq[None, :] - 2.0 * (codes @ codes.T)).clamp_min(0.0)


# --------------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------------


def effective_perplexity(perplexity: float, n: int) -> float:
    """Perplexity actually used for a batch of n: at most (n-1)/3, and at least 1."""
    if perplexity <= 0:
        raise ValueError(f"perplexity: must be > 0, got {perplexity}")
    return max(1.0, min(float(perplexity), (n - 1) / 3.0))


@torch.no_grad()
def perplexity_rows(d2: torch.Tensor, perplexity: float, tol: float = 1e-6, max_iter: int = 200) -> torch.Tensor:
    """Row-stochastic P(j|i) = exp(-beta_i d2_ij) / sum_j, each row's entropy matched to log(perplexity).

    ``d2``: squared distances per row, +inf where j is no candidate (a dense batch's diagonal):
    a dense (n, n) matrix or the (n, k) block of each row's kNN. The precision beta_i = 1/(2 sigma_i^2)
    is found by a bisection (doubling until bracketed) run for all rows at once, until
    |H_i - log(perplexity)| < tol (entropy in nats); the perplexity is used as given (callers clamp it).
    """
    target = math.log(perplexity)
    candidate = torch.isfinite(d2)
    # Shift each row by its smallest distance: P is unchanged and exp() cannot underflow to 0/0.
    d = d2 - d2.min(dim=1, keepdim=True).values
    finite = d.masked_fill(~candidate, 0.0)
    mean_d = finite.sum(dim=1) / candidate.sum(dim=1)
    beta = 1.0 / mean_d.clamp_min(1e-12)
    lo = torch.zeros_like(beta)
    hi = torch.full_like(beta, math.inf)
    p = torch.empty_like(d)
    for _ in range(max_iter):
        p = torch.exp(-d * beta[:, None])  # no candidate: exp(-inf) = 0
        sum_p = p.sum(dim=1)
        entropy = torch.log(sum_p) + beta * (finite * p).sum(dim=1) / sum_p
        diff = entropy - target
        if bool((diff.abs() < tol).all()):
            break
        too_flat = diff > 0  # entropy too high: sharpen, i.e. raise beta
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(torch.isinf(hi), beta * 2.0, (lo + hi) / 2.0)
    return p / p.sum(dim=1, keepdim=True)


@torch.no_grad()
def tsne_conditional_affinities(
    x_batch: torch.Tensor, perplexity: float, tol: float = 1e-6, max_iter: int = 200
) -> torch.Tensor:
    """Row-stochastic P(j|i) of a batch with a Gaussian kernel whose bandwidth matches the perplexity.

    See :func:`perplexity_rows`; the perplexity is clamped to the batch (:func:`effective_perplexity`).
    Returns float64 on x's device, zero diagonal, rows summing to 1.
    """
    n = x_batch.shape[0]
    if n < 2:
        raise ValueError(f"x_batch: t-SNE affinities need at least 2 items, got {n}")
    d = _sq_dists64(x_batch).masked_fill(torch.eye(n, dtype=torch.bool, device=x_batch.device), math.inf)
    return perplexity_rows(d, effective_perplexity(perplexity, n), tol, max_iter)


@torch.no_grad()
def tsne_affinities(x_batch: torch.Tensor, perplexity: float = 30.0) -> torch.Tensor:
    """Joint t-SNE affinities of a batch: P = (P_cond + P_cond^T) / (2n), in x's float dtype."""
    p_cond = tsne_conditional_affinities(x_batch, perplexity)
    n = p_cond.shape[0]
    dtype = x_batch.dtype if x_batch.is_floating_point() else torch.float32
    return ((p_cond + p_cond.T) / (2.0 * n)).to(dtype)


def tsne_loss(P: torch.Tensor, codes: torch.Tensor, dof: float = 1.0, exaggeration: float = 1.0) -> torch.Tensor:
    """KL(P || Q), Q from a Student-t kernel with ``dof`` degrees of freedom on the codes.

    q_ij = (1 + |y_i - y_j|^2 / dof)^(-(dof + 1)/2) normalised over all i != j; computed in log
    space, so it is finite for coincident codes. van der Maaten (2009) suggests dof = code_dim - 1
    for wide codes; dof = 1 is classic t-SNE. ``exaggeration`` > 1 multiplies the attraction
    (-sum P log k; Kobak & Berens 2019); at 1 the value is the KL itself.
    """
    n = codes.shape[0]
    if P.shape != (n, n):
        raise ValueError(f"P: expected shape ({n}, {n}) for {n} codes, got {tuple(P.shape)}")
    if dof <= 0:
        raise ValueError(f"dof: must be > 0, got {dof}")
    P = P.to(device=codes.device, dtype=codes.dtype)
    eye = torch.eye(n, dtype=torch.bool, device=codes.device)
    log_kernel = -(dof + 1.0) / 2.0 * torch.log1p(_code_sq_dists(codes) / dof)
    log_kernel = log_kernel.masked_fill(eye, -math.inf)
    log_norm = torch.logsumexp(log_kernel.reshape(-1), dim=0)
    log_kernel = log_kernel.masked_fill(eye, 0.0)  # P's diagonal is 0; avoid 0 * -inf
    return (torch.special.xlogy(P, P) - exaggeration * P * log_kernel).sum() + P.sum() * log_norm


# --------------------------------------------------------------------------------------------
# UMAP
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def umap_weights_from_knn(
    knn_d: torch.Tensor, n_neighbors: int, tol: float = 1e-5, max_iter: int = 64
) -> torch.Tensor:
    """UMAP memberships exp(-max(0, d_ij - rho_i) / sigma_i) of each row's kNN distances (n, k, sorted).

    rho_i is the nearest non-zero distance; sigma_i is bisected so that the row sums to
    log2(n_neighbors) and floored as umap-learn does. Shared by the per-batch and global graphs.
    """
    n = knn_d.shape[0]
    knn_d = knn_d.to(torch.float64)
    # rho: nearest neighbour at a non-zero distance (duplicates would otherwise give rho = 0).
    nonzero = knn_d > 0
    rho = torch.where(nonzero, knn_d, torch.full_like(knn_d, math.inf)).min(dim=1).values
    rho = torch.where(torch.isinf(rho), torch.zeros_like(rho), rho)
    gap = (knn_d - rho[:, None]).clamp_min(0.0)
    target = math.log2(n_neighbors)
    lo = torch.zeros(n, dtype=torch.float64, device=knn_d.device)
    hi = torch.full_like(lo, math.inf)
    sigma = torch.ones_like(lo)
    for _ in range(max_iter):
        total = torch.exp(-gap / sigma[:, None]).sum(dim=1)
        diff = total - target
        if bool((diff.abs() < tol).all()):
            break
        too_big = diff > 0  # sum grows with sigma
        hi = torch.where(too_big, sigma, hi)
        lo = torch.where(too_big, lo, sigma)
        sigma = torch.where(torch.isinf(hi), sigma * 2.0, (lo + hi) / 2.0)
    mean_all = knn_d.mean()
    floor = torch.where(rho > 0, _MIN_K_DIST_SCALE * knn_d.mean(dim=1), _MIN_K_DIST_SCALE * mean_all)
    sigma = torch.maximum(sigma, floor)
    return torch.exp(-gap / sigma[:, None])


@torch.no_grad()
def umap_memberships(
    x_batch: torch.Tensor, n_neighbors: int = 15, tol: float = 1e-5, max_iter: int = 64
) -> torch.Tensor:
    """Directed fuzzy memberships w(i -> j) over each point's kNN in the batch (float64, n x n).

    As in umap-learn, ``n_neighbors`` counts the point itself, so each point has
    k = n_neighbors - 1 other neighbours; rho_i is the distance to the nearest of them and
    sigma_i is bisected so that sum_j exp(-max(0, d_ij - rho_i) / sigma_i) = log2(n_neighbors).
    """
    n = x_batch.shape[0]
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors: must be >= 2 (it counts the point itself), got {n_neighbors}")
    k = min(n_neighbors, n) - 1
    if k < 1:
        raise ValueError(f"x_batch: UMAP graph needs at least 2 items, got {n}")
    d2 = _sq_dists64(x_batch)
    eye = torch.eye(n, dtype=torch.bool, device=d2.device)
    d2 = d2.masked_fill(eye, math.inf)
    knn_d2, knn_idx = torch.topk(d2, k, dim=1, largest=False, sorted=True)
    weights = umap_weights_from_knn(knn_d2.sqrt(), min(n_neighbors, n), tol, max_iter)
    w = torch.zeros_like(d2.masked_fill(eye, 0.0))
    w.scatter_(1, knn_idx, weights)
    return w


@torch.no_grad()
def umap_fuzzy_graph(x_batch: torch.Tensor, n_neighbors: int = 15) -> torch.Tensor:
    """Symmetric UMAP graph of a batch: fuzzy union W = A + A^T - A * A^T, in x's float dtype."""
    a = umap_memberships(x_batch, n_neighbors)
    dtype = x_batch.dtype if x_batch.is_floating_point() else torch.float32
    return (a + a.T - a * a.T).to(dtype)


@functools.lru_cache(maxsize=32)
def umap_ab(min_dist: float = 0.1, spread: float = 1.0) -> tuple[float, float]:
    """UMAP's (a, b): least-squares fit of 1/(1 + a x^(2b)) to the target membership curve.

    The target is 1 for x < min_dist and exp(-(x - min_dist)/spread) beyond, on 300 points in
    [0, 3*spread], fitted with ``scipy.optimize.curve_fit`` from a = b = 1, as umap-learn's
    ``find_ab_params`` does (min_dist=0.1, spread=1: a=1.5769, b=0.8951). Raises ``ValueError``
    unless spread > 0 and 0 <= min_dist < 3*spread.
    """
    from scipy.optimize import curve_fit

    if spread <= 0 or min_dist < 0 or min_dist >= 3 * spread:
        raise ValueError(f"umap_ab: need spread > 0 and 0 <= min_dist < 3*spread, got {min_dist}, {spread}")
    xs = np.linspace(0.0, spread * 3.0, 300)
    ys = np.where(xs < min_dist, 1.0, np.exp(-(xs - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2.0 * b)), xs, ys, p0=(1.0, 1.0))
    return float(a), float(b)


def _log_a_d2b(u: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    """z = log(a |u - v|^(2b)), so that -log q = softplus(z) and -log(1 - q) = softplus(-z)."""
    eps = torch.finfo(u.dtype).tiny ** 0.5  # coincident codes: a large but finite loss
    return math.log(a) + b * torch.log(((u - v) ** 2).sum(dim=-1).clamp_min(eps))


def umap_loss(
    graph: torch.Tensor,
    codes: torch.Tensor,
    a: float,
    b: float,
    negative_sample_rate: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UMAP's fuzzy-set cross-entropy on a batch, with negative sampling (parametric UMAP).

    With q_ij = 1 / (1 + a |y_i - y_j|^(2b)): every edge (i, j) of the graph attracts with
    -log q_ij and, for its tail i, ``negative_sample_rate`` uniformly drawn other items j' repel
    with -log(1 - q_ij'); both weighted by w_ij and divided by the total weight, i.e. the
    expected loss of UMAP's edge-sampling SGD. Logs go through softplus, so coincident codes
    give a large but finite loss.
    """
    n = codes.shape[0]
    if graph.shape != (n, n):
        raise ValueError(f"graph: expected shape ({n}, {n}) for {n} codes, got {tuple(graph.shape)}")
    if negative_sample_rate < 0:
        raise ValueError(f"negative_sample_rate: must be >= 0, got {negative_sample_rate}")
    graph = graph.to(device=codes.device, dtype=codes.dtype)
    graph = graph.masked_fill(torch.eye(n, dtype=torch.bool, device=codes.device), 0.0)
    head, tail = torch.nonzero(graph > 0, as_tuple=True)
    if head.numel() == 0:
        raise ValueError("graph: no edges")
    w = graph[head, tail]

    def logit_q_complement(i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return _log_a_d2b(codes[i], codes[j], a, b)

    attract = F.softplus(logit_q_complement(head, tail))
    total = (w * attract).sum()
    if negative_sample_rate > 0 and n > 1:
        gen_device = generator.device if generator is not None else codes.device
        shift = torch.randint(
            1, n, (head.numel(), negative_sample_rate), generator=generator, device=gen_device
        )
        neg = (head[:, None] + shift.to(codes.device)) % n  # uniform over the other n-1 items
        repel = F.softplus(-logit_q_complement(head[:, None].expand_as(neg), neg)).sum(dim=1)
        total = total + (w * repel).sum()
    return total / w.sum()


# --------------------------------------------------------------------------------------------
# Sampled-edge forms, for a global graph (sae_model.neighbor_graph)
# --------------------------------------------------------------------------------------------


def tsne_edge_loss(
    z_head: torch.Tensor, z_tail: torch.Tensor, z_uniform: torch.Tensor, dof: float = 1.0, exaggeration: float = 1.0
) -> torch.Tensor:
    """KL(P || Q) up to P's constant entropy, from edges sampled in proportion to p_ij.

    KL = -sum_ij p_ij log k_ij + log sum_kl k_kl + const, with k the Student-t kernel: the first
    term is the mean of -log k over the sampled edges; the normaliser is estimated from all pairs
    of the uniformly drawn rows (the log of their mean kernel, scaled to all pairs; only the
    gradient matters, and it is that of t-SNE's as the sample grows). ``exaggeration`` multiplies
    the attraction (Kobak & Berens 2019).
    """
    if z_head.shape != z_tail.shape or z_head.shape[0] == 0:
        raise ValueError(f"z_head/z_tail: need the same non-empty shape, got {tuple(z_head.shape)}, {tuple(z_tail.shape)}")
    m = z_uniform.shape[0]
    if m < 2:
        raise ValueError(f"z_uniform: the normaliser needs at least 2 rows, got {m}")
    if dof <= 0:
        raise ValueError(f"dof: must be > 0, got {dof}")
    power = -(dof + 1.0) / 2.0
    attract = -exaggeration * (power * torch.log1p(((z_head - z_tail) ** 2).sum(dim=-1) / dof)).mean()
    log_kernel = power * torch.log1p(_code_sq_dists(z_uniform) / dof)
    eye = torch.eye(m, dtype=torch.bool, device=z_uniform.device)
    log_norm = torch.logsumexp(log_kernel.masked_fill(eye, -math.inf).reshape(-1), dim=0) - math.log(m * (m - 1))
    return attract + log_norm


def umap_edge_loss(
    z_head: torch.Tensor,
    z_tail: torch.Tensor,
    z_negative: torch.Tensor,
    a: float,
    b: float,
    negative_sample_rate: int = 5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """UMAP's cross-entropy from edges sampled in proportion to their membership (parametric UMAP).

    Each edge attracts with -log q(head, tail) and its head is repelled from
    ``negative_sample_rate`` rows drawn from ``z_negative`` with -log(1 - q); averaged over edges,
    this is the expectation that :func:`umap_loss` computes for a batch's own graph.
    """
    if z_head.shape != z_tail.shape or z_head.shape[0] == 0:
        raise ValueError(f"z_head/z_tail: need the same non-empty shape, got {tuple(z_head.shape)}, {tuple(z_tail.shape)}")
    if negative_sample_rate < 0:
        raise ValueError(f"negative_sample_rate: must be >= 0, got {negative_sample_rate}")
    loss = F.softplus(_log_a_d2b(z_head, z_tail, a, b)).mean()
    if negative_sample_rate > 0 and z_negative.shape[0] > 0:
        gen_device = generator.device if generator is not None else z_head.device
        pick = torch.randint(
            0, z_negative.shape[0], (z_head.shape[0], negative_sample_rate), generator=generator, device=gen_device
        ).to(z_head.device)
        repel = F.softplus(-_log_a_d2b(z_head[:, None, :].expand(-1, negative_sample_rate, -1), z_negative[pick], a, b))
        loss = loss + repel.sum(dim=1).mean()
    return loss


# --------------------------------------------------------------------------------------------
# Row-sampled forms: a batch's rows with all their edges, the other ends from a bank of codes
# --------------------------------------------------------------------------------------------


def tsne_row_loss(
    z_rows: torch.Tensor,
    seg: torch.Tensor,
    z_tail: torch.Tensor,
    weight: torch.Tensor,
    z_pool: torch.Tensor,
    self_pair: torch.Tensor,
    dof: float = 1.0,
    exaggeration: float = 1.0,
) -> torch.Tensor:
    """t-SNE's KL(P || Q) for a batch of rows, up to constants, with the other ends held fixed.

    ``z_rows`` (B, d) are the batch's codes (with gradient); edge e joins row ``seg[e]`` to a code
    ``z_tail[e]`` (E, d) read from the bank, with affinity ``weight[e]`` = n p_ij (a row of the joint
    P scaled to sum ~1); ``z_pool`` (M, d) are uniformly drawn bank codes and ``self_pair`` (B, M)
    masks a row's pairing with itself. Loss = exaggeration x mean_i sum_j n p_ij (-log k_ij) +
    log mean_{i, j in pool} k_ij, with k the Student-t kernel of ``dof``: its gradient in y_i is
    half t-SNE's dKL/dy_i (exactly so when the batch and the pool are all n rows), the repulsion
    estimated from the pool (van der Maaten 2009 for the parametric map; exaggeration as in Kobak &
    Berens 2019). Raises ValueError on empty inputs or dof <= 0.
    """
    b = z_rows.shape[0]
    pairs = int((~self_pair).sum())
    if b == 0 or z_pool.shape[0] == 0 or pairs == 0:
        raise ValueError("tsne_row_loss: needs at least one row and one other pool row")
    if dof <= 0:
        raise ValueError(f"dof: must be > 0, got {dof}")
    power = -(dof + 1.0) / 2.0
    neg_log_k = -power * torch.log1p(((z_rows[seg] - z_tail) ** 2).sum(dim=-1) / dof)
    attract = exaggeration * (weight.to(neg_log_k.dtype) * neg_log_k).sum() / b
    d2 = ((z_rows[:, None, :] - z_pool[None, :, :]) ** 2).sum(dim=-1)
    log_kernel = (power * torch.log1p(d2 / dof)).masked_fill(self_pair, -math.inf)
    log_norm = torch.logsumexp(log_kernel.reshape(-1), dim=0) - math.log(pairs)
    return attract + log_norm


def umap_row_loss(
    z_rows: torch.Tensor,
    seg: torch.Tensor,
    z_tail: torch.Tensor,
    weight: torch.Tensor,
    z_pool: torch.Tensor,
    self_pair: torch.Tensor,
    a: float,
    b: float,
    negative_sample_rate: int = 5,
    mean_degree: float = 1.0,
) -> torch.Tensor:
    """UMAP's cross-entropy for a batch of rows, with the other ends held fixed.

    Shapes as :func:`tsne_row_loss`; ``weight`` are the fuzzy graph's memberships. Row i attracts
    with sum_j w_ij (-log q_ij) and is repelled with ``negative_sample_rate`` x w_i x the mean of
    -log(1 - q) over the pool, w_i = sum_j w_ij: the expectation of UMAP's edge-sampling SGD with that
    many negative samples per edge (McInnes et al. 2018), divided by B x ``mean_degree`` (the mean
    w_i of the whole graph) so that it is on :func:`umap_edge_loss`'s per-edge scale.
    """
    n_rows = z_rows.shape[0]
    if n_rows == 0:
        raise ValueError("umap_row_loss: needs at least one row")
    if negative_sample_rate < 0:
        raise ValueError(f"negative_sample_rate: must be >= 0, got {negative_sample_rate}")
    w = weight.to(z_rows.dtype)
    total = (w * F.softplus(_log_a_d2b(z_rows[seg], z_tail, a, b))).sum()
    valid = ~self_pair
    if negative_sample_rate > 0 and bool(valid.any()):
        w_row = torch.zeros(n_rows, dtype=w.dtype, device=w.device).index_add_(0, seg, w)
        repel = F.softplus(-_log_a_d2b(z_rows[:, None, :], z_pool[None, :, :], a, b)) * valid
        mean_repel = repel.sum(dim=1) / valid.sum(dim=1).clamp_min(1)
        total = total + negative_sample_rate * (w_row * mean_repel).sum()
    return total / (n_rows * mean_degree)


# --------------------------------------------------------------------------------------------
# One entry point for the fine-tuning loop
# --------------------------------------------------------------------------------------------


def neighbor_loss(
    kind: NeighbourLoss,
    x_batch: torch.Tensor,
    codes: torch.Tensor,
    cfg_like: Any = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Neighbour loss of a batch's codes given its inputs.

    ``cfg_like`` is any object (e.g. ``FinetuneConfig``) read with defaults: ``perplexity`` (30),
    ``tsne_dof`` (1.0) and ``tsne_exaggeration`` (1.0) for t-SNE; ``n_neighbors`` (15), ``min_dist`` (0.1), ``spread`` (1.0)
    and ``negative_sample_rate`` (5) for UMAP.
    """

    def opt(name: str, default: Any) -> Any:
        return getattr(cfg_like, name, default) if cfg_like is not None else default

    if x_batch.shape[0] != codes.shape[0]:
        raise ValueError(f"codes: {codes.shape[0]} rows but x_batch has {x_batch.shape[0]}")
    if kind == "tsne":
        P = tsne_affinities(x_batch, float(opt("perplexity", 30.0)))
        return tsne_loss(P, codes, dof=float(opt("tsne_dof", 1.0)), exaggeration=float(opt("tsne_exaggeration", 1.0)))
    if kind == "umap":
        graph = umap_fuzzy_graph(x_batch, int(opt("n_neighbors", 15)))
        a, b = umap_ab(float(opt("min_dist", 0.1)), float(opt("spread", 1.0)))
        return umap_loss(graph, codes, a, b, int(opt("negative_sample_rate", 5)), generator=generator)
    raise ValueError(f"kind: expected 'tsne' or 'umap', got {kind!r}")
