"""Shape a table into one vector per id: the wide, long and array layouts every table-like source
(``jdbc``, ``table``) shares, with their quarantine reasons and counts.

``shape=wide``: one row per id, one column per feature (``feature_columns``, or every numeric column
but the id and ``metadata_columns``). ``shape=long``: rows of (id, feature, value), pivoted with the
feature names sorted; a missing pair is 0.0 (``fill_missing``) or quarantines the id.
``shape=array``: one row per id with one array column of numbers (``array_column``), all of one width
(the most common length); a wide table whose only feature column is an array is read the same way.

Every value a float32 vector cannot hold (null, NaN, infinity, a magnitude beyond float32's largest
finite value, a null or missing array element) quarantines its row or pair with a reason naming the
column; none raises a Java exception.

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
from pipelines.sources.tag_genome import OVER_LIMIT

BAD_ID = "null or non-integer id"
BAD_VALUE = "null or non-numeric value"
NOT_FINITE = "NaN or infinite value"
BEYOND_F32 = "value beyond float32 range"
NULL_ARRAY = "null array"
NULL_ELEMENT = "null element"
NOT_FINITE_ELEMENT = "NaN or infinite element"
ELEMENT_BEYOND_F32 = "element beyond float32 range"
RAGGED = "array length differs from the vector width"
# The largest finite float32: a larger double becomes infinity in the float vector.
F32_MAX = 3.4028234663852886e38
BAD_FEATURE = "null feature name"
DUPLICATE_ID = "duplicate id"
DUPLICATE_PAIR = "duplicate (id, feature)"
INCOMPLETE = "incomplete vector"

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


def value_reason(v: Column, column: str) -> Column:
    """Why the double ``v`` of ``column`` cannot go into a float32 vector, naming the column; null
    when it can. Null (or text that is no number), NaN and infinities, and magnitudes beyond
    float32's largest finite value (which would turn into infinity) are the reasons."""
    return (
        F.when(v.isNull(), F.lit(f"{BAD_VALUE} in {column}"))
        .when(F.isnan(v) | (F.abs(v) == float("inf")), F.lit(f"{NOT_FINITE} in {column}"))
        .when(F.abs(v) > F32_MAX, F.lit(f"{BEYOND_F32} in {column}"))
    )


def array_reason(arr: Column, column: str, dim: int) -> Column:
    """Why the array<double> ``arr`` of ``column`` is not a vector of width ``dim``, naming the
    column (null array, ragged length, null, non-finite or out-of-float32-range element); null when
    it is one."""
    return (
        F.when(arr.isNull(), F.lit(f"{NULL_ARRAY} in {column}"))
        .when(F.size(arr) != dim, F.format_string(f"{RAGGED} in {column}: %d values, expected {dim}", F.size(arr)))
        .when(F.exists(arr, lambda x: x.isNull()), F.lit(f"{NULL_ELEMENT} in {column}"))
        .when(F.exists(arr, lambda x: F.isnan(x) | (F.abs(x) == float("inf"))), F.lit(f"{NOT_FINITE_ELEMENT} in {column}"))
        .when(F.exists(arr, lambda x: F.abs(x) > F32_MAX), F.lit(f"{ELEMENT_BEYOND_F32} in {column}"))
    )


def is_array(df: DataFrame, column: str) -> bool:
    """True when ``column`` of ``df`` is an array column."""
    return isinstance(df.schema[column].dataType, T.ArrayType)


def array_width(df: DataFrame, column: str, source: str = "jdbc") -> int:
    """The vector width of an array column: its most common non-null length (the longest among
    equally common ones). Rows of any other length are quarantined as ragged."""
    row = (
        df.filter(F.col(column).isNotNull())
        .groupBy(F.size(column).alias("n"))
        .count()
        .orderBy(F.desc("count"), F.desc("n"))
        .first()
    )
    if row is None or row["n"] < 1:
        raise InputError(f"{source}: array column {column!r} holds no non-empty array")
    return int(row["n"])


def wide_rows(
    df: DataFrame, id_col: str, features: list[str], metadata: list[str], source: str = "jdbc", dim: int | None = None
) -> DataFrame:
    """item_id, vec (array<double>), meta struct, raw, reason (null = used). ``features`` is one
    column per feature, or a single array column (``dim`` elements, see :func:`array_width`)."""
    _need(df, [id_col, *features, *metadata], source)
    item = F.expr(f"try_cast(`{id_col}` as long)")
    if len(features) == 1 and is_array(df, features[0]):
        arr = F.expr(f"try_cast(`{features[0]}` as array<double>)")
        vec, bad = arr, array_reason(arr, features[0], dim or array_width(df, features[0], source))
    else:
        vals = [F.expr(f"try_cast(`{c}` as double)") for c in features]
        vec, bad = F.array(*vals), F.coalesce(*[value_reason(v, c) for c, v in zip(features, vals, strict=True)])
    rows = df.select(item.alias("item_id"), vec.alias("vec"), _meta(metadata), _raw(df).alias("raw"), bad.alias("bad"))
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("bad").isNotNull(), F.col("bad"))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
    )
    return rows.withColumn("reason", reason).drop("bad")


def wide_features(
    df: DataFrame, sc, source: str = "jdbc", what: str = "the table", skip: list[str] = ()
) -> tuple[list[str], list[str]]:
    """Feature and metadata column names of a wide table: ``feature_columns``, or every numeric
    column but the id, the metadata columns and ``skip``, or else the table's one numeric array
    column (a vector stored as ``double precision[]`` / ``real[]``). An array column must be the
    only feature column. Raises InputError naming ``what`` otherwise."""
    skip = {sc.id_column, *sc.metadata_columns, *skip}
    if sc.feature_columns:
        feats = list(sc.feature_columns)
    else:
        feats = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, NUMERIC)]
        if not feats:
            arrays = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, T.ArrayType)
                      and isinstance(f.dataType.elementType, NUMERIC)]
            feats = arrays if len(arrays) == 1 else []
    if not feats:
        raise InputError(
            f"{source}: {what} has no numeric column or single numeric array column besides {sc.id_column!r}; "
            f"set data.{source}.feature_columns"
        )
    arrays = [c for c in feats if c in df.columns and is_array(df, c)]
    if arrays and len(feats) > 1:
        raise InputError(
            f"data.{source}.feature_columns: {arrays[0]!r} is an array column; a vector stored as an array must be "
            f"the only feature column, got {feats}"
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
        .otherwise(value_reason(F.col("value"), value_col))
    )
    reason = F.coalesce(reason, F.when(n_pair > 1, F.lit(DUPLICATE_PAIR)))
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


def over_limit(rows: DataFrame, limit: int, ids: DataFrame | None = None) -> DataFrame:
    """``rows`` (item_id, reason) with the valid rows of every id beyond the ``limit`` smallest valid ids
    (of ``ids``, item_id, when given: the complete vectors) given the reason ``beyond data.limit``: the
    first N items, the same on every run. ``limit`` 0 = all."""
    if not limit:
        return rows
    ids = rows.filter(F.col("reason").isNull()) if ids is None else ids
    max_id = ids.select("item_id").distinct().orderBy("item_id").limit(limit).agg(F.max("item_id")).first()[0]
    if max_id is None:
        return rows
    beyond = F.col("reason").isNull() & (F.col("item_id") > max_id)
    return rows.withColumn("reason", F.when(beyond, F.lit(OVER_LIMIT)).otherwise(F.col("reason")))


# ---------------------------------------------------------------- composition


def _f32(col: str) -> Column:
    return F.transform(col, lambda x: x.cast("float"))


def shaped(
    table: DataFrame, sc, *, source: str, origin: str, what: str, extra: dict, items_extra: list[str] = (),
    limit: int = 0,
) -> SourceResult:
    """``table`` in ``sc.shape`` -> the source's result: features, items (item_id + metadata
    columns + ``items_extra``, which are metadata columns not named by the config, e.g. a string
    id's original value), quarantine (``origin`` as its source_file) and counts. ``limit`` > 0 keeps
    the vectors of the ``limit`` smallest item ids (``data.limit``); the rows of the others are
    quarantined as beyond it (:func:`over_limit`).

    Raises InputError naming ``what`` when a named column is missing or nothing valid is left."""
    metadata = [*dict.fromkeys([*sc.metadata_columns, *items_extra])]
    if sc.shape == "long":
        return _long(table, sc, metadata, source=source, origin=origin, what=what, extra=extra, limit=limit)
    if sc.shape == "array":
        columns = [sc.array_column]
        _need(table, columns, source)
        if not is_array(table, sc.array_column):
            raise InputError(f"{source}: column {sc.array_column!r} of {what} is not an array column")
    else:
        columns = wide_features(table, sc, source, what, skip=metadata)[0]
    names, dim = columns, None
    if len(columns) == 1 and columns[0] in table.columns and is_array(table, columns[0]):
        dim = array_width(table, columns[0], source)
        names = [f"{columns[0]}[{i}]" for i in range(dim)]
        extra = {k: ({**v, "shape": "array"} if isinstance(v, dict) and "shape" in v else v) for k, v in extra.items()}
    cached = wide_rows(table, sc.id_column, columns, metadata, source, dim).persist(StorageLevel.MEMORY_AND_DISK)
    rows = over_limit(cached, limit)
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
        cleanup=cached.unpersist,
    )


def _long(table: DataFrame, sc, metadata: list[str], *, source: str, origin: str, what: str, extra: dict,
          limit: int = 0) -> SourceResult:
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
    incomplete = vecs.filter(~F.col("complete")).select("item_id", F.lit(True).alias("_inc"))
    flagged = rows.join(incomplete, "item_id", "left").withColumn(
        "reason", F.coalesce(F.col("reason"), F.when(F.col("_inc"), F.lit(INCOMPLETE)))
    )
    flagged = over_limit(flagged, limit, vecs.filter("complete"))
    kept = vecs.filter("complete")
    if limit:
        kept = kept.join(flagged.filter(F.col("reason").isNull()).select("item_id").distinct(), "item_id")
    features = kept.select("item_id", _f32("vec").alias("features"))
    quarantine = flagged.filter(F.col("reason").isNotNull()).select(F.lit(origin).alias("source_file"), "raw", "reason")
    items = kept.select("item_id", *[F.col(f"meta.{c}").alias(c) for c in metadata])

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
