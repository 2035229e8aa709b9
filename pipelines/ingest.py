"""Ingest core: run the configured source, check its tables, publish them atomically with a manifest.

``check_inputs(cfg)`` runs before Spark starts; ``run_ingest(spark, cfg)`` writes ``features/``,
``items/``, ``quarantine/`` (and any extra tables of the source) under ``paths.root`` and returns the
manifest, also stored as ``features/_manifest.json``.
"""

from __future__ import annotations

import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from pipelines.config import Config
from pipelines.publish import publishing
from pipelines.schemas import FEATURES, QUARANTINE, SchemaError, check_columns, conform
from pipelines.sources import SOURCES, InputError, Source, SourceResult

# Registers the built-in sources. A new source module adds itself here.
from pipelines.sources import documents, events, jdbc, mnist, synthetic, table, tag_genome  # noqa: F401, E402  isort: skip

log = logging.getLogger(__name__)

TABLES = ["features", "items", "quarantine"]


def source_for(cfg: Config) -> Source:
    """The ingest ``Source`` registered for ``data.source``. Raises ``InputError`` when none is."""
    try:
        return SOURCES[cfg.data.source]
    except KeyError:
        raise InputError(
            f"data.source {cfg.data.source!r} has no ingest source yet; available: {sorted(SOURCES)}"
        ) from None


def check_inputs(cfg: Config) -> None:
    """Missing files, wrong headers, empty input: InputError naming the file, before any output."""
    source_for(cfg).check(cfg)


def run_ingest(spark: SparkSession, cfg: Config) -> dict[str, Any]:
    """Read, validate and publish; returns the manifest. Nothing is published unless every table was
    written and the counts reconcile (rows_in == rows_used + rows_quarantined).

    A file that Spark finds damaged only while reading it (a ``.gz`` that is not gzip or is cut
    short, on a path the source could not check beforehand) or a database value its driver cannot
    convert raises InputError with the file or value named (see :func:`read_failure`)."""
    result = source_for(cfg).read(spark, cfg)
    try:
        return publish_result(spark, result, cfg)
    except Exception as exc:
        reason = read_failure(exc)
        if reason is None:
            raise
        raise InputError(reason) from None
    finally:
        result.cleanup()


# Java exceptions that mean the input itself is bad, not the job or the machine.
_INPUT_FAULTS = ("java.io.EOFException", "java.util.zip.ZipException", "java.sql.SQLException",
                 "org.postgresql.util.PSQLException", "java.lang.NumberFormatException",
                 "java.lang.ArithmeticException", "java.nio.charset.MalformedInputException")
_FILE = re.compile(r"reading file (\S+?)\.?(?:\s|$)")


def read_failure(exc: BaseException) -> str | None:
    """One line for a Spark job that failed on a damaged input: the file Spark names (its
    FAILED_READ_FILE error) and the innermost cause, e.g. ``file:/in/tags.csv.gz: java.io.EOFException:
    Unexpected end of input stream``. None for any other failure, which is re-raised as is."""
    java = getattr(exc, "java_exception", None)
    if java is None:
        return None
    chain, e = [], java
    while e is not None and len(chain) < 32:
        chain.append(str(e.toString()))
        nxt = e.getCause()
        e = None if nxt is None or nxt == e else nxt
    text = "\n".join(chain)
    if not any(fault in text for fault in _INPUT_FAULTS):
        return None
    innermost = chain[-1].strip().splitlines()[0] if chain[-1].strip() else chain[-1]
    where = _FILE.search(text)
    return f"{where.group(1)}: {innermost}" if where else f"cannot read the input: {innermost}"


def publish_result(spark: SparkSession, result: SourceResult, cfg: Config) -> dict[str, Any]:
    """Write ``result`` as a new version of the ``ingest`` set under ``paths.root`` (``features``: item_id
    long, features array<float>; ``items``; ``quarantine``: source_file, raw, reason strings; and the
    source's extra tables) and return the features manifest, also written as ``features/_manifest.json``.
    Raises ``SchemaError`` when a table lacks its contracted columns, or the features have mixed widths,
    null/NaN elements or repeated ids; RuntimeError when rows in != rows used + quarantined. Nothing is
    published on error."""
    check_columns(result.features, FEATURES, "features")
    check_columns(result.quarantine, QUARANTINE, "quarantine")
    if "item_id" not in result.items.columns:
        raise SchemaError("items: missing column 'item_id' (bigint)")
    root = cfg.paths.root
    meta = {"job": "ingest", "config_hash": cfg.hash()}
    with publishing(root, TABLES + sorted(result.extra_tables), spark, meta=meta, keep=cfg.publish.keep) as pub:
        features_dir = pub.staging("features")
        # First and alone: this job materialises the source's cached aggregate the others read.
        # Not conform(): a cast cannot drop array<float>'s containsNull; null elements are counted below.
        result.features.select(F.col("item_id").cast("long"), "features").write.parquet(features_dir)
        frames = {"items": result.items, "quarantine": conform(result.quarantine, QUARANTINE), **result.extra_tables}
        targets = {name: (df, pub.staging(name)) for name, df in frames.items()}
        written = spark.read.parquet(features_dir)

        def write(name: str, df: DataFrame, path: str) -> int | None:
            df.write.parquet(path)
            # The quarantine's rows as written (the counts must reconcile), counted in the same thread.
            return spark.read.parquet(path).count() if name == "quarantine" else None

        # The other tables and the checks of the written features are small jobs that each leave a
        # core idle part of the time; submitted together, Spark runs them side by side.
        with ThreadPoolExecutor(max_workers=len(targets) + 1, thread_name_prefix="ingest-write") as pool:
            writes = {name: pool.submit(write, name, df, path) for name, (df, path) in targets.items()}
            summary = pool.submit(vector_summary, written, len(result.feature_names))
            counts = {name: w.result() for name, w in writes.items()}
            summary_out = summary.result()
        quarantine_rows = counts["quarantine"]
        manifest = build_manifest(written, result, cfg, quarantine_rows, summary_out)
        # Where this very version lies: a downstream reader pins it instead of following features/.
        manifest["publication"] = {"set": pub.set_name, "version": pub.version, "path": pub.path}
        write_text(spark, f"{features_dir}/_manifest.json", json.dumps(manifest, indent=1))
    return manifest


def build_manifest(
    features: DataFrame, result: SourceResult, cfg: Config, rows_quarantined: int, summary: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Check the written features (fixed width, unique ids) and describe them (``summary``: a
    ``vector_summary`` of ``features`` already computed)."""
    dim = len(result.feature_names)
    summary = summary if summary is not None else vector_summary(features, dim)
    items_out = int(summary["n"])
    if items_out and (summary["min_w"] != dim or summary["max_w"] != dim):
        raise SchemaError(
            f"features: vector width {summary['min_w']}..{summary['max_w']}, expected {dim} (len(feature_names))"
        )
    if summary["holes"]:
        raise SchemaError(f"features: {summary['holes']} vectors contain null or NaN values")
    if summary["ids"] != items_out:
        raise SchemaError(f"features: item_id not unique ({items_out} rows, {summary['ids']} distinct ids)")
    rows_in = int(result.rows_in())
    rows_used = int(result.rows_used()) if result.rows_used else items_out
    if rows_in != rows_used + rows_quarantined:
        raise RuntimeError(
            f"counts do not reconcile: rows_in {rows_in} != rows used {rows_used} + quarantined {rows_quarantined}"
        )
    stats = summary["stats"] if items_out else {"min": [], "max": [], "mean": []}
    return {
        "source": cfg.data.source,
        "input_files": result.input_files,
        "rows_in": rows_in,
        "rows_used": rows_used,
        "items_out": items_out,
        "rows_quarantined": rows_quarantined,
        "dim": dim,
        "feature_names": result.feature_names,
        "stats": stats,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config_hash": cfg.hash(),
        **result.extra,
        **(result.report() if result.report else {}),
    }


def vector_summary(features: DataFrame, dim: int) -> dict[str, Any]:
    """Row count, distinct ids, min/max vector width, vectors with null or NaN values and the
    per-dimension min/max/mean of the written table, in the JVM: one aggregate for the checks and
    one for the statistics, run side by side (each small job leaves a core idle part of the time).
    The statistics count only when the checks pass. Only 3 x ``dim`` numbers reach the driver.

    The statistics group the exploded elements by position: compiled, 0.07-0.1 s for 5 M elements
    where ``Summarizer`` (a UDF that boxes every element on its way to a vector) took 0.4-0.5 s;
    a Python pass paid a worker's start-up."""
    width = F.coalesce(F.size("features"), F.lit(-1))
    # array_contains(a, NaN) is true with a NaN, null without one but with a null element, false
    # for a clean vector: one compiled scan finds both kinds of hole.
    hole = F.coalesce(F.array_contains("features", F.lit(float("nan"))), F.lit(True))
    checks = features.agg(
        F.count("*").alias("n"),
        F.countDistinct("item_id").alias("ids"),
        F.min(width).alias("min_w"),
        F.max(width).alias("max_w"),
        F.count_if(F.col("features").isNotNull() & hole).alias("holes"),
    )
    per_dim = (
        features.select(F.posexplode("features"))
        .groupBy("pos")
        .agg(F.min("col").alias("min"), F.max("col").alias("max"), F.avg("col").alias("mean"))
    )
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-stats") as pool:
        stats = pool.submit(per_dim.collect)
        row = checks.first()
        out: dict[str, Any] = {k: (int(row[k]) if row[k] is not None else None) for k in ("n", "ids", "min_w", "max_w", "holes")}
        rows = sorted(stats.result(), key=lambda r: r["pos"])
        if out["n"] and out["min_w"] == out["max_w"] == dim and not out["holes"]:
            out["stats"] = {k: [float(r[k]) for r in rows] for k in ("min", "max", "mean")}
    return out


def write_text(spark: SparkSession, path: str, text: str) -> None:
    """A small text file on any Hadoop filesystem (local paths included)."""
    jvm = spark._jvm
    hpath = jvm.org.apache.hadoop.fs.Path(path if "://" in path else f"file://{path}")
    fs = hpath.getFileSystem(spark._jsc.hadoopConfiguration())
    out = fs.create(hpath, True)
    try:
        out.write(bytearray(text.encode("utf-8")))
    finally:
        out.close()
