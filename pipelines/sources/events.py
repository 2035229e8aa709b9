"""A generic event log -> one vector per entity over its tokens (``data.source=events``).

An event is a row of (entity, token[, weight][, timestamp][, event id]), the columns named by
``data.events.*``; the file is any table ``pipelines.sources.table.read_table`` reads (CSV with any
delimiter, quoting and encoding through ``data.options``; ``columns`` names the fields of a CSV
without a header). The MovieLens tags log is this with entity=movieId, token=tag.

Vector: the ``top_k`` tokens with the most events, among those with ``min_support`` events or more
(ties by token), weighted per (entity, token) from the summed event weight ``w``:
``counts`` (w), ``binary`` (1), ``tfidf`` (w / the entity's vocabulary total x smoothed idf
``ln((1 + N) / (1 + df)) + 1``, scikit-learn's ``TfidfTransformer``), ``bm25`` (Robertson & Zaragoza
2009: ``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` times ``w (k1 + 1) / (w + k1 (1 - b + b len / avglen))``,
len = the entity's vocabulary total) or ``mean_centred`` (w minus the mean of the entity's w; ratings).
The pivot is ``shaping.long_vectors``, the one the table sources use.

Incremental loads: ``events_state`` under ``paths.root`` (published with the features) keeps the
summed weights per (entity, token), the identity hash of every event loaded and the loads. A run
reads partitions not loaded yet (``KEY=VALUE/`` folders), or for a flat file, every event whose
identity is not in the state -- late events included, whatever their timestamp; events loaded
before are left out of this load's counts and reported as ``events.already_loaded``. A repeated
identity within a load is quarantined as a duplicate, as is an event of a new partition that an
earlier load already had.

Counting: ``rows_in`` = this load's events; each is used (its entity got a vector) or quarantined.
Valid events of an entity left without a vector are quarantined (no token in the vocabulary) but
stay in the state.
"""

from __future__ import annotations

import logging

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.publish import table_path
from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.shaping import long_vectors, stable_id
from pipelines.sources.table import current_path, partitions, path_exists, read_table, table_format

log = logging.getLogger(__name__)

STATE_TABLE = "events_state"
BAD_ENTITY = "null or empty entity"
EMPTY_TOKEN = "empty token"
BAD_WEIGHT = "null or non-numeric weight"
BAD_TIMESTAMP = "unparseable timestamp"
DUPLICATE = "duplicate event"
NO_VOCAB = "entity has no token in the vocabulary"

# kind pair: item_id, token, w (summed weight), n (events); kind seen: key; kind load: load, n.
STATE = T.StructType(
    [
        T.StructField("kind", T.StringType(), False),
        T.StructField("item_id", T.LongType(), True),
        T.StructField("source_id", T.StringType(), True),
        T.StructField("token", T.StringType(), True),
        T.StructField("w", T.DoubleType(), True),
        T.StructField("n", T.LongType(), True),
        T.StructField("key", T.LongType(), True),
        T.StructField("load", T.StringType(), True),
    ]
)


def check(cfg) -> None:
    """Check the ``data.events`` settings before reading: a known or inferable table format and both
    ``entity_column`` and ``token_column`` set. Raises ``InputError`` otherwise (also when the input path
    does not exist or holds no data files)."""
    ec = cfg.data.events
    table_format(cfg.data.input, ec.format, "data.events.format")
    if not ec.entity_column or not ec.token_column:
        raise InputError("data.events: entity_column and token_column must be set")


def _read(spark: SparkSession, path: str, fmt: str, cfg) -> DataFrame:
    ec = cfg.data.events
    if not ec.columns:
        return read_table(spark, path, fmt, cfg.data.options)
    df = read_table(spark, path, fmt, {**cfg.data.options, "header": "false"})
    if len(df.columns) != len(ec.columns):
        raise InputError(f"{path}: {len(df.columns)} fields, data.events.columns names {len(ec.columns)}")
    return df.toDF(*ec.columns)


def read_state(spark: SparkSession, root: str) -> DataFrame | None:
    """The published incremental state table under ``root`` (``STATE``: kind, item_id long, source_id, token,
    w double, n long, key long, load strings), or None when there is none yet."""
    path = table_path(root, STATE_TABLE)
    return spark.read.schema(STATE).parquet(current_path(root, STATE_TABLE)) if path_exists(spark, path) else None


# ---------------------------------------------------------------- pure transforms


def _timestamp(col: str) -> Column:
    # Epoch seconds or an ISO date-time; try_*: a bad value is null, not an error.
    c = F.trim(F.col(col).cast("string"))
    return F.coalesce(F.expr(f"try_cast(trim(cast(`{col}` as string)) as long)"), F.unix_seconds(F.try_to_timestamp(c)))


def parse(events: DataFrame, ec) -> DataFrame:
    """Rows -> item_id, source_id, token, w, key (identity hash), raw, load, source_file, reason
    (null = valid; duplicates of an identity within the frame after the first are reasons)."""
    for c in [ec.entity_column, ec.token_column, ec.weight_column, ec.timestamp_column, ec.event_id_column]:
        if c and c not in events.columns:
            raise InputError(f"events: column {c!r} not in the input (columns: {events.columns}); see data.events.*")
    data_cols = [c for c in events.columns if c not in ("_load", "_file")]
    ent = F.trim(F.col(ec.entity_column).cast("string"))
    integral = isinstance(events.schema[ec.entity_column].dataType, (T.IntegerType, T.LongType, T.ShortType))
    item = F.col(ec.entity_column).cast("long") if integral else stable_id(ent)
    weight = F.expr(f"try_cast(`{ec.weight_column}` as double)") if ec.weight_column else F.lit(1.0)
    ts = _timestamp(ec.timestamp_column) if ec.timestamp_column else F.lit(0).cast("long")
    ident = [ec.event_id_column] if ec.event_id_column else [
        c for c in (ec.entity_column, ec.token_column, ec.weight_column, ec.timestamp_column) if c
    ]
    parsed = events.select(
        item.alias("item_id"),
        ent.alias("source_id"),
        F.trim(F.col(ec.token_column).cast("string")).alias("token"),
        weight.alias("w"),
        ts.alias("ts"),
        F.xxhash64(*[F.col(c).cast("string") for c in ident]).alias("key"),
        F.to_json(F.struct(*[F.col(c) for c in data_cols])).alias("raw"),
        "_load",
        "_file",
    )
    nth = F.row_number().over(Window.partitionBy("key").orderBy("_load", "raw"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ENTITY))
        .when(F.col("token").isNull() | (F.col("token") == ""), F.lit(EMPTY_TOKEN))
        .when(F.col("w").isNull() | F.isnan("w"), F.lit(BAD_WEIGHT))
        .when(F.col("ts").isNull(), F.lit(BAD_TIMESTAMP))
        .when(nth > 1, F.lit(DUPLICATE))
    )
    return parsed.withColumn("reason", reason)


def merge_pairs(state: DataFrame | None, good: DataFrame) -> DataFrame:
    """item_id, source_id, token, w (summed weight), n (events) over earlier and new valid events."""
    new = good.groupBy("item_id", "token").agg(
        F.first("source_id").alias("source_id"), F.sum("w").alias("w"), F.count("*").alias("n")
    )
    if state is not None:
        new = new.unionByName(state.filter(F.col("kind") == "pair").select("item_id", "source_id", "token", "w", "n"))
    return new.groupBy("item_id", "token").agg(
        F.first("source_id", ignorenulls=True).alias("source_id"), F.sum("w").alias("w"), F.sum("n").alias("n")
    )


def vocabulary(pairs: DataFrame, top_k: int, min_support: int) -> list[tuple[str, int, int]]:
    """(token, events, entities) of the top_k tokens by events with >= min_support events, then by
    token: the feature order."""
    rows = (
        pairs.groupBy("token").agg(F.sum("n").alias("events"), F.count("*").alias("df"))
        .filter(F.col("events") >= min_support).orderBy(F.desc("events"), F.asc("token")).limit(top_k).collect()
    )
    return [(r["token"], int(r["events"]), int(r["df"])) for r in rows]


def weighted(pairs: DataFrame, vocab: list[tuple[str, int, int]], ec) -> DataFrame:
    """item_id, feature (token), value: the weighted pairs of vocabulary tokens."""
    spark = pairs.sparkSession
    index = spark.createDataFrame([(t, df) for t, _, df in vocab], "token string, df long")
    p = pairs.join(F.broadcast(index), "token")
    per = Window.partitionBy("item_id")
    w = F.col("w")
    n_items = pairs.select("item_id").distinct().count()
    if ec.weighting == "binary":
        v = F.when(w > 0, 1.0).otherwise(0.0)
    elif ec.weighting == "tfidf":
        v = w / F.sum("w").over(per) * (F.log((1.0 + n_items) / (1.0 + F.col("df"))) + 1.0)
    elif ec.weighting == "bm25":
        length = F.sum("w").over(per)
        avg = p.groupBy("item_id").agg(F.sum("w").alias("l")).agg(F.avg("l")).first()[0] or 1.0
        idf = F.log(1.0 + (F.lit(n_items) - F.col("df") + 0.5) / (F.col("df") + 0.5))
        k1, b = ec.bm25_k1, ec.bm25_b
        v = idf * w * (k1 + 1) / (w + k1 * (1 - b + b * length / F.lit(float(avg))))
    elif ec.weighting == "mean_centred":
        v = w - F.avg("w").over(per)
    else:
        v = w
    return p.select("item_id", F.col("token").alias("feature"), v.alias("value"), "source_id")


# ---------------------------------------------------------------- composition


def read(spark: SparkSession, cfg) -> SourceResult:
    """Events -> one vector per entity over its ``top_k`` tokens (weighted as ``data.events.weighting``, e.g.
    tf-idf as scikit-learn's ``TfidfTransformer``, BM25 as Robertson & Zaragoza 2009), merged with earlier
    loads when incremental: features item_id long, features array<float>; items item_id, source_id;
    quarantined events with their reason; the new state as an extra table. Raises ``InputError`` on an
    unreadable input or missing columns, when no partition is left to load, or when no token has
    ``min_support`` events."""
    ec = cfg.data.events
    fmt = table_format(cfg.data.input, ec.format, "data.events.format")
    state = read_state(spark, cfg.paths.root) if ec.incremental else None
    done = {r["load"] for r in state.filter("kind = 'load'").select("load").collect()} if state is not None else set()
    parts = partitions(cfg.data.input, cfg.data.since) if fmt != "catalog" else []
    loads = [(k, p) for k, p in parts if k not in done] if parts else [(cfg.data.input, cfg.data.input)]
    frames = [_read(spark, p, fmt, cfg).withColumn("_load", F.lit(k)).withColumn("_file", F.lit(p)) for k, p in loads]
    if not frames:
        raise InputError(f"{cfg.data.input}: no partition left to load (all are in {STATE_TABLE})")
    table = frames[0]
    for df in frames[1:]:
        table = table.unionByName(df, allowMissingColumns=True)
    events = parse(table, ec)
    already = 0
    if state is not None:
        seen = state.filter("kind = 'seen'").select("key", F.lit(True).alias("_seen"))
        events = events.join(seen, "key", "left")
        if not parts:
            # A flat file is read whole each time: events loaded before are not this load's.
            events = events.persist(StorageLevel.MEMORY_AND_DISK)
            already = events.filter("_seen").count()
            events = events.filter(F.col("_seen").isNull())
        else:
            events = events.withColumn("reason", F.coalesce("reason", F.when(F.col("_seen"), F.lit(DUPLICATE))))
        events = events.drop("_seen")
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    good = events.filter(F.col("reason").isNull())
    pairs = merge_pairs(state, good).persist(StorageLevel.MEMORY_AND_DISK)
    vocab = vocabulary(pairs, ec.top_k, ec.min_support)
    if not vocab:
        events.unpersist()
        pairs.unpersist()
        raise InputError(f"{cfg.data.input}: no token has data.events.min_support={ec.min_support} events")
    names = [t for t, _, _ in vocab]
    rows = weighted(pairs, vocab, ec).withColumn("reason", F.lit(None).cast("string")).withColumn(
        "meta", F.struct("source_id")
    )
    vecs = long_vectors(rows, names, fill=True).persist(StorageLevel.MEMORY_AND_DISK)
    features = vecs.select("item_id", F.transform("vec", lambda x: x.cast("float")).alias("features"))
    items = vecs.select("item_id", F.col("meta.source_id").alias("source_id"))
    has_vec = vecs.select("item_id", F.lit(True).alias("_vec"))
    unused = good.join(has_vec, "item_id", "left").filter(F.col("_vec").isNull())
    quarantine = events.filter(F.col("reason").isNotNull()).select(
        F.col("_file").alias("source_file"), "raw", "reason"
    ).unionByName(unused.select(F.col("_file").alias("source_file"), "raw", F.lit(NO_VOCAB).alias("reason")))
    new_state = (
        pairs.select(F.lit("pair").alias("kind"), "item_id", "source_id", "token", "w", "n")
        # Every event's identity, quarantined ones too: a flat file re-read does not count them again.
        .unionByName(events.select(F.lit("seen").alias("kind"), "key").distinct(), allowMissingColumns=True)
        .unionByName(
            events.groupBy(F.col("_load").alias("load")).agg(F.count("*").alias("n")).withColumn("kind", F.lit("load")),
            allowMissingColumns=True,
        )
    )
    if state is not None:
        new_state = new_state.unionByName(state.filter("kind in ('seen', 'load')"))
    new_state = new_state.select([F.col(f.name).cast(f.dataType) for f in STATE.fields])

    def rows_used() -> int:
        return good.count() - unused.count()

    def cleanup() -> None:
        for df in (vecs, pairs, events):
            df.unpersist()

    return SourceResult(
        features=features,
        items=items,
        quarantine=quarantine,
        feature_names=names,
        input_files=[p for _, p in loads],
        rows_in=events.count,
        rows_used=rows_used,
        extra={
            "events": {
                "weighting": ec.weighting,
                "loads": [k for k, _ in loads],
                "already_loaded": already,
                "vocabulary": [{"token": t, "events": e, "entities": d} for t, e, d in vocab[:50]],
            }
        },
        extra_tables={STATE_TABLE: new_state},
        cleanup=cleanup,
    )


register("events", check, read)
