"""A stand-in for ``sae_model.loading.Encoder`` in the evaluation tests: a fixed linear map."""

from __future__ import annotations

import numpy as np


class LinearEncoder:
    """The ``Encoder`` surface evaluation uses (``encode``, ``reconstruct``, ``input_width``,
    ``code_width``): the projection ``w`` (d x width) and its transpose."""

    def __init__(self, w: np.ndarray) -> None:
        self.w, self.input_width, self.code_width = w, w.shape[0], w.shape[1]

    def encode(self, x):
        return np.asarray(x, np.float64) @ self.w

    def reconstruct(self, x):
        return self.encode(x) @ self.w.T
