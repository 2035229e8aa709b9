"""Maps drawn from published tables: `sae map`, what the page embeds, sampling, PCA axes, region labels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipelines.maps import bounds, colours, map_data, region_labels
from tests.map_data import FEATURES, GENRES, K, publish_small_map


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory):
    import mlflow

    root = tmp_path_factory.mktemp("map-root")
    tracking = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(tracking)
    # An experiment of this store, named explicitly: the process may still hold another store's active
    # experiment id, and setting an active one here would leak to later tests.
    experiment_id = mlflow.MlflowClient(tracking).create_experiment("sae-map-test")
    with mlflow.start_run(experiment_id=experiment_id) as run:  # the run that "made" codes/: `sae map --log` logs to it
        pass
    mlflow.set_tracking_uri("")
    made = publish_small_map(spark, root, run_id=run.info.run_id)
    return root, made | {"tracking": tracking, "run_id": run.info.run_id}


def _tables(spark, root):
    return [spark.read.parquet(str(root / t)) for t in ("codes", "items", "neighbors", "features")]


def test_sae_map_redraws_from_published_codes(published, tmp_path, capsys):
    from jobs.cli import main

    root, made = published
    out = tmp_path / "movies.html"
    args = ["map", f"paths.root={root}", f"mlflow.tracking_uri={made['tracking']}", "--out", str(out)]
    assert main([*args, "--colour", "genre", "--max-points", "1000", "--log"]) == 0
    assert f"map:        {out}" in capsys.readouterr().out
    import mlflow
    from mlflow import MlflowClient

    arts = MlflowClient(made["tracking"]).list_artifacts(made["run_id"], "maps")
    mlflow.set_tracking_uri("")  # `sae map --log` set it for this process
    assert sorted(a.path for a in arts) == ["maps/movies.html", "maps/movies.png"]
    page = out.read_text()
    # Self-contained: Bokeh inline, WebGL, the data embedded, nothing fetched.
    assert "<script src" not in page and "<link" not in page and "Toy Story (1995)" in page
    assert '"output_backend":"webgl"' in page.replace(" ", "")
    import matplotlib.image

    png = matplotlib.image.imread(out.with_suffix(".png"))
    assert png.shape[:2] == (990, 1210)  # 11 x 9 in at 110 dpi


def test_a_colour_key_items_lack_is_an_input_error_and_writes_nothing(published, tmp_path, capsys):
    from jobs.cli import main

    root, _ = published
    assert main(["map", f"paths.root={root}", "--out", str(tmp_path / "m"), "--colour", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("input error: colour: no column 'nope' in items/ (columns: item_id, title, genres)")
    assert not (tmp_path / "m").exists()


def test_map_data_explains_items_and_lists_their_published_neighbours(spark, published):
    root, made = published
    codes, items, nb, feats = _tables(spark, root)
    data = map_data(codes, items, nb, feats, FEATURES, colour="genre", max_points=1000, k=3)
    pts = data.points
    assert len(pts) == data.total == 60 and data.search is None
    assert pts.item_id.tolist() == sorted(made["ids"].tolist())
    # Cluster c's strongest features are FEATURES[c] then FEATURES[c + 3]; the genre is the first one.
    c = made["cluster"][5]
    row = pts[pts.item_id == made["ids"][5]].iloc[0]
    assert row.explain.split(", ")[:2] == [FEATURES[c], FEATURES[c + 3]] and row.category == GENRES[c]
    np.testing.assert_allclose(row[["x", "y"]].to_numpy(float), made["code"][5], rtol=1e-6)
    want = pq.read_table(root / "neighbors").to_pandas()
    want = want[want["rank"] <= 3].sort_values(["item_id", "rank"]).reset_index(drop=True)
    got = data.neighbours.sort_values(["item_id", "rank"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got[["item_id", "neighbor_id", "rank"]], want[["item_id", "neighbor_id", "rank"]])


def test_a_sampled_map_still_finds_every_item_where_it_is_drawn(spark, tmp_path):
    # 4-wide codes: drawn on the sample's two principal components; the search table of all items
    # is projected in Spark with the same components, so drawn items sit where the search puts them.
    made = publish_small_map(spark, tmp_path, n=60, width=4)
    codes, items, nb, _ = _tables(spark, tmp_path)
    data = map_data(codes, items, nb, max_points=20, seed=3, k=K)
    assert len(data.points) == 20 and data.total == 60 and "PCA of the 4-wide codes" in data.axes
    assert sorted(data.search.item_id) == sorted(made["ids"])
    both = data.points.merge(data.search, on="item_id", suffixes=("", "_s"))
    assert len(both) == 20
    np.testing.assert_allclose(both[["x", "y"]].to_numpy(), both[["x_s", "y_s"]].to_numpy(), atol=1e-5)
    assert set(data.neighbours.item_id) == set(data.points.item_id) and len(data.neighbours) == 20 * K
    # The same seed draws the same sample.
    assert map_data(codes, items, max_points=20, seed=3, k=0).points.item_id.tolist() == data.points.item_id.tolist()


def test_region_labels_name_each_dense_cluster_by_its_commonest_category():
    rng = np.random.default_rng(0)
    centres = {"Drama": (0, 0), "Comedy": (10, 0), "Horror": (5, 9)}
    rows = [(name, *rng.normal(c, 0.5)) for name, c in centres.items() for _ in range(50)]
    pts = pd.DataFrame(rows, columns=["category", "x", "y"]).assign(explain="")
    pts.loc[0, "category"] = "Comedy"  # one stray item does not rename its region
    labels = region_labels(pts).set_index("text")
    assert sorted(labels.index) == sorted(centres)
    for name, (cx, cy) in centres.items():
        assert abs(labels.loc[name, "x"] - cx) < 1 and abs(labels.loc[name, "y"] - cy) < 1
    # Without categories, text regions are named by their commonest top features.
    words = pts.assign(category="", explain=[f"{c.lower()}, word" for c in pts.category])
    assert "drama, word" in set(region_labels(words).text)


def test_png_and_page_share_colours_and_axes(spark, published):
    from pipelines.map_page import build_layout

    root, _ = published
    codes, items, nb, feats = _tables(spark, root)
    data = map_data(codes, items, nb, feats, FEATURES, colour="genre", max_points=1000, k=K)
    layout = build_layout(data, "t")
    fig = layout.select_one({"name": "map"})
    assert (fig.x_range.start, fig.x_range.end, fig.y_range.start, fig.y_range.end) == bounds(data.points)
    _, legend = colours(data.points.category)
    drawn = {r.name.split(":", 1)[1]: r.glyph.fill_color for r in fig.renderers if (r.name or "").startswith("group:")}
    assert drawn == legend and set(legend) == set(GENRES)


def test_a_text_map_shows_each_posts_subject_and_colours_by_its_group(spark, tmp_path):
    """The text source writes a post's Subject line as its title and its folder as its label: the
    map's hover shows the subject and the label, and the features' top words; each group is coloured."""
    from datetime import UTC, datetime

    from pipelines.ingest import run_ingest
    from pipelines.map_page import build_layout
    from pipelines.schemas import CODES
    from tests.test_text_source import STRIP, cfg_for, write_corpus

    manifest = run_ingest(spark, cfg_for(tmp_path, write_corpus(tmp_path / "corpus"), *STRIP))
    root = tmp_path / "out"
    items = spark.read.parquet(str(root / "items"))
    ids = {r["doc"]: r["item_id"] for r in items.collect()}
    at = datetime(2026, 1, 1, tzinfo=UTC)
    xy = {"train/sport/1": (0.0, 0.0), "train/sport/2": (1.0, 0.0), "train/space/3": (5.0, 5.0), "test/space/4": (6.0, 5.0)}
    codes = spark.createDataFrame(
        [(ids[d], [x, y], x, y, "models:/sae/1", "r1", "1", at) for d, (x, y) in xy.items()], CODES
    )
    feats = spark.read.parquet(str(root / "features"))
    data = map_data(codes, items, None, feats, manifest["feature_names"], n_top=1)
    pts = data.points.set_index("item_id")
    by_doc = {d: pts.loc[i] for d, i in ids.items()}
    assert [by_doc[d].title for d in xy] == ["Goal!", "Match", "Orbit", "Latin"]  # the Subject lines
    assert [by_doc[d].category for d in xy] == ["sport", "sport", "space", "space"]
    # The heaviest word (the test post's orbit and rocket tie, so it is left out here).
    assert [by_doc[d].explain for d in list(xy)[:3]] == ["ball", "ball", "orbit"]
    fig = build_layout(data, "news").select_one({"name": "map"})
    from bokeh.models import HoverTool

    (hover,) = [t for t in fig.tools if isinstance(t, HoverTool)]
    assert hover.tooltips == [("", "@title"), ("id", "@item_id{0}"), ("label", "@category"), ("top features", "@explain")]
    drawn = {r.name.split(":", 1)[1]: r.glyph.fill_color for r in fig.renderers if (r.name or "").startswith("group:")}
    assert drawn == {"space": "#1f77b4", "sport": "#ff7f0e"}


def test_twenty_groups_get_twenty_colours():
    groups = pd.Series([f"g{i:02d}" for i in range(21) for _ in range(21 - i)])  # g20 is the rarest
    cols, legend = colours(groups)
    assert len(legend) == 20 and len(set(legend.values())) == 20 and "g20" not in legend
    assert cols[-1] == "#c7c7c7"  # the 21st group is grey
