"""Activity logs (MovieLens ``tags.csv`` / ``ratings.csv``) -> item (or user) vectors, incrementally.

Input layouts under ``data.input``: a flat ``tags.csv`` (``ratings.csv``), or daily partitions
``tags/date=YYYY-MM-DD/*.csv`` (``ratings/date=.../*.csv``); ``movies.csv`` beside them gives titles
and genres, and makes an unknown movieId a quarantine reason.

Incremental loads: the counts (tags) or ratings (ratings) of every earlier load, and the identity of
every event loaded, live in the ``state`` table under ``paths.root``, published with the features in
one atomic publication. A run reads partitions not yet recorded in the state or whose files changed
since (and not before ``data.since``), or the whole flat file, and keeps only the events not loaded
before, known by their own identity (user, movie, tag or rating, timestamp), never by a watermark:
an event appended late, with a timestamp at or before the last load's newest, is loaded and counted
in the manifest (``late_events``). Rejected lines are remembered by their text per file, so a re-read
quarantines only new ones. Loading the same file or day twice reads nothing new, so nothing changes.

Counting: ``rows_in`` is the records of *this* load; each is used (its item got a vector) or
quarantined with a reason. Valid records of an item left without a vector (no tag in the vocabulary,
no rating in the chosen columns) are quarantined with that reason but still kept in the state, since
later loads may give the item a vector.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import unicodedata
from pathlib import Path

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.publish import is_local, local_path, table_path
from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.csvfiles import (
    CORRUPT,
    check_header,
    check_readable,
    find_file,
    pick_one,
    read_csv_strings,
)
from pipelines.sources.tag_genome import MOVIES_HEADER, MOVIES_NAMES, movie_items, movie_rejects, movie_rows

log = logging.getLogger(__name__)

TAGS_HEADER = ("userId", "movieId", "tag", "timestamp")
RATINGS_HEADER = ("userId", "movieId", "rating", "timestamp")
PARTITION = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
STATE_TABLE = "state"

# Quarantine reasons (stable strings: tests and dashboards group by them).
MALFORMED = "malformed line (wrong number of fields)"
BAD_ID = "non-integer userId or movieId"
BAD_TIMESTAMP = "unparseable timestamp"
EMPTY_TAG = "empty tag"
BAD_RATING = "rating not in 0.5..5.0 in steps of 0.5"
UNKNOWN_MOVIE = "unknown movieId (not in movies.csv)"
DUPLICATE = "duplicate event"
NO_VOCAB = "movie has no tag in the vocabulary"
NO_COLUMNS = "no rating in the vector's columns"

# One schema for the state of both log sources; `kind` says which columns a row uses:
#   count  (tags):    item_id, tag, n = applications, ts = latest
#   rating (ratings): item_id, user_id, rating, ts (the latest rating of the pair)
#   load   (both):    load = partition or file loaded, n = records read, ts = max timestamp,
#                     tag = the files' name:size signature (a changed partition is read again)
#   event  (tags):    user_id, item_id, tag, ts of every event loaded (its identity)
#   rejected (both):  load, tag = the raw line, n = copies quarantined from that file
STATE = T.StructType(
    [
        T.StructField("source", T.StringType(), False),
        T.StructField("kind", T.StringType(), False),
        T.StructField("item_id", T.LongType(), True),
        T.StructField("user_id", T.LongType(), True),
        T.StructField("tag", T.StringType(), True),
        T.StructField("n", T.LongType(), True),
        T.StructField("rating", T.FloatType(), True),
        T.StructField("ts", T.LongType(), True),
        T.StructField("load", T.StringType(), True),
    ]
)


# ---------------------------------------------------------------- finding the input


def find_loads(input_dir: str, stem: str, since: str = "") -> list[tuple[str, list[str]]]:
    """(load key, files) of the input, oldest first: one per ``<stem>/date=D/`` partition from
    ``since`` on, else the flat ``<stem>.csv`` (or ``.csv.gz``) as one load keyed by its name.

    The same data twice is read once or refused (:func:`~pipelines.sources.csvfiles.pick_one`):
    ``x.csv`` beside ``x.csv.gz`` in a partition or flat; a flat file beside partitions is an
    error naming both, since either choice would silently drop or double events."""
    if not is_local(input_dir):
        return [(f"{stem}.csv", [f"{input_dir.rstrip('/')}/{stem}.csv"])]
    base = local_path(input_dir)
    if not base.is_dir():
        raise InputError(f"{base}: input directory does not exist (data.input); expected {stem}.csv or {stem}/date=*/")
    parts = base / stem
    flats = [base / n for n in (f"{stem}.csv", f"{stem}.csv.gz") if (base / n).is_file()]
    if parts.is_dir():
        if flats:
            raise InputError(f"{flats[0]} and {parts}/: events both in a flat file and in partitions; keep one layout")
        loads = []
        for d in sorted(parts.iterdir()):
            m = PARTITION.match(d.name)
            if not d.is_dir() or not m:
                continue
            if since and m.group(1) < since:
                continue
            by_name: dict[str, list[Path]] = {}
            for f in sorted(d.iterdir(), key=lambda f: (f.suffix == ".gz", f.name)):
                if f.is_file() and f.name.endswith((".csv", ".csv.gz")):
                    by_name.setdefault(f.name.removesuffix(".gz"), []).append(f)
            files = sorted(str(pick_one(group)) for group in by_name.values())
            if files:
                loads.append((d.name, files))
        if not loads and not since and not any(PARTITION.match(d.name) for d in parts.iterdir()):
            raise InputError(f"{parts}: no date=YYYY-MM-DD/ partitions with .csv files")
        return loads
    if not flats:
        raise InputError(f"{base}: no {stem}.csv and no {stem}/date=YYYY-MM-DD/ partitions (data.input)")
    return [(f"{stem}.csv", [str(pick_one(flats))])]


def movies_file(input_dir: str) -> str | None:
    """movies.csv (or movie.csv, either gzipped) under ``input_dir``, or None when there is none."""
    if not is_local(input_dir):
        return None
    base = local_path(input_dir)
    if not any((base / n).is_file() or (base / f"{n}.gz").is_file() for n in MOVIES_NAMES):
        return None
    return find_file(input_dir, MOVIES_NAMES)


def check_logs(cfg, stem: str, header: tuple[str, ...]) -> None:
    """Check the ``<stem>`` logs under ``data.input`` (and ``movies.csv`` if present) before Spark reads them:
    each file's header equals ``header`` with a data line after it and each ``.gz`` file reads to its end.
    Raises ``InputError`` naming the file otherwise, or when no ``<stem>.csv`` or ``date=`` partition is
    found."""
    for _, files in find_loads(cfg.data.input, stem, cfg.data.since):
        for f in files:
            check_header(f, header)
            check_readable(f)
    movies = movies_file(cfg.data.input)
    if movies:
        check_header(movies, MOVIES_HEADER)
        check_readable(movies)


def since_epoch(since: str) -> int | None:
    """``data.since`` (``YYYY-MM-DD``) as Unix seconds at 00:00 UTC, or None when empty. Raises ValueError on
    another format."""
    if not since:
        return None
    return int(dt.datetime.combine(dt.date.fromisoformat(since), dt.time(), dt.UTC).timestamp())


# ---------------------------------------------------------------- reading (edges)


def read_lines(spark: SparkSession, loads: list[tuple[str, list[str]]], header: tuple[str, ...],
               multi_line: bool = True) -> DataFrame:
    """Every field a string, plus _corrupt_record, source_file and load (the load key). Fields as
    RFC 4180 allows (:func:`~pipelines.sources.csvfiles.read_csv_strings`); ``multi_line`` for files
    with free text (tags, titles), whose quoted fields may hold line breaks."""
    frames = [
        read_csv_strings(spark, files, header, multi_line)
        .withColumn("source_file", F.input_file_name())
        .withColumn("load", F.lit(key))
        for key, files in loads
    ]
    if not frames:
        schema = T.StructType(
            [T.StructField(c, T.StringType(), True) for c in (*header, CORRUPT, "source_file", "load")]
        )
        return spark.createDataFrame([], schema)
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


def read_state(spark: SparkSession, root: str, source: str) -> DataFrame | None:
    """The state of earlier loads, or None if there is none yet."""
    path = table_path(root, STATE_TABLE)
    if is_local(root):
        if not Path(path).exists():
            return None
    else:
        jvm = spark._jvm
        hpath = jvm.org.apache.hadoop.fs.Path(path)
        if not hpath.getFileSystem(spark._jsc.hadoopConfiguration()).exists(hpath):
            return None
    state = spark.read.schema(STATE).parquet(path)
    other = [r["source"] for r in state.select("source").distinct().collect() if r["source"] != source]
    if other:
        raise InputError(
            f"{path}: state of source {other[0]!r}, not {source!r}; use another paths.root or data.logs.incremental=false"
        )
    return state


def loaded(state: DataFrame | None) -> tuple[dict[str, set[str | None]], int | None]:
    """Load keys already in the state with the files' signatures they were loaded with (one per
    load of the key), and the newest timestamp loaded."""
    if state is None:
        return {}, None
    rows = state.filter(F.col("kind") == "load").select("load", "ts", "tag").collect()
    marks = [r["ts"] for r in rows if r["ts"] is not None]
    done: dict[str, set[str | None]] = {}
    for r in rows:
        done.setdefault(r["load"], set()).add(r["tag"])
    return done, (max(marks) if marks else None)


def signature(files: list[str]) -> str | None:
    """``name:size`` of each local file: a partition whose files grow or change is read again."""
    if not all(is_local(f) for f in files):
        return None
    return ";".join(f"{Path(f).name}:{local_path(f).stat().st_size}" for f in sorted(files))


# ---------------------------------------------------------------- pure transforms


@F.pandas_udf(T.StringType())
def normalise_tag(tags: pd.Series) -> pd.Series:
    """Unicode NFKC, lower case, runs of whitespace (any Unicode space) to one blank, trimmed."""
    return tags.map(lambda t: None if t is None else " ".join(unicodedata.normalize("NFKC", t).lower().split()))


def _timestamp(col: str) -> F.Column:
    # MovieLens writes epoch seconds; ISO date-times are accepted too. try_*: bad values are null, not errors.
    return F.coalesce(
        F.expr(f"try_cast(trim(`{col}`) as long)"), F.unix_seconds(F.try_to_timestamp(F.trim(F.col(col))))
    )


def parse_events(lines: DataFrame, value: str, movie_ids: DataFrame | None = None) -> DataFrame:
    """Raw lines -> user_id, item_id, value (normalised tag or rating), ts, source_file, load, raw, reason
    (null = valid). ``value`` is ``tag`` or ``rating``; ``movie_ids`` (item_id) makes unknown movies a
    reason. Duplicate events (same user, movie, value, timestamp) keep one and quarantine the others."""
    if value == "tag":
        val = normalise_tag(F.col("tag"))
        bad_val = F.when(F.col("value").isNull() | (F.col("value") == ""), F.lit(EMPTY_TAG))
    else:
        val = F.expr("try_cast(trim(rating) as double)")
        ok = (F.col("value") >= 0.5) & (F.col("value") <= 5.0) & ((F.col("value") * 2) == F.round(F.col("value") * 2))
        bad_val = F.when(F.col("value").isNull() | ~ok, F.lit(BAD_RATING))
    raw_cols = ["userId", "movieId", value, "timestamp"]
    parsed = lines.select(
        F.expr("try_cast(trim(userId) as long)").alias("user_id"),
        F.expr("try_cast(trim(movieId) as long)").alias("item_id"),
        val.alias("value"),
        _timestamp("timestamp").alias("ts"),
        "source_file",
        "load",
        F.coalesce(F.col(CORRUPT), F.concat_ws(",", *raw_cols)).alias("raw"),
        (F.col(CORRUPT).isNotNull() | F.col("timestamp").isNull()).alias("corrupt"),
    )
    if movie_ids is not None:
        known = movie_ids.select("item_id", F.lit(True).alias("known")).dropDuplicates(["item_id"])
        parsed = parsed.join(F.broadcast(known), "item_id", "left")
    else:
        parsed = parsed.withColumn("known", F.lit(True))
    reason = (
        F.when(F.col("corrupt"), F.lit(MALFORMED))
        .when(F.col("user_id").isNull() | F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("ts").isNull(), F.lit(BAD_TIMESTAMP))
        .otherwise(bad_val)
    )
    reason = F.coalesce(reason, F.when(F.col("known").isNull(), F.lit(UNKNOWN_MOVIE)))
    classified = parsed.withColumn("reason", reason)
    key = ["user_id", "item_id", "value", "ts"]
    nth = F.row_number().over(Window.partitionBy(*key).orderBy("source_file", "raw"))
    return classified.withColumn(
        "reason", F.when(F.col("reason").isNull() & (nth > 1), F.lit(DUPLICATE)).otherwise(F.col("reason"))
    ).select("user_id", "item_id", "value", "ts", "source_file", "load", "raw", "reason")


def after(events: DataFrame, since: int | None) -> DataFrame:
    """Records at or after ``since``. Lines without a timestamp stay (they are quarantined)."""
    if since is None:
        return events
    return events.filter(F.col("ts").isNull() | (F.col("ts") >= since))


def _identity(value: str) -> list[F.Column]:
    # Ratings are parsed as double and stored as float: compare them as float.
    v = F.col("value") if value == "tag" else F.col("value").cast("float")
    return [F.col("user_id"), F.col("item_id"), v.alias("value"), F.col("ts")]


def split_seen(events: DataFrame, state: DataFrame | None, value: str) -> tuple[DataFrame, DataFrame]:
    """(events not loaded before, events loaded before). A valid event was loaded before when its
    identity (user, movie, tag or rating, timestamp) is in the state; a rejected line when its file
    (``load``) already had as many copies of that text quarantined. No watermark is involved, so an
    event that arrives late, with an old timestamp, is new."""
    if state is None:
        return events, events.limit(0)
    if value == "tag":
        known = state.filter(F.col("kind") == "event").select("user_id", "item_id", F.col("tag").alias("value"), "ts")
    else:
        known = state.filter(F.col("kind") == "rating").select(
            "user_id", "item_id", F.col("rating").cast("float").alias("value"), "ts")
    known = known.dropDuplicates().withColumn("_seen", F.lit(True))
    valid = events.filter(F.col("reason").isNull())
    keyed = valid.select("*", *[c.alias(f"_k{i}") for i, c in enumerate(_identity(value))])
    keys = ["_k0", "_k1", "_k2", "_k3"]
    known = known.toDF(*keys, "_seen")
    valid = keyed.join(known, keys, "left").drop(*keys)
    rejected_before = state.filter(F.col("kind") == "rejected").groupBy("load", F.col("tag").alias("raw")).agg(
        F.sum("n").alias("_n"))
    nth = F.row_number().over(Window.partitionBy("load", "raw").orderBy("source_file", "reason"))
    rejected = (
        events.filter(F.col("reason").isNotNull())
        .withColumn("_nth", nth)
        .join(rejected_before, ["load", "raw"], "left")
        .withColumn("_seen", F.col("_nth") <= F.coalesce(F.col("_n"), F.lit(0)))
        .drop("_nth", "_n")
    )
    both = valid.unionByName(rejected)
    seen = F.coalesce(F.col("_seen"), F.lit(False))
    return both.filter(~seen).drop("_seen"), both.filter(seen).drop("_seen")


def load_rows(spark: SparkSession, events: DataFrame, source: str, loads: list[tuple[str, str | None]]) -> DataFrame:
    """One state row per load of this run (``loads``: key, files' signature): records read, max timestamp."""
    keys = spark.createDataFrame(loads, "load string, tag string")
    agg = events.groupBy("load").agg(F.count("*").alias("n"), F.max("ts").alias("ts"))
    rows = keys.join(agg, "load", "left").select("load", "tag", F.coalesce("n", F.lit(0)).alias("n"), "ts")
    return _state(rows, source, "load")


def event_rows(events: DataFrame, state: DataFrame | None, source: str) -> DataFrame:
    """The identities of every tag event loaded: the state's and the valid new events'."""
    new = _state(events.filter(F.col("reason").isNull()).select("user_id", "item_id", F.col("value").alias("tag"), "ts"),
                 source, "event")
    return new if state is None else new.unionByName(state.filter(F.col("kind") == "event"))


def rejected_rows(events: DataFrame, state: DataFrame | None, source: str) -> DataFrame:
    """Copies of each rejected line quarantined per file, over this run and the earlier ones."""
    new = events.filter(F.col("reason").isNotNull()).select("load", F.col("raw").alias("tag"))
    rows = new.groupBy("load", "tag").agg(F.count("*").alias("n"))
    if state is not None:
        rows = rows.unionByName(state.filter(F.col("kind") == "rejected").select("load", "tag", "n"))
        rows = rows.groupBy("load", "tag").agg(F.sum("n").alias("n"))
    return _state(rows, source, "rejected")


def _state(df: DataFrame, source: str, kind: str) -> DataFrame:
    cols = []
    for f in STATE.fields:
        if f.name == "source":
            cols.append(F.lit(source).alias("source"))
        elif f.name == "kind":
            cols.append(F.lit(kind).alias("kind"))
        elif f.name in df.columns:
            cols.append(F.col(f.name).cast(f.dataType).alias(f.name))
        else:
            cols.append(F.lit(None).cast(f.dataType).alias(f.name))
    return df.select(cols)


def merge_tag_counts(state: DataFrame | None, good: DataFrame) -> DataFrame:
    """Counts per (item_id, tag) of earlier loads plus those of the valid new records."""
    new = good.groupBy("item_id", F.col("value").alias("tag")).agg(F.count("*").alias("n"), F.max("ts").alias("ts"))
    if state is not None:
        new = new.unionByName(state.filter(F.col("kind") == "count").select("item_id", "tag", "n", "ts"))
    return new.groupBy("item_id", "tag").agg(F.sum("n").alias("n"), F.max("ts").alias("ts"))


def vocabulary(counts: DataFrame, size: int, min_support: int) -> list[tuple[str, int, int]]:
    """(tag, applications, movies) of the ``size`` most used tags with >= min_support applications,
    by applications desc, then tag: the feature order."""
    rows = (
        counts.groupBy("tag")
        .agg(F.sum("n").alias("total"), F.count("*").alias("df"))
        .filter(F.col("total") >= min_support)
        .orderBy(F.desc("total"), F.asc("tag"))
        .limit(size)
        .collect()
    )
    return [(r["tag"], int(r["total"]), int(r["df"])) for r in rows]


def _dense(pairs: DataFrame, entity: str, dim: int) -> DataFrame:
    """(entity, idx, v) -> entity, vector (array<double> of width dim, 0 where no pair)."""
    per = pairs.groupBy(entity).agg(F.map_from_entries(F.collect_list(F.struct("idx", "v"))).alias("m"))
    vec = F.transform(F.sequence(F.lit(0), F.lit(dim - 1)), lambda i: F.coalesce(F.col("m")[i], F.lit(0.0)))
    return per.select(entity, vec.alias("vec"))


def tag_vectors(spark: SparkSession, counts: DataFrame, vocab: list[tuple[str, int, int]], weighting: str) -> DataFrame:
    """item_id, features array<float>: one vector per movie with a vocabulary tag."""
    dim = len(vocab)
    index = spark.createDataFrame([(t, i) for i, (t, _, _) in enumerate(vocab)], "tag string, idx int")
    pairs = counts.join(F.broadcast(index), "tag").select("item_id", "idx", F.col("n").cast("double").alias("v"))
    dense = _dense(pairs, "item_id", dim)
    v = F.col("vec")
    if weighting == "relevance":
        top = F.array_max(v)
        v = F.transform(v, lambda x: x / top)
    elif weighting == "tfidf":
        movies = pairs.select("item_id").distinct().count()
        idf = F.array(*[F.lit(float(_idf(movies, df))) for _, _, df in vocab])
        total = F.aggregate(v, F.lit(0.0), lambda acc, x: acc + x)
        v = F.transform(v, lambda x, i: x / total * idf[i])
    return dense.select("item_id", F.transform(v, lambda x: x.cast("float")).alias("features"))


def _idf(n_items: int, df: int) -> float:
    import math

    return math.log((1 + n_items) / (1 + df)) + 1.0  # smoothed, as scikit-learn's TfidfTransformer


def merge_ratings(state: DataFrame | None, good: DataFrame) -> DataFrame:
    """Every distinct rating event (user_id, item_id, rating, ts) of earlier loads and the valid new
    records: the state keeps them all, so each is known by its identity when read again."""
    new = good.select("user_id", "item_id", F.col("value").cast("float").alias("rating"), "ts")
    if state is not None:
        new = new.unionByName(state.filter(F.col("kind") == "rating").select("user_id", "item_id", "rating", "ts"))
    return new.dropDuplicates(["user_id", "item_id", "rating", "ts"])


def latest_ratings(ratings: DataFrame) -> DataFrame:
    """The latest rating per (user_id, item_id): what the vectors use."""
    latest = F.row_number().over(Window.partitionBy("user_id", "item_id").orderBy(F.desc("ts"), F.desc("rating")))
    return ratings.withColumn("_k", latest).filter("_k = 1").drop("_k")


def rating_vectors(ratings: DataFrame, entity: str, width: int, columns: str) -> tuple[DataFrame, list[str]]:
    """Ratings centred on each user's mean -> (entity_id as item_id, features) and feature names.
    entity=item: a movie's vector over users; entity=user: a user's vector over movies. Columns are the
    ``width`` keys with most ratings (then smallest id), or ``width`` hash buckets (values summed)."""
    ent, key = ("item_id", "user_id") if entity == "item" else ("user_id", "item_id")
    prefix = "user" if entity == "item" else "item"
    mean = ratings.groupBy("user_id").agg(F.avg("rating").alias("mu"))
    centred = ratings.join(mean, "user_id").select(ent, key, (F.col("rating") - F.col("mu")).alias("v"))
    if columns == "top":
        top = centred.groupBy(key).count().orderBy(F.desc("count"), F.asc(key)).limit(width).collect()
        keys = [int(r[key]) for r in top]
        index = centred.sparkSession.createDataFrame([(k, i) for i, k in enumerate(keys)], f"{key} long, idx int")
        pairs = centred.join(F.broadcast(index), key).select(ent, "idx", "v")
        names = [f"{prefix}_{k}" for k in keys]
        dim = len(keys)
    else:
        pairs = centred.select(ent, F.pmod(F.xxhash64(key), F.lit(width)).cast("int").alias("idx"), "v")
        pairs = pairs.groupBy(ent, "idx").agg(F.sum("v").alias("v"))
        names = [f"{prefix}_hash_{i}" for i in range(width)]
        dim = width
    dense = _dense(pairs, ent, dim)
    out = dense.select(F.col(ent).alias("item_id"), F.transform("vec", lambda x: x.cast("float")).alias("features"))
    return out, names


def unused_valid(events: DataFrame, with_vector: DataFrame, ent: str, reason: str) -> DataFrame:
    """Valid events whose entity got no vector, as quarantine rows with ``reason``."""
    has = with_vector.select(F.col("item_id").alias(ent), F.lit(True).alias("_has"))
    return (
        events.filter(F.col("reason").isNull())
        .join(has, ent, "left")
        .filter(F.col("_has").isNull())
        .select("source_file", "raw", F.lit(reason).alias("reason"))
    )


def bad_events(events: DataFrame) -> DataFrame:
    """The events with a reason, as quarantine rows: source_file, raw, reason strings."""
    return events.filter(F.col("reason").isNotNull()).select("source_file", "raw", "reason")


# ---------------------------------------------------------------- composition


def _new_events(spark: SparkSession, cfg, stem: str, header: tuple[str, ...], value: str):
    """(events of this run, old state or None, loads of this run as (key, signature), input files,
    movies lines or None, report of events skipped as loaded before and of late events)."""
    source = cfg.data.source
    state = read_state(spark, cfg.paths.root, source) if cfg.data.logs.incremental else None
    done, watermark = loaded(state)
    loads = find_loads(cfg.data.input, stem, cfg.data.since)
    flat = len(loads) == 1 and not PARTITION.match(loads[0][0])
    if flat:
        # A flat file is read whole each time; events loaded before are known by their identity.
        loads = [(f"{loads[0][0]}@{cfg.data.since or 'all'}", loads[0][1])]
    else:
        # A partition is read again only when its files changed (a late file, or one that grew).
        # (No signature recorded: a state written before signatures were; its partitions count as loaded.)
        skipped = [k for k, f in loads if k in done and (None in done[k] or signature(f) in done[k])]
        if skipped:
            log.info("%s: partitions already loaded, skipped: %s", stem, ", ".join(skipped))
        loads = [(k, f) for k, f in loads if k not in skipped]
    movies_path = movies_file(cfg.data.input)
    movies_lines = None
    if movies_path:
        movies_lines = read_lines(spark, [("movies", [movies_path])], MOVIES_HEADER)
    movie_ids = None
    if movies_lines is not None:
        movie_ids = movie_rows(movies_lines).filter(F.col("reason").isNull()).select("item_id")
    # Ratings are all numbers: a line break inside a field could never parse, so they read line by line.
    lines = read_lines(spark, loads, header, multi_line=value == "tag")
    events = after(parse_events(lines, value, movie_ids), since_epoch(cfg.data.since))
    events, seen = split_seen(events, state, value)
    files = [f for _, fs in loads for f in fs] + ([movies_path] if movies_path else [])

    def report(new: DataFrame) -> dict:
        # Late: valid new events at or before the newest timestamp of the earlier loads. Loaded, and said so.
        late = 0
        if watermark is not None:
            late = new.filter(F.col("reason").isNull() & (F.col("ts") <= watermark)).count()
        n_seen = seen.count()
        if late:
            log.warning("%s: %d late events (timestamp at or before the last load's newest, %d) loaded", stem, late,
                        watermark)
        if n_seen:
            log.info("%s: %d events or lines loaded before, skipped", stem, n_seen)
        return {"late_events": late, "events_loaded_before": n_seen}

    return events, state, [(k, signature(f)) for k, f in loads], files, movies_lines, report


def tags_result(spark: SparkSession, cfg) -> SourceResult:
    """Tag applications -> one vector per movie over the ``vocab_size`` most applied tags with ``min_support``
    applications, counts merged with earlier loads when incremental: features item_id long, features
    array<float>; items with titles and genres when ``movies.csv`` is there; bad events and tags outside
    the vocabulary quarantined; the new state as an extra table. Raises ``InputError`` when no tag has
    ``min_support`` applications (and on unreadable input or another source's state)."""
    lc = cfg.data.logs
    events, state, loads, files, movies_lines, report = _new_events(spark, cfg, "tags", TAGS_HEADER, "tag")
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    counts = merge_tag_counts(state, events.filter(F.col("reason").isNull())).persist(StorageLevel.MEMORY_AND_DISK)
    vocab = vocabulary(counts, lc.vocab_size, lc.min_support)
    if not vocab:
        events.unpersist()
        counts.unpersist()
        raise InputError(
            f"{cfg.data.input}: no tag has data.logs.min_support={lc.min_support} applications; nothing to build"
        )
    features = tag_vectors(spark, counts, vocab, lc.weighting).persist(StorageLevel.MEMORY_AND_DISK)
    no_vocab = counts.select("item_id").distinct().join(features.select("item_id"), "item_id", "left_anti")
    summary = no_vocab.agg(F.count("*").alias("n"), F.slice(F.sort_array(F.collect_list("item_id")), 1, 20)).first()
    n_no_vocab, sample = int(summary[0]), list(summary[1] or [])
    if n_no_vocab:
        log.warning("tags: %d movies have no tag in the vocabulary and get no vector", n_no_vocab)
    quarantine = bad_events(events).unionByName(unused_valid(events, features, "item_id", NO_VOCAB))
    new_state = (
        _state(counts, cfg.data.source, "count")
        .unionByName(event_rows(events, state, cfg.data.source))
        .unionByName(rejected_rows(events, state, cfg.data.source))
        .unionByName(load_rows(spark, events, cfg.data.source, loads))
    )
    if state is not None:
        new_state = new_state.unionByName(state.filter(F.col("kind") == "load"))
    return _result(
        features,
        items=_items(movies_lines, features),
        quarantine=quarantine,
        names=[t for t, _, _ in vocab],
        files=files,
        events=events,
        state=new_state,
        extra={
            "vocab_size": len(vocab),
            "weighting": lc.weighting,
            "since": cfg.data.since,
            "loads": [k for k, _ in loads],
            "items_without_vocab_tags": n_no_vocab,
            "items_without_vocab_tags_sample": sample,
        },
        caches=[events, counts, features],
        movies_lines=movies_lines,
        report=report,
    )


def ratings_result(spark: SparkSession, cfg) -> SourceResult:
    """Ratings -> user-mean-centred rating vectors per movie (``entity=item``) or per user, latest rating per
    pair, merged with earlier loads when incremental: features item_id long, features array<float>; items;
    bad events quarantined; the new state as an extra table. Raises ``InputError`` when no rating is valid
    (and on unreadable input or another source's state)."""
    rc = cfg.data.ratings
    events, state, loads, files, movies_lines, report = _new_events(
        spark, cfg, "ratings", RATINGS_HEADER, "rating")
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    ratings = merge_ratings(state, events.filter(F.col("reason").isNull())).persist(StorageLevel.MEMORY_AND_DISK)
    features, names = rating_vectors(latest_ratings(ratings), rc.entity, rc.width, rc.columns)
    if not names:
        events.unpersist()
        ratings.unpersist()
        raise InputError(f"{cfg.data.input}: no valid rating; nothing to build")
    features = features.persist(StorageLevel.MEMORY_AND_DISK)
    ent = "item_id" if rc.entity == "item" else "user_id"
    quarantine = bad_events(events).unionByName(unused_valid(events, features, ent, NO_COLUMNS))
    new_state = (
        _state(ratings, cfg.data.source, "rating")
        .unionByName(rejected_rows(events, state, cfg.data.source))
        .unionByName(load_rows(spark, events, cfg.data.source, loads))
    )
    if state is not None:
        new_state = new_state.unionByName(state.filter(F.col("kind") == "load"))
    items = _items(movies_lines, features) if rc.entity == "item" else features.select("item_id")
    return _result(
        features,
        items=items,
        quarantine=quarantine,
        names=names,
        files=files,
        events=events,
        state=new_state,
        extra={"entity": rc.entity, "columns": rc.columns, "since": cfg.data.since, "loads": [k for k, _ in loads]},
        caches=[events, ratings, features],
        movies_lines=movies_lines,
        report=report,
    )


def _items(movies_lines: DataFrame | None, features: DataFrame) -> DataFrame:
    ids = features.select("item_id")
    if movies_lines is None:
        return ids
    return movie_items(movies_lines, ids)


def _result(features, items, quarantine, names, files, events, state, extra, caches,
            movies_lines: DataFrame | None = None, report=None) -> SourceResult:
    # movies.csv records that give no metadata are quarantined and counted in, as in tag_genome.
    meta_bad = None if movies_lines is None else movie_rejects(movies_lines, files[-1])
    if meta_bad is not None:
        quarantine = quarantine.unionByName(meta_bad)

    def rows_in() -> int:
        return events.count() + (meta_bad.count() if meta_bad is not None else 0)

    def rows_used() -> int:
        # Valid records of this load whose entity got a vector (the others are quarantined).
        return events.filter(F.col("reason").isNull()).count() - quarantine.filter(
            F.col("reason").isin(NO_VOCAB, NO_COLUMNS)
        ).count()

    def cleanup() -> None:
        for df in caches:
            df.unpersist()

    return SourceResult(
        features=features,
        items=items,
        quarantine=quarantine,
        feature_names=names,
        input_files=files,
        rows_in=rows_in,
        rows_used=rows_used,
        extra=extra,
        report=(lambda: report(events)) if report else None,
        extra_tables={STATE_TABLE: state},
        cleanup=cleanup,
    )


def check_tags(cfg) -> None:
    """``check_logs`` for ``tags.csv`` logs (source=movielens_tags)."""
    check_logs(cfg, "tags", TAGS_HEADER)


def check_ratings(cfg) -> None:
    """``check_logs`` for ``ratings.csv`` logs (source=movielens_ratings)."""
    check_logs(cfg, "ratings", RATINGS_HEADER)


register("movielens_tags", check_tags, tags_result)
register("movielens_ratings", check_ratings, ratings_result)
