"""MovieLens tags and ratings as presets of the events source: ``data.source=movielens_ratings`` (the
preset with ``data.ratings.*`` mapped) against hand-computed vectors over a flat log that grows by a
late and a re-sent event, then turned per user from the same state; and ``--preset movielens_tags``
(``data.source=events``) publishing what ``data.source=movielens_tags`` does.

(Before ``pipelines/sources/logs.py`` was deleted, this input was run through both it and the presets,
which published the same features, items, quarantine, feature names and counts.)"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.ingest import check_inputs, run_ingest
from tests.test_logs_sources import DAY1, MOVIES, tags_day1, write


def published(root):
    def t(name):
        return pq.read_table(str((root / name).resolve())).to_pylist()

    # float32 features: hand values here are exact in float32 (-1, 0, 1), rounding only drops the noise.
    feats = {r["item_id"]: [round(x, 6) for x in r["features"]] for r in t("features")}
    m = json.loads((root / "features" / "_manifest.json").read_text())
    return feats, t("items"), sorted((r["raw"], r["reason"]) for r in t("quarantine")), m


def counts(m):
    return m["rows_in"], m["rows_used"], m["rows_quarantined"]


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_ratings_preset_late_and_resent_events_then_per_user(spark, tmp_path):
    d = tmp_path / "in"
    write(d / "movies.csv", MOVIES)
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n"
          f"1,1,5.0,{DAY1}\n1,11,3.0,{DAY1}\n2,1,4.0,{DAY1}\n2,260,2.0,{DAY1}\n"
          f"2,260,7.0,{DAY1 + 1}\n"  # off the scale
          f"3,1,4.5,{DAY1}\n3,1,4.5,{DAY1}\n"  # the second a duplicate
          f"2,1,2.0,{DAY1 + 5}\n"  # user 2 re-rates movie 1: the latest rating (2.0) counts
          f"1,x,3,{DAY1}\n4,5555,3,{DAY1}\n")  # a non-integer id; a movie not in movies.csv

    def cfg(*extra):
        return load_config(None, ["data.source=movielens_ratings", f"data.input={d}", f"paths.root={tmp_path / 'out'}",
                                  "data.ratings.width=2", *extra])

    check_inputs(cfg())
    m = run_ingest(spark, cfg())
    feats, items, quarantine, m = published(tmp_path / "out")
    # Latest ratings: u1 {1: 5, 11: 3} mean 4; u2 {1: 2, 260: 2} mean 2; u3 {1: 4.5} mean 4.5.
    # Columns: the 2 users with most rated movies (u1, u2; u3 has one).
    assert m["feature_names"] == ["user_1", "user_2"]
    assert feats == {1: [1.0, 0.0], 11: [-1.0, 0.0], 260: [0.0, 0.0]}
    assert counts(m) == (10, 6, 4)
    assert quarantine == sorted([
        (f"2,260,7.0,{DAY1 + 1}", "rating not in 0.5..5.0 in steps of 0.5"), (f"3,1,4.5,{DAY1}", "duplicate event"),
        (f"1,x,3,{DAY1}", "non-integer userId or movieId"), (f"4,5555,3,{DAY1}", "unknown movieId (not in movies.csv)"),
    ])
    assert {r["item_id"]: r["title"] for r in items} == {1: "Toy Story (1995)", 11: "American President, The (1995)",
                                                        260: "Star Wars: Episode IV - A New Hope (1977)"}

    # A late rating (older than any loaded) and a re-sent copy of a loaded one are appended.
    with open(d / "ratings.csv", "a") as fh:
        fh.write(f"5,11,1.0,{DAY1 - 9}\n1,1,5.0,{DAY1}\n")
    run_ingest(spark, cfg())
    feats, _, quarantine, m = published(tmp_path / "out")
    assert counts(m) == (2, 1, 1) and (m["late_events"], m["events_loaded_before"]) == (1, 10)
    assert quarantine == [(f"1,1,5.0,{DAY1}", "duplicate event")]
    # u5's only rating centres to 0; the columns stay u1, u2.
    assert feats == {1: [1.0, 0.0], 11: [-1.0, 0.0], 260: [0.0, 0.0]}

    # Per user, from the same state (nothing read again): movies by raters, 1 (3), 11 (2), 260 (1).
    run_ingest(spark, cfg("data.ratings.entity=user", "data.ratings.width=3"))
    feats, items, quarantine, m = published(tmp_path / "out")
    assert counts(m) == (0, 0, 0)
    assert m["feature_names"] == ["item_1", "item_11", "item_260"]
    assert feats == {1: [1.0, -1.0, 0.0], 2: [0.0, 0.0, 0.0], 3: [0.0, 0.0, 0.0], 5: [0.0, 0.0, 0.0]}
    assert sorted(r["item_id"] for r in items) == [1, 2, 3, 5]


@pytest.mark.slow  # two ingests compared
def test_tags_preset_file_and_source_name_publish_the_same(spark, tmp_path):
    write(tmp_path / "in" / "movies.csv", MOVIES)
    write(tmp_path / "in" / "tags.csv", tags_day1())
    by_name = load_config(None, ["data.source=movielens_tags", f"data.input={tmp_path / 'in'}",
                                 f"paths.root={tmp_path / 'a'}", "data.logs.min_support=2"])
    by_preset = load_config(None, [f"data.input={tmp_path / 'in'}", f"paths.root={tmp_path / 'b'}",
                                   "data.events.min_support=2"], preset="movielens_tags")
    assert by_preset.data.source == "events"
    got = []
    for cfg, root in ((by_name, tmp_path / "a"), (by_preset, tmp_path / "b")):
        run_ingest(spark, cfg)
        feats, items, quarantine, m = published(root)
        got.append((feats, sorted(r["item_id"] for r in items), quarantine, m["feature_names"], counts(m)))
    assert got[0] == got[1]
    assert got[0][0] == {260: [1.0, 0.0], 4973: [0.0, 1.0]} and got[0][3] == ["sci-fi", "amélie"]
    assert got[0][4] == (13, 5, 8)


def test_events_keys_under_a_movielens_source_name_are_refused_not_dropped(tmp_path, capsys):
    # data.source=movielens_tags runs the preset with data.logs.* mapped: a data.events.* key was dropped
    # without a word (top_k=3 built 1,128 columns). One config line, exit 2, before Spark.

    from jobs import ingest as ingest_job
    from jobs.common import guarded
    from pipelines.config import ConfigError
    from pipelines.sources.events import settings

    write(tmp_path / "in" / "tags.csv", tags_day1())
    over = ["data.source=movielens_tags", f"data.input={tmp_path / 'in'}", f"paths.root={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"^data.events.top_k: not read with data.source=movielens_tags, which takes data.logs"):
        settings(load_config(None, [*over, "data.events.top_k=3"]))
    assert settings(load_config(None, [*over, "data.logs.vocab_size=3"]))[0].top_k == 3
    assert settings(load_config(None, over, preset="movielens_tags"))[0].top_k == 1128  # the preset's own: fine
    argv = [*over, "data.events.top_k=3"]
    assert guarded(lambda: ingest_job.main(argv), argv) == 2
    assert capsys.readouterr().err.startswith("config error: data.events.top_k: not read")
    assert not (tmp_path / "out").exists()


def test_logs_keys_under_the_events_presets_are_refused_not_dropped(tmp_path):
    # --preset movielens_tags is data.source=events: data.logs.vocab_size=3 was never read (1,128 columns).

    from pipelines.config import ConfigError
    from pipelines.sources.events import settings

    over = [f"data.input={tmp_path / 'in'}", f"paths.root={tmp_path / 'out'}"]
    with pytest.raises(ConfigError, match=r"^data.logs.vocab_size: not read with data.source=events .*data.events.top_k"):
        settings(load_config(None, [*over, "data.logs.vocab_size=3"], preset="movielens_tags"))
    with pytest.raises(ConfigError, match=r"^data.ratings.entity: .*data.events.entity_column and token_column"):
        settings(load_config(None, [*over, "data.ratings.entity=user"], preset="movielens_ratings"))
    assert settings(load_config(None, [*over, "data.events.top_k=3"], preset="movielens_tags"))[0].top_k == 3
