"""Maps of the codes: a PNG (matplotlib) and a self-contained interactive HTML page.

Only a seeded, bounded sample of the codes ever leaves Spark (``max_points``, 50k by default).
2-D codes are drawn as they are; wider codes are drawn on the first two principal components of
the sample, and the map's title says so.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from pipelines.schemas import genre_names

log = logging.getLogger(__name__)

MAX_CATEGORIES = 12
PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a",
]
OTHER_COLOUR = "#c7c7c7"


def map_sample(codes: DataFrame, items: DataFrame | None, max_points: int = 50000, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """A seeded sample of at most ``max_points`` codes with their metadata, and the axes' description.

    Columns: item_id, x, y, category (label or first genre, may be empty), title, genres.
    """
    n = codes.count()
    frac = min(1.0, 1.2 * max_points / max(n, 1))
    sample = codes.sample(fraction=frac, seed=seed) if frac < 1.0 else codes
    sample = sample.orderBy(F.xxhash64("item_id", F.lit(seed))).limit(max_points)
    if items is not None:
        meta = [c for c in ("title", "genres", "label") if c in items.columns]
        if meta:
            sample = sample.join(items.select("item_id", *meta), "item_id", "left")
    pdf = sample.drop("model_uri", "run_id", "model_version", "scored_at").toPandas()
    codes_m = np.stack(pdf["code"].to_numpy()) if len(pdf) else np.zeros((0, 2), np.float32)
    width = codes_m.shape[1] if codes_m.ndim == 2 else 0
    if width == 2:
        xy, axes = codes_m.astype(np.float64), "the 2-D codes"
    elif width == 1:
        xy, axes = np.column_stack([codes_m[:, 0], np.zeros(len(codes_m))]), "the 1-D code (y = 0)"
    else:
        centred = codes_m.astype(np.float64) - codes_m.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        xy = centred @ vt[:2].T
        share = (s[:2] ** 2).sum() / max((s**2).sum(), 1e-12)
        axes = f"PCA of the {width}-wide codes (first two components, {share:.0%} of variance)"
    out = pd.DataFrame({"item_id": pdf["item_id"].astype("int64"), "x": xy[:, 0], "y": xy[:, 1]})
    out["title"] = pdf["title"].fillna("").astype(str) if "title" in pdf else ""
    # items/ genres are a list column (Tag Genome) or a |-joined string: one |-joined string here.
    out["genres"] = pdf["genres"].map(lambda g: "|".join(genre_names(g))) if "genres" in pdf else ""
    if "label" in pdf:
        out["category"] = pdf["label"].map(lambda v: "" if pd.isna(v) else str(v))
    elif "genres" in pdf:
        out["category"] = out["genres"].map(lambda g: g.split("|")[0] if g else "")
    else:
        out["category"] = ""
    log.info("map sample: %d of %d items; axes: %s", len(out), n, axes)
    return out.sort_values("item_id", kind="stable").reset_index(drop=True), axes


def _colours(categories: pd.Series) -> tuple[list[str], dict[str, str]]:
    """Most frequent categories get palette colours (ties by name), the rest grey."""
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


def _labelled(sample: pd.DataFrame, cells: int = 6) -> pd.DataFrame:
    """A readable spread of points to write names on: the most central point of each grid cell."""
    if sample.empty:
        return sample
    names = sample["title"].where(sample["title"] != "", sample["category"])
    s = sample.assign(name=names)[names != ""]
    if s.empty:
        return s
    x0, x1, y0, y1 = s.x.min(), s.x.max(), s.y.min(), s.y.max()
    cx = np.minimum(((s.x - x0) / max(x1 - x0, 1e-12) * cells).astype(int), cells - 1)
    cy = np.minimum(((s.y - y0) / max(y1 - y0, 1e-12) * cells).astype(int), cells - 1)
    centre_x = x0 + (cx + 0.5) * (x1 - x0) / cells
    centre_y = y0 + (cy + 0.5) * (y1 - y0) / cells
    s = s.assign(cell=cx * cells + cy, off=(s.x - centre_x) ** 2 + (s.y - centre_y) ** 2)
    return s.sort_values(["cell", "off", "item_id"]).groupby("cell").head(1)


def write_png(sample: pd.DataFrame, path: str | Path, title: str, axes: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    colours, legend = _colours(sample["category"])
    fig, ax = plt.subplots(figsize=(11, 9), dpi=110)
    size = max(1.0, min(12.0, 20000 / max(len(sample), 1)))
    ax.scatter(sample.x, sample.y, c=colours, s=size, alpha=0.6, linewidths=0)
    for r in _labelled(sample).itertuples():
        ax.annotate(
            r.name[:32], (r.x, r.y), fontsize=7, alpha=0.9, xytext=(2, 2), textcoords="offset points",
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.6},
        )
    if legend:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in legend.items()]
        ax.legend(handles=handles, loc="best", fontsize=8, markerscale=1.2, framealpha=0.8)
    ax.set_title(f"{title}\n{len(sample):,} items; axes: {axes}", fontsize=10)
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px sans-serif;margin:0;display:flex;height:100vh}
#wrap{flex:1;position:relative}canvas{width:100%;height:100%;display:block;cursor:crosshair}
#side{width:230px;padding:10px;overflow:auto;border-left:1px solid #ddd}
#tip{position:absolute;pointer-events:none;background:#fffffe;border:1px solid #999;padding:4px 6px;
border-radius:3px;display:none;max-width:320px;box-shadow:0 1px 4px #0003}
.sw{display:inline-block;width:10px;height:10px;border-radius:5px;margin-right:6px}
</style></head><body>
<div id="wrap"><canvas id="c"></canvas><div id="tip"></div></div>
<div id="side"><b>__TITLE__</b><p>__N__ items; axes: __AXES__.</p><p>Hover a point for its title and genres.</p>
<div id="legend"></div></div>
<script>
const D=__DATA__;
const cv=document.getElementById('c'),tip=document.getElementById('tip'),ctx=cv.getContext('2d');
const n=D.x.length,pad=20;let W,H,sx,sy,grid;
const x0=Math.min(...D.x),x1=Math.max(...D.x),y0=Math.min(...D.y),y1=Math.max(...D.y);
function px(i){return pad+(D.x[i]-x0)/((x1-x0)||1)*(W-2*pad)}
function py(i){return H-pad-(D.y[i]-y0)/((y1-y0)||1)*(H-2*pad)}
function draw(){const r=cv.getBoundingClientRect();W=cv.width=r.width;H=cv.height=r.height;
ctx.clearRect(0,0,W,H);grid=new Map();const s=n>20000?1.5:n>2000?2.5:4;
for(let i=0;i<n;i++){const a=px(i),b=py(i);ctx.fillStyle=D.colours[D.c[i]];ctx.globalAlpha=.7;
ctx.beginPath();ctx.arc(a,b,s,0,6.283);ctx.fill();const k=((a/8)|0)+','+((b/8)|0);
if(!grid.has(k))grid.set(k,[]);grid.get(k).push(i);}}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
cv.addEventListener('mousemove',e=>{const r=cv.getBoundingClientRect(),mx=e.clientX-r.left,my=e.clientY-r.top;
let best=-1,bd=100;const gx=(mx/8)|0,gy=(my/8)|0;
for(let dx=-1;dx<=1;dx++)for(let dy=-1;dy<=1;dy++){for(const i of grid.get((gx+dx)+','+(gy+dy))||[]){
const d=(px(i)-mx)**2+(py(i)-my)**2;if(d<bd){bd=d;best=i}}}
if(best<0){tip.style.display='none';return}
tip.innerHTML='<b>'+esc(D.t[best]||('item '+D.id[best]))+'</b>'+(D.g[best]?'<br>'+esc(D.g[best].split('|').join(', ')):'')+
(D.cats[D.c[best]]?'<br>'+esc(D.catName)+': '+esc(D.cats[D.c[best]]):'')+'<br><small>id '+D.id[best]+'</small>';
tip.style.display='block';tip.style.left=(mx+12)+'px';tip.style.top=(my+12)+'px';});
cv.addEventListener('mouseleave',()=>{tip.style.display='none'});
document.getElementById('legend').innerHTML=D.legend.map(([k,c])=>'<div><span class="sw" style="background:'+c+'"></span>'+esc(k)+'</div>').join('');
window.addEventListener('resize',draw);draw();
</script></body></html>
"""


def write_html(sample: pd.DataFrame, path: str | Path, title: str, axes: str, category_name: str = "label") -> Path:
    """One self-contained file (data embedded, no external scripts): canvas scatter, hover tooltip, legend."""
    path = Path(path)
    colours, legend = _colours(sample["category"])
    cats = [""] + sorted(legend, key=_natural) + ["other"]
    index = {c: i for i, c in enumerate(cats)}
    cat_idx = [index[c] if c in legend else (0 if c == "" else index["other"]) for c in sample["category"]]
    palette = [OTHER_COLOUR] + [legend[c] for c in cats[1:-1]] + [OTHER_COLOUR]
    data = {
        "x": [round(float(v), 5) for v in sample.x],
        "y": [round(float(v), 5) for v in sample.y],
        "id": [int(v) for v in sample.item_id],
        "t": sample["title"].tolist(),
        "g": sample["genres"].tolist(),
        "c": cat_idx,
        "cats": cats[:-1] + ["other"],
        "colours": palette,
        "catName": category_name,
        "legend": [[c, legend[c]] for c in cats[1:-1]],
    }
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    text = (
        _HTML.replace("__TITLE__", html.escape(title))
        .replace("__AXES__", html.escape(axes))
        .replace("__N__", f"{len(sample):,}")
        .replace("__DATA__", payload)
    )
    path.write_text(text, encoding="utf-8")
    return path


def write_maps(
    codes: DataFrame,
    items: DataFrame | None,
    out_dir: str | Path,
    title: str = "sae map",
    max_points: int = 50000,
    seed: int = 0,
) -> list[Path]:
    """``map.png`` and ``map.html`` of a bounded sample of ``codes`` under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample, axes = map_sample(codes, items, max_points, seed)
    category = "label" if items is not None and "label" in items.columns else "genre"
    return [write_png(sample, out / "map.png", title, axes), write_html(sample, out / "map.html", title, axes, category)]
