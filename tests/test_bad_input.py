"""Issue 16's input kinds as contracts, one test per kind and source: damaged or doubled input files
(1), RFC 4180 CSV fields (2) and late events in incremental logs (8). Each asserts the value the user
gets, not only that nothing crashed. The cases in ../shared/cases/ are one example of each kind."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import pipelines.ingest as ingest
from jobs import ingest as ingest_job
from pipelines.config import load_config
from pipelines.sources import InputError, mnist
from pipelines.sources import tag_genome as tg
from pipelines.sources.csvfiles import pick_one

REPO = Path(__file__).resolve().parent.parent
HTML = b"<!DOCTYPE html><html><body>429 Too Many Requests</body></html>\n"


def cfg_for(input_dir, root, source, *more):
    return load_config(None, [f"data.source={source}", f"data.input={input_dir}", f"paths.root={root}", *more])


def table(root: Path, name: str) -> list[dict]:
    return pq.read_table(str((root / name).resolve())).to_pylist()


def idx_files(d: Path, n: int = 3, prefix: str = "t10k", gz: bool = True) -> None:
    """A tiny MNIST split: n images of 28x28 (image i filled with i) and labels 0..n-1."""
    d.mkdir(parents=True, exist_ok=True)
    images = (0x803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
    images += np.repeat(np.arange(n, dtype=np.uint8), 784).tobytes()
    labels = (0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + bytes(range(n))
    for name, data in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        (d / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)


def genome_dir(d: Path, movies: str, scores: str = "movieId,tagId,relevance\n1,1,0.1\n1,2,0.2\n2,1,0.3\n2,2,0.4\n",
               tags: str = 'tagId,tag\n1,funny\n2,"twist, ending"\n') -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "genome-scores.csv").write_text(scores, encoding="utf-8")
    (d / "genome-tags.csv").write_text(tags, encoding="utf-8")
    (d / "movies.csv").write_text(movies, encoding="utf-8")
    return d


# ---------------------------------------------------------------- kind 1: damaged or doubled files


def test_mnist_gz_that_is_not_gzip_is_one_line_exit_2_naming_it(tmp_path, capsys):
    # The mnist-not-gzip case: an HTML error page saved under the images .gz name.
    idx_files(tmp_path / "in")
    bad = tmp_path / "in" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(HTML)
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte.gz: cannot be read .*not gzip"):
        ingest.check_inputs(cfg_for(tmp_path / "in", tmp_path / "out", "mnist"))
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte.gz"):
        mnist.load(str(tmp_path / "in"))  # the reader alone says the same
    code = ingest_job.main(["--config", str(REPO / "conf/local.yaml"), "data.source=mnist",
                            f"data.input={tmp_path / 'in'}", f"paths.root={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("input error: ") and str(bad) in err[0]
    assert not (tmp_path / "out" / "features").exists()


def test_mnist_gz_beside_its_extracted_copy_publishes_each_image_once(spark, tmp_path, caplog):
    # The mnist-gz-and-extracted case: `gunzip -k` leaves x and x.gz side by side.
    idx_files(tmp_path / "in", n=3, gz=True)
    idx_files(tmp_path / "in", n=3, gz=False)
    cfg = cfg_for(tmp_path / "in", tmp_path / "out", "mnist")
    ingest.check_inputs(cfg)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        m = ingest.run_ingest(spark, cfg)
    assert (m["rows_in"], m["items_out"], m["rows_quarantined"]) == (3, 3, 0)
    assert len(m["input_files"]) == 2 and "same data" in caplog.text
    assert sorted(r["label"] for r in table(tmp_path / "out", "items")) == [0, 1, 2]
    # The same images again under another split name (test- beside t10k-) are read once too.
    idx_files(tmp_path / "in2", n=3, prefix="t10k")
    idx_files(tmp_path / "in2", n=3, prefix="test")
    splits, _ = mnist.load(str(tmp_path / "in2"))
    assert [len(s["images"]) for s in splits] == [3]


def test_doubled_files_with_different_contents_are_refused_naming_both(tmp_path):
    idx_files(tmp_path / "in", n=3, gz=True)
    idx_files(tmp_path / "in", n=2, gz=False)
    with pytest.raises(InputError, match=r"t10k-images-idx3-ubyte and .*t10k-images-idx3-ubyte.gz: two files"):
        mnist.pairs(str(tmp_path / "in"))
    d = genome_dir(tmp_path / "g", "movieId,title,genres\n1,A,Drama\n2,B,Drama\n")
    (d / "movie.csv").write_text("movieId,title,genres\n1,A,Drama\n")
    with pytest.raises(InputError, match=r"movies.csv and .*movie.csv: two files for the same input"):
        ingest.check_inputs(cfg_for(d, tmp_path / "out", "tag_genome"))


def test_genome_files_under_two_names_are_read_once(spark, tmp_path, caplog):
    d = genome_dir(tmp_path / "in", "movieId,title,genres\n1,A,Drama\n2,B,Comedy\n")
    shutil.copy(d / "genome-scores.csv", d / "genome_scores.csv")
    (d / "genome-tags.csv.gz").write_bytes(gzip.compress((d / "genome-tags.csv").read_bytes()))
    cfg = cfg_for(d, tmp_path / "out", "tag_genome")
    ingest.check_inputs(cfg)
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        m = ingest.run_ingest(spark, cfg)
    assert (m["rows_in"], m["rows_used"], m["items_out"], m["rows_quarantined"]) == (4, 4, 2, 0)
    assert "also in genome_scores.csv" in caplog.text and "also in genome-tags.csv.gz" in caplog.text


@pytest.mark.parametrize("layout", ["partition", "flat", "genome"])
def test_csv_gz_that_is_not_gzip_or_truncated_is_an_input_error_naming_it(tmp_path, layout):
    good = gzip.compress(b"userId,movieId,tag,timestamp\n" + b"1,1,funny,1445714994\n" * 2000)
    if layout == "genome":
        good = gzip.compress(b"movieId,tagId,relevance\n" + b"1,1,0.5\n" * 5000)
        d = genome_dir(tmp_path / "in", "movieId,title,genres\n1,A,Drama\n")
        (d / "genome-scores.csv").unlink()
        bad, source = d / "genome-scores.csv.gz", "tag_genome"
    else:
        bad = tmp_path / "in" / ("tags/date=2024-01-02/part.csv.gz" if layout == "partition" else "tags.csv.gz")
        bad.parent.mkdir(parents=True)
        source = "movielens_tags"
    for content, why in ((HTML, "not gzip"), (good[: len(good) // 2], "truncated")):
        bad.write_bytes(content)
        with pytest.raises(InputError, match=rf"{bad.name}: cannot be read .*{why}"):
            ingest.check_inputs(cfg_for(tmp_path / "in", tmp_path / "out", source))


def test_flat_tags_beside_partitions_is_refused_and_gz_twins_in_a_partition_read_once(tmp_path):
    from pipelines.sources import events as ev

    day = tmp_path / "in" / "tags" / "date=2024-01-02"
    day.mkdir(parents=True)
    text = b"userId,movieId,tag,timestamp\n1,1,funny,1704153600\n"
    (day / "a.csv").write_bytes(text)
    (day / "a.csv.gz").write_bytes(gzip.compress(text))
    assert ev.find_loads(str(tmp_path / "in"), "tags") == [("date=2024-01-02", [str(day / "a.csv")])]
    (tmp_path / "in" / "tags.csv").write_bytes(text)
    with pytest.raises(InputError, match=r"tags.csv and .*tags/: events both in a flat file and in partitions"):
        ev.find_loads(str(tmp_path / "in"), "tags")


def test_a_file_spark_finds_damaged_is_one_line_naming_it(spark, tmp_path):
    # Paths that cannot be checked before Spark reads them (remote stores) fail inside a Spark job.
    data = gzip.compress(b"a,b\n" + b"1,2\n" * 50000)
    bad = tmp_path / "x.csv.gz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception) as info:
        spark.read.csv(str(bad)).count()
    line = ingest.read_failure(info.value)
    assert line is not None and "x.csv.gz" in line and "EOFException" in line and "\n" not in line
    assert ingest.read_failure(ValueError("not a Spark failure")) is None


def test_pick_one_is_the_first_name_when_contents_match(tmp_path):
    a, b = tmp_path / "x.csv", tmp_path / "x.csv.gz"
    a.write_bytes(b"h\n1\n")
    b.write_bytes(gzip.compress(b"h\n1\n"))
    assert pick_one([a, b]) == a
    assert pick_one([a]) == a


# ---------------------------------------------------------------- kind 2: RFC 4180 fields


CASES = Path("/work/shared/cases")


def test_quoted_title_with_a_line_break_is_read_whole(spark, tmp_path):
    # The movies-title-newline case (copied here when the shared folder exists; else the same bytes).
    src = CASES / "movies-title-newline" / "in"
    if src.is_dir():
        shutil.copytree(src, tmp_path / "in")
        d = tmp_path / "in"
    else:
        d = genome_dir(
            tmp_path / "in",
            'movieId,title,genres\n1,"""Great Performances"" Cats (1998)",Musical\n'
            '2,"Beta, The\n(Second Part) (1996)",Drama|Horror\n3,Gamma (1997),Comedy\n',
            scores="movieId,tagId,relevance\n" + "".join(f"{m},{t},0.{m * 3 + t - 3}\n" for m in (1, 2, 3) for t in (1, 2, 3)),
            tags='tagId,tag\n1,funny\n2,dark\n3,"twist, ending"\n',
        )
    cfg = cfg_for(d, tmp_path / "out", "tag_genome")
    ingest.check_inputs(cfg)
    m = ingest.run_ingest(spark, cfg)
    items = {r["item_id"]: (r["title"], r["genres"]) for r in table(tmp_path / "out", "items")}
    assert items == {
        1: ('"Great Performances" Cats (1998)', ["Musical"]),
        2: ("Beta, The\n(Second Part) (1996)", ["Drama", "Horror"]),
        3: ("Gamma (1997)", ["Comedy"]),
    }
    assert m["feature_names"] == ["funny", "dark", "twist, ending"]
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"], m["items_without_metadata"]) == (9, 9, 0, 0)


def test_movie_without_movies_row_is_published_and_reported_and_bad_rows_quarantined(spark, tmp_path, caplog):
    d = genome_dir(tmp_path / "in", 'movieId,title,genres\n1,A,Drama\n1,A again,Drama\nx,B,Drama\n3,"C",Drama,extra\n')
    cfg = cfg_for(d, tmp_path / "out", "tag_genome")
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        m = ingest.run_ingest(spark, cfg)
    items = {r["item_id"]: r["title"] for r in table(tmp_path / "out", "items")}
    assert items == {1: "A", 2: None}  # movie 2 has scores but no movies.csv row: still published
    assert (m["items_without_metadata"], m["items_without_metadata_sample"]) == (1, [2])
    assert "1 published items have no movies.csv row" in caplog.text
    q = sorted((r["raw"], r["reason"]) for r in table(tmp_path / "out", "quarantine"))
    assert q == sorted([('3,"C",Drama,extra', tg.MOVIES_MALFORMED), ("1,A again,Drama", tg.MOVIES_DUPLICATE),
                        ("x,B,Drama", tg.MOVIES_BAD_ID)])
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"] == 4 + 3


def test_log_tag_with_a_line_break_and_quotes_is_read_whole(spark, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "tags.csv").write_text(
        'userId,movieId,tag,timestamp\r\n1,1,"twist,\r\nending",1445714994\r\n2,1,"twist,\r\nending",1445715000\r\n'
        '3,2,"say ""what""",1445715100\r\n', encoding="utf-8")
    (d / "movies.csv").write_text('movieId,title,genres\n1,"Alpha,\nThe (1995)",Comedy\n2,Beta (1996),Drama\n')
    cfg = cfg_for(d, tmp_path / "out", "movielens_tags", "data.logs.min_support=1")
    ingest.check_inputs(cfg)
    m = ingest.run_ingest(spark, cfg)
    assert sorted(m["feature_names"]) == ['say "what"', "twist, ending"]  # NFKC + whitespace folding
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"]) == (3, 3, 0)
    items = {r["item_id"]: r["title"] for r in table(tmp_path / "out", "items")}
    assert items == {1: "Alpha,\nThe (1995)", 2: "Beta (1996)"}


# ---------------------------------------------------------------- kind 8: late events in incremental logs


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_late_events_appended_to_a_flat_log_are_loaded_once(spark, tmp_path, caplog):
    # The tags-late-events case: three valid events appended with timestamps at or before the newest loaded.
    d = tmp_path / "in"
    d.mkdir()
    (d / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,1,funny,1445714994\n2,1,funny,1445715000\n"
                                "3,2,dark,1445715100\n4,2,dark,1445715200\n")
    (d / "movies.csv").write_text("movieId,title,genres\n1,Alpha (1995),Comedy\n2,Beta (1996),Drama\n")
    cfg = cfg_for(d, tmp_path / "out", "movielens_tags", "data.logs.min_support=1")
    m1 = ingest.run_ingest(spark, cfg)
    assert (m1["rows_in"], m1["rows_used"], m1["late_events"]) == (4, 4, 0)
    with open(d / "tags.csv", "a") as fh:
        fh.write("5,1,funny,1445715000\n6,2,dark,1445715200\n7,1,dark,1445700000\n")
    with caplog.at_level(logging.WARNING, logger="pipelines"):
        m2 = ingest.run_ingest(spark, cfg)
    assert (m2["rows_in"], m2["rows_used"], m2["rows_quarantined"]) == (3, 3, 0)
    assert (m2["late_events"], m2["events_loaded_before"]) == (3, 4) and "3 late events" in caplog.text
    assert m2["feature_names"] == ["dark", "funny"]  # dark 4 applications, funny 3
    got = {r["item_id"]: r["features"] for r in table(tmp_path / "out", "features")}
    assert got == {1: [pytest.approx(1 / 3), 1.0], 2: [1.0, 0.0]}  # movie 1 gained "dark"
    # Re-loading the same file changes nothing, bad lines included.
    with open(d / "tags.csv", "a") as fh:
        fh.write("8,1,funny\n")
    m3 = ingest.run_ingest(spark, cfg)
    assert (m3["rows_in"], m3["rows_quarantined"]) == (1, 1)
    m4 = ingest.run_ingest(spark, cfg)
    assert (m4["rows_in"], m4["rows_used"], m4["rows_quarantined"], m4["events_loaded_before"]) == (0, 0, 0, 8)
    assert {r["item_id"]: r["features"] for r in table(tmp_path / "out", "features")} == got


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_late_ratings_and_a_late_file_in_a_loaded_partition_are_loaded(spark, tmp_path):
    d = tmp_path / "in"
    day = d / "ratings" / "date=2024-01-02"
    day.mkdir(parents=True)
    (day / "a.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n1,2,2.0,200\n2,1,3.0,300\n")
    cfg = cfg_for(d, tmp_path / "out", "movielens_ratings", "data.ratings.width=2")
    m1 = ingest.run_ingest(spark, cfg)
    assert (m1["rows_in"], m1["rows_used"]) == (3, 3)
    # A late file lands in the day already loaded: an old rating re-exported and one new late rating.
    (day / "b.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,100\n2,2,5.0,150\n")
    m2 = ingest.run_ingest(spark, cfg)
    # The re-exported copy is read beside a.csv's: a duplicate event, quarantined and counted, not used twice.
    assert (m2["rows_in"], m2["rows_used"], m2["late_events"], m2["events_loaded_before"]) == (2, 1, 1, 3)
    assert [r["reason"] for r in table(tmp_path / "out", "quarantine")] == ["duplicate event"]
    assert m2["loads"] == ["date=2024-01-02"]
    # user 2 now rated both movies: mean 4, so movie 2's column for user 2 is +1.
    got = {r["item_id"]: r["features"] for r in table(tmp_path / "out", "features")}
    assert got[2] == [pytest.approx(-1.0), pytest.approx(1.0)]
    m3 = ingest.run_ingest(spark, cfg)
    assert (m3["rows_in"], m3["loads"]) == (0, [])
