"""Batch inference: score ``features/`` with a tracked model, publish ``codes/`` and ``neighbors/``, draw maps.

``predict_batch(spark, model, root, infer)`` is the one call a job makes. Both tables are written
aside and swapped in together (``pipelines.publish``), so readers never see codes from one model
and neighbours from another.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyspark.errors import AnalysisException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.alignment import Alignment
from pipelines.config import Config, ConfigError, InferConfig, tracking_uri
from pipelines.maps import MAP_NEIGHBOURS, map_data, write_maps
from pipelines.neighbors import recall_at_k, top_k_neighbors
from pipelines.publish import Pinned, is_local, local_path, pin, publishing
from pipelines.schemas import CODES, FEATURES, NEIGHBORS, check_columns, conform
from pipelines.scoring import ResolvedModel, score_parquet

log = logging.getLogger(__name__)


def codes_table(
    spark: SparkSession,
    features_path: str,
    model: ResolvedModel,
    infer: InferConfig,
    scored_at: datetime,
    alignment: Alignment | None = None,
    reference: DataFrame | None = None,
) -> DataFrame:
    """The CODES table of the Parquet table at ``features_path``: item_id, code, x/y for 2-D codes,
    model provenance and scoring time.

    ``reference``: :func:`reference_items`' (item_id, _reference) table; the items outside the training
    split are placed against the training items' map (:func:`placed_codes`, ``infer.placement=refine``).
    ``alignment`` (``pipelines.alignment``) is applied to the code after that, before x/y are taken
    from it.
    """
    scored = score_parquet(spark, features_path, model, layer=-1, batch_rows=infer.batch_size, threads=infer.torch_threads)
    if reference is not None:
        scored = placed_codes(scored, spark.read.parquet(features_path), reference, seed=infer.seed)
    if alignment is not None:
        scored = scored.withColumn("code", aligned_code(F.col("code"), alignment))
    two_d = F.size("code") == 2
    return conform(
        scored.select(
            "item_id",
            "code",
            F.when(two_d, F.col("code")[0]).alias("x"),
            F.when(two_d, F.col("code")[1]).alias("y"),
            F.lit(model.uri).alias("model_uri"),
            F.lit(model.run_id).cast("string").alias("run_id"),
            F.lit(model.version).cast("string").alias("model_version"),
            F.lit(scored_at).alias("scored_at"),
        ),
        CODES,
    )


def reference_items(items: DataFrame, split_column: str, train_value: str) -> DataFrame:
    """(item_id, _reference: bool) of ``items``, one row per item: whether its ``split_column`` (as a
    string) is ``train_value``, the training items ``infer.placement=refine`` places the others against.

    Raises ``sae_model.config.ConfigError`` when ``items`` lacks the column or when no item, or too few
    to place against (``sae_model.placement.N_NEIGHBORS`` or fewer), has the value (one small Spark
    query), so a job can check before it scores anything."""
    from sae_model.placement import N_NEIGHBORS

    if split_column not in items.columns:
        raise ConfigError(f"train.split_column: items/ has no column {split_column!r} to take the training items "
                          f"from (infer.placement=refine); columns: {', '.join(items.columns)}")
    is_ref = (F.col(split_column).cast("string") == F.lit(train_value)).alias("_reference")
    out = items.select("item_id", is_ref).groupBy("item_id").agg(F.max("_reference").alias("_reference"))
    found = out.where("_reference").limit(N_NEIGHBORS + 1).count()
    if not found:
        raise ConfigError(f"train.train_value: no item has {split_column} == {train_value!r}: nothing to place the "
                          "others against (infer.placement=refine)")
    if found <= N_NEIGHBORS:
        raise ConfigError(f"train.train_value: only {found} items have {split_column} == {train_value!r}; placing "
                          f"against their map needs more than {N_NEIGHBORS} (infer.placement=refine)")
    return out


def placed_codes(scored: DataFrame, features: DataFrame, reference: DataFrame, seed: int = 0) -> DataFrame:
    """``scored`` (item_id, code) with the codes of the items that are not training items in
    ``reference`` (:func:`reference_items`; items it lacks count as new) refined against the training
    items' codes (``sae_model.placement.refine_split``: umap-learn's ``transform``, McInnes et al. 2018,
    started from the encoder's codes); the training items keep theirs. ``features``: the FEATURES table
    (item_id, features) the codes were scored from.

    Runs on the driver: every item's features and code are collected (float32, items x (dim + code
    width)) and the exact kNN of the new items among the training ones is computed there, so it is
    meant for the tens of thousands of items of a document or catalogue map. Raises
    ``sae_model.config.ConfigError`` (a ``ValueError``; the job prints ``config error: ...`` and exits
    2, nothing published) when no scored item, or too few, is a training item
    (``sae_model.placement.refine_codes``'s checks).
    """
    import numpy as np
    import pandas as pd

    from sae_model.placement import refine_split

    rows = (
        scored.select("item_id", "code")
        .join(features.select("item_id", "features"), "item_id")
        .join(reference, "item_id", "left")
        .select("item_id", "code", "features", F.coalesce("_reference", F.lit(False)).alias("_reference"))
        .toPandas()
        .sort_values("item_id", kind="stable")  # the same rows in the same order: the same placement on a rerun
    )
    is_ref = rows["_reference"].to_numpy(dtype=bool)
    if not is_ref.any():
        raise ConfigError("train.train_value: no scored item is a training item: nothing to place the others "
                          "against (infer.placement=refine)")
    t0 = time.perf_counter()
    x = np.stack(rows["features"].to_numpy()).astype(np.float32)
    try:
        codes = refine_split(x, np.stack(rows["code"].to_numpy()), is_ref, seed=seed)
    except ValueError as exc:  # e.g. a training split of a handful of items: too few to place against
        raise ConfigError(f"infer.placement: refine: {exc}") from exc
    log.info("placed %d items against the map of %d training items (%.1f s)", int((~is_ref).sum()),
             int(is_ref.sum()), time.perf_counter() - t0)
    out = pd.DataFrame({"item_id": rows["item_id"].to_numpy(dtype=np.int64), "code": list(codes)})
    # Elements declared non-null as CODES has them (Spark will not cast array<float> with nulls allowed
    # to one without).
    schema = T.StructType([T.StructField("item_id", T.LongType(), False),
                           T.StructField("code", T.ArrayType(T.FloatType(), False), False)])
    return scored.sparkSession.createDataFrame(out, schema=schema)


def aligned_code(code: F.Column, alignment: Alignment) -> F.Column:
    """``scale * code @ rotation + translation`` as Spark column arithmetic (no Python UDF).

    Each element is coalesced with 0 only so that Spark knows it is non-null (CODES' array<float>
    has containsNull=false); the scored code never holds nulls."""
    rot, s, t = alignment.rotation, float(alignment.scale), alignment.translation
    d = rot.shape[0]
    out = [
        F.coalesce(
            sum((code[j] * float(s * rot[j, i]) for j in range(d)), F.lit(float(t[i]))).cast("float"),
            F.lit(0.0).cast("float"),
        )
        for i in range(d)
    ]
    return F.array(*out)


def predict_batch(
    spark: SparkSession,
    model: ResolvedModel,
    root: str,
    infer: InferConfig,
    log_maps: bool = True,
    alignment: Alignment | None = None,
    publish: dict[str, Any] | None = None,
    ingest: Pinned | None = None,
    split: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Score every item under ``root``/features, publish codes/ and neighbors/, write and log maps.

    ``alignment`` maps the model's codes onto the previous map (nightly runs); neighbours are then
    computed on the aligned codes, as published. ``publish``: keyword arguments for
    :func:`pipelines.publish.publishing` (``keep``, ``protect_models``, ``meta`` such as ``job``);
    the model version and the ingest version scored are always recorded in the history.
    ``ingest``: the version of the ingest set to score (default: the current one, resolved once here).
    ``split``: (``train.split_column``, ``train.train_value``), needed by ``infer.placement=refine``
    (raises ``sae_model.config.ConfigError`` without it).

    Returns a summary: table paths, row count, neighbour method, recall (approximate methods, or
    measured anyway for ``grid``), map paths and timings.
    """
    t0 = time.perf_counter()
    ingest = ingest or pin(root, "ingest", spark)
    features_path = ingest.path("features")
    check_columns(spark.read.parquet(features_path), FEATURES, "features")
    scored_at = datetime.now(UTC).replace(microsecond=0)
    summary: dict[str, Any] = {"model_uri": model.uri, "run_id": model.run_id, "model_version": model.version}
    opts = dict(publish or {})
    meta = {"job": "infer", **opts.pop("meta", {}), "model_version": model.version, "ingest_version": ingest.version}
    with publishing(root, ["codes", "neighbors"], spark, meta=meta, **opts) as pub:
        codes_path = pub.staging("codes")
        reference = None
        if infer.placement == "refine":
            if not split or not split[0]:
                raise ConfigError("infer.placement: refine needs train.split_column: the training items to place against")
            # Bad settings fail here, before anything is scored.
            reference = reference_items(spark.read.parquet(ingest.path("items")), *split)
        codes_table(spark, features_path, model, infer, scored_at, alignment, reference).write.parquet(codes_path)
        codes = spark.read.parquet(codes_path)
        summary["items"] = codes.count()
        summary["code_width"] = len(codes.select("code").first()[0]) if summary["items"] else 0
        summary["placement"] = infer.placement
        summary["scoring_s"] = round(time.perf_counter() - t0, 2)
        if infer.layer == -1:
            vectors = codes.select("item_id", "code")
        else:  # an intermediate layer: scored again, used for similarity only, not published
            vectors = score_parquet(spark, features_path, model, layer=infer.layer, batch_rows=infer.batch_size, threads=infer.torch_threads)
        t1 = time.perf_counter()
        nb, method = top_k_neighbors(
            spark,
            vectors,
            k=infer.k,
            metric=infer.metric,
            method=infer.method,
            exact_max_items=infer.exact_max_items,
            tile_items=infer.tile_items,
            lsh_tables=infer.lsh_tables,
            lsh_bucket_items=infer.lsh_bucket_items,
            seed=infer.seed,
        )
        nb_path = pub.staging("neighbors")
        conform(nb, NEIGHBORS).write.parquet(nb_path)
        summary["neighbors_s"] = round(time.perf_counter() - t1, 2)
        summary["method"] = method
        if method != "exact" and infer.recall_sample:
            rec = recall_at_k(spark, vectors, spark.read.parquet(nb_path), infer.k, infer.metric, infer.recall_sample, infer.seed)
            summary["recall"] = round(rec, 4)
            log.info("neighbours (%s) recall@%d against exact on %d sampled items: %.4f", method, infer.k, infer.recall_sample, rec)
    scores = pub.pinned()
    summary["scores_version"] = scores.version
    summary["codes"] = scores.path("codes")
    summary["neighbors"] = scores.path("neighbors")
    if infer.map_max_points:
        run_id = model.run_id if log_maps else None
        summary["maps"] = [str(p) for p in draw_maps(spark, root, infer, run_id=run_id, scores=scores, ingest=ingest)]
    summary["total_s"] = round(time.perf_counter() - t0, 2)
    return summary


@contextlib.contextmanager
def pinned_model(spark: SparkSession, cfg: Config, model_uri: str) -> Iterator[ResolvedModel]:
    """``sae_model.registry.resolve_model`` of ``model_uri`` (empty: ``@champion``, else the newest
    logged model) in ``cfg``'s registry and experiment, for the length of the ``with`` block. On a
    local master the artefacts are downloaded once into a temporary folder (removed afterwards), so
    every worker loads them from disk instead of each asking the tracking server.

    Raises ``sae_model.registry.ModelURIError`` when the URI does not resolve."""
    from sae_model.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="sae-model-") as tmp:
        local = spark.sparkContext.master.startswith("local")
        yield resolve_model(
            model_uri,
            registered_model=cfg.mlflow.registered_model,
            experiment=cfg.mlflow.experiment,
            download_to=tmp if local else None,
        )


def infer_from_config(
    spark: SparkSession, cfg: Config, model_uri: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Pin the model (``model_uri``, else ``infer.model_uri``, else ``@champion``, else the newest
    logged model; ``pinned_model``), then ``predict_batch`` over ``paths.root``; returns its summary
    plus the MLflow ``tracking_uri``.

    Raises ``sae_model.health.UnhealthyModel`` before anything is scored or published when the
    model's training run is marked unhealthy (a collapsed or dead map), unless ``force`` or
    ``infer.force``; ``sae_model.registry.ModelURIError`` when the URI does not resolve."""
    import mlflow

    from sae_model.health import refuse_unhealthy

    mlflow.set_tracking_uri(tracking_uri(cfg))
    with pinned_model(spark, cfg, model_uri or cfg.infer.model_uri) as model:
        refuse_unhealthy(model.run_id, model.uri, force or cfg.infer.force)
        publish = {"keep": cfg.publish.keep, "meta": {"job": "infer", "config_hash": cfg.hash()}}
        summary = predict_batch(spark, model, cfg.paths.root, cfg.infer, publish=publish,
                                split=(cfg.train.split_column, cfg.train.train_value))
    summary["tracking_uri"] = mlflow.get_tracking_uri()
    return summary


def feature_names(spark: SparkSession, features: str) -> list[str] | None:
    """The ``feature_names`` of the ingest manifest ``_manifest.json`` in the ``features`` table
    directory (a pinned version's path), or None when it has none."""
    import json

    path = f"{features}/_manifest.json"
    try:
        if is_local(features):
            text = local_path(path).read_text(encoding="utf-8")
        else:
            text = "".join(r.value for r in spark.read.text(path, wholetext=True).collect())
        names = json.loads(text).get("feature_names")
    except (OSError, ValueError, AnalysisException) as exc:
        log.warning("no features manifest at %s (%s): maps without top features", path, exc)
        return None
    return [str(n) for n in names] if names else None


def _read_optional(spark: SparkSession, version: Pinned, table: str) -> DataFrame | None:
    try:
        return spark.read.parquet(version.path(table))
    except AnalysisException:
        log.warning("no %s/ table in %s version %s: the map goes without it", table, version.set_name, version.version)
        return None


def draw_maps(
    spark: SparkSession,
    root: str,
    infer: InferConfig,
    out: str | Path | None = None,
    colour: str = "auto",
    max_points: int | None = None,
    run_id: str | None = None,
    scores: Pinned | None = None,
    ingest: Pinned | None = None,
) -> list[Path]:
    """Draw ``map.png`` and ``map.html`` from the published tables under ``root``, without scoring.

    Reads codes/ (required), items/ (titles, colours), neighbors/ (the page's neighbour lists) and
    features/ with its manifest (the top features on hover). ``out``: a directory or an ``.html``
    path; default ``root``/maps for local roots, else a temporary directory. ``max_points``: items
    drawn (default ``infer.map_max_points``); ``colour``: see ``pipelines.maps.map_data``. With
    ``run_id`` the two files are logged to that MLflow run under ``maps/``. ``scores``/``ingest``:
    the published versions to draw (default: the current ones, resolved once here).
    Raises ValueError for a colour key items/ lacks; AnalysisException when codes/ is missing.
    """
    import tempfile

    scores = scores or pin(root, "scores", spark)
    ingest = ingest or pin(root, "ingest", spark)
    codes = spark.read.parquet(scores.path("codes"))
    names = feature_names(spark, ingest.path("features"))
    features = _read_optional(spark, ingest, "features") if names else None
    data = map_data(
        codes, _read_optional(spark, ingest, "items"), _read_optional(spark, scores, "neighbors"), features, names,
        colour=colour, max_points=infer.map_max_points if max_points is None else max_points, seed=infer.seed,
        k=min(infer.k, MAP_NEIGHBOURS),
    )
    first = codes.select("model_uri", "model_version").first()
    title = "sae map" + (f" - {first.model_uri}" if first else "") + (f" (version {first.model_version})" if first and first.model_version else "")
    if out is None:
        out = local_path(root) / "maps" if is_local(root) else Path(tempfile.mkdtemp(prefix="sae-maps-"))
    paths = write_maps(data, out, title=title)
    if run_id:
        from mlflow import MlflowClient

        client = MlflowClient()
        for p in paths:
            client.log_artifact(run_id, str(p), artifact_path="maps")
        log.info("maps logged to run %s under maps/", run_id)
    return paths
