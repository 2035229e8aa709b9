"""One typed root config for every job.

Layering: ``conf/base.yaml`` < the ``--config`` file < ``conf/presets/NAME.yaml`` < dotted
``key=value`` overrides. The sections are pydantic dataclasses (``sae_model.config.section``):
pydantic checks each layer's keys and the merged values against the types and field constraints
below, so an unknown key or a bad value fails before Spark starts, with one line that names the key.
The layering and the override parser are this module's own.
"""

from __future__ import annotations

import codecs
import dataclasses
import datetime
import hashlib
import json
import os
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, TypeAdapter, ValidationError, field_validator, model_validator

from sae_model.config import (
    UNKNOWN_KEY_ERRORS,
    ConfigError,
    Count,
    EvaluateConfig,
    FieldError,
    FinetuneConfig,
    Float,
    Int,
    ModelConfig,
    NonNegative,
    PositiveFloat,
    PretrainConfig,
    Share,
    Text,
    TrainConfig,
    describe,
    section,
    type_at,
)


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


@section("data.synthetic")
class SyntheticConfig:
    """data.synthetic.*: the generated Tag Genome-like data set (source=synthetic): sizes, seed, defect rate."""

    items: Count = 2000
    tags: Count = 64
    genres: Count = 8
    seed: Int = 7
    # Share of items given an incomplete vector or a broken line, to exercise quarantine.
    defect_rate: Share = 0.0
    partitions: Int = 0  # 0 = Spark's default parallelism


@section("data.logs")
class LogsConfig:
    """data.logs.*: user tag applications (source=movielens_tags) -> one vector per movie; mapped onto
    conf/presets/movielens_tags.yaml's data.events (pipelines.sources.events.settings)."""

    # Vocabulary: the N most used normalised tags with at least min_support applications.
    vocab_size: Count = 1128
    min_support: Count = 2
    # counts = raw counts; tfidf = count share x smoothed idf; relevance = count / the movie's max (in [0, 1]).
    weighting: Literal["counts", "tfidf", "relevance"] = "relevance"
    # Merge new records into paths.root/state/ (false = rebuild from the input alone, state rewritten);
    # also for source=movielens_ratings.
    incremental: bool = True


@section("data.ratings")
class RatingsConfig:
    """data.ratings.*: ratings.csv (source=movielens_ratings) -> mean-centred rating vectors; mapped onto
    conf/presets/movielens_ratings.yaml's data.events (pipelines.sources.events.settings)."""

    # item = one vector per movie over users (item map); user = one per user over movies (user map).
    entity: Literal["item", "user"] = "item"
    # Vector width: the `width` most active users (items), or `width` hash buckets of them.
    width: Count = 1024
    columns: Literal["top", "hash"] = "top"


@section("data.jdbc")
class JdbcConfig:
    """data.jdbc.*: a table or query over JDBC. Credentials come only from the environment variables
    named here or from secrets_file (YAML/JSON with user/password), never from this config."""

    url: Text = ""  # jdbc:postgresql://host:5432/db, without user or password
    table: Text = ""  # a table name, or
    query: Text = ""  # a SELECT (exactly one of table/query)
    driver: Text = "org.postgresql.Driver"
    # Put on Spark's classpath before the JVM starts (jobs.common.build_spark adds it to spark.jars).
    driver_jar: Text = "/usr/share/java/postgresql.jar"
    user_env: Text = "SAE_JDBC_USER"
    password_env: Text = "SAE_JDBC_PASSWORD"
    secrets_file: Text = ""
    # wide: id_column + one column per feature; long: rows of (id_column, feature_column, value_column).
    shape: Literal["wide", "long"] = "wide"
    id_column: Text = "id"
    feature_columns: list[Text] = field(default_factory=list)  # wide; empty = every numeric column but id/metadata
    metadata_columns: list[Text] = field(default_factory=list)  # copied to items/
    feature_column: Text = "feature"
    value_column: Text = "value"
    # long shape: an (id, feature) pair with no row is 0.0 (true) or quarantines the id (false).
    fill_missing: bool = True
    # Partitioned read: numeric column and bounds split into num_partitions range queries.
    partition_column: Text = ""
    lower_bound: Int = 0
    upper_bound: Int = 0
    num_partitions: Count = 1
    fetch_size: Int = 10000

    @field_validator("url")
    @classmethod
    def _no_credentials(cls, url: str) -> str:
        if "password=" in url.lower() or "@" in url.split("?")[0].split("//", 1)[-1]:
            raise ValueError("must not carry credentials; use data.jdbc.user_env/password_env or secrets_file")
        return url

    @model_validator(mode="after")
    def _cross_field(self) -> JdbcConfig:
        if self.table and self.query:
            raise FieldError("query", "set data.jdbc.table or data.jdbc.query, not both")
        if self.partition_column and self.upper_bound <= self.lower_bound:
            raise FieldError("upper_bound", "must be > data.jdbc.lower_bound with partition_column set")
        return self


@section("data.text")
class TextConfig:
    """data.text.*: documents or log lines (source=text) -> bag-of-words vectors, with Spark ML's
    RegexTokenizer, StopWordsRemover, CountVectorizer and IDF."""

    # folders: data.input is a folder tree (or a .tar/.tar.gz of one) whose file's folder name is its
    # label (the 20news-bydate layout); table: a table with id, text and optional label columns;
    # auto: folders for a directory or an archive, table otherwise.
    layout: Literal["auto", "folders", "table"] = "auto"
    # table layout: how to read data.input (parquet | csv | orc | json | catalog; "" = by the extension);
    # reader options (header, sep, quote, encoding, ...) come from data.options.
    format: Text = ""
    id_column: Text = "id"
    text_column: Text = "text"
    label_column: Text = ""  # "" = no label
    # folders layout: how file bytes are decoded (Python codec name: utf-8, latin-1, cp1252, ...).
    encoding: Text = "utf-8"
    # A document with bytes invalid in its encoding: replace them with U+FFFD and use it, or quarantine it.
    # Either way the manifest counts them (text.encoding_errors).
    on_encoding_error: Literal["replace", "quarantine"] = "replace"
    # Mail/news cleaning: drop the header block (up to the first blank line), quoted replies
    # (lines starting with > or |, "... writes:" lines) and the signature (after the last "--" line).
    strip_headers: bool = False
    strip_quotes: bool = False
    strip_signatures: bool = False
    # RegexTokenizer: tokens are the matches of this Java regex, lower-cased, at least this long.
    token_pattern: Text = "\\p{L}+"
    min_token_length: Count = 2
    stop_words: Literal["english", "none"] = "english"
    # CountVectorizer: the vocab_size most frequent words in at least min_df documents (>= 1: a count,
    # < 1: a share of the documents).
    vocab_size: Count = 2000
    min_df: PositiveFloat = 2.0
    # counts | binary (word present) | log1p (log(1 + count), Hinton 2006's document input) | tfidf (IDF stage).
    weighting: Literal["counts", "binary", "log1p", "tfidf"] = "counts"
    # Each document's weighted vector divided by its L1 or L2 norm (none = as weighted). l2 makes the
    # Euclidean distance of two posts their cosine distance, so a long post and a short one on the
    # same topic are neighbours (Hinton 2006's document model sees word shares, not counts, too).
    normalize: Literal["none", "l1", "l2"] = "none"
    # Fit the vocabulary and IDF on the documents of this split only (folders: the top folder, e.g.
    # 20news-bydate-train), so held-out documents do not choose the words. "" = every document.
    vocab_split: Text = ""

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, encoding: str) -> str:
        try:
            codecs.lookup(encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {encoding!r}") from None
        return encoding


@section("data.table")
class TableConfig:
    """data.table.*: any Spark-readable table (source=table) in the wide, long or array shape, shaped
    by the code the JDBC source uses. Reader options (CSV header, sep, quote, escape, encoding, ...)
    come from data.options."""

    # parquet | csv | orc | json (JSON lines) | catalog (data.input is a table name); "" = by the extension.
    format: Literal["", "parquet", "csv", "orc", "json", "catalog"] = ""
    # wide: id_column + one column per feature; long: rows of (id_column, feature_column, value_column);
    # array: id_column + one array column (array_column).
    shape: Literal["wide", "long", "array"] = "wide"
    id_column: Annotated[Text, Field(min_length=1)] = "id"
    # auto: an integer id column is the item id, any other is mapped to a stable long (xxhash64) with
    # the original kept in items/ as source_id; long: ids must be integers; string: always mapped.
    id_type: Literal["auto", "long", "string"] = "auto"
    feature_columns: list[Text] = field(default_factory=list)  # wide; empty = every numeric column but id/metadata/label
    metadata_columns: list[Text] = field(default_factory=list)  # copied to items/
    # Copied to items/ as `label`, the column evaluation and the maps colour by ("" = none).
    label_column: Text = ""
    feature_column: Text = "feature"
    value_column: Text = "value"
    array_column: Text = "features"
    # long shape: an (id, feature) pair with no row is 0.0 (true) or quarantines the id (false).
    fill_missing: bool = True
    # A folder of KEY=VALUE/ partitions (date=2024-01-31/): read only partitions not loaded before and
    # merge them into the published tables (a later partition's row replaces an id's earlier one).
    # false = rebuild from every partition.
    incremental: bool = True


@section("data.events")
class EventsConfig:
    """data.events.*: a generic event log (source=events) -> one vector per entity over its tokens.
    The file is read like data.source=table (data.events.format, reader options such as sep, quote
    and encoding in data.options). The MovieLens tags and ratings logs are presets of it
    (conf/presets/movielens_tags.yaml, movielens_ratings.yaml; data.source=movielens_tags|_ratings)."""

    format: Text = ""  # parquet | csv | orc | json | catalog; "" = by the extension
    # "" = data.input is the log (a file, a folder, or KEY=VALUE/ partitions); NAME = data.input is a
    # folder holding NAME.<ext> (gzipped or not) or NAME/KEY=VALUE/ partitions (MovieLens: tags, ratings).
    file: Text = ""
    # The CSV's field names, in order ([] = its header line names them). With names given the file has
    # no header line, unless data.options.header=true: then its header must be exactly these names.
    columns: list[Text] = field(default_factory=list)
    entity_column: Text = "entity"
    token_column: Text = "token"
    weight_column: Text = ""  # "" = each event weighs 1
    timestamp_column: Text = ""  # "" = none; set: an unparseable timestamp quarantines the event
    # An event's identity: this column, or ("") all its fields. A repeated identity within a load, or
    # one loaded before, is a duplicate.
    event_id_column: Text = ""
    # Columns that must hold integer ids (a non-integer quarantines the event); an integer entity is the
    # item id itself (other entities map to a stable long, kept in items/ as source_id).
    id_columns: list[Text] = field(default_factory=list)
    # Tokens in Unicode NFKC, lower case, whitespace runs folded to one blank (tags).
    normalise_tokens: bool = False
    # Valid weights: [low, high] and a step (0 = any); another weight quarantines the event (ratings).
    weight_range: list[Float] = field(default_factory=list)
    weight_step: Annotated[Float, Field(ge=0)] = 0.0
    # Repeated (entity, token) events: summed (sum), or the latest by timestamp (latest; ratings).
    combine: Literal["sum", "latest"] = "sum"
    # Subtract from each weight the mean weight of its entity's or token's pairs, all of them, before
    # the vocabulary is applied ("" = no; ratings: the user's mean rating).
    centre_by: Literal["", "entity", "token"] = ""
    # counts = summed weights; binary = 1 where any; tfidf = weight share x smoothed idf;
    # bm25 = Okapi BM25 term weight (k1, b); mean_centred = weight minus the entity's mean weight over
    # its vocabulary tokens; relevance = weight / the entity's largest.
    weighting: Literal["counts", "binary", "tfidf", "bm25", "mean_centred", "relevance"] = "counts"
    bm25_k1: Annotated[Float, Field(ge=0)] = 1.2
    bm25_b: Annotated[Float, Field(ge=0, le=1)] = 0.75
    # Vocabulary: the top_k tokens by events, among those with at least min_support events (top), or
    # top_k hash buckets of the tokens, weights summed per bucket (hash).
    vocabulary: Literal["top", "hash"] = "top"
    top_k: Count = 1000
    min_support: Count = 1
    token_prefix: Text = ""  # feature name = prefix + token (ratings: user_42)
    # A column of MovieLens movie ids: with movies.csv (or movie.csv) in data.input, an id not in it is
    # quarantined, and when it is the entity, titles and genres go to items/.
    movie_column: Text = ""
    # Quarantine reasons reworded: the generic wording -> yours (the MovieLens presets keep theirs).
    reasons: dict[Text, Text] = field(default_factory=dict)
    # Merge new events into paths.root/state (false = rebuild from the input alone).
    incremental: bool = True

    @model_validator(mode="after")
    def _cross_field(self) -> EventsConfig:
        if self.weight_range and (len(self.weight_range) != 2 or self.weight_range[0] > self.weight_range[1]):
            raise FieldError("weight_range", f"expected [low, high], got {self.weight_range}")
        return self


def _iso_date(value: str) -> str:
    if value:
        try:
            datetime.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}") from None
    return value


# A UTC date as text, YYYY-MM-DD, or "" for none.
DateText = Annotated[Text, AfterValidator(_iso_date)]


@section("data")
class DataConfig:
    """data.*: which source ingest reads, from where, and each source's own settings."""

    source: SourceName = "mnist"
    # A directory or a file; relative paths are resolved against the working directory.
    input: Text = "data/mnist"
    # Cap on items read (0 = all); handy for smoke runs on real downloads.
    limit: NonNegative = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    options: dict[Text, Text] = field(default_factory=dict)
    logs: LogsConfig = field(default_factory=LogsConfig)
    ratings: RatingsConfig = field(default_factory=RatingsConfig)
    jdbc: JdbcConfig = field(default_factory=JdbcConfig)
    text: TextConfig = field(default_factory=TextConfig)
    table: TableConfig = field(default_factory=TableConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    # Log sources: read only records from this date (UTC) on, or date=... partitions from it on.
    since: DateText = ""


@section("paths")
class PathsConfig:
    """paths.*: the root directory of every output of one pipeline."""

    # Every output of one pipeline lives under this root: features/, items/, codes/, ...
    root: Text = "out/default"


@section("publish")
class PublishConfig:
    """publish.*: how many published versions of each table set (ingest, scores) are kept."""

    # The last N published versions of each set stay on disk (rollback, pinned readers); the
    # nightly also keeps the tables of @champion and @previous whatever N is.
    keep: Count = 3


@section("spark")
class SparkConfig:
    """spark.*: the Spark session's master, app name, driver memory, shuffle partitions and extra conf."""

    master: Text = "local[*]"
    app_name: Text = "sae"
    driver_memory: Text = "4g"
    shuffle_partitions: Int = 8
    conf: dict[Text, Text] = field(default_factory=dict)


@section("infer")
class InferConfig:
    """infer.*: which model scores, and how neighbours are searched and maps drawn."""

    # MLflow model URI; empty = the registered model's `champion` alias, else the pipeline's latest run.
    model_uri: Text = ""
    # Publish a model whose training run is tagged unhealthy (collapsed map, dead loss); `sae infer --force`.
    force: bool = False
    k: Count = 10
    metric: Literal["euclidean", "cosine"] = "euclidean"
    # Which layer's activations to compare: -1 = the code layer; 3 = the 250-wide layer of 1128-1000-500-250-2.
    layer: Int = -1
    method: Literal["auto", "exact", "grid", "lsh"] = "auto"
    # Up to this many items the exact all-pairs top-k is used when method=auto.
    exact_max_items: Count = 20000
    # Rows per Arrow batch handed to the model in a Spark task (spark.sql.execution.arrow.maxRecordsPerBatch).
    batch_size: Count = 16384
    # Torch threads per Spark Python worker; 0 = spark.task.cpus (one per concurrently running task).
    torch_threads: NonNegative = 0
    # method=grid: about this many items per tile (one KD-tree per tile and pass).
    tile_items: Count = 50000
    # method=lsh: hash tables, and items per bucket (hyperplanes per table = log2(items / this)).
    lsh_tables: Count = 8
    lsh_bucket_items: Count = 2000
    # Query items sampled to measure an approximate method's recall against exact (0 = skip).
    recall_sample: NonNegative = 1000
    # Maps (PNG + HTML) draw every item up to this many, else a seeded sample of this many (0 = no maps);
    # the page's search still covers every item. 200,000 drawn items make a ~35 MB page.
    map_max_points: NonNegative = 200000
    # Where the items outside the training split go on the map: "encoder" = the encoder's code;
    # "refine" = the encoder's code refined against the training items' map (sae_model.placement,
    # umap-learn's transform started from the encoder): on 20 Newsgroups it lifted the test posts'
    # trustworthiness from 0.648 to 0.718 (UMAP 0.689) and kept their 5-NN accuracy (0.343 -> 0.357;
    # README, docs/news20_results.md). Needs train.split_column (its train_value items are the
    # reference, and keep their codes); the driver holds every item's features and code while it
    # places them.
    placement: Literal["encoder", "refine"] = "encoder"
    seed: Int = 0

    @field_validator("layer")
    @classmethod
    def _code_or_layer(cls, layer: int) -> int:
        if layer != -1 and layer < 1:
            raise ValueError(f"must be -1 (the code) or a layer number >= 1, got {layer}")
        return layer


@section("mlflow")
class MlflowConfig:
    """mlflow.*: tracking store, experiment and registered model name."""

    # Empty = sqlite:///<paths.root>/mlflow.db (MLflow 3 refuses a file: store).
    tracking_uri: Text = ""
    experiment: Text = "sae"
    registered_model: Text = "sae"


@section("nightly")
class NightlyConfig:
    """nightly.*: the unattended ingest -> train -> evaluate -> promote -> publish -> report run."""

    # The night to run (UTC date, YYYY-MM-DD); empty = today. Names the state file and the report.
    date: DateText = ""
    # Challenger starts from the champion's weights (no pretraining), else from scratch.
    warm_start: bool = True
    # Quality metric on the fixed holdout; ae_squared_error is lower-is-better, the others higher.
    metric: Literal["ae_squared_error", "ae_trustworthiness", "ae_continuity", "ae_knn_accuracy"] = "ae_squared_error"
    # Promote unless the challenger is worse than the champion by more than this share of its score.
    margin: Share = 0.05
    # Align a new model's 2-D map to the published one (orthogonal Procrustes on the shared items).
    align: bool = True
    align_scaling: bool = True
    # Shared items sampled (to the driver) to fit the alignment.
    align_max_items: Count = 20000
    # Training items sampled for the PCA baseline of the holdout report.
    baseline_max_items: Count = 20000
    # A run holding the lock for longer than this is reported as possibly hung (the OS lock of a
    # dead run is released at once, so nothing is "taken over").
    lock_stale_after_s: Count = 12 * 3600


@section("")
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

    @model_validator(mode="after")
    def _cross_section(self) -> Config:
        if self.infer.placement == "refine" and not self.train.split_column:
            raise FieldError("infer.placement", "refine places the items outside the training split against it: "
                             "needs train.split_column (and train.train_value)")
        return self

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


# Validates a nested dict (a layer, or the merged layers) into Config.
_ROOT = TypeAdapter(Config)

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
        _check_keys(layer, origin)
        _deep_merge(merged, layer)
    for item in overrides:
        nested = _parse_override(item)
        _check_keys(nested, f"override {item!r}")
        _deep_merge(merged, nested)
    try:
        return _ROOT.validate_python(merged)
    except ValidationError as exc:
        raise ConfigError(describe(exc.errors()[0], Config)) from None


def _check_keys(layer: dict[str, Any], origin: str) -> None:
    """Raise ConfigError ``ORIGIN: unknown config key 'a.b'`` for the first key pydantic does not know in
    this one layer; its values are checked once the layers are merged (a later one may fix them)."""
    try:
        _ROOT.validate_python(layer)
    except ValidationError as exc:
        for err in exc.errors():
            if err["type"] in UNKNOWN_KEY_ERRORS:
                raise ConfigError(f"{origin}: {describe(err, Config)}") from None


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


def _parse_override(item: str) -> dict[str, Any]:
    """``a.b=value`` -> the layer ``{a: {b: value}}``. A value for a text key (``paths.root``,
    ``infer.model_uri``, ``spark.conf.*``, a choice such as ``data.source``) is taken literally, character
    for character: YAML would cut ``run #1`` at the comment and turn ``yes``, ``null`` or ``1e3`` into
    other types. Other keys (numbers, booleans, lists) are read as YAML, but never with a comment dropped."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted.key=value, e.g. train.seed=1")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r}: bad key")
    path = _key_path(key)
    value = raw if _takes_text(type_at(Config, path)) else _parse_scalar(raw)
    for part in reversed(path):  # a.b.c=v -> {a: {b: {c: v}}}
        value = {part: value}
    return value


def _key_path(key: str) -> list[str]:
    """``a.b.c`` -> ``[a, b, c]``; below a free-form mapping (``spark.conf``) the rest of the key stays
    whole, so ``spark.conf.spark.sql.ansi.enabled`` is that map's key ``spark.sql.ansi.enabled``."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if typing.get_origin(type_at(Config, parts[:i])) is dict:
            return [*parts[:i], ".".join(parts[i:])]
    return parts


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
