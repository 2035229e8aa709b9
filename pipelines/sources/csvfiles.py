"""Input-file helpers every file-based source shares: locate a file under one of its accepted names
(refusing the same data given twice under two names), open plain or gzip files with one clear error
for a damaged one, check a CSV header before Spark starts, and read CSV as RFC 4180 allows it so
that no line is lost.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import logging
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from pipelines.publish import is_local, local_path
from pipelines.sources import InputError

log = logging.getLogger(__name__)

CORRUPT = "_corrupt_record"


def find_file(input_dir: str, names: Sequence[str]) -> str:
    """The one of ``names`` (or ``name.gz``) present under ``input_dir``; InputError listing the
    names if none is. Two present at once go through :func:`pick_one` (one is read, or an error)."""
    if not is_local(input_dir):
        # No cheap existence check without Spark: trust the first name; Spark will name a missing path.
        return f"{input_dir.rstrip('/')}/{names[0]}"
    base = local_path(input_dir)
    if not base.is_dir():
        raise InputError(f"{base}: input directory does not exist (data.input); expected {' and '.join(names)}")
    found = [base / n for name in names for n in (name, f"{name}.gz") if (base / n).is_file()]
    if not found:
        raise InputError(f"{base}: no {' or '.join(names)} found (data.input)")
    return str(pick_one(found))


@contextmanager
def open_input(path: Path | str, mode: str = "rb", **text_args) -> Iterator:
    """``path`` opened for reading, through gzip when it ends in ``.gz``. A damaged file (not gzip,
    truncated, undecodable text) raises InputError naming it, whenever in the ``with`` body it shows,
    so callers never see a gzip or codec traceback."""
    p = Path(path)
    try:
        if p.suffix == ".gz":
            fh = gzip.open(p, mode, **text_args)
        else:
            fh = open(p, mode, **text_args)  # noqa: SIM115  closed below
        with fh:
            yield fh
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        if isinstance(exc, UnicodeDecodeError):
            # Not damage: text in another encoding than the one it is read with.
            raise InputError(f"{p}: not {exc.encoding} text ({exc.reason} at byte {exc.start}); "
                             "set data.options.encoding (e.g. ISO-8859-1) if it is in another encoding") from None
        raise InputError(f"{p}: cannot be read ({exc}); truncated, damaged or not gzip?") from None


def check_readable(path: Path | str) -> None:
    """Read a gzip file to its end (a truncated one fails only there); InputError naming a damaged
    file. Plain files are not read. Local paths only."""
    if str(path).endswith(".gz") and is_local(str(path)):
        with open_input(local_path(str(path))) as fh:
            while fh.read(1 << 20):
                pass


def same_data(a: Path, b: Path) -> bool:
    """Whether two local files hold the same bytes once decompressed (``.gz`` is read through gzip).
    Streams both in 1 MiB blocks, so it costs one read of each file and no memory."""
    with open_input(a) as fa, open_input(b) as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def pick_one(found: Sequence[Path]) -> Path:
    """One file of several that name the same input (``x`` and ``x.gz``, ``genome-scores.csv`` and
    ``genome_scores.csv``): the first, with a warning, when they all hold the same data; otherwise
    InputError naming both, since reading either would silently drop or double records."""
    first = found[0]
    for other in found[1:]:
        if not same_data(first, other):
            raise InputError(
                f"{first} and {other}: two files for the same input with different contents; keep one of them"
            )
    if len(found) > 1:
        log.warning("%s: the same data is also in %s; reading %s once",
                    first.parent, ", ".join(p.name for p in found[1:]), first.name)
    return first


def check_header(path: str, expected: Sequence[str], options: dict[str, str] | None = None) -> None:
    """Local files only: the header is exactly ``expected`` (quotes, BOM and blanks ignored) and at
    least one data line follows. ``options`` are the Spark CSV reader's (``data.options``): the file
    is decoded with its ``encoding``/``charset`` (default UTF-8) and split at its ``sep``/``delimiter``
    and ``quote``, as Spark will read it, so a Latin-1 or ';'-separated log is not refused here."""
    if not is_local(path):
        return
    p = local_path(path)
    opts = {k.lower(): str(v) for k, v in (options or {}).items()}
    encoding = opts.get("encoding") or opts.get("charset") or "utf-8"
    try:
        # utf-8-sig drops a BOM; any other codec Python knows is used as given.
        encoding = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    except LookupError:
        raise InputError(f"data.options.encoding: unknown encoding {encoding!r} (e.g. UTF-8, ISO-8859-1)") from None
    sep = (opts.get("sep") or opts.get("delimiter") or ",").replace("\\t", "\t")
    if len(sep) != 1:
        return  # a multi-character separator (Spark allows one) is beyond Python's csv: Spark checks it
    fmt = {"delimiter": sep, "quotechar": opts.get("quote") or '"'}
    with open_input(p, "rt", encoding=encoding, newline="") as fh:
        reader = csv.reader(fh, **fmt)
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


def read_csv_strings(spark: SparkSession, path: str | list[str], columns: Sequence[str],
                     multi_line: bool = True) -> DataFrame:
    """Every column a string plus ``_corrupt_record`` (the raw record of a line with the wrong number
    of fields). Read as RFC 4180 allows: quoted fields may hold commas, ``""`` (an escaped quote)
    and, with ``multi_line``, line breaks, and are read whole.

    ``multi_line`` makes each file one Spark task (a record may cross any split point), so it is
    for files with free text (titles, tags); all-numeric files, where a line break inside a field
    could never parse anyway, read line by line in parallel (:func:`read_csv_typed`)."""
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
        .option("multiLine", multi_line)
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
