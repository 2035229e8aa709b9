"""Any table or query over JDBC -> one vector per id, in the wide or the long shape.

``data.jdbc.shape=wide``: one row per id, one column per feature (``feature_columns``, or every
numeric column but the id and ``metadata_columns``), or the whole vector in one array column
(``double precision[]``, ``real[]``; its most common length is the width). ``shape=long``: rows of (id, feature, value),
pivoted with the feature names sorted; a missing pair is 0.0 (``fill_missing``) or quarantines the
id. Reads are split into ``num_partitions`` range queries over ``partition_column`` when it is set.

Credentials come only from the environment variables named by ``user_env``/``password_env`` or from
``secrets_file`` (YAML or JSON with ``user`` and ``password``). They are handed to the JDBC reader
and nowhere else: not to logs, errors, the manifest or the recorded config. The driver jar
(``driver_jar``) must be on Spark's classpath before the JVM starts; ``jobs.common.build_spark``
puts it in ``spark.jars``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import yaml
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.sources import InputError, SourceResult, register

log = logging.getLogger(__name__)

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


def safe_url(url: str) -> str:
    """The URL without query parameters or user info: safe to print."""
    head = url.split("?", 1)[0].split(";", 1)[0]
    return re.sub(r"//[^/@]*@", "//", head)


def what(jc) -> str:
    return f"table {jc.table!r}" if jc.table else f"query {jc.query!r}"


def credentials(jc) -> tuple[str | None, str | None]:
    """(user, password) from secrets_file or the environment; InputError naming the variable/file."""
    if jc.secrets_file:
        path = Path(jc.secrets_file)
        if not path.is_file():
            raise InputError(f"data.jdbc.secrets_file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise InputError(f"data.jdbc.secrets_file {str(path)!r} is not valid YAML/JSON") from None
        if not isinstance(data, dict) or "user" not in data:
            raise InputError(f"data.jdbc.secrets_file {str(path)!r}: expected a mapping with user and password")
        pw = data.get("password")
        return str(data["user"]), None if pw is None else str(pw)
    user = os.environ.get(jc.user_env) if jc.user_env else None
    password = os.environ.get(jc.password_env) if jc.password_env else None
    if jc.user_env and user is None:
        raise InputError(
            f"jdbc: environment variable {jc.user_env} (data.jdbc.user_env) is not set; "
            "set it or name a data.jdbc.secrets_file"
        )
    return user, password


def check(cfg) -> None:
    jc = cfg.data.jdbc
    if not jc.url.startswith("jdbc:"):
        raise InputError(f"data.jdbc.url: expected jdbc:<driver>://host/db, got {safe_url(jc.url)!r}")
    if not jc.table and not jc.query:
        raise InputError("data.jdbc: set table or query")
    if jc.driver_jar and not Path(jc.driver_jar).is_file():
        raise InputError(
            f"data.jdbc.driver_jar {jc.driver_jar!r} does not exist "
            "(Debian/Ubuntu: apt-get install libpostgresql-jdbc-java, or run scripts/setup_system.sh)"
        )
    credentials(jc)


def options(jc) -> dict[str, str]:
    """Reader options without credentials."""
    opts = {
        "url": jc.url,
        "driver": jc.driver,
        "fetchsize": str(jc.fetch_size),
        "dbtable": jc.table if jc.table else f"({jc.query}) AS sae_query",
    }
    if jc.partition_column:
        opts.update(
            partitionColumn=jc.partition_column,
            lowerBound=str(jc.lower_bound),
            upperBound=str(jc.upper_bound),
            numPartitions=str(jc.num_partitions),
        )
    return opts


def load_table(spark: SparkSession, jc) -> DataFrame:
    """The table as Spark sees it. Spark connects here to learn the schema, so an unreachable database
    or a failing query raises InputError now, before any output is touched.

    DECIMAL columns are read as DOUBLE (Spark's ``customSchema``): Spark's DECIMAL(38,18) cannot hold
    PostgreSQL's ``NUMERIC 'NaN'``, ``'Infinity'`` or numbers of more than 20 integer digits, and its
    reader fails the whole job with a Java exception on the first such value. As doubles they arrive
    as NaN, infinity or a large number, which :func:`value_reason` quarantines naming the column.
    Arrays of DECIMAL are cast to ``float8[]`` in the query on PostgreSQL (``customSchema`` cannot
    retype array elements); on other databases they are an InputError saying how to cast them."""
    user, password = credentials(jc)

    def load(opts: dict[str, str]) -> DataFrame:
        reader = spark.read.format("jdbc").options(**opts)
        if user is not None:
            reader = reader.option("user", user)
        if password is not None:
            reader = reader.option("password", password)
        try:
            return reader.load()
        except Exception as exc:  # Py4JJavaError, AnalysisException, ...: one message, no credentials
            raise InputError(
                f"jdbc: cannot read {what(jc)} from {safe_url(jc.url)}: {cause(exc, password)}"
            ) from None

    opts = options(jc)
    table = load(opts)
    fields = table.schema.fields
    decimal_arrays = [
        f.name for f in fields if isinstance(f.dataType, T.ArrayType) and isinstance(f.dataType.elementType, T.DecimalType)
    ]
    if decimal_arrays:
        if not jc.url.startswith("jdbc:postgresql:"):
            raise InputError(
                f"jdbc: column {decimal_arrays[0]!r} is an array of DECIMAL; cast it to an array of double "
                "precision in data.jdbc.query"
            )
        cols = ", ".join(
            f'{quote(f.name)}::float8[] AS {quote(f.name)}' if f.name in decimal_arrays else quote(f.name) for f in fields
        )
        opts = {**opts, "dbtable": f"(SELECT {cols} FROM {opts['dbtable']}) AS sae_cast"}
    # Not the id or partition column: an integer id beyond 2**53 would lose digits as a double.
    keep = {jc.id_column, jc.partition_column}
    decimals = [f.name for f in fields if isinstance(f.dataType, T.DecimalType) and f.name not in keep]
    if decimals:
        opts = {**opts, "customSchema": ", ".join(f"`{c}` DOUBLE" for c in decimals)}
    return load(opts) if decimals or decimal_arrays else table


def quote(name: str) -> str:
    """A column name as an SQL identifier (double quotes, doubled inside)."""
    return '"' + name.replace('"', '""') + '"'


def cause(exc: Exception, secret: str | None) -> str:
    """The innermost Java cause's message, first line, with the secret (if any) masked."""
    text = ""
    java = getattr(exc, "java_exception", None)
    if java is not None:
        e = java
        while e.getCause() is not None and e.getCause() != e:
            e = e.getCause()
        text = str(e.toString())
    if not text:
        text = str(exc)
    text = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if secret:
        text = text.replace(secret, "***")
    return text


# ---------------------------------------------------------------- pure transforms


def _raw(df: DataFrame) -> F.Column:
    return F.to_json(F.struct(*[F.col(c) for c in df.columns]))


def value_reason(v: F.Column, column: str) -> F.Column:
    """Why the double ``v`` of ``column`` cannot go into a float32 vector, naming the column; null
    when it can. Null (or text that is no number), NaN and infinities, and magnitudes beyond
    float32's largest finite value (which would turn into infinity) are the reasons."""
    return (
        F.when(v.isNull(), F.lit(f"{BAD_VALUE} in {column}"))
        .when(F.isnan(v) | (F.abs(v) == float("inf")), F.lit(f"{NOT_FINITE} in {column}"))
        .when(F.abs(v) > F32_MAX, F.lit(f"{BEYOND_F32} in {column}"))
    )


def array_reason(arr: F.Column, column: str, dim: int) -> F.Column:
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
    return isinstance(df.schema[column].dataType, T.ArrayType)


def array_width(df: DataFrame, column: str) -> int:
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
        raise InputError(f"jdbc: array column {column!r} holds no non-empty array")
    return int(row["n"])


def wide_rows(df: DataFrame, id_col: str, features: list[str], metadata: list[str], dim: int | None = None) -> DataFrame:
    """item_id, vec (array<double>), meta struct, raw, reason (null = used). ``features`` is one
    column per feature, or a single array column (``dim`` elements, see :func:`array_width`)."""
    for c in [id_col, *features, *metadata]:
        if c not in df.columns:
            raise InputError(f"jdbc: column {c!r} not in the result (columns: {df.columns})")
    item = F.expr(f"try_cast(`{id_col}` as long)")
    if len(features) == 1 and is_array(df, features[0]):
        arr = F.col(features[0]).cast("array<double>")
        vec, bad = arr, array_reason(arr, features[0], dim or array_width(df, features[0]))
    else:
        vals = [F.expr(f"try_cast(`{c}` as double)") for c in features]
        vec, bad = F.array(*vals), F.coalesce(*[value_reason(v, c) for c, v in zip(features, vals, strict=True)])
    rows = df.select(
        item.alias("item_id"),
        vec.alias("vec"),
        F.struct(*[F.col(c) for c in metadata]).alias("meta") if metadata else F.lit(None).alias("meta"),
        _raw(df).alias("raw"),
        bad.alias("bad"),
    )
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("bad").isNotNull(), F.col("bad"))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
    )
    return rows.withColumn("reason", reason).drop("bad")


def wide_features(df: DataFrame, jc) -> tuple[list[str], list[str]]:
    """Feature and metadata column names of a wide table: ``feature_columns``, or every numeric
    column but the id and metadata, or else the table's one numeric array column (the vector stored
    as ``double precision[]`` / ``real[]``). An array column must be the only feature column."""
    skip = {jc.id_column, *jc.metadata_columns}
    if jc.feature_columns:
        feats = list(jc.feature_columns)
    else:
        feats = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, NUMERIC)]
        if not feats:
            feats = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, T.ArrayType)
                     and isinstance(f.dataType.elementType, NUMERIC)][:2]
            feats = feats if len(feats) == 1 else []
    if not feats:
        raise InputError(
            f"jdbc: {what(jc)} has no numeric column or single numeric array column besides {jc.id_column!r}; "
            "set data.jdbc.feature_columns"
        )
    arrays = [c for c in feats if c in df.columns and is_array(df, c)]
    if arrays and len(feats) > 1:
        raise InputError(
            f"data.jdbc.feature_columns: {arrays[0]!r} is an array column; a vector stored as an array must be "
            f"the only feature column, got {feats}"
        )
    return feats, list(jc.metadata_columns)


def long_rows(df: DataFrame, id_col: str, feat_col: str, value_col: str) -> DataFrame:
    """item_id, feature, value, raw, reason (null = valid pair)."""
    for c in (id_col, feat_col, value_col):
        if c not in df.columns:
            raise InputError(f"jdbc: column {c!r} not in the result (columns: {df.columns})")
    rows = df.select(
        F.expr(f"try_cast(`{id_col}` as long)").alias("item_id"),
        F.col(feat_col).cast("string").alias("feature"),
        F.expr(f"try_cast(`{value_col}` as double)").alias("value"),
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
    """item_id, vec, complete: valid pairs pivoted in ``names`` order."""
    dim = len(names)
    index = rows.sparkSession.createDataFrame([(n, i) for i, n in enumerate(names)], "feature string, idx int")
    pairs = rows.filter(F.col("reason").isNull()).join(F.broadcast(index), "feature")
    per = pairs.groupBy("item_id").agg(
        F.map_from_entries(F.collect_list(F.struct("idx", "value"))).alias("m"), F.count("*").alias("k")
    )
    vec = F.transform(F.sequence(F.lit(0), F.lit(dim - 1)), lambda i: F.coalesce(F.col("m")[i], F.lit(0.0)))
    complete = F.lit(True) if fill else F.col("k") == dim
    return per.select("item_id", vec.alias("vec"), complete.alias("complete"))


# ---------------------------------------------------------------- composition


def read(spark: SparkSession, cfg) -> SourceResult:
    """The configured table or query as a SourceResult. Every value a float32 vector cannot hold
    (null, NaN, infinity, beyond float32 or DECIMAL(38,18), null or missing array elements)
    quarantines its row with a reason naming the column; none raises a Java exception."""
    jc = cfg.data.jdbc
    table = load_table(spark, jc)
    log.info("jdbc: reading %s from %s (%s shape)", what(jc), safe_url(jc.url), jc.shape)
    return wide_result(table, jc) if jc.shape == "wide" else long_result(table, jc)


def _f32(col: str) -> F.Column:
    return F.transform(col, lambda x: x.cast("float"))


def wide_result(table: DataFrame, jc) -> SourceResult:
    columns, metadata = wide_features(table, jc)
    names, dim = columns, None
    if len(columns) == 1 and columns[0] in table.columns and is_array(table, columns[0]):
        dim = array_width(table, columns[0])
        names = [f"{columns[0]}[{i}]" for i in range(dim)]
        log.info("jdbc: vectors from array column %r, width %d", columns[0], dim)
    rows = wide_rows(table, jc.id_column, columns, metadata, dim).persist(StorageLevel.MEMORY_AND_DISK)
    good = rows.filter(F.col("reason").isNull())
    features = good.select("item_id", _f32("vec").alias("features"))
    items = good.select("item_id", *[F.col(f"meta.{c}").alias(c) for c in metadata])
    quarantine = rows.filter(F.col("reason").isNotNull()).select(
        F.lit(_origin(jc)).alias("source_file"), "raw", "reason"
    )
    return SourceResult(
        features=features,
        items=items,
        quarantine=quarantine,
        feature_names=names,
        input_files=[_origin(jc)],
        rows_in=rows.count,
        rows_used=None,
        extra={"jdbc": {"url": safe_url(jc.url), "source": what(jc), "shape": "array" if dim else "wide"}},
        cleanup=rows.unpersist,
    )


def long_result(table: DataFrame, jc) -> SourceResult:
    rows = long_rows(table, jc.id_column, jc.feature_column, jc.value_column).persist(StorageLevel.MEMORY_AND_DISK)
    names = [
        r["feature"]
        for r in rows.filter(F.col("reason").isNull()).select("feature").distinct().orderBy("feature").collect()
    ]
    if not names:
        rows.unpersist()
        raise InputError(f"jdbc: {what(jc)} from {safe_url(jc.url)} has no valid (id, feature, value) row")
    vecs = long_vectors(rows, names, jc.fill_missing).persist(StorageLevel.MEMORY_AND_DISK)
    features = vecs.filter("complete").select("item_id", _f32("vec").alias("features"))
    incomplete = vecs.filter(~F.col("complete")).select("item_id", F.lit(True).alias("_inc"))
    flagged = rows.join(incomplete, "item_id", "left").withColumn(
        "reason", F.coalesce(F.col("reason"), F.when(F.col("_inc"), F.lit(INCOMPLETE)))
    )
    quarantine = flagged.filter(F.col("reason").isNotNull()).select(
        F.lit(_origin(jc)).alias("source_file"), "raw", "reason"
    )

    def cleanup() -> None:
        vecs.unpersist()
        rows.unpersist()

    return SourceResult(
        features=features,
        items=features.select("item_id"),
        quarantine=quarantine,
        feature_names=names,
        input_files=[_origin(jc)],
        rows_in=rows.count,
        rows_used=lambda: flagged.filter(F.col("reason").isNull()).count(),
        extra={"jdbc": {"url": safe_url(jc.url), "source": what(jc), "shape": "long"}},
        cleanup=cleanup,
    )


def _origin(jc) -> str:
    return f"{safe_url(jc.url)} {jc.table or 'query'}"


register("jdbc", check, read)
