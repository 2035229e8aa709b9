"""Documents or log lines -> bag-of-words vectors (``data.source=text``), with Spark ML's own stages:
``RegexTokenizer`` -> ``StopWordsRemover`` -> ``CountVectorizer`` (``vocabSize``, ``minDF``) ->
``IDF`` for tf-idf.

Input (``data.text.layout``):

* ``folders``: a folder tree, or a ``.tar``/``.tar.gz`` of one, one document per file; the folder
  holding a file is its label and the top folder under the input its split (the ``20news-bydate``
  layout: ``20news-bydate-train/alt.atheism/49960``). Files are read and decoded on the driver
  (the whole of 20 Newsgroups is 18,846 files, ~35 MB), in ``data.text.encoding``.
* ``table``: any table ``pipelines.sources.table.read_table`` reads, with ``id_column``,
  ``text_column`` and an optional ``label_column``.

Mail/news cleaning follows scikit-learn's ``fetch_20newsgroups(remove=...)`` rules, in Spark SQL:
headers are everything up to the first blank line (the ``Subject:`` is kept as the item's title);
quoted lines start with ``>`` or ``|``, or say ``writes:``/``wrote:``/``says:``/``said:``/``writes in``,
or start with ``In article``/``Quoted from``. Signatures are cut at the last line of two or more
dashes (``--``, the usual separator); scikit-learn cuts at the last blank line too, which also drops
a last paragraph that is no signature, so that part is narrower here.

The vocabulary (CountVectorizer's order: most frequent first) is the manifest's ``feature_names``,
so a map point can be explained by its top words.

Counting: every document read is used (it got a vector) or quarantined with a reason: an encoding
error (``on_encoding_error=quarantine``), a null or duplicate id, an empty document after cleaning,
or no word in the vocabulary. Documents with an encoding error are counted in the manifest
(``text.encoding_errors``) whichever way they are handled.
"""

from __future__ import annotations

import logging
import tarfile

import pandas as pd
from pyspark import StorageLevel
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import IDF, CountVectorizer, Normalizer, RegexTokenizer, StopWordsRemover
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.publish import is_local, local_path
from pipelines.sources import InputError, SourceResult, register
from pipelines.sources.shaping import BAD_ID, DUPLICATE_ID, stable_id
from pipelines.sources.table import read_table, table_format

log = logging.getLogger(__name__)

ENCODING_ERROR = "bytes not valid in the configured encoding"
EMPTY = "empty document after cleaning"
NO_VOCAB = "no word in the vocabulary"
ARCHIVES = (".tar", ".tar.gz", ".tgz")
REPLACEMENT = "\ufffd"

DOCS = T.StructType(
    [
        T.StructField("doc", T.StringType(), False),  # relative path (folders) or the id as a string
        T.StructField("label", T.StringType(), True),
        T.StructField("split", T.StringType(), True),
        T.StructField("text", T.StringType(), True),
        T.StructField("bad_encoding", T.BooleanType(), False),
    ]
)


# ---------------------------------------------------------------- finding and reading the input (edges)


def _is_archive(path: str) -> bool:
    return path.endswith(ARCHIVES)


def layout(cfg) -> str:
    """The input layout of ``data.text``: its ``layout`` when not "auto"; else "folders" for a local folder
    without table files or a ``.tar``/``.tar.gz`` archive, "table" otherwise."""
    tc = cfg.data.text
    if tc.layout != "auto":
        return tc.layout
    if is_local(cfg.data.input):
        p = local_path(cfg.data.input)
        if p.is_dir() and not any(f.suffix in (".parquet", ".csv", ".json", ".orc") for f in p.iterdir()):
            return "folders"
    return "folders" if _is_archive(cfg.data.input) else "table"


def check(cfg) -> None:
    """Before Spark: the input exists and holds documents (folders) or has a known format (table)."""
    tc = cfg.data.text
    if layout(cfg) == "table":
        if not tc.id_column or not tc.text_column:
            raise InputError("data.text: table layout needs id_column and text_column")
        table_format(cfg.data.input, tc.format, "data.text.format")
        return
    if not is_local(cfg.data.input):
        raise InputError(f"{cfg.data.input}: the folders layout reads local folders or archives only (data.input)")
    base = local_path(cfg.data.input)
    if not base.exists():
        raise InputError(f"{base}: does not exist (data.input); expected <label>/<document> folders or a .tar.gz of them")
    if base.is_file():
        if not _is_archive(base.name) or not tarfile.is_tarfile(base):
            raise InputError(f"{base}: not a folder or a .tar/.tar.gz archive of one (data.input)")
        return
    if not any(p.is_file() and len(p.relative_to(base).parts) >= 2 for p in base.rglob("*")):
        raise InputError(f"{base}: no <label>/<document> files under it (data.input)")


def _doc_row(rel: str, data: bytes, encoding: str) -> tuple[str, str, str, str, bool]:
    parts = rel.split("/")
    label = parts[-2]
    split = parts[0] if len(parts) >= 3 else ""
    try:
        text, bad = data.decode(encoding), False
    except UnicodeDecodeError:
        text, bad = data.decode(encoding, errors="replace"), True
    return rel, label, split, text, bad


def folder_docs(input_path: str, encoding: str) -> pd.DataFrame:
    """doc (path relative to the input, or inside the archive), label (the file's folder), split
    (the top folder; "" for <label>/<file>), text (decoded, invalid bytes as U+FFFD) and bad_encoding,
    sorted by doc. Hidden files and files directly under the input (no label) are skipped."""
    rows = []
    base = local_path(input_path)
    if base.is_file():
        try:
            with tarfile.open(base) as tar:
                for m in tar:
                    rel = m.name.removeprefix("./")
                    if m.isfile() and "/" in rel and not any(p.startswith(".") for p in rel.split("/")):
                        rows.append(_doc_row(rel, tar.extractfile(m).read(), encoding))
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise InputError(f"{base}: cannot read the archive: {exc}") from None
    else:
        for p in sorted(base.rglob("*")):
            rel = p.relative_to(base).as_posix()
            if p.is_file() and "/" in rel and not any(s.startswith(".") for s in rel.split("/")):
                rows.append(_doc_row(rel, p.read_bytes(), encoding))
    if not rows:
        raise InputError(f"{base}: no <label>/<document> files in it (data.input)")
    return pd.DataFrame(rows, columns=[f.name for f in DOCS.fields]).sort_values("doc", ignore_index=True)


def load_docs(spark: SparkSession, cfg) -> tuple[DataFrame, list[str]]:
    """(item_id, doc, label, split, text, bad_encoding, source_file) and the input files."""
    tc = cfg.data.text
    if layout(cfg) == "folders":
        pdf = folder_docs(cfg.data.input, tc.encoding)
        if cfg.data.limit:
            # A stable sample spread over the labels, not the first folder's documents.
            order = pd.util.hash_pandas_object(pdf["doc"], index=False).argsort(kind="stable")
            pdf = pdf.iloc[order[: cfg.data.limit]].sort_values("doc", ignore_index=True)
        docs = spark.createDataFrame(pdf, DOCS)
        origin = str(local_path(cfg.data.input))
        docs = docs.withColumn("item_id", stable_id("doc")).withColumn(
            "source_file", F.concat(F.lit(origin + "/"), F.col("doc"))
        )
        return docs, [origin]
    fmt = table_format(cfg.data.input, tc.format, "data.text.format")
    table = read_table(spark, cfg.data.input, fmt, cfg.data.options)
    return table_docs(table, tc, cfg.data.input), [cfg.data.input]


def table_docs(table: DataFrame, tc, origin: str) -> DataFrame:
    """A table with id, text (and label) columns -> the documents' columns. Integer ids are kept;
    other ids are mapped to a stable long (``shaping.stable_id``) and kept as ``doc``."""
    wanted = [tc.id_column, tc.text_column] + ([tc.label_column] if tc.label_column else [])
    for c in wanted:
        if c not in table.columns:
            raise InputError(f"text: column {c!r} not in {origin} (columns: {table.columns}); set data.text.*_column")
    id_type = table.schema[tc.id_column].dataType
    integral = isinstance(id_type, (T.ByteType, T.ShortType, T.IntegerType, T.LongType))
    item = F.col(tc.id_column).cast("long") if integral else stable_id(F.col(tc.id_column).cast("string"))
    text = F.col(tc.text_column).cast("string")
    return table.select(
        item.alias("item_id"),
        F.coalesce(F.col(tc.id_column).cast("string"), F.lit("")).alias("doc"),
        (F.col(tc.label_column).cast("string") if tc.label_column else F.lit(None).cast("string")).alias("label"),
        F.lit("").alias("split"),
        text.alias("text"),
        F.coalesce(F.instr(text, REPLACEMENT) > 0, F.lit(False)).alias("bad_encoding"),
        F.lit(origin).alias("source_file"),
    )


# ---------------------------------------------------------------- pure transforms

HEADER_END = "\n\n"
QUOTE_LINE = r"(?m)^(?:.*(?:writes in|writes:|wrote:|says:|said:)|In article|Quoted from|\||>).*(?:\n|$)"
SIGNATURE = r"(?s)^(.*)\n[ \t]*-{2,}[ \t]*(?:\n.*)?$"


def strip_header(text: Column) -> Column:
    """The body after the first blank line; "" when there is none (scikit-learn's rule)."""
    at = F.instr(text, HEADER_END)
    return F.when(at > 0, F.substr(text, at + F.lit(2))).otherwise(F.lit(""))


def subject(text: Column) -> Column:
    """The header block's ``Subject:`` line, or null."""
    header = F.substring_index(text, HEADER_END, 1)
    s = F.regexp_extract(header, r"(?mi)^Subject:[ \t]*(.*?)[ \t\r]*$", 1)
    return F.when(s != "", s)


def clean(docs: DataFrame, tc) -> DataFrame:
    """Adds ``title`` (the Subject line, when headers are stripped) and ``body`` (the text after the
    configured stripping), and ``reason`` (null = usable): encoding error (when quarantined), null or
    duplicate id, empty body."""
    text = F.regexp_replace(F.coalesce(F.col("text"), F.lit("")), "\r\n?", "\n")
    body = strip_header(text) if tc.strip_headers else text
    if tc.strip_quotes:
        body = F.regexp_replace(body, QUOTE_LINE, "")
    if tc.strip_signatures:
        body = F.regexp_replace(body, SIGNATURE, "$1")
    title = subject(text) if tc.strip_headers else F.lit(None).cast("string")
    n_id = F.count("*").over(Window.partitionBy("item_id"))
    encoding = F.col("bad_encoding") if tc.on_encoding_error == "quarantine" else F.lit(False)
    reason = (
        F.when(encoding, F.lit(ENCODING_ERROR))
        .when(F.col("item_id").isNull(), F.lit(BAD_ID))
        .when(n_id > 1, F.lit(DUPLICATE_ID))
        .when(F.trim(F.col("body")) == "", F.lit(EMPTY))
    )
    return docs.withColumn("title", title).withColumn("body", body).withColumn("reason", reason)


def bag_of_words(tc) -> Pipeline:
    """body -> words -> kept (stop words removed) -> counts (a SparseVector over the vocabulary)."""
    stages = [
        RegexTokenizer(
            inputCol="body", outputCol="words", pattern=tc.token_pattern, gaps=False,
            minTokenLength=tc.min_token_length, toLowercase=True,
        ),
        StopWordsRemover(
            inputCol="words", outputCol="kept",
            stopWords=StopWordsRemover.loadDefaultStopWords("english") if tc.stop_words == "english" else [],
        ),
        CountVectorizer(
            inputCol="kept", outputCol="counts", vocabSize=tc.vocab_size, minDF=tc.min_df,
            binary=tc.weighting == "binary",
        ),
    ]
    if tc.weighting == "tfidf":
        stages.append(IDF(inputCol="counts", outputCol="tfidf"))
    return Pipeline(stages=stages)


def vectors(model: PipelineModel, docs: DataFrame, tc) -> DataFrame:
    """The fitted pipeline applied: ``docs`` plus ``features`` (array<float> over the vocabulary,
    weighted by ``tc.weighting``, divided by its ``tc.normalize`` norm) and ``has_word`` (some vocabulary word occurs)."""
    out = model.transform(docs)
    counts = vector_to_array("counts", dtype="float32")
    if tc.weighting == "tfidf":
        feats = vector_to_array("tfidf", dtype="float32")
    elif tc.weighting == "log1p":
        feats = F.transform(counts, lambda x: F.log1p(x).cast("float"))
    else:
        feats = counts
    if tc.normalize != "none":
        # Spark ML's Normalizer on the weighted vector (a zero vector, no vocabulary word, stays zero
        # and is quarantined below). Not an array expression: a norm referenced inside a lambda is
        # evaluated once per element, which took the whole corpus from a minute to over fifteen.
        out = out.withColumn("weighted", array_to_vector(feats))
        p = 1.0 if tc.normalize == "l1" else 2.0
        out = Normalizer(inputCol="weighted", outputCol="normalized", p=p).transform(out)
        feats = vector_to_array("normalized", dtype="float32")
    return out.withColumn("features", feats).withColumn("has_word", F.exists(counts, lambda x: x > 0))


# ---------------------------------------------------------------- composition


def read(spark: SparkSession, cfg) -> SourceResult:
    """Documents -> bag-of-words vectors with Spark ML (``RegexTokenizer``, ``StopWordsRemover``,
    ``CountVectorizer``, ``IDF`` for tf-idf): features item_id long, features array<float> over the
    vocabulary; items with doc, label, split and title; rejected documents and those without a vocabulary
    word quarantined. Raises ``InputError`` when the input cannot be read, no usable document is left to
    fit the vocabulary on, or the vocabulary is empty."""
    tc = cfg.data.text
    docs, files = load_docs(spark, cfg)
    docs = clean(docs, tc).persist(StorageLevel.MEMORY_AND_DISK)
    usable = docs.filter(F.col("reason").isNull())
    fit_on = usable.filter(F.col("split") == tc.vocab_split) if tc.vocab_split else usable
    if fit_on.isEmpty():
        docs.unpersist()
        where = f" in split {tc.vocab_split!r} (data.text.vocab_split)" if tc.vocab_split else ""
        raise InputError(f"text: {cfg.data.input}: no usable document{where} to fit the vocabulary on")
    model = bag_of_words(tc).fit(fit_on)
    vocab = list(model.stages[2].vocabulary)
    log.info("text: vocabulary of %d words (%s weighting)", len(vocab), tc.weighting)
    if not vocab:
        docs.unpersist()
        raise InputError(f"text: {cfg.data.input}: no word occurs in data.text.min_df={tc.min_df} documents")
    scored = vectors(model, usable, tc).persist(StorageLevel.MEMORY_AND_DISK)
    used = scored.filter("has_word")
    raw = F.substring(F.coalesce(F.col("text"), F.lit("")), 1, 100_000)
    quarantine = docs.filter(F.col("reason").isNotNull()).select("source_file", raw.alias("raw"), "reason").unionByName(
        scored.filter(~F.col("has_word")).select("source_file", raw.alias("raw"), F.lit(NO_VOCAB).alias("reason"))
    )
    items = used.select("item_id", "doc", "label", "split", "title")
    encoding_errors = docs.filter("bad_encoding").count()
    if encoding_errors:
        log.warning("text: %d documents had bytes invalid in %s (%s)", encoding_errors, tc.encoding, tc.on_encoding_error)

    def cleanup() -> None:
        scored.unpersist()
        docs.unpersist()

    return SourceResult(
        features=used.select("item_id", "features"),
        items=items,
        quarantine=quarantine,
        feature_names=vocab,
        input_files=files,
        rows_in=docs.count,
        rows_used=used.count,
        extra={
            "text": {
                "layout": layout(cfg),
                "weighting": tc.weighting,
                "normalize": tc.normalize,
                "vocab_size": len(vocab),
                "vocab_split": tc.vocab_split,
                "encoding": tc.encoding,
                "encoding_errors": encoding_errors,
                "on_encoding_error": tc.on_encoding_error,
            }
        },
        cleanup=cleanup,
    )


register("text", check, read)
