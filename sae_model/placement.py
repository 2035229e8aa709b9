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
from sklearn.neighbors import NearestNeighbors

from sae_model.knn import topk
from sae_model.neighbor_loss import umap_ab, umap_row_loss, umap_weights_from_knn

# Rows optimised at once: each row's loss involves only its own code, so blocks give the same
# optimisation as one pass (the negative samples differ) with memory bounded by the block.
_BLOCK_ROWS = 65_536
_CLIP = 4.0
# Nearest reference items each new item is attracted to (umap-learn's n_neighbors default).
N_NEIGHBORS = 15


def refine_codes(
    x_new: np.ndarray,
    codes_new: np.ndarray,
    x_ref: np.ndarray,
    codes_ref: np.ndarray,
    n_neighbors: int = N_NEIGHBORS,
    epochs: int = 100,
    lr: float = 0.25,
    negative_sample_rate: int = 5,
    min_dist: float = 0.1,
    spread: float = 1.0,
    seed: int = 0,
    unit: float = 0.5,
) -> np.ndarray:
    """Codes of new items (m x c, float32) moved from ``codes_new`` to fit the fixed reference map.

    ``x_new`` (m x d) and ``x_ref`` (n x d) are the items' inputs (the model's features, any float
    dtype); ``codes_new`` (m x c) the encoder's codes of the new items, ``codes_ref`` (n x c) those of
    the reference (training) items, in the code's own units. Each new item's ``n_neighbors`` nearest
    reference items in the input space (exact, Euclidean: :func:`sae_model.knn.topk`) get UMAP's
    memberships (:func:`sae_model.neighbor_loss.umap_weights_from_knn`); its code then descends UMAP's
    fuzzy cross-entropy against the fixed reference codes (:func:`sae_model.neighbor_loss.umap_row_loss`,
    q = 1 / (1 + a d^(2b)), ``umap_ab(min_dist, spread)``; repulsion ``negative_sample_rate`` x its
    memberships' sum x the mean over n_neighbors x negative_sample_rate reference codes drawn each step)
    for ``epochs`` full steps of gradient descent, each coordinate's gradient clipped to +-4 and the rate
    falling linearly from ``lr`` to 0: umap-learn's ``transform``
    (McInnes et al. 2018; its schedule: 100 epochs from a quarter of the fitting rate), started from
    the encoder's codes. Deterministic for a given ``seed``; the reference codes are not changed.

    UMAP's kernel has a fixed length scale, and an encoder's map has any: the codes are optimised in
    units where the median distance from a reference code to its ``n_neighbors``-th nearest reference
    code is ``unit``, and returned in their own units. Without this a map of radius 1 pushed its new
    items onto a ring outside it, and one of radius 100 barely moved them. ``unit`` = 0.5 was chosen on
    20 Newsgroups posts held out of the *training* split (a model fitted on the other 80 %; never the
    test posts): trustworthiness 0.724 / 0.723 / 0.699 / 0.680 at 0.25 / 0.5 / 1 / 2, 5-NN accuracy
    0.385 / 0.403 / 0.411 / 0.409 (docs/news20_results.md).

    Memory: the exact kNN reads the reference in row blocks (``sae_model.knn``); the optimisation
    holds m x n_neighbors x (1 + negative_sample_rate) code pairs per block of 65,536 rows.

    Raises ``ValueError`` when the arrays' shapes disagree, when there are ``n_neighbors`` reference items
    or fewer, when an array holds NaN or infinity, or when ``n_neighbors`` < 1, ``epochs`` < 0 or ``lr``
    <= 0 (or ``unit`` <= 0); ``FloatingPointError`` should a step still give non-finite codes.
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
    if n_neighbors < 1 or epochs < 0 or not 0 < lr < np.inf or not 0 < unit < np.inf:
        raise ValueError(f"need n_neighbors >= 1, epochs >= 0, lr > 0 and unit > 0, got {n_neighbors}, {epochs}, "
                         f"{lr}, {unit}")
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
    # Low-dimensional codes: scikit-learn's trees (kneighbors() without X leaves each point out).
    spacing = float(np.median(NearestNeighbors(n_neighbors=k).fit(codes_ref).kneighbors()[0][:, -1]))
    scale = unit / spacing if spacing > 0 else 1.0  # all reference codes equal: nothing to measure by
    ref = torch.from_numpy(codes_ref * np.float32(scale))
    gen = torch.Generator().manual_seed(seed)
    out = np.empty_like(codes_new)
    pool = k * max(negative_sample_rate, 1)  # repelling reference codes drawn per step, shared by the rows
    for s in range(0, m, _BLOCK_ROWS):
        rows = slice(s, min(m, s + _BLOCK_ROWS))
        y = torch.from_numpy(codes_new[rows] * np.float32(scale)).requires_grad_(True)
        n_rows = len(y)
        # Each row's k edges to its fixed neighbours' codes, in umap_row_loss's (row, tail) form.
        seg = torch.arange(n_rows).repeat_interleave(k)
        tail, weight = ref[torch.from_numpy(nb[rows]).reshape(-1)], w[rows].reshape(-1)
        no_self = torch.zeros((n_rows, pool), dtype=torch.bool)  # a new item is never a reference row
        for epoch in range(epochs):
            z_pool = ref[torch.randint(0, n, (pool,), generator=gen)]
            # x n_rows: the loss summed over the rows, so each row's step does not shrink with the block.
            loss = n_rows * umap_row_loss(y, seg, tail, weight, z_pool, no_self, a, b, negative_sample_rate)
            (grad,) = torch.autograd.grad(loss, y)
            with torch.no_grad():
                # -log(1 - q) grows without bound as a drawn code nears the row: umap-learn clips each
                # step's gradient to +-4 per coordinate (its `clip`), so one near-coincident draw moves
                # a row by at most 4 x the rate.
                y -= lr * (1.0 - epoch / epochs) * grad.clamp_(-_CLIP, _CLIP)
        out[rows] = y.detach().numpy() / np.float32(scale)
    if not np.isfinite(out).all():  # clipped steps cannot diverge; kept so NaN is never published
        raise FloatingPointError(f"refine_codes: non-finite codes after {epochs} epochs at lr {lr}; lower lr")
    return out


def refine_split(
    x: np.ndarray, codes: np.ndarray, reference: np.ndarray, **options: float
) -> np.ndarray:
    """``codes`` (n x c, float32) with the rows outside ``reference`` (a boolean mask of n, the training
    items) refined against the reference rows' map by :func:`refine_codes` (its ``options``); the
    reference rows keep their codes. ``x`` (n x d) are the inputs. Raises ``ValueError`` as
    :func:`refine_codes`, or when the mask's length is not n."""
    x, reference = np.asarray(x), np.asarray(reference, dtype=bool)
    if reference.shape != (len(codes),):
        raise ValueError(f"reference: expected a boolean mask of {len(codes)} rows, got shape {reference.shape}")
    out = np.array(codes, dtype=np.float32)
    new = ~reference
    out[new] = refine_codes(x[new], out[new], x[reference], out[reference], **options)
    return out

