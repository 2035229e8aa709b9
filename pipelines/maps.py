"""Maps of the codes: a PNG for reports and one self-contained interactive HTML page (Bokeh).

``map_data`` (Spark) gathers what a map shows, bounded: a seeded sample of at most ``max_points``
codes with their metadata, the top features that explain each item (the largest entries of its
feature vector, named by the features manifest's ``feature_names``), their neighbours from
``neighbors/``, and when the map is a sample, an id/title/position table of every item so that the
page can still find any item. ``write_png`` and ``write_html`` (pandas + matplotlib/Bokeh) draw it
with the same colours, the same axis limits and the same region labels.

2-D codes are drawn as they are; wider codes are drawn on the first two principal components of
the sample, and the map's title says so.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

log = logging.getLogger(__name__)

# Twenty colours, so that each of the 20 Newsgroups gets its own (matplotlib's tab10, then the dark
# and mid tones of tab20b, which stay apart from tab10's hues); further categories are grey "other".
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a",
    "#637939", "#e7ba52", "#7b4173", "#6b6ecf", "#b5cf6b", "#843c39", "#de9ed6", "#8c6d31",
]
MAX_CATEGORIES = len(PALETTE)
OTHER_COLOUR = "#c7c7c7"
OTHER = "other"
# Every item's id, title and position travel with a sampled map (for search) up to this many items.
SEARCH_MAX_ITEMS = 2_000_000
# Neighbours listed per drawn item (the page holds n x this many ids and distances).
MAP_NEIGHBOURS = 10


@dataclass
class MapData:
    """What a map shows (pandas, driver side).

    ``points``: item_id int64, x/y float64, title, genres, category (colour key value, "" if none),
    explain (top feature names, comma-separated). ``neighbours``: item_id, neighbor_id int64, rank
    int, distance float32, for drawn items only (rank <= k). ``search``: item_id, title, x, y of every
    item when the map is a sample (else None). ``total``: rows in codes/.
    """

    points: pd.DataFrame
    axes: str
    total: int
    category_name: str
    neighbours: pd.DataFrame
    search: pd.DataFrame | None = None


def _category_column(items: DataFrame | None, colour: str) -> tuple[F.Column | None, str]:
    """The Spark column that colours the map and its name; ``colour``: auto, none, genre or an items column."""
    cols = items.columns if items is not None else []
    if colour == "auto":
        colour = "label" if "label" in cols else "genre" if "genres" in cols else "none"
    if colour == "none":
        return None, ""
    if colour in ("genre", "genres"):
        if "genres" not in cols:
            raise ValueError(f"colour: items/ has no genres column (columns: {', '.join(cols) or 'no items/ table'})")
        return F.coalesce(F.split(_genres_text(items), r"\|")[0], F.lit("")), "genre"
    if colour not in cols or colour == "item_id":
        raise ValueError(f"colour: no column {colour!r} in items/ (columns: {', '.join(cols) or 'no items/ table'})")
    return F.coalesce(F.col(colour).cast("string"), F.lit("")), colour


def _genres_text(items: DataFrame) -> F.Column:
    """items/ genres as one ``|``-joined string: Tag Genome publishes a list column, MovieLens CSVs a
    ``|``-joined string (``pipelines.schemas.genre_names`` is the same rule for Python values)."""
    if isinstance(items.schema["genres"].dataType, T.ArrayType):
        return F.array_join(F.col("genres"), "|")
    return F.col("genres").cast("string")


def top_features(features: DataFrame, n: int = 3) -> DataFrame:
    """item_id and ``top``: array<int> of the indices of the ``n`` largest positive entries of ``features``.

    The largest inputs are what a reader recognises an item by (a movie's most relevant tags, a
    post's heaviest tf-idf words). Spark SQL higher-order functions, no Python UDF."""
    pairs = F.transform("features", lambda v, i: F.struct(v.alias("v"), i.alias("i")))
    positive = F.filter(F.sort_array(pairs, asc=False), lambda s: s["v"] > 0)
    return features.select("item_id", F.transform(F.slice(positive, 1, n), lambda s: s["i"]).alias("top"))


def _projection(codes_m: np.ndarray) -> tuple[np.ndarray, str, np.ndarray | None, np.ndarray | None]:
    """(xy, axes description, mean, 2 x width components or None) of an n x width code matrix."""
    width = codes_m.shape[1] if codes_m.ndim == 2 else 0
    if width == 2:
        return codes_m.astype(np.float64), "the 2-D codes", None, None
    if width == 1:
        return np.column_stack([codes_m[:, 0], np.zeros(len(codes_m))]), "the 1-D code (y = 0)", None, None
    if len(codes_m) == 0:
        return np.zeros((0, 2)), "no codes", None, None
    mean = codes_m.astype(np.float64).mean(0)
    centred = codes_m.astype(np.float64) - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    share = (s[:2] ** 2).sum() / max((s**2).sum(), 1e-12)
    return centred @ vt[:2].T, f"PCA of the {width}-wide codes (first two components, {share:.0%} of variance)", mean, vt[:2]


def _xy_columns(mean: np.ndarray | None, comps: np.ndarray | None, width: int) -> list[F.Column]:
    """x, y of every code in Spark, with the sample's projection (so searched items land where drawn)."""
    if mean is None:
        y = F.col("code")[1] if width == 2 else F.lit(0.0)
        return [F.col("code")[0].cast("double").alias("x"), y.cast("double").alias("y")]
    return [
        sum(((F.col("code")[j] - float(mean[j])) * float(comps[a, j]) for j in range(width)), F.lit(0.0)).alias(name)
        for a, name in enumerate(("x", "y"))
    ]


def map_data(
    codes: DataFrame,
    items: DataFrame | None,
    neighbors: DataFrame | None = None,
    features: DataFrame | None = None,
    feature_names: list[str] | None = None,
    colour: str = "auto",
    max_points: int = 200000,
    seed: int = 0,
    k: int = 10,
    n_top: int = 3,
) -> MapData:
    """Collect a bounded, seeded view of the published tables for drawing.

    ``codes``: the CODES table; ``items``: item_id plus metadata (title, genres, label ...);
    ``neighbors``: the NEIGHBORS table (the ``k`` nearest per drawn item are kept); ``features`` with
    ``feature_names`` (the ingest manifest's) give each item's top ``n_top`` features. ``colour``:
    ``auto`` (label, else first genre), ``none``, ``genre``, or an items column.
    Raises ValueError (message starts ``colour:``) for a colour key items/ lacks.
    """
    cat_col, category_name = _category_column(items, colour)
    n = codes.count()
    frac = min(1.0, 1.2 * max_points / max(n, 1))
    sample = codes.sample(fraction=frac, seed=seed) if frac < 1.0 else codes
    sample = sample.orderBy(F.xxhash64("item_id", F.lit(seed))).limit(max_points).select("item_id", "code")
    if items is not None:
        meta = [F.col("title")] if "title" in items.columns else []
        meta += [_genres_text(items).alias("genres")] if "genres" in items.columns else []
        cat = [cat_col.alias("category")] if cat_col is not None else []
        sample = sample.join(items.select("item_id", *meta, *cat), "item_id", "left")
    if features is not None and feature_names:
        # Only the drawn items' vectors are ranked, not the whole table's.
        wanted = features.join(sample.select("item_id"), "item_id", "left_semi")
        sample = sample.join(top_features(wanted, n_top), "item_id", "left")
    pdf = sample.toPandas().sort_values("item_id", kind="stable").reset_index(drop=True)
    codes_m = np.stack(pdf["code"].to_numpy()) if len(pdf) else np.zeros((0, 2), np.float32)
    xy, axes, mean, comps = _projection(codes_m)
    out = pd.DataFrame({"item_id": pdf["item_id"].astype("int64"), "x": xy[:, 0], "y": xy[:, 1]})
    for c in ("title", "genres", "category"):
        out[c] = pdf[c].fillna("").astype(str) if c in pdf else ""
    if "top" in pdf:
        names = list(feature_names or [])
        out["explain"] = [", ".join(names[i] for i in t if i < len(names)) if t is not None else "" for t in pdf["top"]]
    else:
        out["explain"] = ""
    nb = pd.DataFrame({"item_id": pd.Series(dtype="int64"), "neighbor_id": pd.Series(dtype="int64"),
                       "rank": pd.Series(dtype="int32"), "distance": pd.Series(dtype="float32")})
    if neighbors is not None and k > 0 and len(out):
        drawn = codes.sparkSession.createDataFrame(out[["item_id"]])
        nb = (
            neighbors.where(F.col("rank") <= k).join(drawn, "item_id", "left_semi")
            .select("item_id", "neighbor_id", "rank", "distance").toPandas()
        )
    search = None
    if n > len(out):
        width = codes_m.shape[1] if codes_m.ndim == 2 else 2
        every = codes.select("item_id", *_xy_columns(mean, comps, width)).limit(SEARCH_MAX_ITEMS)
        if items is not None and "title" in items.columns:
            every = every.join(items.select("item_id", "title"), "item_id", "left")
        search = every.toPandas()
        search["title"] = search["title"].fillna("").astype(str) if "title" in search else ""
        if n > SEARCH_MAX_ITEMS:
            log.warning("map search covers %d of %d items (SEARCH_MAX_ITEMS)", SEARCH_MAX_ITEMS, n)
    log.info("map: %d of %d items drawn, %d neighbour rows; axes: %s", len(out), n, len(nb), axes)
    return MapData(out, axes, n, category_name, nb, search)


def colours(categories: pd.Series) -> tuple[list[str], dict[str, str]]:
    """(colour per row, legend): the most frequent categories get palette colours (ties by name), the rest grey."""
    counts = categories[categories != ""].value_counts()
    top = sorted(counts.index, key=lambda c: (-counts[c], _natural(c)))[:MAX_CATEGORIES]
    top = sorted(top, key=_natural)
    legend = {c: PALETTE[i] for i, c in enumerate(top)}
    return [legend.get(c, OTHER_COLOUR) for c in categories], legend


def _natural(c: str) -> tuple[int, float, str]:
    try:
        return (0, float(c), c)
    except ValueError:
        return (1, 0.0, c)


def bounds(points: pd.DataFrame, pad: float = 0.04) -> tuple[float, float, float, float]:
    """(x0, x1, y0, y1): the data's extent plus ``pad`` of it each side; both drawings use these axes."""
    if points.empty:
        return -1.0, 1.0, -1.0, 1.0
    x0, x1, y0, y1 = points.x.min(), points.x.max(), points.y.min(), points.y.max()
    dx, dy = max(x1 - x0, 1e-9) * pad, max(y1 - y0, 1e-9) * pad
    return float(x0 - dx), float(x1 + dx), float(y0 - dy), float(y1 + dy)


def region_labels(points: pd.DataFrame, cells: int = 10, max_labels: int = 12, min_share: float = 0.02) -> pd.DataFrame:
    """Labels at the densest regions: x, y, text, share.

    The map is cut into ``cells`` x ``cells`` bins; a bin holding at least ``min_share`` of the points
    and at least as many as each of its 8 neighbours is a dense region. Its label is the most common
    category of its points, else (text without labels) their most common top features; it sits at the
    points' median. At most ``max_labels``, densest first; neighbouring peaks with the same text
    are kept once."""
    empty = pd.DataFrame({"x": [], "y": [], "text": [], "share": []})
    if len(points) < 3:
        return empty
    x0, x1, y0, y1 = bounds(points, pad=0.0)
    cx = np.minimum(((points.x - x0) / max(x1 - x0, 1e-12) * cells).astype(int), cells - 1).to_numpy()
    cy = np.minimum(((points.y - y0) / max(y1 - y0, 1e-12) * cells).astype(int), cells - 1).to_numpy()
    counts = np.zeros((cells + 2, cells + 2), int)
    np.add.at(counts, (cx + 1, cy + 1), 1)
    rows, seen = [], set()
    for flat in np.argsort(-counts[1:-1, 1:-1], axis=None, kind="stable"):
        i, j = divmod(int(flat), cells)
        c = counts[i + 1, j + 1]
        if c < max(min_share * len(points), 2) or len(rows) >= max_labels:
            break
        if c < counts[i : i + 3, j : j + 3].max():
            continue
        inside = points[(cx == i) & (cy == j)]
        cats = inside["category"][inside["category"] != ""]
        if len(cats):
            text = Counter(cats).most_common(1)[0][0]
        else:
            words = Counter(w for e in inside["explain"] if e for w in e.split(", ")[:2])
            text = ", ".join(w for w, _ in words.most_common(2))
        if not text or text in seen:
            continue
        seen.add(text)
        rows.append({"x": float(inside.x.median()), "y": float(inside.y.median()), "text": text, "share": c / len(points)})
    return pd.DataFrame(rows) if rows else empty


def _title_lines(data: MapData, title: str) -> str:
    drawn = len(data.points)
    shown = f"{drawn:,} items" if drawn == data.total else f"{drawn:,} of {data.total:,} items (seeded sample)"
    return f"{title}\n{shown}; axes: {data.axes}"


def write_png(data: MapData, path: str | Path, title: str) -> Path:
    """A static PNG: the same colours, axis limits and region labels as :func:`write_html`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path, pts = Path(path), data.points
    cols, legend = colours(pts["category"])
    fig, ax = plt.subplots(figsize=(11, 9), dpi=110)
    size = max(1.0, min(12.0, 20000 / max(len(pts), 1)))
    ax.scatter(pts.x, pts.y, c=cols, s=size, alpha=0.6, linewidths=0)
    for r in region_labels(pts).itertuples():
        ax.annotate(
            r.text[:32], (r.x, r.y), fontsize=9, ha="center", va="center", weight="bold",
            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.7},
        )
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in legend.items()]
        if (pts["category"].isin(legend.keys()) == False).any():  # noqa: E712 - pandas element-wise
            handles.append(Line2D([], [], marker="o", ls="", color=OTHER_COLOUR, label=OTHER))
        ax.legend(handles=handles, loc="best", fontsize=8, markerscale=1.2, framealpha=0.8, title=data.category_name)
    x0, x1, y0, y1 = bounds(pts)
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_title(_title_lines(data, title), fontsize=10)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_maps(
    data: MapData,
    out: str | Path,
    title: str = "sae map",
) -> list[Path]:
    """``map.png`` and ``map.html`` under the directory ``out``, or ``out`` (an .html path) and the PNG beside it."""
    from pipelines.map_page import write_html

    out = Path(out)
    html_path = out if out.suffix == ".html" else out / "map.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    png = write_png(data, html_path.with_suffix(".png"), title)
    return [png, write_html(data, html_path, title)]
