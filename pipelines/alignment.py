"""Keep 2-D maps stable from one model to the next.

A retrained autoencoder is free to flip, rotate or rescale its map. Users who bookmarked "the
comedy corner" should not find it on the other side the next morning, so a new map is aligned to
the previous one by orthogonal Procrustes (optionally with scaling) on the items both share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Alignment:
    """A similarity transform found by ``procrustes``: rotation (float (d, d), orthogonal), scale, translation
    (float (d,)), the RMS residual over the shared items in map units, and how many items were shared."""

    rotation: np.ndarray  # (d, d) orthogonal
    scale: float
    translation: np.ndarray  # (d,)
    residual: float  # RMS distance between aligned new and old positions of the shared items
    shared: int

    def apply(self, codes: np.ndarray) -> np.ndarray:
        """Map ``codes`` (array (n, d)) into the previous map's frame: ``scale * codes @ rotation +
        translation``, computed in float64 and returned as float32 (n, d)."""
        return (self.scale * np.asarray(codes, dtype=np.float64) @ self.rotation + self.translation).astype(
            np.float32
        )


def procrustes(new: np.ndarray, old: np.ndarray, scaling: bool = True) -> Alignment:
    """Find R (orthogonal), s, t minimising ||s * new @ R + t - old|| over the shared rows."""
    new = np.asarray(new, dtype=np.float64)
    old = np.asarray(old, dtype=np.float64)
    if new.shape != old.shape or new.ndim != 2:
        raise ValueError(f"procrustes: need two (n, d) arrays of the same shape, got {new.shape} and {old.shape}")
    if new.shape[0] < new.shape[1] + 1:
        raise ValueError(f"procrustes: need at least {new.shape[1] + 1} shared items, got {new.shape[0]}")
    mu_new, mu_old = new.mean(axis=0), old.mean(axis=0)
    a, b = new - mu_new, old - mu_old
    u, sigma, vt = np.linalg.svd(a.T @ b)
    rotation = u @ vt  # reflections allowed: a mirrored map is exactly what we want to undo
    norm = float((a**2).sum())
    scale = float(sigma.sum() / norm) if scaling and norm > 0 else 1.0
    translation = mu_old - scale * mu_new @ rotation
    aligned = scale * new @ rotation + translation
    residual = float(np.sqrt(((aligned - old) ** 2).sum(axis=1).mean()))
    return Alignment(rotation, scale, translation, residual, new.shape[0])
