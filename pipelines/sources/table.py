"""Any Spark-readable table -> one vector per id (``data.source=table``).

``data.input`` is a Parquet, CSV, ORC or JSON-lines file or folder, or (``data.table.format=catalog``)
a table name in Spark's catalog. Reader options (CSV ``header``, ``sep``, ``quote``, ``escape``,
``encoding``, ...) come from ``data.options``. The table is shaped by ``pipelines.sources.shaping``,
the code the JDBC source uses: wide, long ``(id, feature, value)`` or array.

Ids: an integer id column is the item id. Other ids (``id_type``) are mapped to a stable ``long``
(``shaping.stable_id``: the same string gives the same id on every run) and published beside it in
``items/`` as ``source_id`` -- the mapping. ``metadata_columns`` go to ``items/``, and
``label_column`` as ``label``, the column evaluation and the maps use. ``data.limit`` keeps the
vectors of the N smallest item ids (of each load); the rows of the others are quarantined as beyond it.

Partitioned input (``KEY=VALUE/`` folders, e.g. ``date=2024-01-31/``) loads incrementally, as the
log sources do: the ``loads`` table under ``paths.root`` (published with the features) lists the
partitions loaded; a run reads only the others (from ``data.since`` on for ``date=``), keeps each
id's row(s) of its latest partition (its earlier rows are quarantined as superseded), and merges
the new vectors into the published ``features/`` and ``items/`` (a new row replaces an id's old
vector). Counts are of this load's rows; a run with no new partition republishes the same tables
with ``rows_in`` 0. A change of the feature names between loads is an input error: rebuild with
``data.table.incremental=false``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.publish import is_local, local_path, table_path
from pipelines.schemas import QUARANTINE
from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.shaping import shaped, stable_id

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "orc", "json", "catalog")
EXTENSIONS = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "csv", ".orc": "orc",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
}
# CSV defaults a user can override in data.options: a header line, RFC 4180 quoting, every field a
# string. No schema inference: one bad number would make its column a string column and drop it from
# the inferred features silently; read as strings, it is a quarantined row naming the column.
CSV_DEFAULTS = {"header": "true", "quote": '"', "escape": '"', "mode": "PERMISSIVE"}


def _data_files(base: Path) -> list[Path]:
    return sorted(
        p for p in base.rglob("*")
        if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(base).parts)
    )


def table_format(input_path: str, fmt: str, key: str) -> str:
    """The reader format: ``fmt`` if set, else from the extension of ``input_path`` (or of the data
    files under it). InputError naming ``key`` when neither says."""
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"{key}: unknown format {fmt!r}; choose one of {list(FORMATS)}")
        return fmt
    if not is_local(input_path):
        suffix = "".join(Path(input_path.rstrip("/")).suffixes[-2:]).replace(".gz", "")
        if suffix in EXTENSIONS:
            return EXTENSIONS[suffix]
        raise InputError(f"{input_path}: cannot tell the format from the name; set {key}")
    base = local_path(input_path)
    if not base.exists():
        raise InputError(f"{base}: does not exist (data.input)")
    files = [base] if base.is_file() else _data_files(base)
    if not files:
        raise InputError(f"{base}: no data files under it (data.input)")
    kinds = {EXTENSIONS.get(f.suffix if f.suffix != ".gz" else Path(f.stem).suffix) for f in files}
    kinds.discard(None)
    if len(kinds) != 1:
        raise InputError(
            f"{base}: cannot tell the format from the file names ({sorted(k for k in kinds if k) or 'no known extension'}); set {key}"
        )
    return kinds.pop()


def read_table(spark: SparkSession, input_path: str, fmt: str, options: dict[str, str]) -> DataFrame:
    """The input as a DataFrame (``fmt`` from :func:`table_format`). Spark reads the schema here, so
    a missing or unreadable input raises InputError now, before any output is touched. A partitioned
    folder (``date=.../``) gets its partition columns, as Spark's readers give them."""
    try:
        if fmt == "catalog":
            return spark.table(input_path)
        opts = {**CSV_DEFAULTS, **options} if fmt == "csv" else dict(options)
        return spark.read.options(**opts).format(fmt).load(input_path)
    except Exception as exc:  # AnalysisException, Py4JJavaError: one line naming the input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{input_path}: cannot read it as {fmt}: {first}") from None


# ---------------------------------------------------------------- the table source

SUPERSEDED = "superseded by a later partition"
LOADS_TABLE = "loads"  # one row per partition loaded: source, load (KEY=VALUE), rows
PARTITION = re.compile(r"^[A-Za-z_][\w]*=[^/]+$")
LOADS = T.StructType(
    [
        T.StructField("source", T.StringType(), False),
        T.StructField("load", T.StringType(), False),
        T.StructField("rows", T.LongType(), False),
    ]
)


def partitions(input_path: str, since: str = "") -> list[tuple[str, str]]:
    """(KEY=VALUE, path) of the top-level partition folders of a local input, in name order (dates
    sort by time); ``date=`` partitions before ``since`` are left out. [] = not partitioned."""
    if not is_local(input_path):
        return []
    base = local_path(input_path)
    if not base.is_dir():
        return []
    found = []
    for d in sorted(base.iterdir()):
        if d.is_dir() and PARTITION.match(d.name):
            if since and d.name.startswith("date=") and d.name[len("date=") :] < since:
                continue
            found.append((d.name, str(d)))
    return found


def check_no_loose_files(base: Path) -> None:
    """InputError naming the first data file (a known extension, not ``_``/``.``-prefixed) that lies
    directly in ``base`` beside its ``KEY=VALUE/`` partitions: only partitions are read, so its rows
    would be dropped without a word (a day's file put in ``tags/`` instead of ``tags/date=.../``)."""
    loose = [p for p in sorted(base.iterdir()) if p.is_file() and not p.name.startswith(("_", "."))
             and Path(p.name.removesuffix(".gz")).suffix in EXTENSIONS]
    if loose:
        raise InputError(f"{loose[0]}: a data file beside the KEY=VALUE/ partitions of {base}, which alone are "
                         "read; move it into a partition (e.g. date=YYYY-MM-DD/) or out of the folder")


def check(cfg) -> None:
    """Before Spark: the input exists (a file, a folder or a catalog name), its format is known, and a
    partitioned folder holds no data file outside its partitions (:func:`check_no_loose_files`)."""
    tc = cfg.data.table
    if partitions(cfg.data.input):
        check_no_loose_files(local_path(cfg.data.input))
    fmt = table_format(cfg.data.input, tc.format, "data.table.format")
    if fmt == "catalog" and not cfg.data.input:
        raise InputError("data.input: the catalog table's name is empty")


def path_exists(spark: SparkSession, path: str) -> bool:
    """Whether ``path`` exists, on the local disk or any Hadoop filesystem."""
    if is_local(path):
        return Path(local_path(path)).exists()
    hpath = spark._jvm.org.apache.hadoop.fs.Path(path)
    return bool(hpath.getFileSystem(spark._jsc.hadoopConfiguration()).exists(hpath))


def _read_text(spark: SparkSession, path: str) -> str:
    # Spark's readers skip _-prefixed files such as _manifest.json: read it whole through Hadoop's FS.
    if is_local(path):
        return local_path(path).read_text(encoding="utf-8")
    jvm = spark._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path)
    stream = hpath.getFileSystem(spark._jsc.hadoopConfiguration()).open(hpath)
    try:
        return str(jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8"))
    finally:
        stream.close()


def current_path(root: str, name: str) -> str:
    """Where table ``name`` under ``root`` is now: the version directory its link points at. Read
    that, not the link: the publication swaps the link, and Spark caches a path's file listing."""
    p = table_path(root, name)
    return os.path.realpath(p) if is_local(root) else p


def _published(spark: SparkSession, root: str) -> tuple[DataFrame, DataFrame, DataFrame, list[str]] | None:
    """The features, items and loads of the last incremental load under ``root``, and its
    feature names; None when there is none."""
    loads_path = table_path(root, LOADS_TABLE)
    if not path_exists(spark, loads_path):
        return None

    names = json.loads(_read_text(spark, f"{table_path(root, 'features')}/_manifest.json"))["feature_names"]
    return (
        spark.read.parquet(current_path(root, "features")), spark.read.parquet(current_path(root, "items")),
        spark.read.schema(LOADS).parquet(current_path(root, LOADS_TABLE)), names,
    )


def prepare_ids(table: DataFrame, tc, origin: str) -> tuple[DataFrame, list[str]]:
    """The id column as the long item id, and the extra item columns: string ids (``id_type``)
    become ``shaping.stable_id`` with the original kept as ``source_id``; ``label_column`` is copied
    to ``label``."""
    if tc.id_column not in table.columns:
        raise InputError(f"table: column {tc.id_column!r} not in {origin} (columns: {table.columns}); set data.table.id_column")
    extra = []
    integral = isinstance(table.schema[tc.id_column].dataType, (T.ByteType, T.ShortType, T.IntegerType, T.LongType))
    if tc.id_type == "string" or (tc.id_type == "auto" and not integral):
        table = table.withColumn("source_id", F.col(tc.id_column).cast("string")).withColumn(
            tc.id_column, stable_id(F.col(tc.id_column).cast("string"))
        )
        extra.append("source_id")
    if tc.label_column:
        if tc.label_column not in table.columns:
            raise InputError(f"table: label column {tc.label_column!r} not in {origin} (columns: {table.columns})")
        if tc.label_column != "label":
            table = table.withColumn("label", F.col(tc.label_column))
        extra.append("label")
    return table, extra


def latest_rows(table: DataFrame, id_col: str, origin: str) -> tuple[DataFrame, DataFrame]:
    """(rows of each id's latest load, quarantine rows of its earlier loads): a partition's row for
    an id replaces that id's rows in the partitions before it. ``table`` has a ``_load`` column."""
    latest = F.max("_load").over(Window.partitionBy(id_col))
    marked = table.withColumn("_latest", latest)
    kept = marked.filter((F.col("_load") == F.col("_latest")) | F.col(id_col).isNull()).drop("_latest", "_load")
    data_cols = [c for c in table.columns if c != "_load"]
    old = marked.filter(F.col("_load") < F.col("_latest")).select(
        F.concat(F.lit(origin + "/"), F.col("_load")).alias("source_file"),
        F.to_json(F.struct(*[F.col(c) for c in data_cols])).alias("raw"),
        F.lit(SUPERSEDED).alias("reason"),
    )
    return kept, old


def read(spark: SparkSession, cfg) -> SourceResult:
    """Any Spark-readable table (or its ``date=`` partitions) -> features item_id long, features array<float>,
    items and quarantine, shaped by ``pipelines.sources.shaping``, merged with the published tables when
    partitions are loaded incrementally. Raises ``InputError`` on an unknown or unreadable format, a
    missing input, id or label column, no partition to load, or new partitions whose features differ from
    the published ones."""
    tc = cfg.data.table
    fmt = table_format(cfg.data.input, tc.format, "data.table.format")
    origin = cfg.data.input
    parts = partitions(cfg.data.input, cfg.data.since) if fmt != "catalog" else []
    extra = {"table": {"format": fmt, "shape": tc.shape}}
    if not parts:
        table, items_extra = prepare_ids(read_table(spark, cfg.data.input, fmt, cfg.data.options), tc, origin)
        tc = text_features(table, tc, items_extra)
        return shaped(table, tc, source="table", origin=origin, what=origin, extra=extra, items_extra=items_extra,
                      limit=cfg.data.limit)
    return partitioned(spark, cfg, fmt, parts, extra)


def text_features(table: DataFrame, tc, items_extra: list[str]):
    """``tc`` with ``feature_columns`` set to every column but the id, metadata and item columns
    when the table has no typed column to infer them from (CSV read as strings); else ``tc``."""
    if tc.shape != "wide" or tc.feature_columns:
        return tc
    skip = {tc.id_column, *tc.metadata_columns, *items_extra, tc.label_column}
    rest = [f for f in table.schema.fields if f.name not in skip and f.name != "_load"]
    if rest and all(isinstance(f.dataType, T.StringType) for f in rest):
        return dataclasses.replace(tc, feature_columns=[f.name for f in rest])
    return tc


def partitioned(spark: SparkSession, cfg, fmt: str, parts: list[tuple[str, str]], extra: dict) -> SourceResult:
    """KEY=VALUE/ partitions: only those not loaded yet (``incremental``), latest row per id, merged
    into the published features and items. Counts are of this load's rows."""
    tc = cfg.data.table
    origin = cfg.data.input
    before = _published(spark, cfg.paths.root) if tc.incremental else None
    done = {r["load"] for r in before[2].filter(F.col("source") == "table").collect()} if before else set()
    new = [(key, path) for key, path in parts if key not in done]
    extra["table"]["loads"] = [key for key, _ in new]
    log.info("table: %d partitions, %d new", len(parts), len(new))
    if not new:
        if before is None:
            raise InputError(f"{origin}: no partition to load")
        features, items, loads, names = before
        empty = spark.createDataFrame([], QUARANTINE)
        return SourceResult(
            features=features, items=items, quarantine=empty, feature_names=names, input_files=[origin],
            rows_in=lambda: 0, rows_used=lambda: 0, extra=extra, extra_tables={LOADS_TABLE: loads},
        )
    frames = [read_table(spark, path, fmt, cfg.data.options).withColumn("_load", F.lit(key)) for key, path in new]
    table = frames[0]
    for df in frames[1:]:
        table = table.unionByName(df, allowMissingColumns=True)
    table, items_extra = prepare_ids(table, tc, origin)
    tc = text_features(table, tc, items_extra)
    kept, superseded = latest_rows(table, tc.id_column, origin)
    superseded = superseded.persist(StorageLevel.MEMORY_AND_DISK)
    res = shaped(kept, tc, source="table", origin=origin, what=origin, extra=extra, items_extra=items_extra,
                 limit=cfg.data.limit)
    new_loads = table.groupBy(F.col("_load").alias("load")).agg(F.count("*").alias("rows")).select(
        F.lit("table").alias("source"), "load", "rows"
    )
    features, items, loads = res.features, res.items, new_loads
    if before is not None:
        old_features, old_items, old_loads, names = before
        if names != res.feature_names:
            res.cleanup()
            raise InputError(
                f"{origin}: partitions {[k for k, _ in new]} have features {res.feature_names[:5]}..., the published "
                f"ones {names[:5]}...; rebuild with data.table.incremental=false"
            )
        features = features.unionByName(old_features.join(features.select("item_id"), "item_id", "left_anti"))
        items = items.unionByName(old_items.join(items.select("item_id"), "item_id", "left_anti"), allowMissingColumns=True)
        loads = loads.unionByName(old_loads)
    new_used = res.features.count if res.rows_used is None else res.rows_used

    def cleanup() -> None:
        res.cleanup()
        superseded.unpersist()

    return SourceResult(
        features=features,
        items=items,
        quarantine=res.quarantine.unionByName(superseded),
        feature_names=res.feature_names,
        input_files=[path for _, path in new],
        rows_in=lambda: res.rows_in() + superseded.count(),
        rows_used=new_used,
        extra=extra,
        extra_tables={LOADS_TABLE: loads},
        cleanup=cleanup,
    )


register("table", check, read)
