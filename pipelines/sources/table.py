"""Any Spark-readable table -> one vector per id (``data.source=table``).

``data.input`` is a Parquet, CSV, ORC or JSON-lines file or folder, or (``data.table.format=catalog``)
a table name in Spark's catalog. Reader options (CSV ``header``, ``sep``, ``quote``, ``escape``,
``encoding``, ...) come from ``data.options``. The table is shaped by ``pipelines.sources.shaping``,
the code the JDBC source uses: wide, long ``(id, feature, value)`` or array.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession

from pipelines.publish import is_local, local_path
from pipelines.sources import InputError

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "orc", "json", "catalog")
EXTENSIONS = {
    ".parquet": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "csv", ".orc": "orc",
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
}
# CSV defaults a user can override in data.options: a header line, typed columns, RFC 4180 quoting.
CSV_DEFAULTS = {"header": "true", "inferSchema": "true", "quote": '"', "escape": '"', "mode": "PERMISSIVE"}


def _data_files(base: Path) -> list[Path]:
    return sorted(
        p for p in base.rglob("*")
        if p.is_file() and not any(part.startswith(("_", ".")) for part in p.relative_to(base).parts)
    )


def table_format(input_path: str, fmt: str, key: str) -> str:
    """The reader format: ``fmt`` if set, else from the extension of ``input_path`` (or of the data
    files under it). InputError naming ``key`` when neither says."""
    if fmt:
        if fmt not in FORMATS:
            raise InputError(f"{key}: unknown format {fmt!r}; choose one of {list(FORMATS)}")
        return fmt
    if not is_local(input_path):
        suffix = "".join(Path(input_path.rstrip("/")).suffixes[-2:]).replace(".gz", "")
        if suffix in EXTENSIONS:
            return EXTENSIONS[suffix]
        raise InputError(f"{input_path}: cannot tell the format from the name; set {key}")
    base = local_path(input_path)
    if not base.exists():
        raise InputError(f"{base}: does not exist (data.input)")
    files = [base] if base.is_file() else _data_files(base)
    if not files:
        raise InputError(f"{base}: no data files under it (data.input)")
    kinds = {EXTENSIONS.get(f.suffix if f.suffix != ".gz" else Path(f.stem).suffix) for f in files}
    kinds.discard(None)
    if len(kinds) != 1:
        raise InputError(
            f"{base}: cannot tell the format from the file names ({sorted(k for k in kinds if k) or 'no known extension'}); set {key}"
        )
    return kinds.pop()


def read_table(spark: SparkSession, input_path: str, fmt: str, options: dict[str, str]) -> DataFrame:
    """The input as a DataFrame (``fmt`` from :func:`table_format`). Spark reads the schema here, so
    a missing or unreadable input raises InputError now, before any output is touched. A partitioned
    folder (``date=.../``) gets its partition columns, as Spark's readers give them."""
    try:
        if fmt == "catalog":
            return spark.table(input_path)
        opts = {**CSV_DEFAULTS, **options} if fmt == "csv" else dict(options)
        return spark.read.options(**opts).format(fmt).load(input_path)
    except Exception as exc:  # AnalysisException, Py4JJavaError: one line naming the input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{input_path}: cannot read it as {fmt}: {first}") from None
