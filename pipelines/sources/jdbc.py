"""Any table or query over JDBC -> one vector per id, in the wide or the long shape.

``data.jdbc.shape=wide``: one row per id, one column per feature (``feature_columns``, or every
numeric column but the id and ``metadata_columns``), or the whole vector in one array column
(``double precision[]``, ``real[]``; its most common length is the width). ``shape=long``: rows of (id, feature, value),
pivoted with the feature names sorted; a missing pair is 0.0 (``fill_missing``) or quarantines the
id. The shaping is ``pipelines.sources.shaping``'s, shared with the ``table`` source. Reads are
split into ``num_partitions`` range queries over ``partition_column`` when it is set.

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
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.shaping import shaped

log = logging.getLogger(__name__)


def safe_url(url: str) -> str:
    """The URL without query parameters or user info: safe to print."""
    head = url.split("?", 1)[0].split(";", 1)[0]
    return re.sub(r"//[^/@]*@", "//", head)


def what(jc) -> str:
    """"table 'name'" or "query '...'" for ``data.jdbc``, for log lines and errors."""
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
    """Check ``data.jdbc`` before connecting: a ``jdbc:`` URL, a table or a query, an existing driver jar and
    readable credentials. Raises ``InputError`` naming the key otherwise (never the credentials)."""
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


# ---------------------------------------------------------------- composition


def read(spark: SparkSession, cfg) -> SourceResult:
    """Read the table or query over JDBC and shape it (wide, long or array; ``pipelines.sources.shaping``)
    into features item_id long, features array<float>, items and quarantine; ``data.limit`` > 0 keeps the
    vectors of that many smallest valid ids and quarantines the other rows as beyond it. Raises ``InputError`` when the
    database is unreachable, the query fails, or a named column is missing or not an array."""
    jc = cfg.data.jdbc
    table = load_table(spark, jc)
    log.info("jdbc: reading %s from %s (%s shape)", what(jc), safe_url(jc.url), jc.shape)
    return shaped(
        table,
        jc,
        source="jdbc",
        origin=_origin(jc),
        what=f"{what(jc)} from {safe_url(jc.url)}",
        extra={"jdbc": {"url": safe_url(jc.url), "source": what(jc), "shape": jc.shape}},
        limit=cfg.data.limit,
    )


def _origin(jc) -> str:
    return f"{safe_url(jc.url)} {jc.table or 'query'}"


register("jdbc", check, read)
