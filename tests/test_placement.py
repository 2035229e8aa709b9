"""Out-of-sample placement (``sae_model.placement``): new items' codes refined against a fixed map."""

from __future__ import annotations

import numpy as np
import pytest

from sae_model.evaluation import trustworthiness
from sae_model.placement import refine_codes, refine_split


def _blobs(seed: int, n_per: int = 40, dim: int = 20):
    """Three separated clusters in the input space, and a perfect 2-D map of them (the cluster's corner
    of a triangle plus a little noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, (3, dim))
    corners = np.array([[0.0, 0.0], [10.0, 0.0], [5.0, 8.0]])
    labels = np.repeat(np.arange(3), n_per)
    x = centres[labels] + rng.normal(0, 1, (3 * n_per, dim))
    codes = corners[labels] + rng.normal(0, 0.5, (3 * n_per, 2))
    return x, codes.astype(np.float32), labels, corners


def _nearest_corner(codes: np.ndarray, corners: np.ndarray) -> np.ndarray:
    return ((codes[:, None, :] - corners[None]) ** 2).sum(-1).argmin(1)


def test_items_placed_between_clusters_move_to_their_own():
    x_ref, c_ref, _, corners = _blobs(0)
    x_new, _, y_new, _ = _blobs(0, n_per=15)  # same centres (same seed), fresh draws
    x_new = x_new + np.random.default_rng(1).normal(0, 1, x_new.shape)
    # An encoder that puts every new item in the middle of the map, with a little spread.
    start = (corners.mean(0) + np.random.default_rng(2).normal(0, 0.5, (len(x_new), 2))).astype(np.float32)
    assert (_nearest_corner(start, corners) == y_new).mean() < 0.6
    placed = refine_codes(x_new, start, x_ref, c_ref, n_neighbors=10)
    assert placed.dtype == np.float32 and placed.shape == start.shape
    assert (_nearest_corner(placed, corners) == y_new).mean() == 1.0
    assert trustworthiness(x_new, placed, k=5) > trustworthiness(x_new, start, k=5) + 0.1


def test_items_already_well_placed_stay_near_their_cluster():
    x_ref, c_ref, _, corners = _blobs(3)
    x_new, c_new, y_new, _ = _blobs(3, n_per=10)
    placed = refine_codes(x_new, c_new, x_ref, c_ref)
    assert (_nearest_corner(placed, corners) == y_new).all()
    # Each stays within its cluster's spread of where the encoder put it (the clusters are 10 apart).
    assert np.linalg.norm(placed - c_new, axis=1).max() < 3.0


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_placement_does_not_depend_on_the_maps_units(scale):
    # A map of radius ~0.1 or ~1,000 is the same map: new items land at the same places relative to it
    # (once, a map of radius 1 pushed them onto a ring outside it).
    x_ref, c_ref, _, corners = _blobs(9)
    x_new, c_new, y_new, _ = _blobs(9, n_per=10)
    base = refine_codes(x_new, c_new, x_ref, c_ref)
    placed = refine_codes(x_new, c_new * scale, x_ref, c_ref * scale)
    np.testing.assert_allclose(placed / scale, base, rtol=1e-3, atol=1e-3)
    assert (_nearest_corner(placed / scale, corners) == y_new).all()
    # Every placed item ends within the map: as near a reference code as reference codes are to each other.
    gap = np.sqrt(((placed[:, None] - c_ref[None] * scale) ** 2).sum(-1)).min(1)
    assert gap.max() < 2.0 * scale


def test_seeded_deterministic_and_inputs_untouched():
    x_ref, c_ref, _, _ = _blobs(4)
    x_new, c_new, _, _ = _blobs(5, n_per=5)
    before_ref, before_new = c_ref.copy(), c_new.copy()
    a = refine_codes(x_new, c_new, x_ref, c_ref, epochs=20, seed=7)
    b = refine_codes(x_new, c_new, x_ref, c_ref, epochs=20, seed=7)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(c_ref, before_ref)
    np.testing.assert_array_equal(c_new, before_new)
    assert not np.array_equal(a, c_new)
    np.testing.assert_array_equal(refine_codes(x_new, c_new, x_ref, c_ref, epochs=0), c_new)


def test_refine_split_keeps_the_reference_rows():
    x, codes, _, _ = _blobs(6)
    reference = np.arange(len(x)) % 4 != 0
    out = refine_split(x, codes, reference, epochs=10)
    np.testing.assert_array_equal(out[reference], codes[reference])
    assert not np.array_equal(out[~reference], codes[~reference])
    with pytest.raises(ValueError, match="boolean mask of 120 rows"):
        refine_split(x, codes, reference[:-1])


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros((3, 4)), np.zeros((2, 2)), np.zeros((5, 4)), np.zeros((5, 2))), "as many rows"),
        ((np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((5, 3)), np.zeros((5, 2))), "same widths"),
        ((np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((5, 4)), np.zeros((5, 3))), "same widths"),
        ((np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((0, 4)), np.zeros((0, 2))), "0 reference items"),
        ((np.zeros((3, 4)), np.zeros((3, 2)), np.zeros((15, 4)), np.zeros((15, 2))), "needs more than n_neighbors = 15"),
        ((np.zeros((3, 4)), np.full((3, 2), np.nan), np.zeros((20, 4)), np.zeros((20, 2))), "codes_new: holds NaN"),
        ((np.zeros((3, 4)), np.zeros((3, 2)), np.full((20, 4), np.inf), np.zeros((20, 2))), "x_ref: holds NaN"),
        ((np.zeros(3), np.zeros((3, 2)), np.zeros((5, 4)), np.zeros((5, 2))), "2-D array"),
    ],
)
def test_bad_shapes_raise(args, message):
    with pytest.raises(ValueError, match=message):
        refine_codes(*args)


def test_bad_settings_raise():
    x, c, _, _ = _blobs(8, n_per=3)
    for kw in ({"n_neighbors": 0}, {"epochs": -1}, {"lr": 0.0}, {"lr": np.inf}, {"unit": 0.0}):
        with pytest.raises(ValueError, match="n_neighbors >= 1"):
            refine_codes(x, c, x, c, **kw)
