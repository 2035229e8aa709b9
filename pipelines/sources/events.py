"""An event log -> one vector per entity over its tokens (``data.source=events``), and the MovieLens
tags and ratings logs as presets of it (``movielens_tags``, ``movielens_ratings``).

An event is a row of (entity, token[, weight][, timestamp], other fields), the columns named by
``data.events.*``; the file is any table ``pipelines.sources.table.read_table`` reads (CSV with any
delimiter, quoting and encoding through ``data.options``; ``columns`` names the fields of a CSV,
checked against its header when it has one). A CSV line with the wrong number of fields is
quarantined as malformed, with the line as read. ``conf/presets/movielens_tags.yaml`` and
``movielens_ratings.yaml`` hold the MovieLens settings; the source names ``movielens_tags`` and
``movielens_ratings`` run those presets with ``data.logs.*`` / ``data.ratings.*`` mapped onto them
(:func:`settings`).

Input layouts: ``data.input`` itself (a file, a folder of files, or ``KEY=VALUE/`` partitions), or
with ``file=NAME`` a folder holding ``NAME.<ext>`` (``.gz`` or not) or ``NAME/KEY=VALUE/`` partitions.
The same file twice (``x.csv`` beside ``x.csv.gz``) is read once or refused
(:func:`~pipelines.sources.csvfiles.pick_one`); a flat file beside partitions is an error.

Vector: pairs (entity, token) combine their events' weights (summed, or the latest by timestamp);
optionally centred on the entity's or token's mean (``centre_by``; ratings: the user's mean). The
vocabulary is the ``top_k`` tokens with the most events, among those with ``min_support`` events or
more (ties by token, numerically for an id column), or ``top_k`` hash buckets. Weighting per pair
from its weight ``w``: ``counts`` (w), ``binary`` (1), ``relevance`` (w / the entity's largest),
``tfidf`` (w / the entity's vocabulary total x smoothed idf ``ln((1 + N) / (1 + df)) + 1``,
scikit-learn's ``TfidfTransformer``), ``bm25`` (Robertson & Zaragoza 2009:
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))`` times ``w (k1 + 1) / (w + k1 (1 - b + b len / avglen))``,
len = the entity's vocabulary total) or ``mean_centred`` (w minus the mean of the entity's vocabulary
weights). The pivot is ``shaping.long_vectors``, the one the table sources use. ``data.limit`` keeps
the vectors of the N smallest item ids; the events of the others are quarantined as beyond it.

Incremental loads: the ``state`` table under ``paths.root`` (published with the features in one
atomic publication) keeps the combined pairs, the identity hash of every valid event loaded, the
rejected lines per load, and the loads. A run reads the partitions not loaded yet or whose files
changed since (and not before ``data.since``), or the whole flat file (events before ``data.since``
left out), and keeps only the events not loaded before, known by their identity (``event_id_column``
or all their fields), never by a watermark: an event appended late, with a timestamp at or before the
last load's newest, is loaded and counted in the manifest (``late_events``). Rejected lines are
remembered by their text per load, so a re-read quarantines only new ones. Loading the same file or
partition twice reads nothing new, so nothing changes. Swapping entity and token (ratings per movie
or per user) reuses the state.

Counting: ``rows_in`` is the events of *this* load (plus ``movies.csv`` records that give no
metadata); each is used (its entity got a vector) or quarantined with a reason. Valid events of an
entity left without a vector are quarantined but stay in the state: later loads may give it one.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import unicodedata
from pathlib import Path

import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
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
from pipelines.sources.shaping import long_vectors, stable_id
from pipelines.sources.table import (
    CSV_DEFAULTS,
    EXTENSIONS,
    PARTITION,
    _data_files,
    check_no_loose_files,
    current_path,
    path_exists,
    read_table,
    table_format,
)
from pipelines.sources.tag_genome import (
    MOVIES_HEADER,
    MOVIES_NAMES,
    OVER_LIMIT,
    movie_items,
    movie_rejects,
    movie_rows,
)

log = logging.getLogger(__name__)

STATE_TABLE = "state"
# Quarantine reasons (stable strings: tests and dashboards group by them; data.events.reasons rewords).
MALFORMED = "malformed line (wrong number of fields)"
BAD_ENTITY = "null or empty entity"
BAD_TIMESTAMP = "unparseable timestamp"
EMPTY_TOKEN = "empty token"
BAD_WEIGHT = "null or non-numeric weight"
DUPLICATE = "duplicate event"
NO_VOCAB = "entity has no token in the vocabulary"
REASONS = (MALFORMED, BAD_ENTITY, BAD_TIMESTAMP, EMPTY_TOKEN, BAD_WEIGHT, DUPLICATE, NO_VOCAB)

# One state schema; `kind` says which columns a row uses:
#   pair     item_id, source_id (the entity as given), token, w (combined weight), n (events), ts (latest)
#   seen     key: the identity hash of a valid event loaded
#   rejected load, raw (the line), n: copies quarantined from that load
#   load     load (partition or flat file@since), n (events read), ts (newest), signature (files' name:size)
#   columns  source_id = entity column, token = token column (and `source`): what the pairs are of
STATE = T.StructType(
    [
        T.StructField("source", T.StringType(), False),
        T.StructField("kind", T.StringType(), False),
        T.StructField("item_id", T.LongType(), True),
        T.StructField("source_id", T.StringType(), True),
        T.StructField("token", T.StringType(), True),
        T.StructField("w", T.DoubleType(), True),
        T.StructField("n", T.LongType(), True),
        T.StructField("ts", T.LongType(), True),
        T.StructField("key", T.LongType(), True),
        T.StructField("load", T.StringType(), True),
        T.StructField("raw", T.StringType(), True),
        T.StructField("signature", T.StringType(), True),
    ]
)
PRESETS = ("movielens_tags", "movielens_ratings")
# data.logs.* / data.ratings.* -> the data.events.* key :func:`settings` maps it onto.
LOGS_KEYS = {"vocab_size": "top_k", "min_support": "min_support", "weighting": "weighting",
             "incremental": "incremental", "width": "top_k", "columns": "vocabulary",
             "entity": "entity_column and token_column"}


# ---------------------------------------------------------------- settings


def settings(cfg):
    """(events settings, reader options) the source runs with: ``data.events`` and ``data.options`` for
    ``data.source=events``; for ``movielens_tags`` / ``movielens_ratings`` the preset of that name
    (``conf/presets/NAME.yaml``) with ``data.logs.*`` or ``data.ratings.*`` applied and ``data.options``
    over the preset's options. Raises ``ConfigError`` on a bad preset."""
    source = cfg.data.source
    from pipelines.config import ConfigError, load_config

    if source not in PRESETS:
        if source == "events":  # `--preset movielens_tags data.logs.vocab_size=3`: data.logs.* is never read
            base = load_config(None, []).data
            for name in ("logs", "ratings"):
                given, ref = dataclasses.asdict(getattr(cfg.data, name)), dataclasses.asdict(getattr(base, name))
                key = next((k for k in given if given[k] != ref[k]), None)
                if key:
                    raise ConfigError(f"data.{name}.{key}: not read with data.source=events (what --preset movielens_* "
                                      f"sets); set data.events.{LOGS_KEYS.get(key, '*')} instead")
        return cfg.data.events, dict(cfg.data.options)

    # data.events.* set by the user would be dropped without a word (the preset's replace them): refused,
    # unless they are the defaults or the preset's own (`--preset movielens_tags data.source=movielens_tags`).
    given = dataclasses.asdict(cfg.data.events)
    for ref in (load_config(None, []).data.events, load_config(None, [], preset=source).data.events):
        if given == dataclasses.asdict(ref):
            break
    else:
        ref = dataclasses.asdict(load_config(None, []).data.events)
        key = next(k for k in given if given[k] != ref[k])
        mapped = "data.logs.*" if source == "movielens_tags" else "data.ratings.*"
        raise ConfigError(f"data.events.{key}: not read with data.source={source}, which takes {mapped}; "
                          f"for data.events.* run --preset {source} (data.source=events) instead")
    lc, rc = cfg.data.logs, cfg.data.ratings
    over = [f"data.events.incremental={lc.incremental}"]
    if source == "movielens_tags":
        over += [f"data.events.top_k={lc.vocab_size}", f"data.events.min_support={lc.min_support}",
                 f"data.events.weighting={lc.weighting}"]
    else:
        over += [f"data.events.top_k={rc.width}", f"data.events.vocabulary={rc.columns}"]
        if rc.entity == "user":
            over += ["data.events.entity_column=userId", "data.events.token_column=movieId",
                     "data.events.token_prefix=item_", "data.events.centre_by=entity"]
    preset = load_config(None, over, preset=source).data
    return preset.events, {**preset.options, **cfg.data.options}


def _reason(ec, text: str) -> str:
    return ec.reasons.get(text, text)


def _bad_id(ec) -> str:
    return f"non-integer {' or '.join(ec.id_columns)}"


def _bad_weight(ec) -> str:
    if not ec.weight_range:
        return _reason(ec, BAD_WEIGHT)
    lo, hi = ec.weight_range
    return f"{ec.weight_column} not in {lo}..{hi}" + (f" in steps of {ec.weight_step}" if ec.weight_step else "")


def _unknown_movie(ec) -> str:
    return f"unknown {ec.movie_column} (not in movies.csv)"


# ---------------------------------------------------------------- finding the input


def _known(p: Path) -> bool:
    name = p.name.removesuffix(".gz")
    return Path(name).suffix in EXTENSIONS


def _one_per_name(files: list[Path]) -> list[str]:
    # x.csv beside x.csv.gz: the same data, read once (or refused when they differ).
    by_name: dict[str, list[Path]] = {}
    for f in sorted(files, key=lambda f: (f.suffix == ".gz", str(f))):
        by_name.setdefault(str(f).removesuffix(".gz"), []).append(f)
    return sorted(str(pick_one(group)) for group in by_name.values())


def find_loads(input_path: str, name: str = "", since: str = "") -> list[tuple[str, list[str]]]:
    """(load key, files) of the input, oldest first: one per ``KEY=VALUE/`` partition (``date=`` ones from
    ``since`` on) of ``input_path`` (``name`` set: of ``input_path/name/``), else the flat file(s) as one
    load keyed by the file's name. Raises InputError when nothing is there, or a flat file lies beside
    the partitions' folder or inside it next to them (either choice would silently drop or double events)."""
    if not is_local(input_path):
        path = f"{input_path.rstrip('/')}/{name}.csv" if name else input_path
        return [(Path(path).name, [path])]
    base = local_path(input_path)
    if name:
        if not base.is_dir():
            raise InputError(f"{base}: input directory does not exist (data.input); expected {name}.csv or {name}/date=*/")
        parts = base / name
        flats = [p for p in sorted(base.glob(f"{glob.escape(name)}.*")) if p.is_file() and _known(p)]
        if not parts.is_dir() and not flats:
            raise InputError(f"{base}: no {name}.csv and no {name}/date=YYYY-MM-DD/ (or other KEY=VALUE/) partitions (data.input)")
    else:
        if not base.exists():
            raise InputError(f"{base}: does not exist (data.input)")
        parts, flats = base, []
        if base.is_file() or not any(d.is_dir() and PARTITION.match(d.name) for d in base.iterdir()):
            files = [base] if base.is_file() else [f for f in _data_files(base) if _known(f)]
            if not files:
                raise InputError(f"{base}: no data files under it (data.input)")
            return [(base.name, _one_per_name(files))]
    if parts.is_dir():
        if flats:
            raise InputError(f"{flats[0]} and {parts}/: events both in a flat file and in partitions; keep one layout")
        loads = []
        all_parts = [d for d in sorted(parts.iterdir()) if d.is_dir() and PARTITION.match(d.name)]
        for d in all_parts:
            if since and d.name.startswith("date=") and d.name[len("date="):] < since:
                continue
            files = [f for f in _data_files(d) if _known(f)]
            if files:
                loads.append((d.name, _one_per_name(files)))
        if not all_parts:
            raise InputError(f"{parts}: no KEY=VALUE/ partitions (date=YYYY-MM-DD/) with data files")
        check_no_loose_files(parts)
        return loads
    return [(flats[0].name.removesuffix(".gz"), [str(pick_one(flats))])]


def movies_file(input_path: str) -> str | None:
    """movies.csv (or movie.csv, either gzipped) in ``input_path`` (or beside it, for a file), or None."""
    if not is_local(input_path):
        return None
    base = local_path(input_path)
    base = base if base.is_dir() else base.parent
    if not any((base / n).is_file() or (base / f"{n}.gz").is_file() for n in MOVIES_NAMES):
        return None
    return find_file(str(base), MOVIES_NAMES)


def _header(options: dict[str, str], ec) -> bool:
    # Names given in data.events.columns: no header line unless data.options.header says so.
    return str(options.get("header", "false" if ec.columns else "true")).lower() == "true"


def check(cfg) -> None:
    """Check the events settings and input before Spark starts: both ``entity_column`` and
    ``token_column`` set, ``reasons`` rewording known reasons, a known or inferable format, the input
    there (:func:`find_loads`), each CSV's header equal to ``columns`` when both are given, each ``.gz``
    file readable to its end, and ``movies.csv``'s header. Raises ``InputError`` naming the file or key."""
    ec, options = settings(cfg)
    if not ec.entity_column or not ec.token_column:
        raise InputError("data.events: entity_column and token_column must be set")
    unknown = sorted(set(ec.reasons) - set(REASONS))
    if unknown:
        raise InputError(f"data.events.reasons: {unknown[0]!r} is not a reason; choose among {list(REASONS)}")
    if ec.format == "catalog":
        return
    loads = find_loads(cfg.data.input, ec.file, cfg.data.since)
    fmt = table_format(loads[0][1][0] if loads else cfg.data.input, ec.format, "data.events.format")
    every = [f for _, files in loads for f in files]
    if every and all(is_local(f) and local_path(f).stat().st_size == 0 for f in every):
        # Spark reads nothing from them and the run would end in "no token has min_support events".
        raise InputError(f"{every[0]}: empty file{'s' if len(every) > 1 else ''}; no events to load (data.input)")
    for _, files in loads:
        for f in files:
            if fmt == "csv" and ec.columns and _header(options, ec):
                check_header(f, ec.columns, options)
            check_readable(f)
    movies = movies_file(cfg.data.input) if ec.movie_column else None
    if movies:
        check_header(movies, MOVIES_HEADER)
        check_readable(movies)


# ---------------------------------------------------------------- reading (edges)


def _read_load(spark: SparkSession, files: list[str], fmt: str, ec, options: dict[str, str]) -> DataFrame:
    """One load's files. A CSV is read as strings with ``_corrupt_record`` (a line with the wrong number of
    fields) under ``columns`` or its header's names; other formats as their reader gives them."""
    if fmt != "csv":
        return read_table(spark, files[0] if len(files) == 1 else files, fmt, options)
    opts = {**CSV_DEFAULTS, **options, "header": "true" if _header(options, ec) else "false"}
    names = list(ec.columns)
    if not names:
        names = read_table(spark, files[0], "csv", opts).columns
    schema = T.StructType([T.StructField(c, T.StringType(), True) for c in names] + [T.StructField(CORRUPT, T.StringType(), True)])
    try:
        return spark.read.schema(schema).options(**opts, columnNameOfCorruptRecord=CORRUPT).csv(files)
    except Exception as exc:  # AnalysisException: one line naming the input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{files[0]}: cannot read it as csv: {first}") from None


def read_events(spark: SparkSession, cfg, ec, options, fmt: str, loads: list[tuple[str, list[str]]]) -> DataFrame:
    """The events of ``loads`` (data columns, ``_corrupt_record`` for CSV, ``_load`` key, ``_file``)."""
    if fmt == "catalog":
        return spark.table(cfg.data.input).withColumn("_load", F.lit(cfg.data.input)).withColumn("_file", F.lit(cfg.data.input))
    frames = [
        _read_load(spark, files, fmt, ec, options).withColumn("_load", F.lit(key)).withColumn("_file", F.input_file_name())
        for key, files in loads
    ]
    if not frames:
        names = list(dict.fromkeys(c for c in (*ec.columns, ec.entity_column, ec.token_column, ec.weight_column,
                                               ec.timestamp_column, ec.event_id_column, *ec.id_columns) if c))
        schema = T.StructType([T.StructField(c, T.StringType(), True) for c in (*names, "_load", "_file")])
        return spark.createDataFrame([], schema)
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df, allowMissingColumns=True)
    return out


def read_state(spark: SparkSession, root: str, source: str, ec) -> DataFrame | None:
    """The state of earlier loads under ``root`` (``STATE``), or None when there is none yet. Pairs kept with
    entity and token the other way round (ratings per movie, then per user) are turned round. Raises
    ``InputError`` when the state's pairs are of other columns (another source's state)."""
    path = table_path(root, STATE_TABLE)
    if not path_exists(spark, path):
        return None
    state = spark.read.schema(STATE).parquet(current_path(root, STATE_TABLE))
    cols = state.filter("kind = 'columns'").select("source", "source_id", "token").collect()
    if not cols:
        raise InputError(f"{path}: a state without its columns (written by an older version); "
                         "rebuild it once with incremental=false (data.events.incremental, data.logs.incremental)")
    old, ent, tok = cols[0]
    if (ent, tok) == (ec.token_column, ec.entity_column) and ent != tok:
        pairs = state.filter("kind = 'pair'")
        swapped = pairs.select(
            "source", "kind", _entity_id(F.col("token"), ec).alias("item_id"), F.col("token").alias("source_id"),
            F.col("source_id").alias("token"), *[f.name for f in STATE.fields[5:]],
        )
        state = swapped.unionByName(state.filter("kind not in ('pair', 'columns')"))
    elif (ent, tok) != (ec.entity_column, ec.token_column):
        raise InputError(
            f"{path}: state of source {old!r}, not {source!r} (pairs of {ent}/{tok}, not "
            f"{ec.entity_column}/{ec.token_column}); use another paths.root or incremental=false"
        )
    return state.filter("kind != 'columns'")


def loaded(state: DataFrame | None) -> tuple[dict[str, set[str | None]], int | None]:
    """Load keys in the state with the files' signatures each was loaded with, and the newest timestamp
    loaded."""
    if state is None:
        return {}, None
    rows = state.filter(F.col("kind") == "load").select("load", "ts", "signature").collect()
    done: dict[str, set[str | None]] = {}
    for r in rows:
        done.setdefault(r["load"], set()).add(r["signature"])
    marks = [r["ts"] for r in rows if r["ts"] is not None]
    return done, (max(marks) if marks else None)


def signature(files: list[str]) -> str | None:
    """``name:size`` of each local file: a partition whose files grow or change is read again."""
    if not all(is_local(f) for f in files):
        return None
    return ";".join(f"{Path(f).name}:{local_path(f).stat().st_size}" for f in sorted(files))


# ---------------------------------------------------------------- pure transforms


@F.pandas_udf(T.StringType())
def normalise_token(tokens: pd.Series) -> pd.Series:
    """Unicode NFKC, lower case, runs of whitespace (any Unicode space) to one blank, trimmed."""
    return tokens.map(lambda t: None if t is None else " ".join(unicodedata.normalize("NFKC", t).lower().split()))


def _timestamp(col: str) -> Column:
    # Epoch seconds or an ISO date-time; try_*: a bad value is null, not an error.
    c = F.trim(F.col(col).cast("string"))
    return F.coalesce(F.expr(f"try_cast(trim(cast(`{col}` as string)) as long)"), F.unix_seconds(F.try_to_timestamp(c)))


def _id(col: str) -> Column:
    return F.expr(f"try_cast(trim(cast(`{col}` as string)) as long)")


def _entity_id(entity: Column, ec) -> Column:
    """The item id of an entity given as a string: the integer for an id column, else ``stable_id``."""
    return entity.cast("long") if ec.entity_column in ec.id_columns else stable_id(entity)


def parse(events: DataFrame, ec, movie_ids: DataFrame | None = None, sep: str = ",") -> DataFrame:
    """Rows -> item_id, source_id, token, w, ts, key (identity hash), raw, load, source_file, reason
    (null = valid). Reasons, first that applies: malformed CSV line, non-integer id column, null entity,
    bad timestamp, empty token, bad weight (null, non-numeric or outside ``weight_range``/``weight_step``),
    unknown movie (``movie_ids``: item_id), duplicate (a repeated identity within the frame, after the
    first by file and line). Raises ``InputError`` when a named column is not in the input."""
    named = [ec.entity_column, ec.token_column, ec.weight_column, ec.timestamp_column, ec.event_id_column,
             *ec.id_columns, ec.movie_column]
    for c in named:
        if c and c not in events.columns:
            raise InputError(f"events: column {c!r} not in the input (columns: {events.columns}); see data.events.*")
    data_cols = [c for c in events.columns if c not in ("_load", "_file", CORRUPT)]
    corrupt = F.col(CORRUPT) if CORRUPT in events.columns else F.lit(None).cast("string")
    ids = {c: _id(c) for c in ec.id_columns}
    ent = F.trim(F.col(ec.entity_column).cast("string"))
    dtype = events.schema[ec.entity_column].dataType
    if ec.entity_column in ids:
        item = ids[ec.entity_column]
    elif isinstance(dtype, (T.ByteType, T.ShortType, T.IntegerType, T.LongType)):
        item = F.col(ec.entity_column).cast("long")
    else:
        item = stable_id(ent)
    if ec.token_column in ids:
        token = ids[ec.token_column].cast("string")
    else:
        token = F.trim(F.col(ec.token_column).cast("string"))
        token = normalise_token(token) if ec.normalise_tokens else token
    weight = F.expr(f"try_cast(trim(cast(`{ec.weight_column}` as string)) as double)") if ec.weight_column else F.lit(1.0)
    ts = _timestamp(ec.timestamp_column) if ec.timestamp_column else F.lit(None).cast("long")
    canon = {**{c: v.cast("string") for c, v in ids.items()}, ec.token_column: token,
             ec.timestamp_column: ts.cast("string"), ec.weight_column: weight.cast("string")}
    ident = [ec.event_id_column] if ec.event_id_column else sorted(data_cols)
    key = F.xxhash64(*[canon.get(c, F.trim(F.col(c).cast("string"))) for c in ident])
    raw = F.concat_ws(sep, *[F.col(c).cast("string") for c in data_cols]) if CORRUPT in events.columns else (
        F.to_json(F.struct(*[F.col(c) for c in data_cols])))
    parsed = events.select(
        item.alias("item_id"), ent.alias("source_id"), token.alias("token"), weight.alias("w"), ts.alias("ts"),
        key.alias("key"), F.coalesce(corrupt, raw).alias("raw"), F.col("_load").alias("load"),
        F.col("_file").alias("source_file"), corrupt.isNotNull().alias("_corrupt"),
        (F.lit(None).cast("long") if not ec.movie_column else ids.get(ec.movie_column, _id(ec.movie_column))).alias("_movie"),
        *[v.isNull().alias(f"_bad_{i}") for i, v in enumerate(ids.values())],
    )
    w = F.col("w")
    bad_w = w.isNull() | F.isnan(w)
    if ec.weight_range:
        lo, hi = ec.weight_range
        bad_w = bad_w | (w < lo) | (w > hi)
        if ec.weight_step:
            bad_w = bad_w | (F.abs(w / ec.weight_step - F.round(w / ec.weight_step)) > 1e-9)
    reason = F.when(F.col("_corrupt"), F.lit(MALFORMED))
    if ids:
        any_bad = F.col("_bad_0")
        for i in range(1, len(ids)):
            any_bad = any_bad | F.col(f"_bad_{i}")
        reason = reason.when(any_bad, F.lit(_bad_id(ec)))
    reason = reason.when(F.col("item_id").isNull() | (F.col("source_id") == ""), F.lit(_reason(ec, BAD_ENTITY)))
    if ec.timestamp_column:
        reason = reason.when(F.col("ts").isNull(), F.lit(_reason(ec, BAD_TIMESTAMP)))
    reason = reason.when(F.col("token").isNull() | (F.col("token") == ""), F.lit(_reason(ec, EMPTY_TOKEN)))
    reason = reason.when(bad_w, F.lit(_bad_weight(ec)))
    if movie_ids is not None:
        known = movie_ids.select(F.col("item_id").alias("_movie"), F.lit(True).alias("_known")).dropDuplicates(["_movie"])
        parsed = parsed.join(F.broadcast(known), "_movie", "left")
        reason = reason.when(F.col("_known").isNull(), F.lit(_unknown_movie(ec)))
    classified = parsed.withColumn("reason", reason)
    nth = F.row_number().over(Window.partitionBy(F.col("reason").isNull(), "key").orderBy("source_file", "raw"))
    return classified.withColumn(
        "reason", F.when(F.col("reason").isNull() & (nth > 1), F.lit(_reason(ec, DUPLICATE))).otherwise(F.col("reason"))
    ).select("item_id", "source_id", "token", "w", "ts", "key", "raw", "load", "source_file", "reason")


def after(events: DataFrame, since: int | None) -> DataFrame:
    """Events at or after ``since`` (Unix seconds). Events without a timestamp stay (they are quarantined
    when the log has a timestamp column)."""
    if since is None:
        return events
    return events.filter(F.col("ts").isNull() | (F.col("ts") >= since))


def since_epoch(since: str) -> int | None:
    """``data.since`` (``YYYY-MM-DD``) as Unix seconds at 00:00 UTC, or None when empty."""
    import datetime as dt

    if not since:
        return None
    return int(dt.datetime.combine(dt.date.fromisoformat(since), dt.time(), dt.UTC).timestamp())


def split_seen(events: DataFrame, state: DataFrame | None) -> tuple[DataFrame, DataFrame]:
    """(events not loaded before, events loaded before). A valid event was loaded before when its identity
    hash is in the state; a rejected line when its load already had as many copies of that text
    quarantined. No watermark is involved, so an event that arrives late, with an old timestamp, is new."""
    if state is None:
        return events, events.limit(0)
    known = state.filter(F.col("kind") == "seen").select("key", F.lit(True).alias("_seen")).dropDuplicates(["key"])
    valid = events.filter(F.col("reason").isNull()).join(known, "key", "left")
    before = state.filter(F.col("kind") == "rejected").groupBy("load", "raw").agg(F.sum("n").alias("_n"))
    nth = F.row_number().over(Window.partitionBy("load", "raw").orderBy("source_file", "reason"))
    rejected = (
        events.filter(F.col("reason").isNotNull()).withColumn("_nth", nth).join(before, ["load", "raw"], "left")
        .withColumn("_seen", F.col("_nth") <= F.coalesce(F.col("_n"), F.lit(0))).drop("_nth", "_n")
    )
    both = valid.unionByName(rejected)
    seen = F.coalesce(F.col("_seen"), F.lit(False))
    return both.filter(~seen).drop("_seen"), both.filter(seen).drop("_seen")


def merge_pairs(state: DataFrame | None, good: DataFrame, combine: str = "sum") -> DataFrame:
    """item_id, source_id, token, w, n (events), ts (latest) over earlier and new valid events: weights
    summed (``sum``) or the latest event's by timestamp, then the larger weight (``latest``, n = 1)."""
    cols = ["item_id", "source_id", "token", "w", "n", "ts"]
    if combine == "latest":
        latest = Window.partitionBy("item_id", "token").orderBy(F.desc("ts"), F.desc("w"))
        new = good.select("item_id", "source_id", "token", "w", F.lit(1).cast("long").alias("n"), "ts")
        if state is not None:
            new = new.unionByName(state.filter(F.col("kind") == "pair").select(*cols))
        return new.withColumn("_k", F.row_number().over(latest)).filter("_k = 1").drop("_k")
    new = good.groupBy("item_id", "token").agg(
        F.first("source_id").alias("source_id"), F.sum("w").alias("w"), F.count("*").alias("n"), F.max("ts").alias("ts")
    )
    if state is not None:
        new = new.unionByName(state.filter(F.col("kind") == "pair").select(*cols))
    return new.groupBy("item_id", "token").agg(
        F.first("source_id", ignorenulls=True).alias("source_id"), F.sum("w").alias("w"), F.sum("n").alias("n"),
        F.max("ts").alias("ts"),
    )


def vocabulary(pairs: DataFrame, top_k: int, min_support: int, numeric: bool = False) -> list[tuple[str, int, int]]:
    """(token, events, entities) of the top_k tokens by events with >= min_support events, then by token
    (as a number when ``numeric``): the feature order."""
    order = [F.desc("events")] + ([F.expr("try_cast(token as long)").asc_nulls_last()] if numeric else []) + [F.asc("token")]
    rows = (
        pairs.groupBy("token").agg(F.sum("n").alias("events"), F.count("*").alias("df"))
        .filter(F.col("events") >= min_support).orderBy(*order).limit(top_k).collect()
    )
    return [(r["token"], int(r["events"]), int(r["df"])) for r in rows]


def centred(pairs: DataFrame, by: str) -> DataFrame:
    """``pairs`` with w minus the mean w of its entity's (``by=entity``) or token's (``token``) pairs."""
    if not by:
        return pairs
    group = "item_id" if by == "entity" else "token"
    return pairs.withColumn("w", F.col("w") - F.avg("w").over(Window.partitionBy(group)))


def hashed(pairs: DataFrame, buckets: int, numeric: bool = False) -> DataFrame:
    """``pairs`` with each token replaced by its bucket (``pmod(xxhash64(token), buckets)``, of the
    integer for a ``numeric`` token) and the weights of a bucket summed; df = 1."""
    h = F.xxhash64(F.col("token").cast("long") if numeric else F.col("token"))
    return (
        pairs.withColumn("token", F.pmod(h, F.lit(buckets)).cast("string"))
        .groupBy("item_id", "token").agg(F.first("source_id").alias("source_id"), F.sum("w").alias("w"))
    )


def weighted(pairs: DataFrame, vocab: list[tuple[str, int, int]], ec, n_items: int | None = None) -> DataFrame:
    """item_id, feature (token), value, source_id: the weighted pairs of vocabulary tokens. ``n_items``: the
    entities of the idf (default: those in ``pairs``)."""
    spark = pairs.sparkSession
    index = spark.createDataFrame([(t, df) for t, _, df in vocab], "token string, df long")
    p = pairs.join(F.broadcast(index), "token")
    per = Window.partitionBy("item_id")
    w = F.col("w")
    n_items = pairs.select("item_id").distinct().count() if n_items is None else n_items
    if ec.weighting == "binary":
        v = F.when(w > 0, 1.0).otherwise(0.0)
    elif ec.weighting == "relevance":
        v = w / F.max("w").over(per)
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


# ---------------------------------------------------------------- state rows


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


def new_state(spark, source: str, ec, pairs, events, state, loads: list[tuple[str, str | None]]) -> DataFrame:
    """The state after this load: the pairs, seen identities (earlier and this load's valid events),
    rejected lines per load (summed over runs), one row per load (this run's and earlier ones) and the
    columns the pairs are of."""
    seen = _state(events.filter(F.col("reason").isNull()).select("key"), source, "seen")
    rejected = events.filter(F.col("reason").isNotNull()).groupBy("load", "raw").agg(F.count("*").alias("n"))
    keys = spark.createDataFrame(loads, "load string, signature string")
    agg = events.groupBy("load").agg(F.count("*").alias("n"), F.max("ts").alias("ts"))
    load_rows = keys.join(agg, "load", "left").select("load", "signature", F.coalesce("n", F.lit(0)).alias("n"), "ts")
    if state is not None:
        seen = seen.unionByName(state.filter(F.col("kind") == "seen"))
        rejected = rejected.unionByName(state.filter(F.col("kind") == "rejected").select("load", "raw", "n"))
        rejected = rejected.groupBy("load", "raw").agg(F.sum("n").alias("n"))
    columns = spark.createDataFrame([(ec.entity_column, ec.token_column)], "source_id string, token string")
    out = (
        _state(pairs, source, "pair").unionByName(seen).unionByName(_state(rejected, source, "rejected"))
        .unionByName(_state(load_rows, source, "load")).unionByName(_state(columns, source, "columns"))
    )
    if state is not None:
        out = out.unionByName(state.filter(F.col("kind") == "load").withColumn("source", F.lit(source)))
    return out


# ---------------------------------------------------------------- composition


def read(spark: SparkSession, cfg) -> SourceResult:
    """Events -> one vector per entity (see the module docstring), merged with earlier loads when
    incremental: features item_id long, features array<float>; items item_id (+ source_id for a mapped
    entity, + title and genres from movies.csv); quarantined events with their reason; the new state as
    an extra table. Raises ``InputError`` on an unreadable input, missing columns, another source's
    state, or when no token is in the vocabulary."""
    ec, options = settings(cfg)
    source = cfg.data.source
    fmt = "catalog" if ec.format == "catalog" else None
    loads = [] if fmt else find_loads(cfg.data.input, ec.file, cfg.data.since)
    fmt = fmt or table_format(loads[0][1][0] if loads else cfg.data.input, ec.format, "data.events.format")
    state = read_state(spark, cfg.paths.root, source, ec) if ec.incremental else None
    done, watermark = loaded(state)
    flat = len(loads) == 1 and not PARTITION.match(loads[0][0])
    if fmt == "catalog" or flat:
        # A flat file is read whole each time; events loaded before are known by their identity.
        name = cfg.data.input if fmt == "catalog" else loads[0][0]
        loads = [(f"{name}@{cfg.data.since or 'all'}", loads[0][1] if loads else [])]
    else:
        # A partition is read again only when its files changed (a late file, or one that grew).
        skipped = [k for k, f in loads if k in done and (None in done[k] or signature(f) in done[k])]
        if skipped:
            log.info("events: partitions already loaded, skipped: %s", ", ".join(skipped))
        loads = [(k, f) for k, f in loads if k not in skipped]
    movies_path = movies_file(cfg.data.input) if ec.movie_column else None
    movies_lines = read_csv_strings(spark, movies_path, MOVIES_HEADER) if movies_path else None
    movie_ids = movie_rows(movies_lines).filter(F.col("reason").isNull()).select("item_id") if movies_path else None
    table = read_events(spark, cfg, ec, options, fmt, loads)
    sep = options.get("sep", options.get("delimiter", ","))
    events = after(parse(table, ec, movie_ids, sep), since_epoch(cfg.data.since) if ec.timestamp_column else None)
    events, seen = split_seen(events, state)
    events = events.persist(StorageLevel.MEMORY_AND_DISK)
    good = events.filter(F.col("reason").isNull())
    pairs = merge_pairs(state, good, ec.combine).persist(StorageLevel.MEMORY_AND_DISK)
    numeric = ec.token_column in ec.id_columns
    values = centred(pairs, ec.centre_by)
    if ec.vocabulary == "hash":
        values = hashed(values, ec.top_k, numeric)
        vocab = [(str(i), 0, 0) for i in range(ec.top_k)]
    else:
        vocab = vocabulary(pairs, ec.top_k, ec.min_support, numeric)
    if not vocab:
        events.unpersist()
        pairs.unpersist()
        raise InputError(f"{cfg.data.input}: no token has data.events.min_support={ec.min_support} events; nothing to build")
    names = [f"{ec.token_prefix}hash_{t}" if ec.vocabulary == "hash" else f"{ec.token_prefix}{t}" for t, _, _ in vocab]
    n_items = pairs.select("item_id").distinct().count()
    rows = weighted(values, vocab, ec, n_items).withColumn("reason", F.lit(None).cast("string"))
    rows = rows.withColumn("meta", F.struct("source_id"))
    all_vecs = long_vectors(rows, [t for t, _, _ in vocab], fill=True).persist(StorageLevel.MEMORY_AND_DISK)
    vecs = all_vecs
    if cfg.data.limit:
        # The vectors of the `limit` smallest item ids; the events of the others are quarantined.
        max_id = all_vecs.select("item_id").orderBy("item_id").limit(cfg.data.limit).agg(F.max("item_id")).first()[0]
        vecs = all_vecs if max_id is None else all_vecs.filter(F.col("item_id") <= max_id)
    features = vecs.select("item_id", F.transform("vec", lambda x: x.cast("float")).alias("features"))
    mapped = ec.entity_column not in ec.id_columns and dict(table.dtypes).get(ec.entity_column) not in (
        "tinyint", "smallint", "int", "bigint")
    items = vecs.select("item_id", *([F.col("meta.source_id").alias("source_id")] if mapped else []))
    if movies_lines is not None and ec.movie_column == ec.entity_column:
        items = movie_items(movies_lines, items)
    unused = (
        good.join(vecs.select("item_id", F.lit(True).alias("_vec")), "item_id", "left").filter(F.col("_vec").isNull())
        .join(all_vecs.select("item_id", F.lit(True).alias("_any")), "item_id", "left")
    )
    no_vector = unused.select("source_file", "raw", F.when(F.col("_any").isNull(), F.lit(_reason(ec, NO_VOCAB)))
                              .otherwise(F.lit(OVER_LIMIT)).alias("reason"))
    quarantine = events.filter(F.col("reason").isNotNull()).select("source_file", "raw", "reason").unionByName(no_vector)
    meta_bad = movie_rejects(movies_lines, movies_path) if movies_lines is not None else None
    if meta_bad is not None:
        quarantine = quarantine.unionByName(meta_bad)
    state_out = new_state(spark, source, ec, pairs, events, state, [(k, signature(f)) for k, f in loads])
    without = pairs.select("item_id").distinct().join(all_vecs.select("item_id"), "item_id", "left_anti")
    summary = without.agg(F.count("*"), F.slice(F.sort_array(F.collect_list("item_id")), 1, 20)).first()
    if summary[0]:
        log.warning("events: %d entities have no token in the vocabulary and get no vector", summary[0])
    files = [f for _, fs in loads for f in fs] + ([movies_path] if movies_path else [])

    def rows_in() -> int:
        return events.count() + (meta_bad.count() if meta_bad is not None else 0)

    def rows_used() -> int:
        return good.count() - unused.count()

    def report() -> dict:
        # Late: valid new events at or before the newest timestamp of the earlier loads. Loaded, and said so.
        late = 0
        if watermark is not None:
            late = events.filter(F.col("reason").isNull() & (F.col("ts") <= watermark)).count()
        n_seen = seen.count()
        if late:
            log.warning("events: %d late events (timestamp at or before the last load's newest, %d) loaded", late, watermark)
        if n_seen:
            log.info("events: %d events or lines loaded before, skipped", n_seen)
        return {"late_events": late, "events_loaded_before": n_seen,
                "events": {"weighting": ec.weighting, "loads": [k for k, _ in loads], "already_loaded": n_seen,
                           "vocabulary": [{"token": t, "events": e, "entities": d} for t, e, d in vocab[:50]]}}

    def cleanup() -> None:
        for df in (all_vecs, pairs, events):
            df.unpersist()

    return SourceResult(
        features=features,
        items=items,
        quarantine=quarantine,
        feature_names=names,
        input_files=files or [cfg.data.input],
        rows_in=rows_in,
        rows_used=rows_used,
        extra={
            "vocab_size": len(vocab),
            "weighting": ec.weighting,
            "since": cfg.data.since,
            "loads": [k for k, _ in loads],
            "items_without_vocab_tags": int(summary[0]),
            "items_without_vocab_tags_sample": list(summary[1] or []),
        },
        report=report,
        extra_tables={STATE_TABLE: state_out},
        cleanup=cleanup,
    )


for _name in ("events", *PRESETS):
    register(_name, check, read)
