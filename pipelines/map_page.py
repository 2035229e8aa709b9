"""The interactive map page: one self-contained HTML file drawn with Bokeh.

Bokeh (the library behind umap-learn's interactive plots) gives pan/zoom, hover, tap, legends that
hide groups and a WebGL scatter that stays fluid at 200,000 points; with ``INLINE`` resources its
JavaScript is embedded, so the file opens from disk with no network. Only the map's own behaviour
(search, neighbour lists and lines) is a little ``CustomJS``.
"""

from __future__ import annotations

import html as html_lib
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.maps import DENSITY_THRESHOLD, OTHER, OTHER_COLOUR, MapData, bounds, colours, region_labels

# Shared by both callbacks: lookups built once per page, kept on the neighbour source object.
_LOOKUP = """
function lookup(){
  if(!nb._ix){
    const ix=new Map(), d=src.data;
    for(let i=0;i<d.item_id.length;i++) ix.set(Number(d.item_id[i]), i);
    const ex=new Map();
    if(every){const e=every.data; for(let i=0;i<e.item_id.length;i++) ex.set(Number(e.item_id[i]), i);}
    nb._ix=ix; nb._ex=ex;
  }
  return [nb._ix, nb._ex];
}
function esc(s){return String(s).replace(/[&<>"]/g,c=>({'&':'&amp;','<':'&lt;','>':'&gt;','"':'&quot;'}[c]))}
"""

_SELECT = _LOOKUP + """
const sel=src.selected.indices;
if(sel.length==0){return;}
const i=sel[0], d=src.data, [ix, ex]=lookup();
const id=Number(d.item_id[i]), x=d.x[i], y=d.y[i];
hl.data={x:[x], y:[y], item_id:[id]};
const x0=[], y0=[], x1=[], y1=[], rows=[];
const ids=nb.data.ids, dist=nb.data.d;
for(let r=0;r<k;r++){
  const nid=ids[i*k+r];
  if(!(nid>=0)) continue;
  let name='item '+nid, nx=null, ny=null;
  if(ix.has(nid)){const j=ix.get(nid); name=d.title[j]||name; nx=d.x[j]; ny=d.y[j];}
  else if(ex.has(nid)){const j=ex.get(nid), e=every.data; name=e.title[j]||name; nx=e.x[j]; ny=e.y[j];}
  if(nx!==null){x0.push(x); y0.push(y); x1.push(nx); y1.push(ny);}
  rows.push('<li data-id="'+nid+'">'+esc(name)+' <small>(id '+nid+')</small> d='+dist[i*k+r].toFixed(4)+'</li>');
}
links.data={x0:x0, y0:y0, x1:x1, y1:y1};
div.text='<b>Nearest to '+esc(d.title[i]||('item '+id))+'</b> <small>(id '+id+')</small>'+
  (rows.length?'<ol class="nb">'+rows.join('')+'</ol>':'<p>no neighbours published for this item</p>');
"""

_SEARCH = _LOOKUP + """
const q=cb_obj.value.trim().toLowerCase();
if(!q) return;
const d=src.data, [ix, ex]=lookup();
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
let [i, count]=find(d.title, d.item_id);
let x, y, id, title;
if(i>=0){
  x=d.x[i]; y=d.y[i]; id=Number(d.item_id[i]); title=d.title[i];
}else if(every){
  const e=every.data; [i, count]=find(e.title, e.item_id);
  if(i<0){div.text='<b>No item matches</b> '+esc(q); return;}
  x=e.x[i]; y=e.y[i]; id=Number(e.item_id[i]); title=e.title[i]; i=-1;
}else{div.text='<b>No item matches</b> '+esc(q); return;}
const w=xr.end-xr.start, h=yr.end-yr.start;
xr.setv({start:x-w/2, end:x+w/2}); yr.setv({start:y-h/2, end:y+h/2});
if(i>=0){src.selected.indices=[i];}
else{
  hl.data={x:[x], y:[y], item_id:[id]}; links.data={x0:[], y0:[], x1:[], y1:[]};
  div.text='<b>'+esc(title||('item '+id))+'</b> <small>(id '+id+')</small><p>not drawn in this sample; neighbours are listed for drawn items</p>';
}
if(count>1) div.text+='<p><small>'+count+' titles match; the first is shown</small></p>';
"""


def _flat_neighbours(points: pd.DataFrame, nb: pd.DataFrame, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row i*k+r: the r-th neighbour of drawn point i (id, distance); -1 / NaN where fewer than k."""
    ids = np.full(len(points) * k, -1.0)
    dist = np.full(len(points) * k, np.nan, dtype=np.float32)
    if k and len(nb):
        pos = pd.Series(np.arange(len(points)), index=points["item_id"].to_numpy())
        row = pos.reindex(nb["item_id"].to_numpy()).to_numpy()
        slot = row * k + nb["rank"].to_numpy().astype(int) - 1
        ok = ~np.isnan(row) & (nb["rank"].to_numpy() <= k)
        slot = slot[ok].astype(int)
        ids[slot] = nb["neighbor_id"].to_numpy()[ok]  # float64 holds ids exactly up to 2**53
        dist[slot] = nb["distance"].to_numpy()[ok]
    return ids, dist


def build_layout(data: MapData, title: str):  # noqa: ANN201 - a Bokeh layout
    """The Bokeh layout of the map (see the module docstring); models a test can find are named."""
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
        Range1d,
        TapTool,
        TextInput,
    )
    from bokeh.plotting import figure
    from bokeh.transform import linear_cmap
    from bokeh.util.hex import hexbin

    pts = data.points.reset_index(drop=True)
    cols, legend = colours(pts["category"])
    group = [c if c in legend else OTHER for c in pts["category"]]
    n = len(pts)
    src = ColumnDataSource(
        {
            "x": pts.x.to_numpy(np.float64), "y": pts.y.to_numpy(np.float64),
            "item_id": pts.item_id.to_numpy(np.float64), "title": pts.title.tolist(), "genres": pts.genres.tolist(),
            "category": pts.category.tolist(), "explain": pts.explain.tolist(), "colour": cols, "group": group,
        },
        name="points",
    )
    k = int(data.neighbours["rank"].max()) if len(data.neighbours) else 0
    ids, dist = _flat_neighbours(pts, data.neighbours, k)
    nb = ColumnDataSource({"ids": ids, "d": dist}, name="neighbours")
    every = None
    if data.search is not None:
        s = data.search
        every = ColumnDataSource(
            {"item_id": s.item_id.to_numpy(np.float64), "title": s.title.tolist(), "x": s.x.to_numpy(), "y": s.y.to_numpy()},
            name="search_table",
        )
    x0, x1, y0, y1 = bounds(pts)
    p = figure(
        title=title.split("\n")[0], sizing_mode="stretch_both", output_backend="webgl",
        tools="pan,wheel_zoom,box_zoom,reset,save", active_scroll="wheel_zoom",
        x_range=Range1d(x0, x1, name="x_range"), y_range=Range1d(y0, y1, name="y_range"),
        x_axis_label="x", y_axis_label="y", name="map",
    )
    dense = n > DENSITY_THRESHOLD
    if dense:
        size = max(x1 - x0, y1 - y0) / 120
        bins = hexbin(pts.x.to_numpy(), pts.y.to_numpy(), size)
        p.hex_tile(
            q="q", r="r", size=size, source=ColumnDataSource(bins), line_color=None, alpha=0.5, name="density",
            fill_color=linear_cmap("counts", "Greys256", 1, max(int(bins.counts.max()), 2), low_color="white"),
        )
    radius = 2 if dense else 4 if n > 5000 else 6
    renderers = []
    groups = list(legend) + ([OTHER] if OTHER in group else [])
    for g in groups or [OTHER]:
        view = CDSView(filter=GroupFilter(column_name="group", group=g)) if groups else CDSView()
        r = p.scatter(
            "x", "y", source=src, view=view, size=radius, fill_color=legend.get(g, OTHER_COLOUR if groups else "#1f77b4"),
            line_color=None, fill_alpha=0.35 if dense else 0.7, name=f"group:{g}",
            selection_fill_alpha=1.0, nonselection_fill_alpha=0.35 if dense else 0.7,
        )
        renderers.append((g, r))
    links = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []}, name="links")
    p.segment("x0", "y0", "x1", "y1", source=links, line_color="black", line_width=1.5, line_alpha=0.8)
    hl = ColumnDataSource({"x": [], "y": [], "item_id": []}, name="highlight")
    p.scatter("x", "y", source=hl, size=18, fill_color=None, line_color="red", line_width=3, name="highlight_ring")
    labels = region_labels(pts)
    p.add_layout(LabelSet(
        x="x", y="y", text="text", source=ColumnDataSource(labels), text_font_size="11pt", text_font_style="bold",
        text_align="center", background_fill_color="white", background_fill_alpha=0.7, name="regions",
    ))
    if groups:
        items = [LegendItem(label=g, renderers=[r]) for g, r in renderers]
        p.add_layout(Legend(items=items, click_policy="hide", title=data.category_name or None), "right")
    tips = [("", "@title"), ("id", "@item_id{0}")]
    if data.category_name:
        tips.append((data.category_name, "@category"))
    if pts.genres.ne("").any() and data.category_name != "genres":
        tips.append(("genres", "@genres"))
    if pts.explain.ne("").any():
        tips.append(("top features", "@explain"))
    p.add_tools(HoverTool(renderers=[r for _, r in renderers], tooltips=tips))
    p.add_tools(TapTool(renderers=[r for _, r in renderers]))
    info = Div(text="<p>Click a point, or search, to list its nearest neighbours.</p>", name="neighbour_list", width=300)
    args = {"src": src, "nb": nb, "every": every, "links": links, "hl": hl, "div": info, "k": k}
    src.selected.js_on_change("indices", CustomJS(args=args, code=_SELECT))
    search = TextInput(placeholder="title or id, then Enter", title="Find an item", name="search", width=300)
    search.js_on_change("value", CustomJS(args=args | {"xr": p.x_range, "yr": p.y_range}, code=_SEARCH))
    drawn = f"{n:,} items drawn" + ("" if data.search is None else f" (seeded sample of {data.total:,}; search covers all)")
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
