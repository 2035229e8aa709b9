"""Integration tests: the real ingest job on small files in every accepted format, broken inputs,
atomic publishing, and one run through spark-submit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipelines.ingest as ingest
from pipelines.config import load_config
from pipelines.publish import table_path
from pipelines.sources import InputError
from pipelines.sources import tag_genome as tg

REPO = Path(__file__).resolve().parent.parent

TAGS = [(1, "007"), (2, "action"), (3, "zombies, lots of")]
# movie 1, 2 complete; movie 3 stops after tag 2 (real exports end like that)
GOOD = [(1, 1, "0.025"), (1, 2, "0.5"), (1, 3, "1"), (2, 1, "0"), (2, 2, "0.1"), (2, 3, "0.33"),
        (3, 1, "0.2"), (3, 2, "0.4")]
MOVIES = [(1, "Toy Story (1995)", "Adventure|Animation"), (2, 'The "Best" Movie, Part 2 (2001)', "Drama"),
          (3, "Nothing (2020)", "(no genres listed)")]


def _field(v, quoted: bool) -> str:
    s = str(v)
    if quoted or "," in s or '"' in s:
        return '"' + s.replace('"', '""') + '"'
    return s


def write_genome(d: Path, *, dash=True, quoted=False, movie_file="movies.csv", scores=GOOD, extra_lines=()):
    d.mkdir(parents=True, exist_ok=True)
    sep = "-" if dash else "_"

    def write(name, header, rows):
        body = "\n".join(",".join(_field(v, quoted) for v in r) for r in rows)
        (d / name).write_text(header + "\n" + body + "\n")

    write(f"genome{sep}scores.csv", "movieId,tagId,relevance", scores)
    with open(d / f"genome{sep}scores.csv", "a") as fh:
        fh.writelines(line + "\n" for line in extra_lines)
    write(f"genome{sep}tags.csv", "tagId,tag", TAGS)
    write(movie_file, "movieId,title,genres", MOVIES)
    return d


def cfg_for(input_dir, root, source="tag_genome", *more):
    return load_config(None, [f"data.source={source}", f"data.input={input_dir}", f"paths.root={root}", *more])


def ingest_ok(spark, cfg):
    ingest.check_inputs(cfg)
    return ingest.run_ingest(spark, cfg)


@pytest.mark.parametrize(
    "dash,quoted,movie_file",
    # make test-fast keeps one format; the other two are ingests of the same kind.
    [pytest.param(True, False, "movies.csv", marks=pytest.mark.slow), (False, True, "movies.csv"),
     pytest.param(True, True, "movie.csv", marks=pytest.mark.slow)],
    ids=["dash-unquoted", "underscore-quoted", "movie.csv"],
)
def test_tag_genome_formats_give_the_same_tables(spark, tmp_path, dash, quoted, movie_file):
    src = write_genome(tmp_path / "in", dash=dash, quoted=quoted, movie_file=movie_file)
    m = ingest_ok(spark, cfg_for(src, tmp_path / "out"))
    root = str(tmp_path / "out")
    features = spark.read.parquet(table_path(root, "features"))
    assert dict(features.dtypes) == {"item_id": "bigint", "features": "array<float>"}
    got = {r["item_id"]: r["features"] for r in features.collect()}
    assert got == {1: pytest.approx([0.025, 0.5, 1.0]), 2: pytest.approx([0.0, 0.1, 0.33])}
    items = {r["item_id"]: (r["title"], r["genres"]) for r in spark.read.parquet(table_path(root, "items")).collect()}
    assert items == {1: ("Toy Story (1995)", ["Adventure", "Animation"]),
                     2: ('The "Best" Movie, Part 2 (2001)', ["Drama"])}
    q = spark.read.parquet(table_path(root, "quarantine"))
    assert dict(q.dtypes) == {"source_file": "string", "raw": "string", "reason": "string"}
    assert sorted((r["raw"], r["reason"]) for r in q.collect()) == [("3,1,0.2", tg.INCOMPLETE), ("3,2,0.4", tg.INCOMPLETE)]
    # the incomplete last movie is quarantined, never zero-filled; 8 lines = 6 used + 2 quarantined
    assert (m["rows_in"], m["rows_used"], m["items_out"], m["rows_quarantined"], m["dim"]) == (8, 6, 2, 2, 3)
    on_disk = json.loads(Path(table_path(root, "features"), "_manifest.json").read_text())
    assert on_disk == m
    assert m["feature_names"] == ["007", "action", "zombies, lots of"]
    assert m["stats"]["max"] == pytest.approx([0.025, 0.5, 1.0]) and len(m["stats"]["mean"]) == 3
    assert m["config_hash"] and m["created"] and len(m["input_files"]) == 3


def test_broken_lines_all_reach_quarantine_and_counts_reconcile(spark, tmp_path):
    extra = ["garbage", "1,2", "4,1,abc", "4,2,1.5", "4,3,0.1", "x,1,0.1", "2,99,0.5", "2,3,0.34", "1,2,3,4"]
    src = write_genome(tmp_path / "in", extra_lines=extra)
    m = ingest_ok(spark, cfg_for(src, tmp_path / "out"))
    q = spark.read.parquet(table_path(str(tmp_path / "out"), "quarantine"))
    reasons = {}
    for r in q.collect():
        reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    lines_in_file = len(GOOD) + len(extra)
    assert m["rows_in"] == lines_in_file == m["rows_used"] + m["rows_quarantined"] == 3 * m["items_out"] + q.count()
    # movie 2 now has tag 3 twice -> its 4 lines leave; only movie 1 remains
    assert m["items_out"] == 1
    assert reasons == {
        tg.MALFORMED: 3,  # garbage, "1,2", "1,2,3,4"
        tg.NON_NUMERIC: 1, tg.OUT_OF_RANGE: 1, tg.BAD_ID: 1, tg.UNKNOWN_TAG: 1,
        tg.DUPLICATE: 2, tg.INCOMPLETE: 2 + 2 + 1,  # movie 2 (tags 1, 2), movie 3, movie 4's good line
    }
    assert {r["source_file"] for r in q.collect()} == {str(src / "genome-scores.csv")}


@pytest.mark.parametrize(
    "breakage,message",
    [
        (lambda d: (d / "genome-tags.csv").unlink(), r"no genome-tags.csv or genome_tags.csv found"),
        (lambda d: (d / "genome-scores.csv").write_text("movieId;tagId;relevance\n1;1;0.5\n"),
         r"genome-scores.csv: header is 'movieId;tagId;relevance', expected 'movieId,tagId,relevance'"),
        (lambda d: (d / "movies.csv").write_text(""), r"movies.csv: file is empty"),
        (lambda d: (d / "genome-scores.csv").write_text("movieId,tagId,relevance\n"), r"genome-scores.csv: no data lines"),
    ],
    ids=["missing-file", "wrong-header", "empty-file", "header-only"],
)
def test_bad_inputs_fail_before_any_output_is_touched(tmp_path, breakage, message):
    src = write_genome(tmp_path / "in")
    breakage(src)
    with pytest.raises(InputError, match=message):
        ingest.check_inputs(cfg_for(src, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three ingests in sequence (test_publish.py checks the same transaction without Spark jobs)
def test_a_failed_run_leaves_the_previous_outputs_and_a_rerun_replaces(spark, tmp_path, monkeypatch):
    src = write_genome(tmp_path / "in")
    cfg = cfg_for(src, tmp_path / "out")
    root = str(tmp_path / "out")
    ingest_ok(spark, cfg)
    before = sorted(spark.read.parquet(table_path(root, "features")).collect())

    def fail(*args, **kwargs):
        raise RuntimeError("killed mid-way")

    # the new tables are written, then the job dies before the swap
    monkeypatch.setattr(ingest, "build_manifest", fail)
    write_genome(src, scores=GOOD + [(3, 3, "0.9")])
    with pytest.raises(RuntimeError, match="killed mid-way"):
        ingest.run_ingest(spark, cfg)
    assert sorted(spark.read.parquet(table_path(root, "features")).collect()) == before
    assert spark.read.parquet(table_path(root, "quarantine")).count() == 2
    monkeypatch.undo()
    m = ingest_ok(spark, cfg)  # re-run: replaces, never appends
    assert spark.read.parquet(table_path(root, "features")).count() == m["items_out"] == 3
    assert spark.read.parquet(table_path(root, "quarantine")).count() == 0


def test_mnist_shipped_test_set(spark, tmp_path):
    m = ingest_ok(spark, cfg_for(REPO / "data" / "mnist", tmp_path / "out", "mnist", "data.limit=500"))
    assert (m["rows_in"], m["items_out"], m["rows_quarantined"], m["dim"]) == (500, 500, 0, 784)
    f = spark.read.parquet(table_path(str(tmp_path / "out"), "features"))
    row = f.orderBy("item_id").first()
    assert row["item_id"] == 0 and len(row["features"]) == 784
    assert 0.0 == min(m["stats"]["min"]) and max(m["stats"]["max"]) == 1.0
    labels = spark.read.parquet(table_path(str(tmp_path / "out"), "items")).orderBy("item_id").limit(3).collect()
    assert [(r["label"], r["split"]) for r in labels] == [(7, "test"), (2, "test"), (1, "test")]


def test_synthetic_with_defects_reconciles(spark, tmp_path):
    m = ingest_ok(spark, load_config(None, [
        "data.source=synthetic", "data.synthetic.items=120", "data.synthetic.tags=8", "data.synthetic.defect_rate=0.2",
        f"paths.root={tmp_path}",
    ]))
    assert 0 < m["items_out"] < 120 and m["rows_quarantined"] > 0
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"] == 8 * m["items_out"] + m["rows_quarantined"]
    items = spark.read.parquet(table_path(str(tmp_path), "items"))
    assert {"title", "genres", "primary_genre"} <= set(items.columns) and items.count() == m["items_out"]


def _env():
    return {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "ingest", "data.source=tag_genome", f"data.input={tmp_path}/nope",
         f"paths.root={tmp_path}/out"],
        cwd=REPO, env=_env(), check=False, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("input error: ")
    assert "nope: input directory does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_spark_submit_runs_the_job(tmp_path):
    import pyspark

    src = write_genome(tmp_path / "in", dash=False, quoted=True)
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    proc = subprocess.run(
        [str(submit), "--master", "local[1]", "--driver-memory", "1g", "jobs/ingest.py",
         "data.source=tag_genome", f"data.input={src}", f"paths.root={tmp_path}/out", "spark.shuffle_partitions=2"],
        cwd=REPO, env=_env(), check=False, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary == {"rows_in": 8, "items_out": 2, "rows_quarantined": 2, "dim": 3}
    assert (tmp_path / "out" / "features" / "_manifest.json").exists()
