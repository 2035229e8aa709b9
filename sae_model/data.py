"""The one place training reads ``features/``: Petastorm streaming, an in-memory load, the split.

Which rows train is decided here only (:class:`Split`): the items of the training split (all of
them, or with ``train.split_column`` those whose ``items/`` column equals ``train.train_value``),
less the validation items, drawn from them by a hash of ``item_id``; every other row is a test
row and never reaches a batch, the validation set, the NaN check or the neighbour graph.

Both paths produce the same batches for ``shuffle=False``: the table's rows in Petastorm's
natural row-group order (files sorted by path, row groups in file order), the validation (and
test) items removed by the same rule, cut into batches of exactly ``batch_size`` (the last one
shorter). With ``shuffle=True`` the in-memory path applies a permutation seeded by
``(seed, epoch)`` (reproducible, also after a resume); the streaming path shuffles row groups with
the same seed and rows within windows of whole row groups, which is statistically equivalent but
not the same order. Swap the reader here and nothing else changes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

ID_COL = "item_id"
FEATURES_COL = "features"
MANIFEST = "_manifest.json"
# Shuffled streaming mixes rows within windows of whole row groups holding at least this many batches.
SHUFFLE_WINDOW_BATCHES = 16
# The niceness of Petastorm's decoding threads (see _lower_priority).
READER_NICE = 19


class DataError(ValueError):
    """``features/`` does not fit the model or the contract; the message names the problem."""


# ---------------------------------------------------------------- paths and the split


def to_uri(path: str | Path) -> str:
    """A ``file://`` URI for local paths (Petastorm wants URIs), other URIs unchanged."""
    s = str(path)
    if "://" in s:
        return s
    return "file://" + str(Path(s).resolve())


def local_dir(uri: str) -> Path:
    """The local directory of table ``uri`` (a ``file://`` URI or a plain path). Raises ``DataError`` for any
    other scheme."""
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if "://" in uri:
        raise DataError(f"{uri}: only local (file://) tables can be loaded in memory here")
    return Path(uri)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def is_validation(item_ids: np.ndarray, val_fraction: float) -> np.ndarray:
    """Deterministic split: ``splitmix64(item_id) / 2**64 < val_fraction``, the same on every path and host."""
    with np.errstate(over="ignore"):
        h = _splitmix64(np.asarray(item_ids, dtype=np.int64).view(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53) < val_fraction


@dataclass(frozen=True, eq=False)
class Split:
    """Which rows train, which validate, which are held out for testing: the one rule every reader of
    ``features/`` applies (training on both data paths, its validation loss, evaluation).

    ``train_ids`` (sorted unique int64; None = every item) are the items of the training split;
    :func:`read_split` reads them from ``items/``. Of those, ``is_validation(item_id, val_fraction)``
    are the validation hold-out and the rest train. Items outside ``train_ids`` are test items.
    """

    val_fraction: float = 0.1
    train_ids: np.ndarray | None = None

    @property
    def has_test(self) -> bool:
        """True when a split column holds some items out of training altogether."""
        return self.train_ids is not None

    def in_training_split(self, item_ids: np.ndarray) -> np.ndarray:
        """Boolean mask (n,) of the rows whose item is in the training split (train or validation)."""
        item_ids = np.asarray(item_ids, dtype=np.int64)
        if self.train_ids is None:
            return np.ones(len(item_ids), dtype=bool)
        if len(self.train_ids) == 0:
            return np.zeros(len(item_ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.train_ids, item_ids), len(self.train_ids) - 1)
        return self.train_ids[pos] == item_ids

    def roles(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(train, validation)`` boolean masks (n,) of ``item_ids``; rows in neither are test rows."""
        member = self.in_training_split(item_ids)
        val = is_validation(item_ids, self.val_fraction)
        return member & ~val, member & val


def read_split(items_uri: str | None, split_column: str, train_value: str, val_fraction: float) -> Split:
    """The :class:`Split` of ``train.split_column``/``train.train_value``: with an empty column, the hash
    split alone (every item trains or validates); else the items of ``items/`` whose ``split_column``
    (compared as a string) equals ``train_value`` form the training split.

    Reads only ``item_id`` and that column with pyarrow. Raises ``DataError`` when ``items/`` is
    missing, lacks the column, or has no item with ``train_value`` (the message lists the values found).
    """
    if not split_column:
        return Split(val_fraction)
    where = f"train.split_column={split_column}"
    root = local_dir(items_uri) if items_uri else None
    files = _files(root) if root is not None and root.exists() else []
    if not files:
        raise DataError(f"{where}: no items table to read the split from ({items_uri}); run `sae ingest` first")
    names = pq.read_schema(files[0]).names
    if split_column not in names or ID_COL not in names:
        raise DataError(f"{where}: items table {items_uri} has no column {split_column!r} (columns: {', '.join(names)})")
    t = pa.concat_tables(pq.read_table(f, columns=[ID_COL, split_column]) for f in files)
    values = t.column(split_column).cast(pa.string())
    ids = t.column(ID_COL).to_numpy().astype(np.int64, copy=False)
    is_train = np.asarray(pc.equal(values, train_value).fill_null(False).to_numpy(zero_copy_only=False))
    if not is_train.any():
        found = sorted({str(v) for v in values.unique().to_pylist()})
        raise DataError(
            f"{where}: no item of {items_uri} has {split_column} == {train_value!r} (train.train_value); "
            f"values found: {', '.join(map(repr, found[:10]))}{' ...' if len(found) > 10 else ''}"
        )
    train_ids = np.unique(ids[is_train])
    log.info("split %s == %r: %d training items of %d", split_column, train_value, len(train_ids), len(np.unique(ids)))
    return Split(val_fraction, train_ids)


# ---------------------------------------------------------------- inspecting the table


@dataclass(frozen=True)
class TableInfo:
    """A features table's URI, row count, feature width, float32 size of its feature matrix in bytes, and
    manifest."""

    uri: str
    rows: int
    dim: int
    nbytes: int  # float32 bytes of the feature matrix
    manifest: dict


def _files(root: Path) -> list[Path]:
    files = sorted(p for p in root.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in p.relative_to(root).parts))
    return files


def inspect_table(uri: str, expected_dim: int) -> TableInfo:
    """Check the contract before training: present, non-empty, fixed width == ``expected_dim``."""
    root = local_dir(uri)
    if not root.exists():
        raise DataError(f"features table {uri} does not exist; run `sae ingest` first")
    files = _files(root)
    if not files:
        raise DataError(f"features table {uri} is empty: no Parquet files")
    manifest: dict = {}
    if (root / MANIFEST).exists():
        manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    schema = pq.read_schema(files[0])
    for col in (ID_COL, FEATURES_COL):
        if col not in schema.names:
            raise DataError(f"features table {uri}: column {col!r} is missing (have {schema.names})")
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    if rows == 0:
        raise DataError(f"features table {uri} is empty: 0 rows")
    first = pq.ParquetFile(files[0]).read_row_group(0, columns=[FEATURES_COL]).column(0)
    dim = len(first[0].as_py()) if len(first) else int(manifest.get("dim", 0))
    if dim != expected_dim:
        raise DataError(
            f"features width is {dim} but model.layers[0] is {expected_dim}; "
            f"set model.layers=[{dim},...] (features table {uri})"
        )
    return TableInfo(uri=uri, rows=rows, dim=dim, nbytes=rows * dim * 4, manifest=manifest)


def _as_matrix(col: pa.ChunkedArray | pa.Array, dim: int, where: str, check_finite: bool = True) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        # combine_chunks copies even a single chunk (9 ms per 4,096 x 1,128 row group).
        arr = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    else:
        arr = col
    n = len(arr)
    if arr.null_count:
        raise DataError(f"{where}: {arr.null_count} null feature vectors")
    lengths = np.diff(arr.offsets.to_numpy())
    if n and (lengths != dim).any():
        raise DataError(f"{where}: feature vectors of width {sorted(set(lengths.tolist()) - {dim})[:3]} (expected {dim})")
    values = arr.flatten()
    flat = values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    m = flat.reshape(n, dim)
    if check_finite and not np.isfinite(m).all():
        bad = int((~np.isfinite(m)).any(axis=1).sum())
        raise DataError(f"{where}: {bad} feature vectors contain NaN or Inf; fix or quarantine them in ingest")
    return m


def load_table(uri: str, dim: int, keep: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The table as ``(item_ids int64 (n,), features float32 (n, dim))`` in Petastorm's natural order;
    with ``keep`` (item ids -> boolean mask) only its rows, the others never decoded nor checked.
    Raises ``DataError`` for NaN/Inf, a wrong width or a repeated ``item_id``."""
    ids, feats = [], []
    for f in _files(local_dir(uri)):
        t = pq.read_table(f, columns=[ID_COL, FEATURES_COL])
        if keep is not None:
            t = t.filter(pa.array(keep(t.column(ID_COL).to_numpy().astype(np.int64, copy=False))))
        ids.append(t.column(ID_COL).to_numpy().astype(np.int64, copy=False))
        feats.append(_as_matrix(t.column(FEATURES_COL), dim, str(f)))
    item_ids = np.concatenate(ids)
    if len(np.unique(item_ids)) != len(item_ids):
        raise DataError(f"features table {uri}: item_id is not unique")
    return item_ids, np.concatenate(feats)


def scan_stats(uri: str, dim: int, keep: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """One pass over a table too big to load: fails on NaN/Inf or a wrong width, naming the file.
    With ``keep`` (item ids -> boolean mask) only those rows are checked."""
    for f in _files(local_dir(uri)):
        pf = pq.ParquetFile(f)
        for i in range(pf.num_row_groups):
            cols = [ID_COL, FEATURES_COL] if keep is not None else [FEATURES_COL]
            t = pf.read_row_group(i, columns=cols)
            if keep is not None:
                t = t.filter(pa.array(keep(t.column(ID_COL).to_numpy().astype(np.int64, copy=False))))
            _as_matrix(t.column(FEATURES_COL), dim, f"{f} row group {i}")


# ---------------------------------------------------------------- batch sources


def epoch_seed(seed: int, stage: int, epoch: int) -> int:
    """The data-order seed of one epoch of one stage: nothing to store to resume it."""
    return int(_splitmix64(np.array([seed * 1_000_003 + stage * 10_007 + epoch], dtype=np.int64).view(np.uint64))[0] >> np.uint64(33))


class InMemorySource:
    """The train and validation rows kept as tensors on the device (test rows of ``train_ids``'s
    :class:`Split` are dropped here if the caller loaded them)."""

    streaming = False

    def __init__(
        self, item_ids: np.ndarray, x: np.ndarray, val_fraction: float, device: torch.device, train_ids: np.ndarray | None = None
    ) -> None:
        train, val = Split(val_fraction, train_ids).roles(item_ids)
        self.train_ids, self.val_ids = item_ids[train], item_ids[val]
        self.train = torch.from_numpy(np.ascontiguousarray(x[train])).to(device)
        self.val = torch.from_numpy(np.ascontiguousarray(x[val])).to(device)
        self.device = device

    @property
    def n_train(self) -> int:
        return len(self.train_ids)

    def batches(
        self, split: str, batch_size: int, shuffle: bool, seed: int = 0, shard: tuple[int, int] | None = None
    ) -> Iterator[torch.Tensor]:
        """Batches of ``batch_size`` rows; with ``shard=(rank, count)`` this rank's part of each such batch.

        Every rank cuts the same global batches (same seeded permutation) and keeps its contiguous
        ``1/count`` slice, so ``count`` ranks together see exactly the single-process batches.
        """
        data = self.train if split == "train" else self.val
        n = data.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device) if shuffle else None
        for s in range(0, n, batch_size):
            xb = data[order[s : s + batch_size]] if order is not None else data[s : s + batch_size]
            if shard is not None:
                xb = torch.tensor_split(xb, shard[1])[shard[0]]
            yield xb

    def validation_arrays(self) -> tuple[np.ndarray, torch.Tensor]:
        """The validation rows: their item ids (int64 array (n,)) and features (float32 tensor (n, d) on the
        device)."""
        return self.val_ids, self.val


class _ArrowColumns:
    """Petastorm's results-queue reader for batched Arrow reads, without its per-row list handling.

    Petastorm 0.12 turns a list column into a pandas Series of per-row arrays and ``np.vstack``s
    them, on the consumer thread and under the GIL: more time than the whole shuffle. A fixed-width
    list<float> column is one contiguous value buffer, so it is viewed as an ``(n, d)`` matrix
    instead (``_as_matrix``; no NaN check here: ``open_source`` scanned the table first). Installed
    by :func:`row_groups` only over the class it replaces.
    """

    batched_output = True

    def read_next(self, workers_pool, schema, ngram):  # noqa: ANN001, ANN201 - Petastorm's interface
        from petastorm.workers_pool import EmptyResultError

        try:
            table = workers_pool.get_results()
        except EmptyResultError:
            raise StopIteration from None
        cols = {}
        for name in table.column_names:
            col = table.column(name)
            if pa.types.is_list(col.type):
                first = col.chunk(0) if col.num_chunks else pa.array([], col.type)
                dim = len(first[0]) if len(first) else 0
                cols[name] = _as_matrix(col, dim, f"{name} column", check_finite=False) if dim else np.zeros((0, 0), np.float32)
            else:
                cols[name] = col.to_numpy()
        return schema.make_namedtuple(**cols)


def _lower_priority(threads: list) -> None:  # noqa: ANN001 - Petastorm's worker threads
    """Let the training threads win a core over the reader's decoding.

    With as many torch threads as cores, a decoding thread that preempts one of them stalls the
    other at the next barrier, so a reader core-second cost two. Niced, the decoding runs in the
    gaps (and when the trainer waits for data), at no cost where cores are spare (GPU hosts).
    """
    for t in threads:
        tid = getattr(t, "native_id", None)
        if tid:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, READER_NICE)
            except OSError:  # not Linux, or not permitted: only the priority is lost
                return


@contextmanager
def _petastorm_url(uri: str) -> Iterator[str]:
    """The URL to hand Petastorm for table ``uri``. Petastorm splits it with ``urlparse`` and never
    unquotes it, so a local path holding ``#``, ``?`` or ``;`` would lose its tail (``run #1`` reads
    ``run ``); such a table is handed over through a symbolic link with a plain name instead."""
    url = to_uri(uri)
    path = url[len("file://") :] if url.startswith("file://") else None
    if path is None or not any(c in path for c in "#?;"):
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="sae-petastorm-") as tmp:
        link = Path(tmp) / "table"
        link.symlink_to(path, target_is_directory=True)
        yield "file://" + str(link)


@contextmanager
def row_groups(
    uri: str,
    shuffle: bool,
    seed: int,
    workers: int = 2,
    shard: int | None = None,
    shard_count: int | None = None,
    cache: tuple[str, int, int] | None = None,
) -> Iterator[Iterator[tuple[np.ndarray, np.ndarray]]]:
    """Petastorm's ``make_batch_reader``: one ``(item_ids int64 (n,), features float32 (n, d))`` per row group.

    ``shuffle=False`` reads with one worker in natural order (deterministic); ``shuffle=True`` shuffles
    row groups with ``seed``. Shards are whole row groups. ``cache=(dir, size limit bytes, row size
    bytes)`` uses Petastorm's local-disk cache: a row group is decoded from Parquet once and later
    read back as Arrow buffers, which costs a copy instead of the list decoding. Always stops the reader.
    """
    from petastorm import make_batch_reader
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader

    # Petastorm 0.12 on pyarrow 14 warns about its legacy dataset API on every open: noise, not news.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\..*")
    # Row groups arrive as read-only views of Arrow buffers; batches are gathered from them, never written.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    with _petastorm_url(uri) as url:
        reader = make_batch_reader(
            url,
            schema_fields=[ID_COL, FEATURES_COL],
            reader_pool_type="thread",
            workers_count=max(1, workers) if shuffle else 1,
            shuffle_row_groups=shuffle,
            seed=seed,
            num_epochs=1,
            cur_shard=shard,
            shard_count=shard_count,
            shard_seed=seed if shard_count else None,
            **(
                dict(cache_type="local-disk", cache_location=cache[0], cache_size_limit=cache[1], cache_row_size_estimate=cache[2])
                if cache
                else {}
            ),
        )
        if type(getattr(reader, "_results_queue_reader", None)) is ArrowReaderWorkerResultsQueueReader:
            reader._results_queue_reader = _ArrowColumns()
        _lower_priority(getattr(reader._workers_pool, "_workers", []))
        try:
            yield ((np.asarray(getattr(r, ID_COL), dtype=np.int64), getattr(r, FEATURES_COL)) for r in reader)
        finally:
            reader.stop()
            reader.join()


def batches_from_row_groups(
    groups: Iterator[tuple[np.ndarray, np.ndarray]],
    keep: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    generator: torch.Generator | None,
    window_rows: int,
) -> Iterator[torch.Tensor]:
    """Batches of exactly ``batch_size`` rows (the last one shorter), each row copied once.

    Petastorm's ``BatchedDataLoader`` shuffling buffer copies every row three times on the training
    thread (compact, append, gather). Here the kept rows of a window of whole row groups are
    permuted as indices only (``generator``; None keeps the natural order), and each batch is
    gathered straight from the row-group matrices. Rows within a batch come grouped by row group:
    the loss is a mean over the batch, so only which rows share a batch matters. Rows left over at
    the end of a window join the next one.
    """
    pool: list[tuple[torch.Tensor, torch.Tensor]] = []  # (row-group matrix, indices of its rows still to serve)
    n_pool = 0

    def drain(final: bool) -> Iterator[torch.Tensor]:
        nonlocal pool, n_pool
        offsets = torch.tensor(np.cumsum([0] + [len(r) for _, r in pool]))
        order = torch.randperm(n_pool, generator=generator) if generator is not None else torch.arange(n_pool)
        full = n_pool if final else n_pool - n_pool % batch_size
        dim = pool[0][0].shape[1]

        def split(sel: torch.Tensor) -> list[tuple[slice, torch.Tensor, torch.Tensor]]:
            """Window positions -> (their span once sorted, row-group matrix, its rows) per row group hit."""
            sel, _ = sel.sort()
            seg = torch.searchsorted(sel, offsets).tolist()
            return [
                (slice(seg[i], seg[i + 1]), m, rows[sel[seg[i] : seg[i + 1]] - offsets[i]])
                for i, (m, rows) in enumerate(pool)
                if seg[i + 1] > seg[i]
            ]

        for s in range(0, n_pool, batch_size):
            parts = split(order[s : s + batch_size])
            if s >= full:  # the rest: carried into the next window
                pool, n_pool = [(m, rows) for _, m, rows in parts], n_pool - s
                return
            out = torch.empty((min(batch_size, n_pool - s), dim), dtype=torch.float32)
            for span, m, rows in parts:
                torch.index_select(m, 0, rows, out=out[span])
            yield out
        pool, n_pool = [], 0

    for ids, x in groups:
        rows = np.flatnonzero(keep(ids))
        if len(rows) == 0:
            continue
        pool.append((torch.from_numpy(x), torch.from_numpy(rows)))
        n_pool += len(rows)
        if n_pool >= window_rows:
            yield from drain(final=False)
    if n_pool:
        yield from drain(final=True)


class StreamingSource:
    """Reads ``features/`` through Petastorm each epoch; keeps the rows of its :class:`Split`'s role
    (``train_ids``: the training split, None = every item) and drops the others before any batch."""

    streaming = True

    def __init__(
        self,
        uri: str,
        info: TableInfo,
        val_fraction: float,
        device: torch.device,
        workers: int,
        cache_mb: int = 0,
        train_ids: np.ndarray | None = None,
    ) -> None:
        self.uri, self.info, self.val_fraction, self.device, self.workers = uri, info, val_fraction, device, workers
        self.split = Split(val_fraction, train_ids)
        self.n_train = None  # unknown until one pass; only used for progress totals
        # Petastorm's local-disk cache of decoded row groups, removed with this source (or at exit).
        self._cache_dir = tempfile.TemporaryDirectory(prefix="sae-reader-cache-") if cache_mb > 0 else None
        self.cache = (self._cache_dir.name, cache_mb * 2**20, info.dim * 4 + 64) if self._cache_dir else None

    def batches(
        self, split: str, batch_size: int, shuffle: bool, seed: int = 0, shard: tuple[int, int] | None = None
    ) -> Iterator[torch.Tensor]:
        """Batches through Petastorm; with ``shard=(rank, count)`` this rank's row groups only.

        Shards are whole row groups (Petastorm's unit), so they are uneven: each rank cuts batches of
        ``ceil(batch_size / count)`` rows from its shard and the trainer lets a rank that ran out join
        the remaining steps with zero gradients. A rank whose shard has no row group gets no batches.
        Shuffled, rows are mixed within windows of at least ``SHUFFLE_WINDOW_BATCHES`` batches of
        whole row groups (row groups themselves come in a seeded random order).
        """
        from petastorm.errors import NoDataAvailableError

        role = 1 if split != "train" else 0
        cur, count = shard if shard is not None else (None, None)
        if count:
            batch_size = math.ceil(batch_size / count)

        def keep(ids: np.ndarray) -> np.ndarray:
            # No NaN check per batch: open_source scanned this (resolved, so pinned) table version.
            return self.split.roles(ids)[role]

        gen = torch.Generator().manual_seed(seed) if shuffle else None
        window = batch_size * SHUFFLE_WINDOW_BATCHES if shuffle else batch_size
        with ExitStack() as stack:
            try:
                groups = stack.enter_context(row_groups(self.uri, shuffle, seed, self.workers, cur, count, self.cache))
            except NoDataAvailableError:
                log.warning("features table %s: no row group for shard %s of %s (fewer row groups than ranks)", self.uri, cur, count)
                return
            for xb in batches_from_row_groups(groups, keep, batch_size, gen, window):
                yield xb.to(self.device, non_blocking=True)

    def validation_arrays(self) -> tuple[np.ndarray, torch.Tensor]:
        """The validation rows, read through every row group of the table: their item ids (int64 array (n,))
        and features (float32 tensor (n, d) on the device)."""
        ids, xs = [], []
        with row_groups(self.uri, False, 0, 1, cache=self.cache) as groups:
            for g_ids, x in groups:
                mask = self.split.roles(g_ids)[1]
                ids.append(g_ids[mask])
                xs.append(torch.from_numpy(x[mask]))
        return np.concatenate(ids), torch.cat(xs).to(self.device)


def open_source(
    uri: str,
    dim: int,
    val_fraction: float,
    device: torch.device,
    in_memory_max_mb: int,
    workers: int,
    cache_mb: int = 0,
    split: Split | None = None,
) -> InMemorySource | StreamingSource:
    """Check the table, then keep it on the device if it fits ``in_memory_max_mb``, else stream it.

    ``split`` (:func:`read_split`; None = the hash split of ``val_fraction`` alone): rows outside its
    training split are test rows, never loaded, checked, batched or validated on. Raises
    ``DataError`` when the table breaks the contract or the split keeps none of its rows."""
    split = split or Split(val_fraction)
    info = inspect_table(uri, dim)
    keep = split.in_training_split if split.has_test else None
    if info.nbytes <= in_memory_max_mb * 1024 * 1024:
        ids, x = load_table(uri, dim, keep)
        if len(ids) == 0:
            raise DataError(f"features table {uri}: no row is in the training split (train.split_column)")
        log.info("features: %d of %d rows x %d loaded onto %s", len(ids), info.rows, dim, device)
        return InMemorySource(ids, x, split.val_fraction, device, split.train_ids)
    scan_stats(uri, dim, keep)
    log.info("features: %d rows x %d (%.1f MB) > train.in_memory_max_mb, streaming", info.rows, dim, info.nbytes / 2**20)
    return StreamingSource(uri, info, split.val_fraction, device, workers, cache_mb, split.train_ids)


def read_label_column(items_uri: str | None) -> tuple[pd.Series | None, str]:
    """The labels of ``items/``: its ``label`` column (one class per item), else ``genres``, as a
    pandas Series indexed by ``item_id`` (first row per id), and the column's name;
    ``(None, "none")`` without a table or either column. The one reader of labels
    (``read_labels``, ``sae_model.evaluation.read_label_sets``)."""
    if not items_uri:
        return None, "none"
    root = local_dir(items_uri)
    files = _files(root) if root.exists() else []
    if not files:
        return None, "none"
    names = pq.read_schema(files[0]).names
    col = "label" if "label" in names else "genres" if "genres" in names else None
    if col is None or ID_COL not in names:
        return None, "none"
    t = pa.concat_tables(pq.read_table(f, columns=[ID_COL, col]) for f in files).to_pandas()
    return t.drop_duplicates(ID_COL).set_index(ID_COL)[col], col


def read_labels(items_uri: str | None, item_ids: np.ndarray) -> np.ndarray | None:
    """A label per item for colouring maps: ``label``, else the first genre; None when there is none."""
    s, col = read_label_column(items_uri)
    if s is None:
        return None
    if col == "genres":
        s = s.fillna("").astype(str).str.split("|").str[0]
    return s.reindex(item_ids).to_numpy()
