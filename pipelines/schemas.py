"""The Parquet tables that stages exchange, each schema defined once.

``features/``   item_id long (unique), features array<float> (fixed width)
``items/``      item_id long, then whatever metadata the source has (title, genres, label ...)
``quarantine/`` every input record not used: raw content, source file, reason
``codes/``      item_id, code array<float>, x/y for 2-D codes, model provenance
``neighbors/``  item_id, neighbor_id, rank, distance
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

FEATURES = T.StructType(
    [
        T.StructField("item_id", T.LongType(), False),
        T.StructField("features", T.ArrayType(T.FloatType(), False), False),
    ]
)

QUARANTINE = T.StructType(
    [
        T.StructField("source_file", T.StringType(), True),
        T.StructField("raw", T.StringType(), True),
        T.StructField("reason", T.StringType(), False),
    ]
)

CODES = T.StructType(
    [
        T.StructField("item_id", T.LongType(), False),
        T.StructField("code", T.ArrayType(T.FloatType(), False), False),
        T.StructField("x", T.FloatType(), True),
        T.StructField("y", T.FloatType(), True),
        T.StructField("model_uri", T.StringType(), False),
        T.StructField("run_id", T.StringType(), True),
        T.StructField("model_version", T.StringType(), True),
        T.StructField("scored_at", T.TimestampType(), False),
    ]
)

NEIGHBORS = T.StructType(
    [
        T.StructField("item_id", T.LongType(), False),
        T.StructField("neighbor_id", T.LongType(), False),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("distance", T.FloatType(), False),
    ]
)


class SchemaError(ValueError):
    """A table does not have the contracted shape; the message names the field."""


def genre_names(genres: object) -> list[str]:
    """Genres as a list, whichever way the source stored them: a list/array column (Tag Genome's
    ``items/``), a ``|``-joined string (MovieLens CSV), or nothing."""
    if genres is None:
        return []
    if isinstance(genres, str):
        return [g for g in genres.split("|") if g]
    return [str(g) for g in genres if g]


def check_columns(df: DataFrame, schema: T.StructType, table: str) -> None:
    """Every contracted column is present with its type (extra columns are allowed)."""
    have = {f.name: f.dataType for f in df.schema.fields}
    for f in schema.fields:
        if f.name not in have:
            raise SchemaError(f"{table}: missing column {f.name!r} ({f.dataType.simpleString()})")
        if have[f.name].simpleString() != f.dataType.simpleString():
            raise SchemaError(
                f"{table}: column {f.name!r} is {have[f.name].simpleString()}, expected {f.dataType.simpleString()}"
            )


def conform(df: DataFrame, schema: T.StructType) -> DataFrame:
    """Select and cast the contracted columns, in contract order."""
    return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])
