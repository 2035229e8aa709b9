"""One typed root config for every job.

Layering: ``conf/base.yaml`` < the ``--config`` file < ``conf/presets/NAME.yaml`` < dotted
``key=value`` overrides. Every layer is checked against the dataclasses below, so an unknown key
or a bad value fails before Spark starts, with an error that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sae_model.config import EvaluateConfig, FinetuneConfig, ModelConfig, PretrainConfig, TrainConfig


def conf_dir() -> Path:
    """Where ``base.yaml`` and ``presets/`` live.

    ``SAE_CONF_DIR`` if set; else ``conf/`` beside the source tree (a checkout or an editable
    install); else ``./conf``. The fallbacks matter under ``spark-submit --py-files``, where this
    module is imported from a zip and ``__file__`` points inside it, and in an installed wheel.
    """
    env = os.environ.get("SAE_CONF_DIR")
    if env:
        return Path(env)
    beside = Path(__file__).resolve().parent.parent / "conf"
    return beside if (beside / "base.yaml").is_file() else Path("conf").absolute()


CONF_DIR = conf_dir()
# The names of data.source; pipelines.sources registers one reader under each (tests check both agree).
SourceName = Literal["tag_genome", "mnist", "synthetic", "movielens_tags", "movielens_ratings", "jdbc", "text", "table", "events"]
SOURCES: tuple[str, ...] = typing.get_args(SourceName)


RESUME_FREE_KEYS = frozenset(
    {"pretrain.epochs", "finetune.epochs", "train.progress", "train.threads", "train.reader_workers",
     "train.auto_resume", "train.restart_on_bad_checkpoint"}
)


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


@dataclass(frozen=True)
class SyntheticConfig:
    """data.synthetic.*: the generated Tag Genome-like data set (source=synthetic): sizes, seed, defect rate."""

    items: int = 2000
    tags: int = 64
    genres: int = 8
    seed: int = 7
    # Share of items given an incomplete vector or a broken line, to exercise quarantine.
    defect_rate: float = 0.0
    partitions: int = 0  # 0 = Spark's default parallelism

    def __post_init__(self) -> None:
        if self.items < 1 or self.tags < 1 or self.genres < 1:
            raise ValueError("data.synthetic: items, tags and genres must be >= 1")
        if not 0.0 <= self.defect_rate < 1.0:
            raise ValueError(f"data.synthetic.defect_rate: must be in [0, 1), got {self.defect_rate}")


@dataclass(frozen=True)
class LogsConfig:
    """data.logs.*: user tag applications (source=movielens_tags) -> one vector per movie."""

    # Vocabulary: the N most used normalised tags with at least min_support applications.
    vocab_size: int = 1128
    min_support: int = 2
    # counts = raw counts; tfidf = count share x smoothed idf; relevance = count / the movie's max (in [0, 1]).
    weighting: Literal["counts", "tfidf", "relevance"] = "relevance"
    # Merge new records into paths.root/state/ (false = rebuild from the input alone, state rewritten).
    incremental: bool = True

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"data.logs.vocab_size: must be >= 1, got {self.vocab_size}")
        if self.min_support < 1:
            raise ValueError(f"data.logs.min_support: must be >= 1, got {self.min_support}")


@dataclass(frozen=True)
class RatingsConfig:
    """data.ratings.*: ratings.csv (source=movielens_ratings) -> mean-centred rating vectors."""

    # item = one vector per movie over users (item map); user = one per user over movies (user map).
    entity: Literal["item", "user"] = "item"
    # Vector width: the `width` most active users (items), or `width` hash buckets of them.
    width: int = 1024
    columns: Literal["top", "hash"] = "top"

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError(f"data.ratings.width: must be >= 1, got {self.width}")


@dataclass(frozen=True)
class JdbcConfig:
    """data.jdbc.*: a table or query over JDBC. Credentials come only from the environment variables
    named here or from secrets_file (YAML/JSON with user/password), never from this config."""

    url: str = ""  # jdbc:postgresql://host:5432/db, without user or password
    table: str = ""  # a table name, or
    query: str = ""  # a SELECT (exactly one of table/query)
    driver: str = "org.postgresql.Driver"
    # Put on Spark's classpath before the JVM starts (jobs.common.build_spark adds it to spark.jars).
    driver_jar: str = "/usr/share/java/postgresql.jar"
    user_env: str = "SAE_JDBC_USER"
    password_env: str = "SAE_JDBC_PASSWORD"
    secrets_file: str = ""
    # wide: id_column + one column per feature; long: rows of (id_column, feature_column, value_column).
    shape: Literal["wide", "long"] = "wide"
    id_column: str = "id"
    feature_columns: list[str] = field(default_factory=list)  # wide; empty = every numeric column but id/metadata
    metadata_columns: list[str] = field(default_factory=list)  # copied to items/
    feature_column: str = "feature"
    value_column: str = "value"
    # long shape: an (id, feature) pair with no row is 0.0 (true) or quarantines the id (false).
    fill_missing: bool = True
    # Partitioned read: numeric column and bounds split into num_partitions range queries.
    partition_column: str = ""
    lower_bound: int = 0
    upper_bound: int = 0
    num_partitions: int = 1
    fetch_size: int = 10000

    def __post_init__(self) -> None:
        if self.table and self.query:
            raise ValueError("data.jdbc: set table or query, not both")
        if self.num_partitions < 1:
            raise ValueError(f"data.jdbc.num_partitions: must be >= 1, got {self.num_partitions}")
        if self.partition_column and self.upper_bound <= self.lower_bound:
            raise ValueError("data.jdbc.upper_bound: must be > data.jdbc.lower_bound with partition_column set")
        if "password=" in self.url.lower() or "@" in self.url.split("?")[0].split("//", 1)[-1]:
            raise ValueError(
                "data.jdbc.url: must not carry credentials; use data.jdbc.user_env/password_env or secrets_file"
            )


@dataclass(frozen=True)
class TextConfig:
    """data.text.*: documents or log lines (source=text) -> bag-of-words vectors, with Spark ML's
    RegexTokenizer, StopWordsRemover, CountVectorizer and IDF."""

    # folders: data.input is a folder tree (or a .tar/.tar.gz of one) whose file's folder name is its
    # label (the 20news-bydate layout); table: a table with id, text and optional label columns;
    # auto: folders for a directory or an archive, table otherwise.
    layout: Literal["auto", "folders", "table"] = "auto"
    # table layout: how to read data.input (parquet | csv | orc | json | catalog; "" = by the extension);
    # reader options (header, sep, quote, encoding, ...) come from data.options.
    format: str = ""
    id_column: str = "id"
    text_column: str = "text"
    label_column: str = ""  # "" = no label
    # folders layout: how file bytes are decoded (Python codec name: utf-8, latin-1, cp1252, ...).
    encoding: str = "utf-8"
    # A document with bytes invalid in its encoding: replace them with U+FFFD and use it, or quarantine it.
    # Either way the manifest counts them (text.encoding_errors).
    on_encoding_error: Literal["replace", "quarantine"] = "replace"
    # Mail/news cleaning: drop the header block (up to the first blank line), quoted replies
    # (lines starting with > or |, "... writes:" lines) and the signature (after the last "--" line).
    strip_headers: bool = False
    strip_quotes: bool = False
    strip_signatures: bool = False
    # RegexTokenizer: tokens are the matches of this Java regex, lower-cased, at least this long.
    token_pattern: str = "\\p{L}+"
    min_token_length: int = 2
    stop_words: Literal["english", "none"] = "english"
    # CountVectorizer: the vocab_size most frequent words in at least min_df documents (>= 1: a count,
    # < 1: a share of the documents).
    vocab_size: int = 2000
    min_df: float = 2.0
    # counts | binary (word present) | log1p (log(1 + count), Hinton 2006's document input) | tfidf (IDF stage).
    weighting: Literal["counts", "binary", "log1p", "tfidf"] = "counts"
    # Each document's weighted vector divided by its L1 or L2 norm (none = as weighted). l2 makes the
    # Euclidean distance of two posts their cosine distance, so a long post and a short one on the
    # same topic are neighbours (Hinton 2006's document model sees word shares, not counts, too).
    normalize: Literal["none", "l1", "l2"] = "none"
    # Fit the vocabulary and IDF on the documents of this split only (folders: the top folder, e.g.
    # 20news-bydate-train), so held-out documents do not choose the words. "" = every document.
    vocab_split: str = ""

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"data.text.vocab_size: must be >= 1, got {self.vocab_size}")
        if self.min_df <= 0:
            raise ValueError(f"data.text.min_df: must be > 0, got {self.min_df}")
        if self.min_token_length < 1:
            raise ValueError(f"data.text.min_token_length: must be >= 1, got {self.min_token_length}")
        import codecs

        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"data.text.encoding: unknown encoding {self.encoding!r}") from None


@dataclass(frozen=True)
class TableConfig:
    """data.table.*: any Spark-readable table (source=table) in the wide, long or array shape, shaped
    by the code the JDBC source uses. Reader options (CSV header, sep, quote, escape, encoding, ...)
    come from data.options."""

    # parquet | csv | orc | json (JSON lines) | catalog (data.input is a table name); "" = by the extension.
    format: str = ""
    # wide: id_column + one column per feature; long: rows of (id_column, feature_column, value_column);
    # array: id_column + one array column (array_column).
    shape: Literal["wide", "long", "array"] = "wide"
    id_column: str = "id"
    # auto: an integer id column is the item id, any other is mapped to a stable long (xxhash64) with
    # the original kept in items/ as source_id; long: ids must be integers; string: always mapped.
    id_type: Literal["auto", "long", "string"] = "auto"
    feature_columns: list[str] = field(default_factory=list)  # wide; empty = every numeric column but id/metadata/label
    metadata_columns: list[str] = field(default_factory=list)  # copied to items/
    # Copied to items/ as `label`, the column evaluation and the maps colour by ("" = none).
    label_column: str = ""
    feature_column: str = "feature"
    value_column: str = "value"
    array_column: str = "features"
    # long shape: an (id, feature) pair with no row is 0.0 (true) or quarantines the id (false).
    fill_missing: bool = True
    # A folder of KEY=VALUE/ partitions (date=2024-01-31/): read only partitions not loaded before and
    # merge them into the published tables (a later partition's row replaces an id's earlier one).
    # false = rebuild from every partition.
    incremental: bool = True

    def __post_init__(self) -> None:
        if self.format not in ("", "parquet", "csv", "orc", "json", "catalog"):
            raise ValueError(
                f"data.table.format: must be one of parquet, csv, orc, json, catalog (or empty), got {self.format!r}"
            )
        if not self.id_column:
            raise ValueError("data.table.id_column: must be set")


@dataclass(frozen=True)
class EventsConfig:
    """data.events.*: a generic event log (source=events) -> one vector per entity over its tokens.
    The file is read like data.source=table (data.events.format, reader options such as sep, quote
    and encoding in data.options)."""

    format: str = ""  # parquet | csv | orc | json | catalog; "" = by the extension
    # Column names for a CSV without a header line, in order ([] = the file's header names them).
    columns: list[str] = field(default_factory=list)
    entity_column: str = "entity"
    token_column: str = "token"
    weight_column: str = ""  # "" = each event weighs 1
    timestamp_column: str = ""  # "" = none; set: an unparseable timestamp quarantines the event
    # An event's identity: this column, or ("") all of entity, token, weight and timestamp. A repeated
    # identity within a load, or one loaded before, is a duplicate.
    event_id_column: str = ""
    # counts = summed weights; binary = 1 where any; tfidf = weight share x smoothed idf;
    # bm25 = Okapi BM25 term weight (k1, b); mean_centred = weight minus the entity's mean weight.
    weighting: Literal["counts", "binary", "tfidf", "bm25", "mean_centred"] = "counts"
    bm25_k1: float = 1.2
    bm25_b: float = 0.75
    # Vocabulary: the top_k tokens by events, among those with at least min_support events.
    top_k: int = 1000
    min_support: int = 1
    # Merge new events into paths.root/events_state (false = rebuild from the input alone).
    incremental: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ValueError(f"data.events.top_k: must be >= 1, got {self.top_k}")
        if self.min_support < 1:
            raise ValueError(f"data.events.min_support: must be >= 1, got {self.min_support}")
        if self.bm25_k1 < 0 or not 0 <= self.bm25_b <= 1:
            raise ValueError("data.events.bm25_k1 must be >= 0 and data.events.bm25_b in [0, 1]")


def _check_date(value: str, key: str) -> None:
    import datetime as _dt

    if value:
        try:
            _dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{key}: expected a date YYYY-MM-DD, got {value!r}") from None


@dataclass(frozen=True)
class DataConfig:
    """data.*: which source ingest reads, from where, and each source's own settings."""

    source: SourceName = "mnist"
    # A directory or a file; relative paths are resolved against the working directory.
    input: str = "data/mnist"
    # Cap on items read (0 = all); handy for smoke runs on real downloads.
    limit: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    options: dict[str, str] = field(default_factory=dict)
    logs: LogsConfig = field(default_factory=LogsConfig)
    ratings: RatingsConfig = field(default_factory=RatingsConfig)
    jdbc: JdbcConfig = field(default_factory=JdbcConfig)
    text: TextConfig = field(default_factory=TextConfig)
    table: TableConfig = field(default_factory=TableConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    # Log sources: read only records from this date (UTC) on, or date=... partitions from it on.
    since: str = ""

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise ValueError(f"data.limit: must be >= 0, got {self.limit}")
        _check_date(self.since, "data.since")


@dataclass(frozen=True)
class PathsConfig:
    """paths.*: the root directory of every output of one pipeline."""

    # Every output of one pipeline lives under this root: features/, items/, codes/, ...
    root: str = "out/default"


@dataclass(frozen=True)
class PublishConfig:
    """publish.*: how many published versions of each table set (ingest, scores) are kept."""

    # The last N published versions of each set stay on disk (rollback, pinned readers); the
    # nightly also keeps the tables of @champion and @previous whatever N is.
    keep: int = 3

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"publish.keep: must be >= 1, got {self.keep}")


@dataclass(frozen=True)
class SparkConfig:
    """spark.*: the Spark session's master, app name, driver memory, shuffle partitions and extra conf."""

    master: str = "local[*]"
    app_name: str = "sae"
    driver_memory: str = "4g"
    shuffle_partitions: int = 8
    conf: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InferConfig:
    """infer.*: which model scores, and how neighbours are searched and maps drawn."""

    # MLflow model URI; empty = the registered model's `champion` alias, else the pipeline's latest run.
    model_uri: str = ""
    # Publish a model whose training run is tagged unhealthy (collapsed map, dead loss); `sae infer --force`.
    force: bool = False
    k: int = 10
    metric: Literal["euclidean", "cosine"] = "euclidean"
    # Which layer's activations to compare: -1 = the code layer; 3 = the 250-wide layer of 1128-1000-500-250-2.
    layer: int = -1
    method: Literal["auto", "exact", "grid", "lsh"] = "auto"
    # Up to this many items the exact all-pairs top-k is used when method=auto.
    exact_max_items: int = 20000
    # Rows per Arrow batch handed to the model in a Spark task (spark.sql.execution.arrow.maxRecordsPerBatch).
    batch_size: int = 16384
    # Torch threads per Spark Python worker; 0 = spark.task.cpus (one per concurrently running task).
    torch_threads: int = 0
    # method=grid: about this many items per tile (one KD-tree per tile and pass).
    tile_items: int = 50000
    # method=lsh: hash tables, and items per bucket (hyperplanes per table = log2(items / this)).
    lsh_tables: int = 8
    lsh_bucket_items: int = 2000
    # Query items sampled to measure an approximate method's recall against exact (0 = skip).
    recall_sample: int = 1000
    # Maps (PNG + HTML) draw every item up to this many, else a seeded sample of this many (0 = no maps);
    # the page's search still covers every item. 200,000 drawn items make a ~35 MB page.
    map_max_points: int = 200000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"infer.k: must be >= 1, got {self.k}")
        if self.layer != -1 and self.layer < 1:
            raise ValueError(f"infer.layer: must be -1 (the code) or a layer number >= 1, got {self.layer}")
        for key in ("exact_max_items", "batch_size", "tile_items", "lsh_tables", "lsh_bucket_items"):
            if getattr(self, key) < 1:
                raise ValueError(f"infer.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("torch_threads", "recall_sample", "map_max_points"):
            if getattr(self, key) < 0:
                raise ValueError(f"infer.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass(frozen=True)
class MlflowConfig:
    """mlflow.*: tracking store, experiment and registered model name."""

    # Empty = sqlite:///<paths.root>/mlflow.db (MLflow 3 refuses a file: store).
    tracking_uri: str = ""
    experiment: str = "sae"
    registered_model: str = "sae"


@dataclass(frozen=True)
class NightlyConfig:
    """nightly.*: the unattended ingest -> train -> evaluate -> promote -> publish -> report run."""

    # The night to run (UTC date, YYYY-MM-DD); empty = today. Names the state file and the report.
    date: str = ""
    # Challenger starts from the champion's weights (no pretraining), else from scratch.
    warm_start: bool = True
    # Quality metric on the fixed holdout; ae_squared_error is lower-is-better, the others higher.
    metric: Literal["ae_squared_error", "ae_trustworthiness", "ae_continuity", "ae_knn_accuracy"] = "ae_squared_error"
    # Promote unless the challenger is worse than the champion by more than this share of its score.
    margin: float = 0.05
    # Align a new model's 2-D map to the published one (orthogonal Procrustes on the shared items).
    align: bool = True
    align_scaling: bool = True
    # Shared items sampled (to the driver) to fit the alignment.
    align_max_items: int = 20000
    # Training items sampled for the PCA baseline of the holdout report.
    baseline_max_items: int = 20000
    # A run holding the lock for longer than this is reported as possibly hung (the OS lock of a
    # dead run is released at once, so nothing is "taken over").
    lock_stale_after_s: int = 12 * 3600

    def __post_init__(self) -> None:
        _check_date(self.date, "nightly.date")
        if not 0.0 <= self.margin < 1.0:
            raise ValueError(f"nightly.margin: must be in [0, 1), got {self.margin}")
        for key in ("align_max_items", "baseline_max_items", "lock_stale_after_s"):
            if getattr(self, key) < 1:
                raise ValueError(f"nightly.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class Config:
    """The root config of every job: one section per part of the pipeline."""

    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as nested plain dicts (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, keys in declaration order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, e.g. for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and not (prefix.endswith(".conf") or prefix.endswith(".options")):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def hash(self) -> str:
        """The first 16 hex digits of the SHA-256 of the config's sorted-key JSON: equal configs, equal
        hashes."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def resume_fingerprint(self) -> str:
        """The config hash without the keys a resumed training may change (``RESUME_FREE_KEYS``: how
        long it runs and how it reports, not what it learns): a checkpoint of the same fingerprint
        can be continued with, say, ``finetune.epochs=40`` after a run started with 5000."""
        flat = {k: v for k, v in self.flat().items() if k not in RESUME_FREE_KEYS}
        return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


def presets() -> list[str]:
    """The names of the preset files in ``conf/presets`` (without ``.yaml``), sorted."""
    return sorted(p.stem for p in (conf_dir() / "presets").glob("*.yaml"))


def load_config(
    config_file: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    preset: str | None = None,
) -> Config:
    """Resolve the layered config; raises ConfigError naming the first bad key."""
    merged: dict[str, Any] = {}
    layers: list[tuple[str, dict[str, Any]]] = [("conf/base.yaml", _read_yaml(conf_dir() / "base.yaml"))]
    if config_file:
        layers.append((str(config_file), _read_yaml(Path(config_file))))
    if preset:
        path = conf_dir() / "presets" / f"{preset}.yaml"
        if not path.exists():
            raise ConfigError(f"--preset {preset!r}: no such preset; choose one of {presets()}")
        layers.append((f"preset {preset}", _read_yaml(path)))
    for origin, layer in layers:
        # Check each layer on its own so the error says which file holds the bad key.
        _check_keys(Config, layer, "", origin)
        _deep_merge(merged, layer)
    for item in overrides:
        key, value = _parse_override(item)
        nested = _nest(Config, key, value)
        _check_keys(Config, nested, "", f"override {item!r}")
        _deep_merge(merged, nested)
    return build(Config, merged)


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, coercing and checking every value."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}{f.name}"
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], key)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{sorted(unknown)[0]!r}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from exc


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
        return build(tp, value, key + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = _parse_scalar(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _check_keys(cls: type, data: Any, prefix: str, origin: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise ConfigError(f"{origin}: unknown config key {prefix}{k!r}; known keys here: {sorted(names)}")
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, dict):
            _check_keys(hints[k], v, f"{prefix}{k}.", origin)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` -> ``(key, value)``. A value for a text key (``paths.root``, ``infer.model_uri``,
    ``spark.conf.*``, a choice such as ``data.source``) is taken literally, character for character:
    YAML would cut ``run #1`` at the comment and turn ``yes``, ``null`` or ``1e3`` into other types.
    Other keys (numbers, booleans, lists) are read as YAML, but never with a comment dropped."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.seed=1")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key")
    if _takes_text(_field_type(Config, key)):
        return key, raw
    return key, _parse_scalar(raw)


def _field_type(cls: Any, key: str) -> Any:
    """The declared type of dotted ``key`` (a value's type below a free-form mapping); None if unknown."""
    tp = cls
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if tp is None:
            return None
        if typing.get_origin(tp) is dict and i < len(parts) - 1:
            return typing.get_args(tp)[1]  # spark.conf.spark.sql.x: the rest of the key is the map's key
    return tp


def _takes_text(tp: Any) -> bool:
    if tp is str:
        return True
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return False


def _parse_scalar(raw: str) -> Any:
    """YAML's reading of ``raw`` (lists ``[1,2]``, numbers and booleans as in the files); ``raw``
    itself when YAML cannot read it or would drop part of it as a comment, so the type check that
    follows names the whole value instead of silently using what precedes ``#``."""
    if not raw.strip():
        return ""
    try:
        value = yaml.safe_load(raw)
        tokens = [t for t in yaml.scan(raw) if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    except (yaml.YAMLError, ValueError):  # ValueError: a date-like value YAML cannot build (2024-13-01)
        return raw
    end = max((t.end_mark.index for t in tokens), default=0)
    return raw if raw[end:].strip() else value


def _nest(cls: Any, key: str, value: Any) -> dict[str, Any]:
    """``a.b.c=v`` -> ``{a: {b: {c: v}}}``; below a free-form mapping (``spark.conf``) the
    rest of the key stays whole, so ``spark.conf.spark.sql.ansi.enabled=false`` works."""
    head, _, rest = key.partition(".")
    if not rest:
        return {head: value}
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    sub = hints.get(head)
    if sub is not None and typing.get_origin(sub) is dict:
        return {head: {rest: value}}
    return {head: _nest(sub, rest, value)}


def _deep_merge(base: dict[str, Any], new: dict[str, Any]) -> None:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri``, or the pipeline's own sqlite store under ``paths.root``."""
    from pipelines.publish import is_local, local_path

    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if not is_local(cfg.paths.root):
        raise ConfigError("mlflow.tracking_uri: must be set when paths.root is not a local directory")
    from sae_model.tracking import relocate_store, sqlite_uri

    root = local_path(cfg.paths.root)
    root.mkdir(parents=True, exist_ok=True)
    relocate_store(root / "mlflow.db")  # a paths.root moved or copied whole keeps working
    return sqlite_uri(root / "mlflow.db")
