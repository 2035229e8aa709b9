"""CSV helpers every file-based source shares: locate a file under one of its accepted names,
check its header before Spark starts, and read it as strings so that no line is lost.
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections.abc import Sequence

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipelines.publish import is_local, local_path
from pipelines.sources import InputError

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"


def find_file(input_dir: str, names: Sequence[str]) -> str:
    """The first of ``names`` present under ``input_dir``; InputError listing the names if none is."""
    if not is_local(input_dir):
        # No cheap existence check without Spark: trust the first name; Spark will name a missing path.
        return f"{input_dir.rstrip('/')}/{names[0]}"
    base = local_path(input_dir)
    if not base.is_dir():
        raise InputError(f"{base}: input directory does not exist (data.input); expected {' and '.join(names)}")
    found = [base / n for n in names if (base / n).is_file()]
    if not found:
        raise InputError(f"{base}: no {' or '.join(names)} found (data.input)")
    if len(found) > 1:
        log.warning("%s: both %s present; using %s", base, [p.name for p in found], found[0].name)
    return str(found[0])


def check_header(path: str, expected: Sequence[str]) -> None:
    """Local files only: the header is exactly ``expected`` (quotes, BOM and blanks ignored) and at
    least one data line follows."""
    if not is_local(path):
        return
    p = local_path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise InputError(f"{p}: file is empty; expected a header line {','.join(expected)} and data lines")
        got = [h.strip() for h in header]
        if got != list(expected):
            raise InputError(f"{p}: header is {','.join(got)!r}, expected {','.join(expected)!r}")
        if not any(any(cell.strip() for cell in row) for row in _first(reader, 100)):
            raise InputError(f"{p}: no data lines after the header {','.join(expected)}")


def _first(reader, n: int):
    for i, row in enumerate(reader):
        if i >= n:
            return
        yield row


def read_csv_strings(spark: SparkSession, path: str, columns: Sequence[str]) -> DataFrame:
    """Every column a string plus ``_corrupt_record`` (the raw line of a line with the wrong number
    of fields). Quoted and unquoted fields both parse; ``""`` escapes a quote (RFC 4180)."""
    schema = T.StructType(
        [T.StructField(c, T.StringType(), True) for c in columns] + [T.StructField(CORRUPT, T.StringType(), True)]
    )
    return (
        spark.read.schema(schema)
        .option("header", True)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("quote", '"')
        .option("escape", '"')
        .csv(path)
    )



def read_csv_typed(spark: SparkSession, path: str, schema: T.StructType) -> DataFrame:
    """``schema``'s typed columns plus ``_corrupt_record``: the raw line of a line that has the wrong
    number of fields or a field that does not parse as its type (whose value is then null).

    Parsing straight to numbers is about a third faster than reading strings and casting them
    (benchmarks/bench_ingest.py). Blanks around fields are ignored, as ``trim`` did."""
    full = T.StructType(list(schema.fields) + [T.StructField(CORRUPT, T.StringType(), True)])
    return (
        spark.read.schema(full)
        .option("header", True)
        .option("mode", "PERMISSIVE")
        .option("columnNameOfCorruptRecord", CORRUPT)
        .option("quote", '"')
        .option("escape", '"')
        .option("ignoreLeadingWhiteSpace", True)
        .option("ignoreTrailingWhiteSpace", True)
        .csv(path)
    )
