"""Out-of-sample placement: new items' codes refined against a fixed reference map.

The encoder places a new item by itself. On noisy, sparse inputs (20 Newsgroups posts) an item
whose input lies between topics lands between the topics' regions of the map, beside unrelated
items, which is what trustworthiness counts against. umap-learn's ``transform`` (McInnes et al.
2018, section 4 of umap-learn's documentation, "Transforming new data") instead optimises each new
item's position against the fixed map of the training items: attraction to its nearest training
items in the input space, repulsion from randomly drawn ones. :func:`refine_codes` does that,
starting from the encoder's code rather than from the mean of the neighbours' positions (umap-learn's
start), so the encoder's placement (which carries the classes better: 5-NN accuracy) is kept where
the neighbours agree with it and corrected where they do not. Measured on 20 Newsgroups in
``docs/news20_results.md``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sae_model.knn import topk
from sae_model.neighbor_loss import _log_a_d2b, umap_ab, umap_weights_from_knn

# Rows optimised at once: each row's loss involves only its own code, so blocks give the same
# optimisation as one pass (the negative samples differ) with memory bounded by the block.
_BLOCK_ROWS = 65_536


def refine_codes(
    x_new: np.ndarray,
    codes_new: np.ndarray,
    x_ref: np.ndarray,
    codes_ref: np.ndarray,
    n_neighbors: int = 15,
    epochs: int = 100,
    lr: float = 0.25,
    negative_sample_rate: int = 5,
    min_dist: float = 0.1,
    spread: float = 1.0,
    seed: int = 0,
) -> np.ndarray:
    """Codes of new items (m x c, float32) moved from ``codes_new`` to fit the fixed reference map.

    ``x_new`` (m x d) and ``x_ref`` (n x d) are the items' inputs (the model's features, any float
    dtype); ``codes_new`` (m x c) the encoder's codes of the new items, ``codes_ref`` (n x c) those of
    the reference (training) items, in the code's own units. Each new item's ``n_neighbors`` nearest
    reference items in the input space (exact, Euclidean: :func:`sae_model.knn.topk`) get UMAP's
    memberships (:func:`sae_model.neighbor_loss.umap_weights_from_knn`); its code then descends UMAP's
    fuzzy cross-entropy against the fixed reference codes (q = 1 / (1 + a d^(2b)), ``umap_ab(min_dist,
    spread)``; ``negative_sample_rate`` random reference items repel per neighbour) for ``epochs`` full
    steps of gradient descent, the rate falling linearly from ``lr`` to 0: umap-learn's ``transform``
    (McInnes et al. 2018; its schedule: 100 epochs from a quarter of the fitting rate), started from
    the encoder's codes. Deterministic for a given ``seed``; the reference codes are not changed.

    Memory: the exact kNN reads the reference in row blocks (``sae_model.knn``); the optimisation
    holds m x n_neighbors x (1 + negative_sample_rate) code pairs per block of 65,536 rows.

    Raises ``ValueError`` when the arrays' shapes disagree, when there are ``n_neighbors`` reference items
    or fewer, when an array holds NaN or infinity, or when ``n_neighbors`` < 1, ``epochs`` < 0 or ``lr``
    <= 0; ``FloatingPointError`` if a step diverges (a far too large ``lr``).
    """
    x_new, x_ref = np.asarray(x_new), np.asarray(x_ref)
    codes_new = np.asarray(codes_new, dtype=np.float32)
    codes_ref = np.asarray(codes_ref, dtype=np.float32)
    for name, a in (("x_new", x_new), ("codes_new", codes_new), ("x_ref", x_ref), ("codes_ref", codes_ref)):
        if a.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D array (items x dims), got shape {a.shape}")
    if len(x_new) != len(codes_new) or len(x_ref) != len(codes_ref):
        raise ValueError(f"inputs and codes must have as many rows: x_new {len(x_new)} vs codes_new {len(codes_new)}, "
                         f"x_ref {len(x_ref)} vs codes_ref {len(codes_ref)}")
    if x_new.shape[1] != x_ref.shape[1] or codes_new.shape[1] != codes_ref.shape[1]:
        raise ValueError(f"new and reference items must have the same widths: inputs {x_new.shape[1]} vs "
                         f"{x_ref.shape[1]}, codes {codes_new.shape[1]} vs {codes_ref.shape[1]}")
    if n_neighbors < 1 or epochs < 0 or not lr > 0:
        raise ValueError(f"need n_neighbors >= 1, epochs >= 0 and lr > 0, got {n_neighbors}, {epochs}, {lr}")
    if len(x_ref) <= n_neighbors:
        # Fewer and the random repelling items are the item's own neighbours: it is pushed off the map.
        raise ValueError(f"x_ref: {len(x_ref)} reference items; placing against a map needs more than "
                         f"n_neighbors = {n_neighbors}")
    for name, a in (("x_new", x_new), ("codes_new", codes_new), ("x_ref", x_ref), ("codes_ref", codes_ref)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: holds NaN or infinite values")
    m, n = len(x_new), len(x_ref)
    if m == 0 or epochs == 0:
        return codes_new.copy()
    k = n_neighbors
    # Ids that never collide: a new item is not excluded from its own neighbours as topk would do.
    nb, nb_d = topk(-1 - np.arange(m, dtype=np.int64), x_new, np.arange(n, dtype=np.int64), x_ref, k)
    w = umap_weights_from_knn(torch.from_numpy(nb_d), k).to(torch.float32)
    a, b = umap_ab(min_dist, spread)
    ref = torch.from_numpy(codes_ref)
    gen = torch.Generator().manual_seed(seed)
    out = np.empty_like(codes_new)
    for s in range(0, m, _BLOCK_ROWS):
        rows = slice(s, min(m, s + _BLOCK_ROWS))
        y = torch.from_numpy(codes_new[rows].copy()).requires_grad_(True)
        wb, nbr = w[rows], ref[torch.from_numpy(nb[rows])]
        w_neg = wb.repeat(1, negative_sample_rate)
        for epoch in range(epochs):
            attract = F.softplus(_log_a_d2b(y[:, None, :], nbr, a, b))
            loss = (wb * attract).sum()
            if negative_sample_rate > 0:
                neg = torch.randint(0, n, (len(y), k * negative_sample_rate), generator=gen)
                loss = loss + (w_neg * F.softplus(-_log_a_d2b(y[:, None, :], ref[neg], a, b))).sum()
            (grad,) = torch.autograd.grad(loss, y)
            with torch.no_grad():
                y -= lr * (1.0 - epoch / epochs) * grad
        out[rows] = y.detach().numpy()
    if not np.isfinite(out).all():  # a diverging step would publish NaN positions
        raise FloatingPointError(f"refine_codes: non-finite codes after {epochs} epochs at lr {lr}; lower lr")
    return out


def refine_split(
    x: np.ndarray, codes: np.ndarray, reference: np.ndarray, **options: float
) -> np.ndarray:
    """``codes`` (n x c, float32) with the rows outside ``reference`` (a boolean mask of n, the training
    items) refined against the reference rows' map by :func:`refine_codes` (its ``options``); the
    reference rows keep their codes. ``x`` (n x d) are the inputs. Raises ``ValueError`` as
    :func:`refine_codes`, or when the mask's length is not n."""
    reference = np.asarray(reference, dtype=bool)
    if reference.shape != (len(codes),):
        raise ValueError(f"reference: expected a boolean mask of {len(codes)} rows, got shape {reference.shape}")
    out = np.array(codes, dtype=np.float32)
    new = ~reference
    out[new] = refine_codes(x[new], out[new], x[reference], out[reference], **options)
    return out

