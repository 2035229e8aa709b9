"""The map page in a real browser (headless Debian Chromium through Selenium): what a person sees.

One small published map (60 items, 3 genres), drawn by `sae map`, opened from disk with the
network unused: the plot is drawn, every published item is on it, search finds and highlights an
item, a click lists the item's neighbours from neighbors/, and the page logs no error and fetches
nothing. A screenshot is kept under the test's tmp_path."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.browser import chromium, console_errors, requests
from tests.map_data import FEATURES, GENRES, publish_small_map

# Finds a Bokeh view by its model's name (views live under shadow roots, out of CSS selectors' reach).
FIND = r"""
window.saeView = function(name){
  let hit=null;
  function walk(v){ if(v.model.name===name) hit=v; for(const c of (v.child_views||[])) walk(c); }
  for(const r of Object.values(Bokeh.index)) walk(r);
  return hit;
};
window.saeTooltip = function(){
  const out=[];
  function walk(root){ for(const el of root.querySelectorAll('*')){
    if(el.shadowRoot) walk(el.shadowRoot);
    if(String(el.className).split(' ').includes('bk-tooltip-content')) out.push(el.innerText);
  } }
  walk(document); return out;
};
window.saeText = function(name){ return saeView(name).el.shadowRoot.lastElementChild.innerText.replace(/\n+/g, "\n"); };
"""


@pytest.fixture(scope="module")
def page(spark, tmp_path_factory):
    from jobs.cli import main

    root = tmp_path_factory.mktemp("browser-map")
    made = publish_small_map(spark, root)
    assert main(["map", f"paths.root={root}", "--out", str(root / "out" / "map.html"), "--colour", "genre"]) == 0
    return root, made


def _names(made: dict) -> dict[int, str]:
    return dict(zip(made["ids"].tolist(), made["titles"], strict=True))


def test_the_map_page_shows_searches_and_lists_neighbours(page, tmp_path):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    root, made = page
    names = _names(made)
    nb = pq.read_table(root / "neighbors").to_pandas().sort_values(["item_id", "rank"])
    with chromium() as d:
        d.get(f"file://{root / 'out' / 'map.html'}")
        WebDriverWait(d, 30).until(lambda d: d.execute_script(
            "return !!(window.Bokeh && Object.keys(Bokeh.index).length)"))
        d.execute_script(FIND)
        WebDriverWait(d, 30).until(lambda d: d.execute_script("return saeView('map') && saeView('map').is_idle"))

        # Every published item is on the page and drawn, and the page says so.
        n_codes = pq.read_table(root / "codes").num_rows
        for table in ("items", "points"):
            assert d.execute_script(f"return Bokeh.documents[0].get_model_by_name('{table}').data.x.length") == n_codes
        assert d.execute_script("return saeText('summary')").splitlines()[1] == f"{n_codes} items drawn"

        # The canvas is not blank: each genre's colour (as blended at alpha 0.7 over white) covers pixels.
        from PIL import Image

        rect = d.execute_script("const r=saeView('map').canvas_view.el.getBoundingClientRect(); return [r.left,r.top,r.width,r.height]")
        shot = np.asarray(Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")).astype(int)
        x0, y0, w, h = (int(v) for v in rect)
        plot = shot[y0 : y0 + h, x0 : x0 + w]
        fills = d.execute_script(
            "return saeView('map').model.renderers.filter(r=>(r.name||'').startsWith('group:')).map(r=>r.glyph.fill_color.value)")
        assert len(fills) == 3
        for hexc in fills:
            rgb = np.array([int(hexc[i : i + 2], 16) for i in (1, 3, 5)]) * 0.7 + 255 * 0.3
            assert (np.abs(plot - rgb).max(axis=2) <= 12).sum() > 50, f"no {hexc} points on the canvas"

        # Typing a title in the search box highlights that item and centres the view on it.
        toy = int(made["ids"][3])
        box = d.execute_script("return saeView('search').input_el")
        box.send_keys("toy story (1995)" + Keys.ENTER)
        WebDriverWait(d, 10).until(lambda d: d.execute_script(
            "return Bokeh.documents[0].get_model_by_name('highlight').data.item_id.length") == 1)
        assert d.execute_script("return Bokeh.documents[0].get_model_by_name('highlight').data.item_id[0]") == toy
        cx, cy = d.execute_script(
            "const v=saeView('map').model; return [(v.x_range.start+v.x_range.end)/2, (v.y_range.start+v.y_range.end)/2]")
        assert (cx, cy) == pytest.approx(tuple(made["code"][3]), abs=1e-6)
        assert d.execute_script("return saeText('neighbour_list')").startswith("Nearest to Toy Story (1995) (id 22)")

        # Clicking an item lists its neighbours from neighbors/ (in rank order, with distances) and draws lines.
        d.find_element("tag name", "body").send_keys(Keys.ESCAPE)
        d.execute_script("saeView('map').model.reset.emit()")  # back to the whole map
        time.sleep(0.3)
        lonely = int(nb[nb["rank"] == 1].sort_values("distance").item_id.iloc[-1])  # nobody overlaps it
        sx, sy = d.execute_script(
            """const pv=saeView('map'), s=Bokeh.documents[0].get_model_by_name('points').data;
               const i=s.item_id.indexOf(arguments[0]), r=pv.canvas_view.el.getBoundingClientRect();
               return [r.left+pv.frame.x_scale.compute(s.x[i]), r.top+pv.frame.y_scale.compute(s.y[i])]""", lonely)
        hover = ActionBuilder(d)
        hover.pointer_action.move_to_location(int(round(sx)), int(round(sy)))
        hover.perform()
        # Hovering shows its metadata and the top features that explain it (manifest feature_names).
        i = int(np.flatnonzero(made["ids"] == lonely)[0])
        c = made["cluster"][i]
        WebDriverWait(d, 10).until(lambda d: d.execute_script("return saeTooltip()"))
        tip = [line.strip() for line in d.execute_script("return saeTooltip()")[0].splitlines()]
        assert tip[:4] == [names[lonely], "id:\t" + str(lonely), "genre:\t" + GENRES[c], "genres:\t" + made["genres"][i]]
        assert tip[4].startswith(f"top features:\t{FEATURES[c]}, {FEATURES[c + 3]}")
        click = ActionBuilder(d)
        click.pointer_action.click()
        click.perform()
        WebDriverWait(d, 10).until(lambda d: d.execute_script("return saeText('neighbour_list')").startswith(
            f"Nearest to {names[lonely]}"))
        listed = d.execute_script("return saeText('neighbour_list')").splitlines()[1:]
        want = nb[nb.item_id == lonely]
        assert listed == [f"{names[n]} (id {n}) d={dist:.4f}" for n, dist in zip(want.neighbor_id, want.distance, strict=True)]
        assert d.execute_script("return Bokeh.documents[0].get_model_by_name('links').data.x1.length") == len(want)

        shot_path = tmp_path / "map.png"
        d.save_screenshot(str(shot_path))
        print(f"screenshot: {shot_path}")
        # Nothing went wrong, and nothing but the file itself (and inline data: URIs) was loaded.
        assert console_errors(d) == []
        urls = requests(d)
        assert [u for u in urls if not u.startswith("data:")] == [f"file://{root / 'out' / 'map.html'}"]
