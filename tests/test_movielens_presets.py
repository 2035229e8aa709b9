"""Temporary: the old logs.py path and the events presets publish the same tables on tiny inputs."""
from __future__ import annotations

import json

import pyarrow.parquet as pq

from pipelines.config import load_config
from pipelines.ingest import run_ingest
from pipelines.sources import events, logs, register
from tests.test_logs_sources import DAY1, MOVIES, tags_day1, tags_day2, write


def tables(root):
    def t(name):
        return pq.read_table(str((root / name).resolve())).to_pylist()
    feats = sorted((r["item_id"], [round(x, 5) for x in r["features"]]) for r in t("features"))
    items = sorted((tuple(sorted((k, str(v)) for k, v in r.items()))) for r in t("items"))
    quarantine = sorted((r["source_file"], r["raw"], r["reason"]) for r in t("quarantine"))
    m = json.loads((root / "features" / "_manifest.json").read_text())
    return feats, items, quarantine, m["feature_names"], (m["rows_in"], m["rows_used"], m["rows_quarantined"]), m.get("late_events"), m.get("events_loaded_before")


def both(spark, tmp_path, source, steps, extra=()):
    out = {}
    for name, (check, read) in {"old": (logs.check_tags if source == "movielens_tags" else logs.check_ratings,
                                        logs.tags_result if source == "movielens_tags" else logs.ratings_result),
                                "new": (events.check, events.read)}.items():
        register(source, check, read)
        base = tmp_path / name
        res = []
        for i, (step, more) in enumerate(steps):
            step(base / "in")
            cfg = load_config(None, [f"data.source={source}", f"data.input={base / 'in'}", f"paths.root={base / 'out'}", *extra, *more])
            check(cfg)
            run_ingest(spark, cfg)
            res.append(tables(base / "out"))
        out[name] = res
    register(source, events.check, events.read)
    return out


def test_tags_old_and_new_publish_the_same(spark, tmp_path):
    def day1(d):
        write(d / "movies.csv", MOVIES)
        write(d / "tags" / "date=2024-01-02" / "part-0.csv", tags_day1())

    def day2(d):
        write(d / "tags" / "date=2024-01-03" / "part-0.csv", tags_day2())

    out = both(spark, tmp_path, "movielens_tags", [(day1, ()), (day2, ()), (lambda d: None, ())], ["data.logs.min_support=2"])
    for a, b in zip(out["old"], out["new"], strict=True):
        assert a[0] == b[0] and a[1] == b[1] and a[3:] == b[3:]
        assert [q[1:] for q in a[2]] == [q[1:] for q in b[2]]


def test_ratings_old_and_new_publish_the_same(spark, tmp_path):
    def flat(d):
        write(d / "movies.csv", MOVIES)
        write(d / "ratings.csv", "userId,movieId,rating,timestamp\n"
              f"1,1,5.0,{DAY1}\n1,11,3.0,{DAY1}\n2,1,4.0,{DAY1}\n2,260,2.0,{DAY1}\n2,260,7.0,{DAY1 + 1}\n"
              f"3,1,4.5,{DAY1}\n3,1,4.5,{DAY1}\n2,1,2.0,{DAY1 + 5}\n1,x,3,{DAY1}\n4,5555,3,{DAY1}\n")

    def more(d):
        with open(d / "ratings.csv", "a") as fh:
            fh.write(f"5,11,1.0,{DAY1 - 9}\n1,1,5.0,{DAY1}\n")

    out = both(spark, tmp_path, "movielens_ratings", [
        (flat, ()), (more, ()), (lambda d: None, ("data.ratings.entity=user", "data.ratings.columns=hash", "data.ratings.width=8")),
        (lambda d: None, ("data.ratings.entity=user", "data.ratings.width=3"))],
        ["data.ratings.width=2"])
    for a, b in zip(out["old"], out["new"], strict=True):
        assert a[0] == b[0] and a[1] == b[1] and a[3:] == b[3:]
        assert [q[1:] for q in a[2]] == [q[1:] for q in b[2]]
