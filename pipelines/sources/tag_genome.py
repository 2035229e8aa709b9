"""Tag Genome (MovieLens ml-20m / ml-25m / ml-latest): long-format scores -> one vector per movie.

``genome-scores.csv`` (movieId,tagId,relevance) is pivoted to one vector per movie ordered by tagId;
the width is the number of tags in ``genome-tags.csv``. The scores file is scanned and shuffled once:
a single groupBy collects each movie's good (index, relevance) pairs, and each line rejected on its
own (malformed, bad numbers, unknown tag) forms its own group keyed by its raw text and reason. The
vectors, every quarantined line and the counts all come out of that one cached aggregate. Nothing is
zero-filled: a movie without every tag exactly once goes to quarantine with all its lines.
"""

from __future__ import annotations

import logging

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.window import Window

from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.csvfiles import (
    CORRUPT,
    check_header,
    check_readable,
    find_file,
    read_csv_strings,
    read_csv_typed,
)

log = logging.getLogger(__name__)

SCORES_NAMES = ("genome-scores.csv", "genome_scores.csv")
TAGS_NAMES = ("genome-tags.csv", "genome_tags.csv")
MOVIES_NAMES = ("movies.csv", "movie.csv")
SCORES_HEADER = ("movieId", "tagId", "relevance")
SCORES_SCHEMA = T.StructType(
    [
        T.StructField("movieId", T.LongType()),
        T.StructField("tagId", T.IntegerType()),
        T.StructField("relevance", T.FloatType()),
    ]
)
TAGS_HEADER = ("tagId", "tag")
MOVIES_HEADER = ("movieId", "title", "genres")

# Quarantine reasons (stable strings: tests and dashboards group by them).
MALFORMED = "malformed line"
BAD_ID = "non-integer movieId or tagId"
NON_NUMERIC = "non-numeric relevance"
OUT_OF_RANGE = "relevance out of range [0, 1]"
UNKNOWN_TAG = "unknown tagId"
DUPLICATE = "duplicate (movieId, tagId)"
INCOMPLETE = "incomplete vector"
OVER_LIMIT = "beyond data.limit"
NO_GENRES = "(no genres listed)"
MOVIES_MALFORMED = "malformed movies.csv record"
MOVIES_BAD_ID = "non-integer movieId in movies.csv"
MOVIES_DUPLICATE = "duplicate movieId in movies.csv"


def files(input_dir: str) -> dict[str, str]:
    """Paths of the scores, tags and movies CSV files under ``input_dir`` (each under one of its accepted
    names). Raises ``InputError`` when a local directory or file is missing."""
    return {
        "scores": find_file(input_dir, SCORES_NAMES),
        "tags": find_file(input_dir, TAGS_NAMES),
        "movies": find_file(input_dir, MOVIES_NAMES),
    }


def check(cfg) -> None:
    """Check the three Tag Genome files before Spark reads them: exact headers with data lines after them, and
    each ``.gz`` file readable to its end. Raises ``InputError`` naming the file otherwise."""
    f = files(cfg.data.input)
    for kind, header in (("scores", SCORES_HEADER), ("tags", TAGS_HEADER), ("movies", MOVIES_HEADER)):
        check_header(f[kind], header)
        check_readable(f[kind])


def read(spark: SparkSession, cfg) -> SourceResult:
    """Tag Genome scores -> one vector per movie ordered by tagId: features item_id long, features
    array<float> of width the number of tags; items from ``movies.csv``; malformed lines and movies without
    every tag exactly once quarantined. Raises ``InputError`` on a missing file or a bad tags file."""
    f = files(cfg.data.input)
    tags = load_tags(spark, f["tags"])
    lines = read_scores(spark, f["scores"])
    movies = read_csv_strings(spark, f["movies"], MOVIES_HEADER)
    return genome_result(spark, lines, tags, movies, f["scores"], cfg.data.limit, list(f.values()), f["movies"])


register("tag_genome", check, read)


def read_scores(spark: SparkSession, path: str) -> DataFrame:
    """movieId long, tagId int, relevance float and ``_corrupt_record`` (see classify_scores)."""
    return read_csv_typed(spark, path, SCORES_SCHEMA)


# ---------------------------------------------------------------- the tag table (small, on the driver)


def load_tags(spark: SparkSession, path: str) -> list[tuple[int, str]]:
    """(tagId, tag) sorted by tagId. The tag table fixes the vector width, so any doubt about it is
    an error naming the file, not a quarantine entry."""
    rows = read_csv_strings(spark, path, TAGS_HEADER).collect()  # ~1,128 rows
    tags: dict[int, str] = {}
    for n, r in enumerate(rows, start=2):
        try:
            tag_id = int(str(r["tagId"]).strip())
        except ValueError:
            raise InputError(f"{path}: line {n}: tagId {r['tagId']!r} is not an integer") from None
        if r[CORRUPT] is not None or r["tag"] is None:
            raise InputError(f"{path}: line {n}: expected 2 fields tagId,tag, got {r[CORRUPT] or r['tagId']!r}")
        if tag_id in tags:
            raise InputError(f"{path}: tagId {tag_id} appears twice")
        tags[tag_id] = r["tag"]
    if not tags:
        raise InputError(f"{path}: no tags; expected lines tagId,tag after the header")
    return sorted(tags.items())


# ---------------------------------------------------------------- pure transforms


def contiguous_start(tag_ids: list[int]) -> int | None:
    """The first tag id when the ids run first, first + 1, ... (the real releases number their tags
    1..1128): a vector position and its tag id are then one addition apart, no lookup. Else None."""
    first = tag_ids[0] if tag_ids else 0
    return first if tag_ids == list(range(first, first + len(tag_ids))) else None


def classify_scores(lines: DataFrame, tag_ids: list[int], spark: SparkSession) -> DataFrame:
    """Typed lines (``read_scores``) -> movie_id, idx (vector position), rel, raw, reason (null = good).

    A line the typed reader could not parse keeps its raw text; it is split again here (rare lines
    only: the branch is evaluated for them alone) to tell a wrong field count from a bad id or a bad
    relevance. Other rejected lines (out of range, unknown tag) are re-assembled from their parsed
    fields as movieId,tagId,relevance, like the unused lines of incomplete movies. ``raw`` is null
    for good lines: Spark evaluates a projected column for every row, and formatting three numbers
    per good line was pure cost (the aggregate groups good lines by movie, never by text)."""
    corrupt = F.col(CORRUPT).isNotNull()
    fields = F.split(F.col(CORRUPT), ",")

    def field(i: int, sql_type: str) -> F.Column:
        return F.trim(F.trim(F.trim(fields[i]), F.lit('"'))).try_cast(sql_type)

    three = F.size(fields) == 3
    # try_cast: a no-op on the typed reader's columns; parses lines given as strings (synthetic).
    movie_id = F.when(corrupt, F.when(three, field(0, "long"))).otherwise(F.col("movieId").try_cast("long"))
    tag_id = F.when(corrupt, F.when(three, field(1, "int"))).otherwise(F.col("tagId").try_cast("int"))
    rel = F.when(corrupt, F.when(three, field(2, "float"))).otherwise(F.col("relevance").try_cast("float"))
    parsed = lines.select(
        movie_id.alias("movie_id"),
        tag_id.alias("tag_id"),
        rel.alias("rel"),
        F.col(CORRUPT),
        "movieId",
        "tagId",
        "relevance",
        (corrupt & ~three).alias("malformed"),
    )
    first = contiguous_start(tag_ids)
    if first is not None:
        in_range = (F.col("tag_id") >= first) & (F.col("tag_id") < first + len(tag_ids))
        joined = parsed.withColumn("idx", F.when(in_range, (F.col("tag_id") - first).cast("int")))
    else:
        index = spark.createDataFrame([(t, i) for i, t in enumerate(tag_ids)], "tag_id int, idx int")
        joined = parsed.join(F.broadcast(index), "tag_id", "left")
    reason = (
        F.when(F.col("malformed"), F.lit(MALFORMED))
        .when(F.col("movie_id").isNull() | F.col("tag_id").isNull(), F.lit(BAD_ID))
        .when(F.col("rel").isNull(), F.lit(NON_NUMERIC))
        .when(~((F.col("rel") >= 0.0) & (F.col("rel") <= 1.0)), F.lit(OUT_OF_RANGE))  # NaN fails too
        .when(F.col("idx").isNull(), F.lit(UNKNOWN_TAG))
    )
    # Built inside the branch: CASE WHEN evaluates a branch only for the rows that take it.
    raw = F.when(reason.isNotNull(), F.coalesce(F.col(CORRUPT), F.concat_ws(",", "movieId", "tagId", "relevance")))
    return joined.select("movie_id", "idx", "rel", raw.alias("raw"), reason.alias("reason"))


def aggregate_movies(classified: DataFrame, dim: int) -> DataFrame:
    """The one shuffle of the scores: a row per movie from its good lines, and a row per distinct
    rejected line. A movie row holds its vector when it has every tag exactly once, else its
    (idx, rel) pairs so the lines can be quarantined. A rejected line is grouped by its raw text and
    reason (movie_id null), so it rides the same shuffle and the file is scanned once; ``n_lines``
    counts identical copies. Only a single collect_list of two numbers goes through the shuffle, as
    in a bare pivot: adding a second aggregate or any string to it made the aggregation 2-3x slower
    in measurements here (the grouping key's strings are null for every good line)."""
    good = F.col("reason").isNull()
    agg = classified.groupBy(
        F.when(good, F.col("movie_id")).alias("movie_id"),
        F.when(~good, F.col("raw")).alias("raw"),
        F.col("reason"),
    ).agg(F.collect_list(F.struct("idx", "rel")).alias("pairs"))
    # pairs.idx and sort_array are compiled; transform()/array_sort() lambdas are interpreted per
    # element, a second or more per 15.6 M rows.
    idxs = F.col("pairs")["idx"]
    complete = good & (F.size("pairs") == dim) & (F.size(F.array_distinct(idxs)) == dim)
    return agg.select("movie_id", "raw", "reason", "pairs", complete.alias("complete")).select(
        "movie_id",
        "raw",
        "reason",
        "complete",
        F.when(F.col("complete"), F.sort_array("pairs")["rel"]).alias("vector"),
        F.when(good & ~F.col("complete"), F.col("pairs")).alias("pairs"),
        F.size("pairs").alias("n_lines"),
    )


def vectors(movies: DataFrame, max_id: int | None = None) -> DataFrame:
    """Complete movies (up to ``max_id`` when a limit applies) as features rows."""
    keep = F.col("complete") if max_id is None else F.col("complete") & (F.col("movie_id") <= max_id)
    return movies.filter(keep).select(F.col("movie_id").alias("item_id"), F.col("vector").alias("features"))


def bad_lines(movies: DataFrame, source_file: str) -> DataFrame:
    """Lines rejected on their own (malformed, bad id, bad relevance, unknown tag), as read, one row
    per line (identical lines were grouped in aggregate_movies)."""
    return movies.filter(F.col("reason").isNotNull()).select(
        F.lit(source_file).alias("source_file"),
        "raw",
        "reason",
        F.explode(F.array_repeat(F.lit(True), F.col("n_lines"))).alias("_copy"),
    ).drop("_copy")


def unused_lines(movies: DataFrame, tag_ids: list[int], source_file: str, max_id: int | None = None) -> DataFrame:
    """The good lines of incomplete, duplicated or over-limit movies, re-assembled from their parsed
    fields as movieId,tagId,relevance (the aggregate does not carry the raw text; see aggregate_movies)."""
    over = F.lit(False) if max_id is None else F.col("complete") & (F.col("movie_id") > max_id)
    first = contiguous_start(tag_ids)
    if first is not None:
        tag_id = F.col("p.idx") + F.lit(first)
    else:
        # One SQL literal, not 1,128 F.lit() calls through Py4J (a third of a second per job).
        tag_of = F.expr(f"array({','.join(str(int(t)) for t in tag_ids)})")
        tag_id = F.element_at(tag_of, F.col("p.idx") + 1)
    unused = movies.filter(F.col("reason").isNull() & (~F.col("complete") | over)).select(
        "movie_id",
        over.alias("over"),
        F.when(over, F.transform("vector", lambda r, i: F.struct(i.alias("idx"), r.alias("rel")))).otherwise(
            F.col("pairs")
        ).alias("pairs"),
    )
    unused = unused.select("movie_id", "over", F.explode("pairs").alias("p"))
    # A window over the few unused lines, not a filter() lambda per line over its movie's ~1,128
    # pairs: that was quadratic per movie and interpreted, ~3 s of a 15.6 M-row ingest.
    dup = F.count(F.lit(1)).over(Window.partitionBy("movie_id", "p.idx")) > 1
    raw = F.concat_ws(",", F.col("movie_id"), tag_id, F.col("p.rel"))
    reason = F.when(F.col("over"), F.lit(OVER_LIMIT)).when(dup, F.lit(DUPLICATE)).otherwise(F.lit(INCOMPLETE))
    return unused.select(F.lit(source_file).alias("source_file"), raw.alias("raw"), reason.alias("reason"))


def movie_rows(movies_lines: DataFrame) -> DataFrame:
    """movies.csv records -> item_id, title, genres (array; empty for "(no genres listed)"), raw,
    reason (null = the record gives the item's metadata). A record that did not parse, has no
    integer movieId or repeats one (all but the first, by title) gets a reason: it is quarantined,
    so metadata is never dropped unseen."""
    corrupt = F.col(CORRUPT) if CORRUPT in movies_lines.columns else F.lit(None).cast("string")
    rows = movies_lines.select(
        F.expr("try_cast(trim(movieId) as long)").alias("item_id"),
        F.col("title"),
        F.when(F.col("genres").isNull() | (F.col("genres") == NO_GENRES), F.array().cast("array<string>"))
        .otherwise(F.split("genres", r"\|"))
        .alias("genres"),
        F.coalesce(corrupt, F.concat_ws(",", "movieId", "title", "genres")).alias("raw"),
        corrupt.isNotNull().alias("_corrupt"),
    )
    nth = F.row_number().over(Window.partitionBy("item_id").orderBy("title", "raw"))
    reason = (
        F.when(F.col("_corrupt"), F.lit(MOVIES_MALFORMED))
        .when(F.col("item_id").isNull(), F.lit(MOVIES_BAD_ID))
        .when(nth > 1, F.lit(MOVIES_DUPLICATE))
    )
    return rows.select("item_id", "title", "genres", "raw", reason.alias("reason"))


def movie_items(movies_lines: DataFrame, item_ids: DataFrame) -> DataFrame:
    """item_id, title, genres (array; empty for "(no genres listed)") for every output item; an item
    missing from movies.csv keeps null metadata rather than being dropped (see missing_metadata)."""
    meta = movie_rows(movies_lines).filter(F.col("reason").isNull()).select("item_id", "title", "genres")
    return item_ids.join(meta, "item_id", "left")


def movie_rejects(movies_lines: DataFrame, source_file: str) -> DataFrame:
    """Quarantine rows (source_file, raw, reason) of the movies.csv records that give no metadata."""
    rows = movie_rows(movies_lines)
    return rows.filter(F.col("reason").isNotNull()).select(F.lit(source_file).alias("source_file"), "raw", "reason")


def missing_metadata(movies_lines: DataFrame, item_ids: DataFrame, what: str = "movies.csv") -> dict:
    """Manifest entries for the published items without a movies.csv row (they are published with
    null title and genres), with a warning: their number and the first 20 ids."""
    meta = movie_rows(movies_lines).filter(F.col("reason").isNull()).select("item_id")
    missing = item_ids.join(meta, "item_id", "left_anti")
    row = missing.agg(F.count("*").alias("n"), F.slice(F.sort_array(F.collect_list("item_id")), 1, 20).alias("s")).first()
    n, sample = int(row["n"]), [int(i) for i in (row["s"] or [])]
    if n:
        log.warning("%d published items have no %s row (title and genres left empty), e.g. %s", n, what, sample)
    return {"items_without_metadata": n, "items_without_metadata_sample": sample}


# ---------------------------------------------------------------- composition


def genome_result(
    spark: SparkSession,
    lines: DataFrame,
    tags: list[tuple[int, str]],
    movies_lines: DataFrame | None,
    source_file: str,
    limit: int = 0,
    input_files: list[str] | None = None,
    movies_file: str | None = None,
) -> SourceResult:
    """Scores lines + tag table + movies lines -> SourceResult. Caches the per-movie aggregate
    (vectors of complete movies, pairs of the others): every output and count is read from it.

    ``rows_in`` counts the scores lines and the movies.csv records quarantined (``movies_file``
    names them); items without a movies.csv row are published and reported in the manifest.
    ``movies_lines`` None: no metadata (the caller builds ``items``)."""
    tag_ids = [t for t, _ in tags]
    dim = len(tag_ids)
    classified = classify_scores(lines, tag_ids, spark)
    movies = aggregate_movies(classified, dim).persist(StorageLevel.MEMORY_AND_DISK)
    max_id = None
    if limit:
        # The `limit` smallest complete movie ids are kept; the lines of later ones are quarantined.
        max_id = movies.filter("complete").select("movie_id").orderBy("movie_id").limit(limit).agg(
            F.max("movie_id")
        ).first()[0]
    features = vectors(movies, max_id)
    counted: dict[str, int] = {}
    if movies_lines is None:
        meta_bad = classified.sparkSession.createDataFrame([], "source_file string, raw string, reason string")
        items = features.select("item_id")
    else:
        meta_bad = movie_rejects(movies_lines, movies_file or "movies.csv")
        items = movie_items(movies_lines, features.select("item_id"))

    def count() -> dict[str, int]:
        # Every scores line is one element of one aggregate row's pairs (n_lines): one pass over the cache.
        if not counted:
            used = F.when(F.col("complete") & (F.lit(True) if max_id is None else F.col("movie_id") <= max_id), 1)
            row = movies.agg(F.sum("n_lines").alias("rows_in"), F.count(used).alias("items")).first()
            n_meta_bad = meta_bad.count()
            counted.update(rows_in=int(row["rows_in"] or 0) + n_meta_bad, rows_used=int(row["items"]) * dim,
                           metadata_quarantined=n_meta_bad)
        return counted

    def report() -> dict:
        if movies_lines is None:
            return {}
        return {"metadata_quarantined": count()["metadata_quarantined"],
                **missing_metadata(movies_lines, features.select("item_id"))}

    return SourceResult(
        features=features,
        items=items,
        quarantine=bad_lines(movies, source_file)
        .unionByName(unused_lines(movies, tag_ids, source_file, max_id))
        .unionByName(meta_bad),
        feature_names=[name for _, name in tags],
        input_files=input_files or [source_file],
        rows_in=lambda: count()["rows_in"],
        rows_used=lambda: count()["rows_used"],
        extra={"tag_ids": tag_ids},
        report=report,
        cleanup=lambda: movies.unpersist() and None,
    )

