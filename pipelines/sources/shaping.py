"""Shape a table into one vector per id: the wide, long and array layouts every table-like source
(``jdbc``, ``table``) shares, with their quarantine reasons and counts.

``shape=wide``: one row per id, one column per feature (``feature_columns``, or every numeric column
but the id and ``metadata_columns``). ``shape=long``: rows of (id, feature, value), pivoted with the
feature names sorted; a missing pair is 0.0 (``fill_missing``) or quarantines the id.
``shape=array``: one row per id with one array column of numbers (``array_column``), all of one width.

A shape config is any object with the attributes ``shape``, ``id_column``, ``feature_columns``,
``metadata_columns``, ``feature_column``, ``value_column``, ``fill_missing`` (and ``array_column``
for the array shape): ``JdbcConfig`` and ``TableConfig`` both are.
"""

from __future__ import annotations

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.sources import InputError, SourceResult

BAD_ID = "null or non-integer id"
BAD_VALUE = "null or non-numeric value"
BAD_FEATURE = "null feature name"
DUPLICATE_ID = "duplicate id"
DUPLICATE_PAIR = "duplicate (id, feature)"
INCOMPLETE = "incomplete vector"
BAD_WIDTH = "array of another width"

NUMERIC = (T.ByteType, T.ShortType, T.IntegerType, T.LongType, T.FloatType, T.DoubleType, T.DecimalType)


def stable_id(col: str | Column) -> Column:
    """A string id -> a stable ``long`` item id: xxHash64 (seed 42, Spark's ``xxhash64``) of the
    trimmed string; null or blank stays null. The same string gives the same id on every run and
    every machine, so incremental loads and re-runs keep their ids; a collision between two
    distinct strings (about n^2 / 2^65 likely) shows up as a duplicate id in quarantine."""
    c = F.trim(F.col(col) if isinstance(col, str) else col)
    return F.when(c.isNull() | (c == ""), F.lit(None).cast("long")).otherwise(F.xxhash64(c))


def _raw(df: DataFrame) -> Column:
    return F.to_json(F.struct(*[F.col(c) for c in df.columns]))


def _need(df: DataFrame, cols: list[str], source: str) -> None:
    for c in cols:
        if c not in df.columns:
            raise InputError(f"{source}: column {c!r} not in the input (columns: {df.columns})")


def _meta(metadata: list[str]) -> Column:
    return F.struct(*[F.col(c) for c in metadata]).alias("meta") if metadata else F.lit(None).alias("meta")


def wide_rows(df: DataFrame, id_col: str, features: list[str], metadata: list[str], source: str = "jdbc") -> DataFrame:
    """item_id, vec (array<double>), meta struct, raw, reason (null = used)."""
    _need(df, [id_col, *features, *metadata], source)
    item = F.expr(f"try_cast(`{id_col}` as long)")
    vals = [F.expr(f"try_cast(`{c}` as double)") for c in features]
    first_bad = F.lit(None).cast("string")
    for c, v in reversed(list(zip(features, vals, strict=True))):
        first_bad = F.when(v.isNull() | F.isnan(v), F.lit(c)).otherwise(first_bad)
    rows = df.select(
        item.alias("item_id"), F.array(*vals).alias("vec"), _meta(metadata), _raw(df).alias("raw"),
        first_bad.alias("bad_col"),
    )
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("bad_col").isNotNull(), F.concat(F.lit(BAD_VALUE + " in "), F.col("bad_col")))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
    )
    return rows.withColumn("reason", reason).drop("bad_col")


def array_rows(df: DataFrame, id_col: str, array_col: str, metadata: list[str], source: str) -> DataFrame:
    """item_id, vec (array<double>), meta, raw, reason: the array shape. The width is the most
    common array length; an array of another width, a null array or a null/NaN element is a reason."""
    _need(df, [id_col, array_col, *metadata], source)
    rows = df.select(
        F.expr(f"try_cast(`{id_col}` as long)").alias("item_id"),
        F.expr(f"try_cast(`{array_col}` as array<double>)").alias("vec"),
        _meta(metadata),
        _raw(df).alias("raw"),
    )
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    hole = F.exists("vec", lambda x: x.isNull() | F.isnan(x))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("vec").isNull() | hole, F.lit(f"{BAD_VALUE} in {array_col}"))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
    )
    return rows.withColumn("reason", reason)


def array_width(rows: DataFrame) -> int | None:
    """The most common length of the valid arrays (ties: the larger), or None without one."""
    top = (
        rows.filter(F.col("reason").isNull()).groupBy(F.size("vec").alias("w")).count()
        .orderBy(F.desc("count"), F.desc("w")).first()
    )
    return None if top is None else int(top["w"])


def wide_features(
    df: DataFrame, sc, source: str = "jdbc", what: str = "the table", skip: list[str] = ()
) -> tuple[list[str], list[str]]:
    """Feature and metadata column names of a wide table; inferred features leave out the id, the
    metadata columns and ``skip``."""
    if sc.feature_columns:
        return list(sc.feature_columns), list(sc.metadata_columns)
    skip = {sc.id_column, *sc.metadata_columns, *skip}
    feats = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, NUMERIC)]
    if not feats:
        raise InputError(
            f"{source}: {what} has no numeric column besides {sc.id_column!r}; set data.{source}.feature_columns"
        )
    return feats, list(sc.metadata_columns)


def long_rows(
    df: DataFrame, id_col: str, feat_col: str, value_col: str, metadata: list[str] = (), source: str = "jdbc"
) -> DataFrame:
    """item_id, feature, value, meta, raw, reason (null = valid pair)."""
    _need(df, [id_col, feat_col, value_col, *metadata], source)
    rows = df.select(
        F.expr(f"try_cast(`{id_col}` as long)").alias("item_id"),
        F.col(feat_col).cast("string").alias("feature"),
        F.expr(f"try_cast(`{value_col}` as double)").alias("value"),
        _meta(list(metadata)),
        _raw(df).alias("raw"),
    )
    n_pair = F.count("*").over(Window.partitionBy("item_id", "feature"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("feature").isNull(), F.lit(BAD_FEATURE))
        .when(F.col("value").isNull() | F.isnan("value"), F.lit(BAD_VALUE))
        .when(n_pair > 1, F.lit(DUPLICATE_PAIR))
    )
    return rows.withColumn("reason", reason)


def long_vectors(rows: DataFrame, names: list[str], fill: bool) -> DataFrame:
    """item_id, vec, complete, meta (the first valid pair's): valid pairs pivoted in ``names`` order."""
    dim = len(names)
    index = rows.sparkSession.createDataFrame([(n, i) for i, n in enumerate(names)], "feature string, idx int")
    pairs = rows.filter(F.col("reason").isNull()).join(F.broadcast(index), "feature")
    per = pairs.groupBy("item_id").agg(
        F.map_from_entries(F.collect_list(F.struct("idx", "value"))).alias("m"),
        F.count("*").alias("k"),
        F.first("meta", ignorenulls=True).alias("meta"),
    )
    vec = F.transform(F.sequence(F.lit(0), F.lit(dim - 1)), lambda i: F.coalesce(F.col("m")[i], F.lit(0.0)))
    complete = F.lit(True) if fill else F.col("k") == dim
    return per.select("item_id", vec.alias("vec"), complete.alias("complete"), "meta")


# ---------------------------------------------------------------- composition


def _f32(col: str) -> Column:
    return F.transform(col, lambda x: x.cast("float"))


def shaped(
    table: DataFrame, sc, *, source: str, origin: str, what: str, extra: dict, items_extra: list[str] = ()
) -> SourceResult:
    """``table`` in ``sc.shape`` -> the source's result: features, items (item_id + metadata
    columns + ``items_extra``, which are metadata columns not named by the config, e.g. a string
    id's original value), quarantine (``origin`` as its source_file) and counts.

    Raises InputError naming ``what`` when a named column is missing or nothing valid is left."""
    metadata = [*dict.fromkeys([*sc.metadata_columns, *items_extra])]
    if sc.shape == "long":
        return _long(table, sc, metadata, source=source, origin=origin, what=what, extra=extra)
    if sc.shape == "array":
        rows = array_rows(table, sc.id_column, sc.array_column, metadata, source).persist(StorageLevel.MEMORY_AND_DISK)
        width = array_width(rows)
        if width is None or width < 1:
            rows.unpersist()
            raise InputError(f"{source}: {what} has no valid non-empty array in column {sc.array_column!r}")
        rows = rows.withColumn(
            "reason", F.coalesce("reason", F.when(F.size("vec") != width, F.lit(f"{BAD_WIDTH} (expected {width})")))
        )
        names = [f"{sc.array_column}[{i}]" for i in range(width)]
    else:
        names = wide_features(table, sc, source, what, skip=metadata)[0]
        rows = wide_rows(table, sc.id_column, names, metadata, source).persist(StorageLevel.MEMORY_AND_DISK)
    good = rows.filter(F.col("reason").isNull())
    quarantine = rows.filter(F.col("reason").isNotNull()).select(F.lit(origin).alias("source_file"), "raw", "reason")
    return SourceResult(
        features=good.select("item_id", _f32("vec").alias("features")),
        items=good.select("item_id", *[F.col(f"meta.{c}").alias(c) for c in metadata]),
        quarantine=quarantine,
        feature_names=names,
        input_files=[origin],
        rows_in=rows.count,
        rows_used=None,
        extra=extra,
        cleanup=rows.unpersist,
    )


def _long(table: DataFrame, sc, metadata: list[str], *, source: str, origin: str, what: str, extra: dict) -> SourceResult:
    rows = long_rows(table, sc.id_column, sc.feature_column, sc.value_column, metadata, source)
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    names = [
        r["feature"]
        for r in rows.filter(F.col("reason").isNull()).select("feature").distinct().orderBy("feature").collect()
    ]
    if not names:
        rows.unpersist()
        raise InputError(f"{source}: {what} has no valid (id, feature, value) row")
    vecs = long_vectors(rows, names, sc.fill_missing).persist(StorageLevel.MEMORY_AND_DISK)
    features = vecs.filter("complete").select("item_id", _f32("vec").alias("features"))
    incomplete = vecs.filter(~F.col("complete")).select("item_id", F.lit(True).alias("_inc"))
    flagged = rows.join(incomplete, "item_id", "left").withColumn(
        "reason", F.coalesce(F.col("reason"), F.when(F.col("_inc"), F.lit(INCOMPLETE)))
    )
    quarantine = flagged.filter(F.col("reason").isNotNull()).select(F.lit(origin).alias("source_file"), "raw", "reason")
    items = vecs.filter("complete").select("item_id", *[F.col(f"meta.{c}").alias(c) for c in metadata])

    def cleanup() -> None:
        vecs.unpersist()
        rows.unpersist()

    return SourceResult(
        features=features,
        items=items,
        quarantine=quarantine,
        feature_names=names,
        input_files=[origin],
        rows_in=rows.count,
        rows_used=lambda: flagged.filter(F.col("reason").isNull()).count(),
        extra=extra,
        cleanup=cleanup,
    )
