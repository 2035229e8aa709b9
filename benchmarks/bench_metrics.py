"""Time the map metrics at evaluation sizes (d=784 inputs, 2-D codes). Figures only, not a test.

Usage: .venv/bin/python benchmarks/bench_metrics.py [n ...]   (default: 2000 10000)
"""

from __future__ import annotations

import resource
import sys
import time

import numpy as np

from sae_model.evaluation import continuity, knn_accuracy, knn_indices, trustworthiness


def _timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def main(sizes: list[int]) -> None:
    rng = np.random.default_rng(0)
    print(f"{'n':>6}  {'knn_indices(codes,5)':>20}  {'knn_accuracy':>12}  {'trustworthiness':>15}  {'continuity':>10}")
    for n in sizes:
        x = rng.random((n, 784), dtype=np.float32)
        labels = rng.integers(0, 10, n)
        codes = x[:, :2] + 0.1 * rng.normal(size=(n, 2))
        t_knn = _timed(knn_indices, codes, 5)
        t_acc = _timed(knn_accuracy, codes, labels, 5)
        t_tw = _timed(trustworthiness, x, codes, 12)
        t_co = _timed(continuity, x, codes, 12)
        print(f"{n:>6}  {t_knn:>19.2f}s  {t_acc:>11.2f}s  {t_tw:>14.2f}s  {t_co:>9.2f}s")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [2000, 10000])
