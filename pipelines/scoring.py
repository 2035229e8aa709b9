"""Batch scoring in Spark: ``features/`` rows -> model codes (or a hidden layer's activations).

Two routes, same result:

* ``score(spark, df, ...)``: any DataFrame. The features column reaches each Python worker as
  Arrow record batches (``mapInArrow``); the fixed-width list values are viewed as one ``(n, d)``
  float32 matrix without building Python objects, encoded in one call, and written back as an
  Arrow list column.
* ``score_parquet(spark, path, ...)``: a Parquet table (the published ``features/``). Spark
  schedules one task per Parquet row group and each Python worker reads its row group with
  pyarrow. The 1,128-wide vectors then never pass through the JVM, whose row-by-row Arrow
  conversion of array columns cost more CPU than the encoding itself (benchmarks/bench_infer.py).

Either way the model is loaded once per Python worker process (Spark reuses workers) and kept for
later batches and tasks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from sae_model.registry import ResolvedModel

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 16384


@functools.lru_cache(maxsize=4)
def _encoder(load_uri: str, tracking_uri: str, threads: int):  # noqa: ANN202 - sae_model.loading.Encoder
    """One Encoder per (model, worker process): Spark reuses Python workers across tasks."""
    import torch

    from sae_model.loading import load_encoder

    if threads > 0:
        torch.set_num_threads(threads)
    if tracking_uri and not Path(load_uri).is_dir():
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    log.info("worker %d loading model %s", os.getpid(), load_uri)
    return load_encoder(load_uri)


def worker_threads(spark: SparkSession) -> int:
    """Torch threads per Python worker so that concurrent tasks together fill, not oversubscribe, the cores."""
    conf = spark.sparkContext.getConf()
    task_cpus = int(conf.get("spark.task.cpus", "1"))
    return max(1, task_cpus)


def score(
    spark: SparkSession,
    features: DataFrame,
    model: ResolvedModel | str,
    layer: int = -1,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    threads: int = 0,
) -> DataFrame:
    """``features`` (item_id, features) -> (item_id long, code array<float>) with the model's ``layer``.

    ``batch_rows`` sets ``spark.sql.execution.arrow.maxRecordsPerBatch`` for the session: large
    batches amortise the per-batch overhead of encoding. ``threads``: torch threads per worker
    (0 = ``spark.task.cpus``, i.e. one per concurrently running task).
    """
    import mlflow

    if isinstance(model, str):
        model = ResolvedModel(uri=model, run_id=None, version=None)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(int(batch_rows)))
    load_uri = model.load_uri
    tracking_uri = mlflow.get_tracking_uri()
    nthreads = threads or worker_threads(spark)

    def encode_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        enc = _encoder(load_uri, tracking_uri, nthreads)
        for batch in batches:
            n = batch.num_rows
            if n == 0:
                continue
            x = matrix(batch.column("features"), enc.input_width)
            codes = enc.encode(x, layer=layer)
            yield pa.RecordBatch.from_arrays(
                [batch.column("item_id"), list_column(codes)], schema=_ARROW_CODES
            )

    return features.select("item_id", "features").mapInArrow(encode_batches, _CODE_SCHEMA)


@dataclass(frozen=True)
class RowGroup:
    """One unit of scoring work: a row group of one Parquet file."""

    path: str  # as pyarrow's filesystem names it
    index: int
    rows: int


def parquet_row_groups(path: str) -> tuple[str, list[RowGroup]] | None:
    """``(filesystem URI, row groups)`` of the Parquet table at ``path``; None if pyarrow can't read it.

    Local paths are resolved first, so a table whose version link is swapped while we score is
    read whole from the version we planned on. Files named ``_*`` or ``.*`` (markers, manifests)
    are skipped, as Spark skips them.
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    if "://" not in path or path.startswith("file:"):
        path = os.path.realpath(path.removeprefix("file://").removeprefix("file:"))
    try:
        fs, base = pafs.FileSystem.from_uri(path if "://" in path else f"file://{path}")
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except (pa.ArrowException, OSError, ValueError) as e:
        log.info("pyarrow cannot list %s (%s); scoring through Spark's reader", path, e)
        return None
    groups: list[RowGroup] = []
    for info in sorted(infos, key=lambda i: i.path):
        rel = info.path[len(base) :].lstrip("/")
        if info.type != pafs.FileType.File or any(part[:1] in "_." for part in rel.split("/")):
            continue
        with fs.open_input_file(info.path) as f:
            meta = pq.ParquetFile(f).metadata
        groups += [RowGroup(info.path, i, meta.row_group(i).num_rows) for i in range(meta.num_row_groups)]
    uri = f"file://{base}" if isinstance(fs, pafs.LocalFileSystem) else path
    return uri, [g for g in groups if g.rows]


def score_parquet(
    spark: SparkSession,
    path: str,
    model: ResolvedModel | str,
    layer: int = -1,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    threads: int = 0,
) -> DataFrame:
    """Like :func:`score` on ``spark.read.parquet(path)``, with each row group read by the Python worker.

    Falls back to :func:`score` where pyarrow cannot open ``path`` (a filesystem only Hadoop knows).
    """
    import mlflow
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    planned = parquet_row_groups(path)
    if planned is None:
        return score(spark, spark.read.parquet(path), model, layer, batch_rows, threads)
    fs_uri, groups = planned
    if isinstance(model, str):
        model = ResolvedModel(uri=model, run_id=None, version=None)
    load_uri = model.load_uri
    tracking_uri = mlflow.get_tracking_uri()
    nthreads = threads or worker_threads(spark)
    batch_rows = int(batch_rows)

    def encode_row_groups(tasks: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        enc = _encoder(load_uri, tracking_uri, nthreads)
        fs = pafs.FileSystem.from_uri(fs_uri)[0]
        for task in tasks:
            for file, index in zip(
                task.column("path").to_pylist(), task.column("row_group").to_pylist(), strict=True
            ):
                with fs.open_input_file(file) as f:
                    batches = pq.ParquetFile(f).iter_batches(
                        batch_size=batch_rows,
                        row_groups=[index],
                        columns=["item_id", "features"],
                        use_threads=False,
                    )
                    for batch in batches:
                        codes = enc.encode(matrix(batch.column("features"), enc.input_width), layer=layer)
                        ids = batch.column("item_id").cast(pa.int64())
                        yield pa.RecordBatch.from_arrays([ids, list_column(codes)], schema=_ARROW_CODES)

    # One row group per task: Spark balances the tasks over the cores and retries a failed one alone.
    task_schema = T.StructType(
        [T.StructField("path", T.StringType()), T.StructField("row_group", T.IntegerType())]
    )
    tasks = spark.createDataFrame(
        spark.sparkContext.parallelize([(g.path, g.index) for g in groups], max(1, len(groups))), task_schema
    )
    return tasks.mapInArrow(encode_row_groups, _CODE_SCHEMA)


_CODE_SCHEMA = T.StructType(
    [
        T.StructField("item_id", T.LongType(), False),
        T.StructField("code", T.ArrayType(T.FloatType(), False), False),
    ]
)

_ARROW_CODES = pa.schema(
    [pa.field("item_id", pa.int64(), False), pa.field("code", pa.list_(pa.float32()), False)]
)


def matrix(column: pa.Array, width: int) -> np.ndarray:
    """A fixed-width Arrow list<float> column as an ``(n, width)`` float32 matrix, copying at most once."""
    n = len(column)
    values = column.flatten()  # respects slicing offsets, unlike .values
    if len(values) != n * width or column.null_count:
        lengths = column.value_lengths().to_numpy(zero_copy_only=False)
        bad = int(np.flatnonzero(lengths != width)[0]) if (lengths != width).any() else -1
        raise ValueError(
            f"features: every vector must have {width} values; row {bad} has "
            f"{lengths[bad] if bad >= 0 else 'null'} (re-run ingest or check the model's input width)"
        )
    arr = values.to_numpy(zero_copy_only=False)
    return np.asarray(arr, dtype=np.float32).reshape(n, width)


def list_column(x: np.ndarray) -> pa.ListArray:
    """An ``(n, w)`` float32 matrix as an Arrow list<float> column (no per-row objects)."""
    n, w = x.shape
    offsets = pa.array(np.arange(0, (n + 1) * w, w, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(x, dtype=np.float32).reshape(-1)))
