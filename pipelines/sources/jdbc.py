"""Any table or query over JDBC -> one vector per id, in the wide or the long shape.

``data.jdbc.shape=wide``: one row per id, one column per feature (``feature_columns``, or every
numeric column but the id and ``metadata_columns``). ``shape=long``: rows of (id, feature, value),
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
    or a failing query raises InputError now, before any output is touched."""
    user, password = credentials(jc)
    reader = spark.read.format("jdbc").options(**options(jc))
    if user is not None:
        reader = reader.option("user", user)
    if password is not None:
        reader = reader.option("password", password)
    try:
        return reader.load()
    except Exception as exc:  # Py4JJavaError, AnalysisException, ...: one message, no credentials
        raise InputError(f"jdbc: cannot read {what(jc)} from {safe_url(jc.url)}: {cause(exc, password)}") from None


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


def wide_rows(df: DataFrame, id_col: str, features: list[str], metadata: list[str]) -> DataFrame:
    """item_id, vec (array<double>), meta struct, raw, reason (null = used)."""
    for c in [id_col, *features, *metadata]:
        if c not in df.columns:
            raise InputError(f"jdbc: column {c!r} not in the result (columns: {df.columns})")
    item = F.expr(f"try_cast(`{id_col}` as long)")
    vals = [F.expr(f"try_cast(`{c}` as double)") for c in features]
    first_bad = F.lit(None).cast("string")
    for c, v in reversed(list(zip(features, vals, strict=True))):
        first_bad = F.when(v.isNull() | F.isnan(v), F.lit(c)).otherwise(first_bad)
    rows = df.select(
        item.alias("item_id"),
        F.array(*vals).alias("vec"),
        F.struct(*[F.col(c) for c in metadata]).alias("meta") if metadata else F.lit(None).alias("meta"),
        _raw(df).alias("raw"),
        first_bad.alias("bad_col"),
    )
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    reason = (
        F.when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(F.col("bad_col").isNotNull(), F.concat(F.lit(BAD_VALUE + " in "), F.col("bad_col")))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
    )
    return rows.withColumn("reason", reason).drop("bad_col")


def wide_features(df: DataFrame, jc) -> tuple[list[str], list[str]]:
    """Feature and metadata column names of a wide table."""
    if jc.feature_columns:
        return list(jc.feature_columns), list(jc.metadata_columns)
    skip = {jc.id_column, *jc.metadata_columns}
    feats = [f.name for f in df.schema.fields if f.name not in skip and isinstance(f.dataType, NUMERIC)]
    if not feats:
        raise InputError(f"jdbc: {what(jc)} has no numeric column besides {jc.id_column!r}; set data.jdbc.feature_columns")
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
        .when(F.col("value").isNull() | F.isnan("value"), F.lit(BAD_VALUE))
        .when(n_pair > 1, F.lit(DUPLICATE_PAIR))
    )
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
    jc = cfg.data.jdbc
    table = load_table(spark, jc)
    log.info("jdbc: reading %s from %s (%s shape)", what(jc), safe_url(jc.url), jc.shape)
    return wide_result(table, jc) if jc.shape == "wide" else long_result(table, jc)


def _f32(col: str) -> F.Column:
    return F.transform(col, lambda x: x.cast("float"))


def wide_result(table: DataFrame, jc) -> SourceResult:
    names, metadata = wide_features(table, jc)
    rows = wide_rows(table, jc.id_column, names, metadata).persist(StorageLevel.MEMORY_AND_DISK)
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
        extra={"jdbc": {"url": safe_url(jc.url), "source": what(jc), "shape": "wide"}},
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
