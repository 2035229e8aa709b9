"""A global kNN graph over the training rows for the neighbour losses (``finetune.neighbor_graph=global``).

Per-batch affinities (the default, ``batch``) only see the neighbours that happen to share a random
batch: with 2,000 of 8,000 MNIST images in a batch, three in four true neighbours are missing, and a
perplexity of 30 in the batch spans what would be ~120 neighbours over the whole set. Here the exact
kNN of every training row is computed once (blockwise, on the rows' device), turned into the
loss's sparse affinities (t-SNE's perplexity-calibrated P over 3 x perplexity neighbours, or UMAP's
fuzzy union over ``n_neighbors``). Each step then samples edges in proportion to their affinity
(the attraction) and, separately, uniform rows (the repulsion: t-SNE's normaliser, UMAP's negative
samples), as UMAP's own optimiser does; a batch built from neighbourhoods alone would over-weight
the repulsion between neighbours and tear clusters apart. See ``tsne_edge_loss``/``umap_edge_loss``.

It needs all training rows in one process (the in-memory path): exact kNN costs O(n^2 d), seconds
for 10^4 rows on a CPU, minutes for 10^5; larger tables keep the per-batch affinities.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sae_model.config import NeighbourLoss
from sae_model.neighbor_loss import perplexity_rows, umap_weights_from_knn

log = logging.getLogger(__name__)


@torch.no_grad()
def exact_knn(x: torch.Tensor, k: int, block: int = 1024, margin: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (n, k) and squared distances (n, k, float64) of each row's k nearest other rows.

    The torch twin of ``sae_model.knn.topk`` (same tie rule), run on the training device:
    ``k + margin`` candidates come from float32 distances in row blocks (memory O(block x n));
    their squared distances are then recomputed exactly in float64 and ordered by (distance,
    index), so ties break towards the smaller index (exactly so while at most ``margin`` further rows
    tie at the k-th distance; ``topk`` also ranks crowded rows in full).
    """
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k: need 1 <= k < number of rows ({n}), got {k}")
    kk = min(n - 1, k + margin)
    xf = x.reshape(n, -1).float()
    sq = (xf * xf).sum(dim=1)
    idx = torch.empty((n, kk), dtype=torch.long, device=x.device)
    for s in range(0, n, block):
        e = min(s + block, n)
        d2 = sq[s:e, None] + sq[None, :] - 2.0 * (xf[s:e] @ xf.T)
        d2[torch.arange(e - s, device=x.device), torch.arange(s, e, device=x.device)] = math.inf
        idx[s:e] = torch.topk(d2, kk, dim=1, largest=False, sorted=True).indices
    idx = torch.sort(idx, dim=1).values  # by index first, so the stable sort below breaks ties by it
    x64 = x.reshape(n, -1).to(torch.float64)
    d2 = torch.empty(idx.shape, dtype=torch.float64, device=x.device)
    for s in range(0, n, block):  # blocks keep the (block, kk, d) differences small
        d2[s : s + block] = ((x64[s : s + block, None, :] - x64[idx[s : s + block]]) ** 2).sum(dim=-1)
    d2, order = torch.sort(d2, dim=1, stable=True)
    return idx.gather(1, order)[:, :k], d2[:, :k].contiguous()


class NeighbourGraph:
    """Sparse symmetric affinities of all training rows and the edge-sampled batches drawn from them."""

    def __init__(self, x: torch.Tensor, kind: NeighbourLoss, cfg: Any) -> None:
        n = x.shape[0]
        if n < 3:
            raise ValueError(f"finetune.neighbor_graph=global: needs at least 3 training rows, got {n}")
        self.n, self.device = n, x.device
        if kind == "tsne":
            k = min(n - 1, max(1, int(math.ceil(3 * float(cfg.perplexity)))))
        elif kind == "umap":
            k = min(n - 1, int(cfg.n_neighbors) - 1)
        else:
            raise ValueError(f"kind: expected 'tsne' or 'umap', got {kind!r}")
        log.info("neighbour graph: exact %d-NN of %d training rows", k, n)
        knn_idx, knn_d2 = exact_knn(x, k)
        if kind == "tsne":
            rows = perplexity_rows(knn_d2, max(1.0, min(float(cfg.perplexity), float(k))))
        else:
            rows = umap_weights_from_knn(knn_d2.sqrt(), int(cfg.n_neighbors))
        head = torch.arange(n, device=x.device).repeat_interleave(k)
        pairs = torch.stack([head, knn_idx.reshape(-1)])
        a = torch.sparse_coo_tensor(pairs, rows.reshape(-1), (n, n), check_invariants=True).coalesce()
        at = a.t().coalesce()
        if kind == "tsne":
            joint = ((a + at) * 0.5).coalesce()  # edges are drawn in proportion: no 1/n needed
        else:
            joint = (a + at - a * at).coalesce()  # fuzzy union
        self._set_joint(joint)

    @classmethod
    def from_joint(cls, joint: torch.Tensor, device: torch.device) -> NeighbourGraph:
        """The graph of an already built ``joint`` (a coalesced sparse (n, n) affinity matrix, as
        ``self.joint`` of an earlier graph, e.g. saved with ``torch.save``), without the kNN search."""
        graph = cls.__new__(cls)
        graph.n, graph.device = joint.shape[0], device
        graph._set_joint(joint)
        return graph

    def _set_joint(self, joint: torch.Tensor) -> None:
        self.joint = joint
        self.n_edges = joint.values().numel()
        # Cumulative weights on the CPU: edges are drawn by a binary search, for any number of edges.
        self._head, self._tail = joint.indices().cpu()
        self._cum = torch.cumsum(joint.values().to(torch.float64).cpu(), dim=0)
        # Row-wise (CSR) view for graph_sampling=rows: a coalesced COO is sorted by head.
        self._crow = torch.zeros(self.n + 1, dtype=torch.long)
        self._crow[1:] = torch.cumsum(torch.bincount(self._head, minlength=self.n), dim=0)
        self._weight = joint.values().to(torch.float32).cpu()
        self.mean_degree = float(self._cum[-1]) / self.n  # mean summed affinity of a row

    def batches(self, batch_size: int, seed: int) -> Iterator[GraphBatch]:
        """One epoch: ceil(n / batch_size) steps of ``batch_size // 2`` edges and as many uniform rows.

        Edges are drawn with replacement in proportion to their affinity (an unbiased sample of the
        attraction term); the uniform rows, drawn without replacement, estimate the repulsion.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        half = max(1, batch_size // 2)
        for _ in range(max(1, math.ceil(self.n / batch_size))):
            u = torch.rand(half, generator=gen, dtype=torch.float64) * self._cum[-1]
            e = torch.searchsorted(self._cum, u, right=True).clamp_max(self._cum.numel() - 1)
            uniform = torch.randperm(self.n, generator=gen)[: min(half, self.n)]
            yield GraphBatch(self._head[e].to(self.device), self._tail[e].to(self.device), uniform.to(self.device))

    def row_batches(self, batch_size: int, seed: int) -> Iterator[RowBatch]:
        """One epoch of ``graph_sampling=rows``: every row once, in seeded random batches of
        ``batch_size`` rows, each with all its edges (the graph's affinities, float32) and
        min(``batch_size``, n) repelling rows, each drawn uniformly from the rows other than one batch
        row (taken in turn), so that no batch's pool is only the batch itself.
        """
        gen = torch.Generator(device="cpu").manual_seed(seed)
        order = torch.randperm(self.n, generator=gen)
        for s in range(0, self.n, batch_size):
            rows = order[s : s + batch_size]
            start, length = self._crow[rows], self._crow[rows + 1] - self._crow[rows]
            seg = torch.repeat_interleave(torch.arange(rows.numel()), length)
            offset = torch.cumsum(length, dim=0) - length
            edge = start[seg] + torch.arange(seg.numel()) - offset[seg]
            m = min(batch_size, self.n)
            anchor = rows[torch.arange(m) % rows.numel()]
            pool = (anchor + torch.randint(1, self.n, (m,), generator=gen)) % self.n
            yield RowBatch(*(t.to(self.device) for t in (rows, seg, self._tail[edge], self._weight[edge], pool)))


@dataclass(frozen=True)
class RowBatch:
    """One step of ``graph_sampling=rows``: ``rows`` (B,) through the encoder; their edges as
    ``seg`` (E,, the head's position in ``rows``), ``tail`` (E,, row index) and ``weight`` (E,);
    ``pool`` (M,) row indices drawn uniformly for the repulsion. Tails and pool are read from the
    code bank."""

    rows: torch.Tensor
    seg: torch.Tensor
    tail: torch.Tensor
    weight: torch.Tensor
    pool: torch.Tensor


@dataclass(frozen=True)
class GraphBatch:
    """Row indices of one step: sampled edges (head[i], tail[i]) and uniformly drawn rows."""

    head: torch.Tensor
    tail: torch.Tensor
    uniform: torch.Tensor
