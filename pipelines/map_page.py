"""The interactive map page: one self-contained HTML file drawn with Bokeh.

Bokeh (the library behind umap-learn's interactive plots) gives pan/zoom, hover, tap, legends that
hide groups and a WebGL scatter; with ``INLINE`` resources its JavaScript is embedded, so the file
opens from disk with no network. Only the map's own behaviour (search, neighbour lists and lines,
which points are in view) is a little ``CustomJS``.

Rendering every one of 200,000 points redrew in 6 s per pan in headless software WebGL; drawing at
most ``VIEW_MAX`` points in view over a density image redraws in 0.7 s there (README, Maps).
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.maps import OTHER, OTHER_COLOUR, MapData, bounds, colours, region_labels

# The page keeps every drawn item in ``items`` (not rendered, in a seeded random order) and renders
# ``points``: the items inside the current view, at most VIEW_MAX of them, taken in that order, so
# the points shown when zoomed out are a uniform sample and zooming in reveals all. Past VIEW_MAX
# items a per-group density image under the points shows the whole set.
VIEW_MAX = 20000
PALETTE_ONE = "#1f77b4"  # uncoloured maps

_COMMON = """
const COLS=['x','y','item_id','title','genres','category','explain','group'];
function lookup(){
  if(!nb._ix){
    const ix=new Map(), d=items.data;
    for(let i=0;i<d.item_id.length;i++) ix.set(Number(d.item_id[i]), i);
    const ex=new Map();
    if(every){const e=every.data; for(let i=0;i<e.item_id.length;i++) ex.set(Number(e.item_id[i]), i);}
    nb._ix=ix; nb._ex=ex;
  }
  return [nb._ix, nb._ex];
}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
function fill(){
  const d=items.data, xs=d.x, ys=d.y, x0=xr.start, x1=xr.end, y0=yr.start, y1=yr.end, rows=[];
  for(let i=0;i<xs.length && rows.length<maxv;i++){
    const x=xs[i], y=ys[i];
    if(x>=x0 && x<=x1 && y>=y0 && y<=y1) rows.push(i);
  }
  const out={row: rows};
  for(const c of COLS){const a=d[c]; out[c]=rows.map(i=>a[i]);}
  src.selected.indices=[];
  src.data=out;
}
function show(i){
  const d=items.data, [ix, ex]=lookup();
  const id=Number(d.item_id[i]), x=d.x[i], y=d.y[i];
  hl.data={x:[x], y:[y], item_id:[id]};
  const x0=[], y0=[], x1=[], y1=[], rows=[], ids=nb.data.ids, dist=nb.data.d;
  for(let r=0;r<k;r++){
    if(isNaN(dist[i*k+r])) continue;
    const nid=Number(ids[i*k+r]);
    let name='item '+nid, nx=null, ny=null;
    if(ix.has(nid)){const j=ix.get(nid); name=d.title[j]||name; nx=d.x[j]; ny=d.y[j];}
    else if(ex.has(nid)){const j=ex.get(nid), e=every.data; name=e.title[j]||name; nx=e.x[j]; ny=e.y[j];}
    if(nx!==null){x0.push(x); y0.push(y); x1.push(nx); y1.push(ny);}
    rows.push('<li data-id="'+nid+'">'+esc(name)+' <small>(id '+nid+')</small> d='+dist[i*k+r].toFixed(4)+'</li>');
  }
  links.data={x0:x0, y0:y0, x1:x1, y1:y1};
  div.text='<b>Nearest to '+esc(d.title[i]||('item '+id))+'</b> <small>(id '+id+')</small>'+
    (rows.length?'<ol class="nb">'+rows.join('')+'</ol>':'<p>no neighbours published for this item</p>');
}
"""

_VIEW = _COMMON + "fill();"

_TAP = _COMMON + """
const sel=src.selected.indices;
if(sel.length) show(src.data.row[sel[0]]);
"""

_SEARCH = _COMMON + """
const q=cb_obj.value.trim().toLowerCase();
if(!q) return;
function find(titles, ids){
  if(/^-?\\d+$/.test(q)){const want=Number(q); for(let i=0;i<ids.length;i++) if(Number(ids[i])===want) return [i, 1];}
  let exact=-1, first=-1, count=0;
  for(let i=0;i<titles.length;i++){
    const t=String(titles[i]).toLowerCase();
    if(t===q && exact<0) exact=i;
    if(t.includes(q)){count++; if(first<0) first=i;}
  }
  return [exact>=0?exact:first, exact>=0?1:count];
}
const d=items.data;
let [i, count]=find(d.title, d.item_id), x, y, id, title;
if(i>=0){x=d.x[i]; y=d.y[i];}
else if(every){
  const e=every.data; let j; [j, count]=find(e.title, e.item_id);
  if(j<0){div.text='<b>No item matches</b> '+esc(q); return;}
  x=e.x[j]; y=e.y[j]; id=Number(e.item_id[j]); title=e.title[j];
}else{div.text='<b>No item matches</b> '+esc(q); return;}
const w=xr.end-xr.start, h=yr.end-yr.start;
xr.setv({start:x-w/2, end:x+w/2}); yr.setv({start:y-h/2, end:y+h/2});
fill();
if(i>=0) show(i);
else{
  hl.data={x:[x], y:[y], item_id:[id]}; links.data={x0:[], y0:[], x1:[], y1:[]};
  div.text='<b>'+esc(title||('item '+id))+'</b> <small>(id '+id+')</small><p>not drawn in this sample; neighbours are listed for drawn items</p>';
}
if(count>1) div.text+='<p><small>'+count+' titles match; the first is shown</small></p>';
"""


def _ids(a: np.ndarray) -> np.ndarray:
    """Item ids as int32 when they all fit (half the page's bytes), else float64 (exact up to 2**53)."""
    a = np.asarray(a, dtype=np.int64)
    small = a.size == 0 or (a.min() >= np.iinfo(np.int32).min and a.max() <= np.iinfo(np.int32).max)
    return a.astype(np.int32) if small else a.astype(np.float64)


def _flat_neighbours(points: pd.DataFrame, nb: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i*k+r: the r-th neighbour of drawn point i (id, distance); distance NaN where fewer than k."""
    ids = np.zeros(len(points) * k, dtype=np.int64)
    dist = np.full(len(points) * k, np.nan, dtype=np.float32)
    if k and len(nb):
        pos = pd.Series(np.arange(len(points)), index=points["item_id"].to_numpy())
        row = pos.reindex(nb["item_id"].to_numpy()).to_numpy()
        ok = ~np.isnan(row) & (nb["rank"].to_numpy() <= k)
        slot = (row[ok] * k + nb["rank"].to_numpy()[ok] - 1).astype(int)
        ids[slot] = nb["neighbor_id"].to_numpy()[ok]
        dist[slot] = nb["distance"].to_numpy()[ok]
    return _ids(ids), dist


def _density(pts: pd.DataFrame, group: np.ndarray, g: str, box: tuple, bins: int = 256) -> np.ndarray:
    """Counts of group ``g`` on a ``bins`` x ``bins`` grid over ``box``, log-scaled to 0..255 (uint8, rows = y)."""
    x0, x1, y0, y1 = box
    sel = group == g
    h, _, _ = np.histogram2d(pts.y[sel], pts.x[sel], bins=bins, range=[[y0, y1], [x0, x1]])
    return np.round(np.log1p(h) / max(np.log1p(h.max()), 1e-9) * 255).astype(np.uint8)


def build_layout(data: MapData, title: str, view_max: int = VIEW_MAX):  # noqa: ANN201 - a Bokeh layout
    """The Bokeh layout of the map (see the module docstring).

    Named models a test can find: sources ``items`` (every drawn item), ``points`` (those rendered),
    ``neighbours``, ``search_table`` (sampled maps), ``links``, ``highlight``; views ``map``,
    ``search``, ``neighbour_list``, ``summary``. Groups are renderers ``group:<name>`` (and
    ``density:<name>`` past ``view_max`` items)."""
    from bokeh.events import RangesUpdate
    from bokeh.layouts import column, row
    from bokeh.models import (
        CDSView,
        ColumnDataSource,
        CustomJS,
        Div,
        GroupFilter,
        HoverTool,
        LabelSet,
        Legend,
        LegendItem,
        LinearColorMapper,
        Range1d,
        TapTool,
        TextInput,
    )
    from bokeh.plotting import figure

    n = len(data.points)
    # A seeded random order: the first view_max items inside any view are a uniform sample of it.
    order = np.random.default_rng(0).permutation(n)
    pts = data.points.iloc[order].reset_index(drop=True)
    cols, legend = colours(pts["category"])
    group = np.array([c if c in legend else OTHER for c in pts["category"]], dtype=object)
    columns = {
        "x": pts.x.to_numpy(np.float64), "y": pts.y.to_numpy(np.float64),
        "item_id": _ids(pts.item_id.to_numpy()), "title": pts.title.tolist(), "genres": pts.genres.tolist(),
        "category": pts.category.tolist(), "explain": pts.explain.tolist(), "group": group.tolist(),
    }
    items = ColumnDataSource(columns, name="items")
    box = bounds(pts)
    x0, x1, y0, y1 = box
    shown = np.flatnonzero((columns["x"] >= x0) & (columns["x"] <= x1) & (columns["y"] >= y0) & (columns["y"] <= y1))
    shown = shown[:view_max]
    src = ColumnDataSource(
        {c: (v[shown] if isinstance(v, np.ndarray) else [v[i] for i in shown]) for c, v in columns.items()} | {"row": shown},
        name="points",
    )
    k = int(data.neighbours["rank"].max()) if len(data.neighbours) else 0
    ids, dist = _flat_neighbours(pts, data.neighbours, k)
    nb = ColumnDataSource({"ids": ids, "d": dist}, name="neighbours")
    every = None
    if data.search is not None:
        s = data.search
        every = ColumnDataSource(
            {"item_id": _ids(s.item_id.to_numpy()), "title": s.title.tolist(), "x": s.x.to_numpy(), "y": s.y.to_numpy()},
            name="search_table",
        )
    p = figure(
        title=title.split("\n")[0], sizing_mode="stretch_both", output_backend="webgl",
        tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
        x_range=Range1d(x0, x1, name="x_range"), y_range=Range1d(y0, y1, name="y_range"),
        x_axis_label="x", y_axis_label="y", name="map",
    )
    dense = n > view_max
    groups = list(legend) + ([OTHER] if OTHER in set(group) else [])
    radius = 3 if dense else 4 if n > 5000 else 6
    renderers = []
    for g in groups or [OTHER]:
        colour = legend.get(g, OTHER_COLOUR) if groups else PALETTE_ONE
        parts = []
        if dense:
            ramp = [colour + f"{a:02x}" for a in range(40, 256, 8)]
            parts.append(p.image(
                image=[_density(pts, group, g, box)], x=x0, y=y0, dw=x1 - x0, dh=y1 - y0, name=f"density:{g}",
                color_mapper=LinearColorMapper(palette=ramp, low=1, high=255, low_color="#00000000"),
            ))
        view = CDSView(filter=GroupFilter(column_name="group", group=g)) if groups else CDSView()
        parts.append(p.scatter(
            "x", "y", source=src, view=view, size=radius, fill_color=colour, line_color=None,
            fill_alpha=0.7, name=f"group:{g}", nonselection_fill_alpha=0.7,
        ))
        renderers.append((g, parts))
    points = [parts[-1] for _, parts in renderers]
    links = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []}, name="links")
    p.segment("x0", "y0", "x1", "y1", source=links, line_color="black", line_width=1.5, line_alpha=0.8)
    hl = ColumnDataSource({"x": [], "y": [], "item_id": []}, name="highlight")
    p.scatter("x", "y", source=hl, size=18, fill_color=None, line_color="red", line_width=3, name="highlight_ring")
    p.add_layout(LabelSet(
        x="x", y="y", text="text", source=ColumnDataSource(region_labels(data.points)), text_font_size="11pt",
        text_font_style="bold", text_align="center", background_fill_color="white", background_fill_alpha=0.7,
        name="regions",
    ))
    if groups:
        entries = [LegendItem(label=g, renderers=parts) for g, parts in renderers]
        p.add_layout(Legend(items=entries, click_policy="hide", title=data.category_name or None), "right")
    tips = [("", "@title"), ("id", "@item_id{0}")]
    if data.category_name:
        tips.append((data.category_name, "@category"))
    if pts.genres.ne("").any() and data.category_name != "genres":
        tips.append(("genres", "@genres"))
    if pts.explain.ne("").any():
        tips.append(("top features", "@explain"))
    p.add_tools(HoverTool(renderers=points, tooltips=tips))
    p.add_tools(TapTool(renderers=points))
    info = Div(text="<p>Click a point, or search, to list its nearest neighbours.</p>", name="neighbour_list", width=300)
    args = {
        "src": src, "items": items, "nb": nb, "every": every, "links": links, "hl": hl, "div": info, "k": k,
        "xr": p.x_range, "yr": p.y_range, "maxv": view_max,
    }
    src.selected.js_on_change("indices", CustomJS(args=args, code=_TAP))
    p.js_on_event(RangesUpdate, CustomJS(args=args, code=_VIEW))
    search = TextInput(placeholder="title or id, then Enter", title="Find an item", name="search", width=300)
    search.js_on_change("value", CustomJS(args=args, code=_SEARCH))
    drawn = f"{n:,} items drawn" + ("" if data.search is None else f" (seeded sample of {data.total:,}; search covers all)")
    if dense:
        drawn += f"; at most {view_max:,} points at a time over a density image of all"
    head = Div(
        text=f"<b>{html_lib.escape(title.splitlines()[0])}</b><p class='count' data-count='{n}'>{drawn}</p>"
        f"<p><small>axes: {html_lib.escape(data.axes)}</small></p>",
        name="summary", width=300,
    )
    return row(p, column(head, search, info, width=320, sizing_mode="stretch_height"), sizing_mode="stretch_both")


def write_html(data: MapData, path: str | Path, title: str) -> Path:
    """One self-contained HTML file (Bokeh's JavaScript inline, data embedded): nothing is fetched."""
    from bokeh.embed import file_html
    from bokeh.resources import INLINE

    path = Path(path)
    page = file_html(build_layout(data, title), INLINE, title=title.splitlines()[0])
    path.write_text(page, encoding="utf-8")
    return path
