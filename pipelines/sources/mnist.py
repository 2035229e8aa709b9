"""MNIST idx files -> 784 floats in [0, 1] per image, label and split as item metadata.

The idx files are parsed with numpy on the driver (70,000 images at most, ~55 MB of bytes); the
magic numbers, dimensions and byte counts are checked, so a truncated file is an error naming it.
Item ids run over the splits in order (train, then test), so they stay unique when both are present.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import SparkSession

from pipelines.publish import is_local, local_path
from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.csvfiles import open_input, pick_one
from sae_model import idx

log = logging.getLogger(__name__)

IMAGES_MAGIC, LABELS_MAGIC = idx.IMAGES_MAGIC, idx.LABELS_MAGIC
_IMAGES = re.compile(r"^(?P<prefix>.+)-images[-.]idx3-ubyte(\.gz)?$")
SPLIT_ORDER = {"train": 0, "t10k": 1, "test": 1}
BAD_LABEL = "label out of range 0-9"


def pairs(input_path: str) -> list[tuple[str, Path, Path]]:
    """(split, images file, labels file) for every images file under the input, train first.

    One split's file under several names (``x`` beside ``x.gz`` after ``gunzip -k``, or the
    ``-images.idx3`` spelling beside ``-images-idx3``) is read once: the names are grouped by split
    prefix and :func:`~pipelines.sources.csvfiles.pick_one` keeps one (warning) or refuses them
    (InputError naming both) when their contents differ."""
    if not is_local(input_path):
        raise InputError(f"{input_path}: the mnist source reads local idx files only (data.input)")
    base = local_path(input_path)
    if not base.exists():
        raise InputError(f"{base}: does not exist (data.input); expected *-images-idx3-ubyte[.gz] files")
    candidates = [base] if base.is_file() else sorted(base.iterdir())
    by_prefix: dict[str, list[Path]] = {}
    for img in candidates:
        m = _IMAGES.match(img.name)
        if m:
            # Plain files first: when both hold the same data, the one read needs no inflating.
            by_prefix.setdefault(m["prefix"], []).append(img)
    found = []
    for prefix, imgs in by_prefix.items():
        img = pick_one(sorted(imgs, key=lambda p: (p.suffix == ".gz", p.name)))
        labels = [img.parent / f"{prefix}-labels{sep}idx1-ubyte{ext}" for sep in "-." for ext in ("", ".gz")]
        existing = [p for p in labels if p.is_file()]
        if not existing:
            raise InputError(f"{img}: no labels file next to it; expected {labels[0].name}[.gz]")
        split = "test" if prefix.startswith("t10k") or prefix.startswith("test") else prefix
        found.append((split, img, pick_one(existing)))
    if not found:
        raise InputError(f"{base}: no MNIST images file; expected *-images-idx3-ubyte or *-images-idx3-ubyte.gz")
    return sorted(found, key=lambda f: (SPLIT_ORDER.get(f[0], 2), f[0]))


def _bytes(path: Path) -> bytes:
    with open_input(path) as fh:
        return fh.read()


def parse_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """uint8 array of shape (n, *dims) of the idx file at ``path`` (``sae_model.idx``, the one parser of the
    format; gzip by name through ``open_input``); InputError naming the file when the header or size is wrong."""
    try:
        return idx.parse_idx(_bytes(path), path, magic, ndim)
    except idx.IdxError as exc:
        raise InputError(str(exc)) from None


def load(input_path: str, limit: int = 0) -> tuple[list[dict], list[str]]:
    """Parsed splits, each {split, images (n, 28*28 uint8), labels (n,), images_file, labels_file}."""
    out, files = [], []
    seen: dict[str, Path] = {}
    for split, img_path, lab_path in pairs(input_path):
        images = parse_idx(img_path, IMAGES_MAGIC, 3)
        labels = parse_idx(lab_path, LABELS_MAGIC, 1)
        # The same images under two split names (t10k- and test-) would publish every image twice.
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        if digest in seen:
            log.warning("%s holds the same images and labels as %s; reading them once", img_path, seen[digest])
            continue
        seen[digest] = img_path
        if len(images) != len(labels):
            raise InputError(f"{lab_path}: {len(labels)} labels for {len(images)} images in {img_path.name}")
        if len(images) == 0:
            raise InputError(f"{img_path}: no images")
        out.append({"split": split, "images": images.reshape(len(images), -1), "labels": labels,
                    "images_file": str(img_path), "shape": images.shape[1:]})
        files += [str(img_path), str(lab_path)]
    if limit:
        left = limit
        for part in out:
            part["images"], part["labels"] = part["images"][:left], part["labels"][:left]
            left -= len(part["images"])
        out = [p for p in out if len(p["images"])]
    return out, files


def check(cfg) -> None:
    """Check that every images and labels file under ``data.input`` starts with its idx magic number. Raises
    ``InputError`` naming the file otherwise, or when the input is not local, does not exist or has no
    images file with its labels file."""
    for _, img, lab in pairs(cfg.data.input):
        for path, magic in ((img, IMAGES_MAGIC), (lab, LABELS_MAGIC)):
            with open_input(path) as fh:
                head = fh.read(4)
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                raise InputError(f"{path}: not an idx file (magic 0x{int.from_bytes(head, 'big'):08x}, "
                                 f"expected 0x{magic:08x})")


def read(spark: SparkSession, cfg) -> SourceResult:
    """MNIST idx files -> features item_id long, features array<float> of height x width pixels scaled to [0,
    1]; items with label int and split; images with a label above 9 quarantined. Raises ``InputError`` on a
    truncated or malformed file, mismatched image and label counts, or images of different sizes."""
    splits, files = load(cfg.data.input, cfg.data.limit)
    frames, bad = [], []
    offset = 0
    for part in splits:
        n = len(part["images"])
        ids = np.arange(offset, offset + n, dtype=np.int64)
        offset += n
        labels = part["labels"].astype(np.int32)
        ok = labels <= 9
        pixels = (part["images"][ok].astype(np.float32) / np.float32(255.0))
        frames.append(pd.DataFrame({"item_id": ids[ok], "features": [row.tolist() for row in pixels], "label": labels[ok],
                                    "split": part["split"]}))
        bad += [(part["images_file"], f"image {i}, label {lab}", BAD_LABEL) for i, lab in
                zip(np.flatnonzero(~ok), labels[~ok], strict=True)]
    shapes = {tuple(p["shape"]) for p in splits}
    if len(shapes) != 1:
        raise InputError(f"{cfg.data.input}: images of different sizes {sorted(shapes)} in one input")
    height, width = shapes.pop()
    table = pd.concat(frames, ignore_index=True)
    rows_in = offset
    df = spark.createDataFrame(
        table, "item_id long, features array<float>, label int, split string"
    )
    quarantine = spark.createDataFrame(bad, "source_file string, raw string, reason string")
    log.info("mnist: %d images from %s", rows_in, ", ".join(files))
    return SourceResult(
        features=df.select("item_id", "features"),
        items=df.select("item_id", "label", "split"),
        quarantine=quarantine,
        feature_names=[f"px{r}_{c}" for r in range(height) for c in range(width)],
        input_files=files,
        rows_in=lambda: rows_in,
    )


register("mnist", check, read)
