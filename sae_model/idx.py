"""The idx file format of MNIST (LeCun, Cortes & Burges, "THE MNIST DATABASE of handwritten digits"):
a 4-byte big-endian magic number ``0x0800 + ndim`` (0x803 images, 0x801 labels), ``ndim`` 4-byte
big-endian dimensions, then the uint8 values, row-major. Files may be gzipped.

The one parser of the format. It lives beside the model, not the ingest, so that tools which run where
pyspark is not installed (``benchmarks/bench_train.py`` on a GPU machine) read idx files the way the
ingest (``pipelines.sources.mnist``) does.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801


class IdxError(ValueError):
    """An idx file whose header, size or compression is wrong; the message names the file."""


def parse_idx(data: bytes, name: str | Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of shape ``(n, *dims)`` held by the (already gunzipped) bytes ``data`` of the idx file
    ``name``. Raises IdxError naming ``name`` when the magic number is not ``magic`` or the byte count does
    not match the ``ndim`` dimensions of the header (a truncated file). The array is a read-only view
    of ``data``."""
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxError(f"{name}: {len(data)} bytes, too short for an idx header")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise IdxError(f"{name}: magic number 0x{got:08x}, expected 0x{magic:08x}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise IdxError(f"{name}: {len(data)} bytes, expected {expected} for dimensions {dims} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | Path, magic: int, ndim: int) -> np.ndarray:
    """:func:`parse_idx` of the file at ``path``, gunzipped when its bytes start with gzip's magic (whatever
    its name). Raises IdxError for a damaged gzip stream or a bad header, OSError when unreadable."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IdxError(f"{path}: cannot be read ({exc}); truncated or damaged gzip?") from None
    return parse_idx(raw, path, magic, ndim)


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (uint8; images ``(n, height, width)`` or labels ``(n,)``) as an idx file that
    :func:`read_idx` reads back: magic ``0x0800 + ndim``, big-endian dimensions, the bytes; gzipped when
    ``path`` ends in ``.gz``. Returns ``path``. Raises ValueError for another dtype."""
    if array.dtype != np.uint8:
        raise ValueError(f"{path}: idx files written here hold uint8, got {array.dtype}")
    data = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += np.ascontiguousarray(array).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.name.endswith(".gz") else data)
    return path
