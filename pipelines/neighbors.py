"""Top-k similarity tables in Spark: exact for small tables, and methods that avoid an N² join.

* ``exact``: every item against every item, blockwise in numpy, the codes broadcast to the tasks.
* ``grid`` (2-D codes): the plane is cut into tiles at the codes' quantiles, so tiles hold about
  ``tile_items`` each. Pass 1 finds each item's k nearest inside its own tile; an item whose k-th
  distance is shorter than its distance to the tile's border is provably done. The others are sent,
  with that k-th distance as a search radius, to every other tile the radius reaches (pass 2), and
  the candidates are merged. The result is exact; the cost is one shuffle per pass, no cross join.
* ``lsh`` (wider codes): random-hyperplane hashing into ``lsh_tables`` tables of buckets of about
  ``lsh_bucket_items`` items; exact top-k inside each bucket; candidates merged across tables.
  Approximate: measure it with :func:`recall_at_k`.

Cosine distance (1 - cos) is computed as half the squared Euclidean distance of unit vectors, so all
methods work in Euclidean space. Ties are broken by the smaller neighbour id and inputs are sorted
by id inside every group, so re-runs give identical tables.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from pipelines.schemas import NEIGHBORS
from pipelines.scoring import list_column, matrix
from sae_model.knn import topk

log = logging.getLogger(__name__)

METHODS = ("auto", "exact", "grid", "lsh")
_CAND = T.StructType(
    [
        T.StructField("item_id", T.LongType(), False),
        T.StructField("neighbor_id", T.LongType(), False),
        T.StructField("distance", T.DoubleType(), False),
    ]
)
_CAND_ARROW = pa.schema([("item_id", pa.int64()), ("neighbor_id", pa.int64()), ("distance", pa.float64())])


# ---------------------------------------------------------------- numpy kernels


def prepare(x: np.ndarray, metric: str) -> np.ndarray:
    """float64 vectors in the space where Euclidean distance ranks like ``metric``."""
    x = np.asarray(x, dtype=np.float64)
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    elif metric != "euclidean":
        raise ValueError(f"infer.metric: must be euclidean or cosine, got {metric!r}")
    return x


def to_metric(d: np.ndarray | float, metric: str) -> np.ndarray | float:
    """Euclidean distance of prepared vectors -> the reported distance."""
    return d * d / 2.0 if metric == "cosine" else d


def _rows(q_ids: np.ndarray, ids: np.ndarray, d: np.ndarray) -> pa.RecordBatch:
    keep = ids >= 0
    item = np.broadcast_to(q_ids[:, None], ids.shape)[keep]
    return pa.RecordBatch.from_arrays(
        [pa.array(item, pa.int64()), pa.array(ids[keep], pa.int64()), pa.array(d[keep], pa.float64())],
        schema=_CAND_ARROW,
    )


def _ranked(candidates: DataFrame, k: int, metric: str) -> DataFrame:
    """(item_id, neighbor_id, euclidean distance) candidates, possibly repeated -> the NEIGHBORS table."""
    best = candidates.groupBy("item_id", "neighbor_id").agg(F.min("distance").alias("distance"))
    w = Window.partitionBy("item_id").orderBy("distance", "neighbor_id")
    ranked = best.withColumn("rank", F.row_number().over(w)).where(F.col("rank") <= k)
    return _finish(ranked, metric)


def _finish(df: DataFrame, metric: str) -> DataFrame:
    dist = F.col("distance") * F.col("distance") / 2.0 if metric == "cosine" else F.col("distance")
    return df.select(
        F.col("item_id").cast("long"),
        F.col("neighbor_id").cast("long"),
        F.col("rank").cast("int"),
        dist.cast("float").alias("distance"),
    )


def _collect(df: DataFrame, column: str = "code") -> tuple[np.ndarray, np.ndarray]:
    """(ids, matrix) of a small (item_id, array<float>) DataFrame, via Arrow."""
    table = df.select("item_id", column).toArrow()
    if table.num_rows == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    col = table.column(column).combine_chunks()
    width = len(col[0].values)
    return table.column("item_id").to_numpy(), matrix(col, width)


# ---------------------------------------------------------------- methods


def exact_neighbors(spark: SparkSession, codes: DataFrame, k: int, metric: str = "euclidean", column: str = "code") -> DataFrame:
    """Exact top-k of every item: the codes are collected once and broadcast; affordable up to ~10⁵ × width."""
    ids, x = _collect(codes, column)
    bc = spark.sparkContext.broadcast((ids, prepare(x, metric)))
    width = x.shape[1]

    def run(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        c_ids, c = bc.value
        for b in batches:
            if b.num_rows:
                q_ids = b.column("item_id").to_numpy()
                nb, d = topk(q_ids, prepare(matrix(b.column(column), width), metric), c_ids, c, k)
                yield _rows(q_ids, nb, d)

    cand = codes.select("item_id", column).mapInArrow(run, _CAND)
    w = Window.partitionBy("item_id").orderBy("distance", "neighbor_id")
    return _finish(cand.withColumn("rank", F.row_number().over(w)), metric)


def _xy(codes: DataFrame, metric: str, column: str) -> DataFrame:
    x, y = F.col(column)[0].cast("double"), F.col(column)[1].cast("double")
    if metric == "cosine":
        norm = F.sqrt(x * x + y * y)
        x = F.when(norm > 0, x / norm).otherwise(F.lit(0.0))
        y = F.when(norm > 0, y / norm).otherwise(F.lit(0.0))
    return codes.select("item_id", x.alias("px"), y.alias("py"))


# ---------------------------------------------------------------- grid method, pure parts


# Pass 1's rows: kind 0 = a certified item's final neighbour, 1 = a query for pass 2 in ``tile``,
# 2 = an undecided item's candidate so far.
_PASS1 = T.StructType(
    [
        T.StructField("kind", T.IntegerType(), False),
        T.StructField("item_id", T.LongType(), False),
        T.StructField("neighbor_id", T.LongType(), False),
        T.StructField("rank", T.IntegerType(), False),
        T.StructField("distance", T.DoubleType(), False),
        T.StructField("tile", T.IntegerType(), False),
        T.StructField("px", T.DoubleType(), False),
        T.StructField("py", T.DoubleType(), False),
    ]
)
_PASS1_ARROW = pa.schema(
    [
        ("kind", pa.int32()),
        ("item_id", pa.int64()),
        ("neighbor_id", pa.int64()),
        ("rank", pa.int32()),
        ("distance", pa.float64()),
        ("tile", pa.int32()),
        ("px", pa.float64()),
        ("py", pa.float64()),
    ]
)


def tile_of(px: np.ndarray, py: np.ndarray, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    """Tile number (int32) of each point: ``tx * (len(ey) + 1) + ty``, where ``tx``/``ty`` count the
    sorted inner tile edges ``ex``/``ey`` at or left of (below) the point."""
    tx = np.searchsorted(ex, px, side="right")
    ty = np.searchsorted(ey, py, side="right")
    return (tx * (len(ey) + 1) + ty).astype(np.int32)


def tree_knn(
    tree_ids: np.ndarray, tree: Any, q: np.ndarray, kq: int, exclude: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The ``kq`` nearest of ``tree`` (a ``scipy.spatial.cKDTree`` of the points ``tree_ids``) to each
    row of ``q`` (m x 2), ``exclude`` ids (each query's own) dropped; ``(ids, dists)`` of shape
    (m, kq) ordered by (distance, id), padded with -1 / inf."""
    kq_eff = min(kq + (1 if exclude is not None else 0), len(tree_ids))
    if kq_eff == 0:
        return np.full((len(q), kq), -1, np.int64), np.full((len(q), kq), np.inf)
    d, idx = tree.query(q, k=kq_eff)
    d, idx = d.reshape(len(q), kq_eff), idx.reshape(len(q), kq_eff)
    nb = tree_ids[np.minimum(idx, len(tree_ids) - 1)]
    nb[~np.isfinite(d)] = -1
    if exclude is not None:
        self_hit = nb == exclude[:, None]
        # Drop self; where self was not returned (many duplicates), drop the farthest instead.
        no_self = ~self_hit.any(1)
        self_hit[no_self, -1] = True
        d = d[~self_hit].reshape(len(q), kq_eff - 1)
        nb = nb[~self_hit].reshape(len(q), kq_eff - 1)
    d = np.where(nb < 0, np.inf, d)
    order = np.lexsort((nb, d), axis=-1)
    nb, d = np.take_along_axis(nb, order, 1), np.take_along_axis(d, order, 1)
    if nb.shape[1] < kq:
        pad = kq - nb.shape[1]
        nb = np.pad(nb, ((0, 0), (0, pad)), constant_values=-1)
        d = np.pad(d, ((0, 0), (0, pad)), constant_values=np.inf)
    return nb, d


def tiles_within(xy: np.ndarray, radius: np.ndarray, tile: int, ex: np.ndarray, ey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For points ``xy`` (m x 2) of ``tile`` with search radii ``radius`` (m,): ``(row, other_tile)``
    pairs, one per other tile that the square of side ``2 * radius`` around the row reaches."""
    gy = len(ey) + 1
    x0 = np.searchsorted(ex, xy[:, 0] - radius, side="right")
    x1 = np.searchsorted(ex, xy[:, 0] + radius, side="right")
    y0 = np.searchsorted(ey, xy[:, 1] - radius, side="right")
    y1 = np.searchsorted(ey, xy[:, 1] + radius, side="right")
    reps, tiles = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for j in range(len(xy)):
        cx, cy = np.meshgrid(np.arange(x0[j], x1[j] + 1), np.arange(y0[j], y1[j] + 1), indexing="ij")
        t = (cx * gy + cy).ravel()
        t = t[t != tile]
        reps.append(np.full(len(t), j))
        tiles.append(t)
    return np.concatenate(reps), np.concatenate(tiles)


def tile_pass1(table: pa.Table, k: int, ex: np.ndarray, ey: np.ndarray) -> pa.Table:
    """Pass 1 of the grid method on one tile's points (``item_id``, ``px``, ``py``, ``tile``): each
    item's k nearest inside the tile; an item whose k-th distance is shorter than its distance to
    the tile's border is done (kind 0 rows), the others keep their candidates (kind 2) and ask
    every other tile their radius reaches (kind 1 rows, one per tile). Rows as ``_PASS1_ARROW``."""
    from scipy.spatial import cKDTree

    gy = len(ey) + 1
    lo_x, hi_x = np.concatenate([[-np.inf], ex]), np.concatenate([ex, [np.inf]])
    lo_y, hi_y = np.concatenate([[-np.inf], ey]), np.concatenate([ey, [np.inf]])
    table = table.sort_by("item_id")
    ids = table.column("item_id").to_numpy()
    xy = np.column_stack([table.column("px").to_numpy(), table.column("py").to_numpy()])
    tile = int(table.column("tile")[0].as_py())
    tx, ty = divmod(tile, gy)
    nb, d = tree_knn(ids, cKDTree(xy), xy, k, ids)
    radius = d[:, -1]
    border = np.minimum.reduce([xy[:, 0] - lo_x[tx], hi_x[tx] - xy[:, 0], xy[:, 1] - lo_y[ty], hi_y[ty] - xy[:, 1]])
    done = radius < border
    parts = []
    # kind 0: certified items' final rows; kind 2: the others' candidates so far.
    for kind, sel in ((0, done), (2, ~done)):
        m = sel[:, None] & (nb >= 0)
        r = np.broadcast_to(np.arange(1, k + 1, dtype=np.int32), nb.shape)
        cnt = int(m.sum())
        parts.append(
            [
                np.full(cnt, kind, np.int32),
                np.broadcast_to(ids[:, None], nb.shape)[m],
                nb[m],
                r[m],
                d[m],
                np.full(cnt, tile, np.int32),
                np.zeros(cnt),
                np.zeros(cnt),
            ]
        )
    # kind 1: one query row per (undecided item, other tile within its radius).
    q = np.flatnonzero(~done)
    if len(q):
        rows, tiles = tiles_within(xy[q], radius[q], tile, ex, ey)
        rep = q[rows]
        cnt = len(rep)
        parts.append(
            [
                np.full(cnt, 1, np.int32),
                ids[rep],
                np.full(cnt, -1, np.int64),
                np.zeros(cnt, np.int32),
                np.zeros(cnt),
                tiles.astype(np.int32),
                xy[rep, 0],
                xy[rep, 1],
            ]
        )
    cols = [np.concatenate([p[i] for p in parts]) for i in range(len(_PASS1_ARROW))]
    return pa.Table.from_arrays([pa.array(c) for c in cols], names=_PASS1_ARROW.names).cast(_PASS1_ARROW)


def tile_pass2(table: pa.Table, k: int) -> pa.Table:
    """Pass 2 of the grid method in one tile: the tile's points (``role`` 0) answer the queries sent
    to it (``role`` 1) with their k nearest; candidate rows as ``_CAND_ARROW``."""
    from scipy.spatial import cKDTree

    role = table.column("role").to_numpy()
    data = table.filter(pc.equal(table.column("role"), 0)).sort_by("item_id")
    qs = table.filter(pc.equal(table.column("role"), 1)).sort_by("item_id")
    if qs.num_rows == 0 or data.num_rows == 0 or not (role == 1).any():
        return pa.Table.from_batches([], schema=_CAND_ARROW)
    d_ids = data.column("item_id").to_numpy()
    dxy = np.column_stack([data.column("px").to_numpy(), data.column("py").to_numpy()])
    q_ids = qs.column("item_id").to_numpy()
    qxy = np.column_stack([qs.column("px").to_numpy(), qs.column("py").to_numpy()])
    nb, d = tree_knn(d_ids, cKDTree(dxy), qxy, k, None)
    return pa.Table.from_batches([_rows(q_ids, nb, d)])


def _assign_tiles(batches: Iterator[pa.RecordBatch], ex: np.ndarray, ey: np.ndarray) -> Iterator[pa.RecordBatch]:
    for b in batches:
        tile = tile_of(b.column("px").to_numpy(), b.column("py").to_numpy(), ex, ey)
        yield pa.RecordBatch.from_arrays([*b.columns, pa.array(tile)], names=[*b.schema.names, "tile"])


# ---------------------------------------------------------------- grid method, the Spark wiring


def grid_neighbors(
    spark: SparkSession,
    codes: DataFrame,
    k: int,
    metric: str = "euclidean",
    tile_items: int = 50000,
    column: str = "code",
    n_items: int | None = None,
) -> DataFrame:
    """Exact top-k for 2-D codes by a two-pass tile join (see the module docstring): tiles cut at
    the codes' quantiles (``tile_of``), ``tile_pass1`` per tile, ``tile_pass2`` for the items whose
    search radius leaves their tile, then the candidates merged."""
    pts = _xy(codes, metric, column)
    n = n_items if n_items is not None else pts.count()
    g = max(1, round(math.sqrt(n / max(tile_items, 1))))
    probs = [i / g for i in range(1, g)]
    qx, qy = pts.approxQuantile(["px", "py"], probs, 1e-4) if probs else ([], [])
    ex, ey = np.unique(np.asarray(qx, np.float64)), np.unique(np.asarray(qy, np.float64))
    log.info("grid neighbours: %d items in %d x %d tiles", n, len(ex) + 1, len(ey) + 1)

    tile_schema = T.StructType(pts.schema.fields + [T.StructField("tile", T.IntegerType(), False)])
    tiled = pts.mapInArrow(functools.partial(_assign_tiles, ex=ex, ey=ey), tile_schema)
    p1 = tiled.groupBy("tile").applyInArrow(functools.partial(tile_pass1, k=k, ex=ex, ey=ey), _PASS1)
    data_rows = tiled.select("tile", "item_id", "px", "py", F.lit(0).alias("role"))
    query_rows = p1.where("kind = 1").select("tile", "item_id", "px", "py", F.lit(1).alias("role"))
    cand2 = data_rows.unionByName(query_rows).groupBy("tile").applyInArrow(functools.partial(tile_pass2, k=k), _CAND)
    undecided = p1.where("kind = 2").select("item_id", "neighbor_id", "distance").unionByName(cand2)
    final = _finish(p1.where("kind = 0"), "euclidean")
    merged = _ranked(undecided, k, "euclidean")
    out = final.unionByName(merged)
    if metric == "cosine":
        out = out.withColumn("distance", (F.col("distance") * F.col("distance") / 2.0).cast("float"))
    return out


def lsh_neighbors(
    spark: SparkSession,
    codes: DataFrame,
    k: int,
    metric: str = "euclidean",
    tables: int = 8,
    bucket_items: int = 2000,
    seed: int = 0,
    column: str = "code",
    n_items: int | None = None,
) -> DataFrame:
    """Approximate top-k for wide codes: random-hyperplane buckets, exact top-k inside each bucket.

    Hyperplanes are split at the median of a seeded sample's projections, so buckets are balanced.
    """
    n = n_items if n_items is not None else codes.count()
    bits = max(0, math.ceil(math.log2(max(n / max(bucket_items, 1), 1))))
    frac = min(1.0, 20000 / max(n, 1))
    _, sample = _collect(codes.sample(fraction=frac, seed=seed).limit(20000), column)
    width = sample.shape[1]
    rng = np.random.default_rng(seed)
    planes = rng.standard_normal((tables, max(bits, 1), width))
    sp = prepare(sample, metric)
    thresholds = np.median(np.einsum("nw,tbw->tbn", sp, planes), axis=2) if len(sp) else np.zeros(planes.shape[:2])
    weights = (1 << np.arange(max(bits, 1))).astype(np.int64)
    log.info("lsh neighbours: %d items, %d tables x %d bits (~%d items per bucket)", n, tables, bits, n >> bits)

    hashed_schema = T.StructType(
        [
            T.StructField("bucket", T.LongType(), False),
            T.StructField("item_id", T.LongType(), False),
            T.StructField("vec", T.ArrayType(T.FloatType(), False), False),
        ]
    )

    def hash_rows(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for b in batches:
            if not b.num_rows:
                continue
            ids = b.column("item_id").to_numpy()
            x = prepare(matrix(b.column(column), width), metric)
            vec = list_column(x.astype(np.float32))
            for t in range(tables):
                h = ((x @ planes[t].T > thresholds[t]) if bits else np.zeros((len(x), 1), bool)) @ weights
                bucket = pa.array(t * (1 << max(bits, 1)) + h, pa.int64())
                yield pa.RecordBatch.from_arrays([bucket, pa.array(ids, pa.int64()), vec], ["bucket", "item_id", "vec"])

    def in_bucket(table: pa.Table) -> pa.Table:
        table = table.sort_by("item_id")
        ids = table.column("item_id").to_numpy()
        x = matrix(table.column("vec").combine_chunks(), width).astype(np.float64)
        nb, d = topk(ids, x, ids, x, k)
        return pa.Table.from_batches([_rows(ids, nb, d)])

    cand = codes.select("item_id", column).mapInArrow(hash_rows, hashed_schema).groupBy("bucket").applyInArrow(in_bucket, _CAND)
    return _ranked(cand, k, metric)


def top_k_neighbors(
    spark: SparkSession,
    codes: DataFrame,
    k: int = 10,
    metric: str = "euclidean",
    method: str = "auto",
    exact_max_items: int = 20000,
    tile_items: int = 50000,
    lsh_tables: int = 8,
    lsh_bucket_items: int = 2000,
    seed: int = 0,
    column: str = "code",
) -> tuple[DataFrame, str]:
    """The NEIGHBORS table of ``codes`` (item_id, ``column`` array<float>) and the method used.

    ``auto``: exact up to ``exact_max_items`` items, else ``grid`` for 2-D vectors, ``lsh`` for wider.
    """
    if method not in METHODS:
        raise ValueError(f"infer.method: must be one of {list(METHODS)}, got {method!r}")
    n = codes.count()
    width = len(codes.select(column).first()[0]) if n else 0
    if method == "auto":
        method = "exact" if n <= exact_max_items else ("grid" if width == 2 else "lsh")
    if method == "grid" and width != 2:
        raise ValueError(f"infer.method=grid needs 2-D vectors, these are {width}-wide; use lsh or exact")
    log.info("neighbours: %d items, width %d, k=%d, metric %s, method %s", n, width, k, metric, method)
    if method == "exact":
        df = exact_neighbors(spark, codes, k, metric, column)
    elif method == "grid":
        df = grid_neighbors(spark, codes, k, metric, tile_items, column, n_items=n)
    else:
        df = lsh_neighbors(spark, codes, k, metric, lsh_tables, lsh_bucket_items, seed, column, n_items=n)
    return df.select([F.col(f.name).cast(f.dataType) for f in NEIGHBORS.fields]), method


def recall_at_k(
    spark: SparkSession,
    codes: DataFrame,
    neighbors: DataFrame,
    k: int,
    metric: str = "euclidean",
    sample: int = 1000,
    seed: int = 0,
    column: str = "code",
) -> float:
    """Share of the exact top-k found in ``neighbors``, over a seeded sample of query items.

    The exact answers are computed by scanning every partition against the broadcast queries (a
    pass over the data per call, no all-pairs join).
    """
    n = codes.count()
    frac = min(1.0, 1.5 * sample / max(n, 1))
    q_ids, q = _collect(codes.sample(fraction=frac, seed=seed).orderBy("item_id").limit(sample), column)
    if len(q_ids) == 0:
        return 1.0
    width = q.shape[1]
    bc = spark.sparkContext.broadcast((q_ids, prepare(q, metric)))

    def scan(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        qi, qv = bc.value
        for b in batches:
            if b.num_rows:
                c_ids = b.column("item_id").to_numpy()
                nb, d = topk(qi, qv, c_ids, prepare(matrix(b.column(column), width), metric), k)
                yield _rows(qi, nb, d)

    cand = codes.select("item_id", column).mapInArrow(scan, _CAND).toArrow()
    exact: dict[int, list[tuple[float, int]]] = {}
    for i, nb, d in zip(*(cand.column(c).to_pylist() for c in ("item_id", "neighbor_id", "distance")), strict=True):
        exact.setdefault(i, []).append((d, nb))
    want = {i: {nb for _, nb in sorted(v)[:k]} for i, v in exact.items()}
    got_t = neighbors.where(F.col("item_id").isin([int(i) for i in q_ids])).select("item_id", "neighbor_id").toArrow()
    got: dict[int, set[int]] = {}
    for i, nb in zip(got_t.column("item_id").to_pylist(), got_t.column("neighbor_id").to_pylist(), strict=True):
        got.setdefault(i, set()).add(nb)
    hits = sum(len(want[i] & got.get(i, set())) for i in want)
    total = sum(len(v) for v in want.values())
    return hits / total if total else 1.0
