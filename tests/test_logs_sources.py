"""The MovieLens tags and ratings logs (data.source=movielens_tags / movielens_ratings: presets of the
events source) on generated files in the exact MovieLens formats, including incremental loads over
two days."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from pipelines.config import load_config
from pipelines.ingest import run_ingest
from pipelines.sources import InputError
from pipelines.sources import events as ev
from pipelines.sources.shaping import long_vectors

DAY1 = 1704153600  # 2024-01-02T00:00:00Z
DAY2 = DAY1 + 86400

# The logs sources' quarantine reasons, word for word: the presets keep them.
MALFORMED = "malformed line (wrong number of fields)"
BAD_ID = "non-integer userId or movieId"
BAD_TIMESTAMP = "unparseable timestamp"
BAD_RATING = "rating not in 0.5..5.0 in steps of 0.5"
UNKNOWN_MOVIE = "unknown movieId (not in movies.csv)"
DUPLICATE = "duplicate event"
NO_VOCAB = "movie has no tag in the vocabulary"

MOVIES = (
    "movieId,title,genres\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\n'
    "4973,\"Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)\",Comedy|Romance\n"
    "260,Star Wars: Episode IV - A New Hope (1977),Action|Adventure|Sci-Fi\n"
    "99,Obscure (2000),(no genres listed)\n"
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tags_day1() -> str:
    return (
        "userId,movieId,tag,timestamp\n"
        f"1,260,sci-fi,{DAY1 + 10}\n"
        f"2,260,  SCI-FI ,{DAY1 + 20}\n"  # same tag after normalisation
        f"3,260,ＳＣＩ－ＦＩ,{DAY1 + 25}\n"  # full-width: NFKC makes it sci-fi
        f"1,4973,Amélie,{DAY1 + 30}\n"
        f"2,4973,Ame\u0301lie,{DAY1 + 40}\n"  # decomposed accent: NFKC composes it
        f'4,11,"politics, US",{DAY1 + 50}\n'  # quoted tag with a comma
        f"4,11,romance,{DAY1 + 60}\n"
        f"5,99,oneoff,{DAY1 + 70}\n"  # below min_support: movie 99 has no vocabulary tag
        f"1,260,sci-fi,{DAY1 + 10}\n"  # duplicate event
        "6,1,toys\n"  # wrong column count
        "7,1,toys,yesterday\n"  # unparseable timestamp
        f"x,1,toys,{DAY1}\n"  # bad user id
        f"8,5555,toys,{DAY1}\n"  # unknown movie
    )


def tags_day2() -> str:
    return (
        "userId,movieId,tag,timestamp\n"
        f"9,260,Sci-Fi,{DAY2 + 5}\n"
        f"9,11,romance,{DAY2 + 6}\n"
        f"9,1,Pixar,{DAY2 + 7}\n"
        f"10,1,pixar,{DAY2 + 8}\n"
        f"10,1,toys,{DAY2 + 9}\n"
        "broken line with no commas\n"
    )


def cfg_for(tmp_path: Path, source: str = "movielens_tags", *extra: str):
    return load_config(
        None,
        [
            f"data.source={source}",
            f"data.input={tmp_path / 'in'}",
            f"paths.root={tmp_path / 'out'}",
            "data.logs.min_support=2",
            *extra,
        ],
    )


def table(root: Path, name: str) -> list[dict]:
    """A published table's rows, read with pyarrow (cheaper than a Spark job per check)."""
    return pq.read_table(str((root / name).resolve())).to_pylist()


def read_tables(spark, root: Path):
    feats = {r["item_id"]: list(r["features"]) for r in table(root, "features")}
    manifest = json.loads((root / "features" / "_manifest.json").read_text())
    quarantine = sorted((r["reason"], r["raw"]) for r in table(root, "quarantine"))
    return feats, manifest, quarantine


def test_normalise_tag_case_whitespace_and_nfkc(spark):
    df = spark.createDataFrame([("  SCI-FI ",), ("ＳＣＩ－ＦＩ",), ("Ame\u0301lie",), ("a\u00a0 b\tc",), (None,)], "t string")
    got = [r[0] for r in df.select(ev.normalise_token("t")).collect()]
    assert got == ["sci-fi", "sci-fi", "amélie", "a b c", None]


def test_ratings_reasons_scale_and_duplicates(spark, tmp_path):
    ec = ev.settings(cfg_for(tmp_path, "movielens_ratings"))[0]
    lines = spark.createDataFrame(
        [
            ("1", "1", "4.5", str(DAY1), None),
            ("1", "2", "5.5", str(DAY1), None),  # above the scale
            ("1", "3", "0.0", str(DAY1), None),  # below
            ("1", "4", "3.25", str(DAY1), None),  # not a half step
            ("1", "5", "abc", str(DAY1), None),
            ("1", "6", "4", "2024-01-02 10:00:00", None),  # ISO timestamps are accepted
            ("1", "7", "4", "soon", None),
            ("1", "1", "4.5", str(DAY1), None),  # duplicate event
        ],
        "userId string, movieId string, rating string, timestamp string, _corrupt_record string",
    ).withColumn("_file", F.lit("r.csv")).withColumn("_load", F.lit("d"))
    got = sorted(((r["raw"], r["reason"]) for r in ev.parse(lines, ec).collect()), key=str)
    assert got == sorted(
        [
            ("1,1,4.5,1704153600", None),
            ("1,1,4.5,1704153600", DUPLICATE),
            ("1,2,5.5,1704153600", BAD_RATING),
            ("1,3,0.0,1704153600", BAD_RATING),
            ("1,4,3.25,1704153600", BAD_RATING),
            ("1,5,abc,1704153600", BAD_RATING),
            ("1,6,4,2024-01-02 10:00:00", None),
            ("1,7,4,soon", BAD_TIMESTAMP),
        ],
        key=str,
    )


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_tags_two_days_incremental_then_reload_changes_nothing(spark, tmp_path):
    write(tmp_path / "in" / "movies.csv", MOVIES)
    write(tmp_path / "in" / "tags" / "date=2024-01-02" / "part-0.csv", tags_day1())
    cfg = cfg_for(tmp_path)
    root = tmp_path / "out"

    m1 = run_ingest(spark, cfg)
    feats, manifest, quarantine = read_tables(spark, root)
    # sci-fi 3 applications, amélie 2: the vocabulary (min_support 2) in count-desc order.
    assert manifest["feature_names"] == ["sci-fi", "amélie"]
    assert feats == {260: [1.0, 0.0], 4973: [0.0, 1.0]}
    # 13 records: 5 used, 8 quarantined (6 bad lines, 2 valid ones of movies without a vocabulary tag).
    assert (m1["rows_in"], m1["rows_used"], m1["rows_quarantined"]) == (13, 5, 8)
    assert m1["items_without_vocab_tags"] == 2 and m1["items_without_vocab_tags_sample"] == [11, 99]
    reasons = [r for r, _ in quarantine]
    assert reasons.count(NO_VOCAB) == 3 and reasons.count(DUPLICATE) == 1
    assert {MALFORMED, BAD_TIMESTAMP, BAD_ID, UNKNOWN_MOVIE} <= set(reasons)
    assert m1["loads"] == ["date=2024-01-02"]
    items = {r["item_id"]: (r["title"], list(r["genres"])) for r in table(root, "items")}
    assert items[4973][0].startswith("Amélie (Fabuleux destin")
    assert set(items) == {260, 4973}

    # Day 2 arrives: counts add up with day 1's (from the state), and romance/pixar join the vocabulary.
    write(tmp_path / "in" / "tags" / "date=2024-01-03" / "part-0.csv", tags_day2())
    m2 = run_ingest(spark, cfg)
    feats2, manifest2, quarantine2 = read_tables(spark, root)
    assert manifest2["feature_names"] == ["sci-fi", "amélie", "pixar", "romance"]
    assert (m2["rows_in"], m2["rows_used"], m2["rows_quarantined"]) == (6, 5, 1)
    assert m2["loads"] == ["date=2024-01-03"]
    assert feats2[260] == [1.0, 0.0, 0.0, 0.0]  # sci-fi 4 times now
    assert feats2[11] == [0.0, 0.0, 0.0, 1.0]  # romance 2 (one per day); "politics, us" once
    assert feats2[1] == [0.0, 0.0, 1.0, 0.0]  # pixar 2, toys 1 (below support)
    assert quarantine2 == [(MALFORMED, "broken line with no commas")]
    state = {(r["item_id"], r["token"]): r["n"] for r in table(root, "state") if r["kind"] == "pair"}
    assert state[(260, "sci-fi")] == 4 and state[(11, "politics, us")] == 1

    # Loading day 2 again changes nothing: both partitions are recorded in the state.
    m3 = run_ingest(spark, cfg)
    feats3, manifest3, _ = read_tables(spark, root)
    assert feats3 == feats2 and manifest3["feature_names"] == manifest2["feature_names"]
    assert (m3["rows_in"], m3["loads"]) == (0, [])


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_tags_flat_file_with_since_reads_new_events_and_weightings(spark, tmp_path):
    day1 = tags_day1()
    write(tmp_path / "in" / "tags.csv", day1)  # no movies.csv: ids are not checked, items have no titles
    cfg = cfg_for(tmp_path, "movielens_tags", "data.logs.weighting=counts")
    m1 = run_ingest(spark, cfg)
    # Without movies.csv, movie 5555 is not unknown; its one "toys" is below support, so still quarantined.
    assert m1["rows_in"] == 13 and m1["rows_quarantined"] == 8
    feats, manifest, _ = read_tables(spark, tmp_path / "out")
    assert feats[260] == [3.0, 0.0]
    # The file grows by a day; data.since and the events' identities read only the new lines.
    write(tmp_path / "in" / "tags.csv", day1 + "".join(tags_day2().splitlines(True)[1:5]))
    cfg2 = cfg_for(tmp_path, "movielens_tags", "data.logs.weighting=counts", "data.since=2024-01-03")
    m2 = run_ingest(spark, cfg2)
    # 4 new lines, plus the 2 lines without a usable timestamp, which data.since cannot place: quarantined
    # again (this load key, tags.csv@2024-01-03, has not seen them).
    assert (m2["rows_in"], m2["rows_quarantined"]) == (6, 2)
    feats, manifest, _ = read_tables(spark, tmp_path / "out")
    assert manifest["feature_names"] == ["sci-fi", "amélie", "pixar", "romance"]
    assert feats[260] == [4.0, 0.0, 0.0, 0.0] and feats[1] == [0.0, 0.0, 2.0, 0.0]
    m3 = run_ingest(spark, cfg2)
    assert (m3["rows_in"], m3["rows_used"]) == (0, 0)  # the same file again: nothing new, nothing re-quarantined
    assert read_tables(spark, tmp_path / "out")[0] == feats


def test_tfidf_and_relevance_weightings(spark, tmp_path):
    counts = spark.createDataFrame(
        [(1, "a", 2, 0), (1, "b", 1, 0), (2, "a", 1, 0), (3, "zz", 5, 0)], "item_id long, token string, n long, ts long"
    ).selectExpr("item_id", "cast(item_id as string) as source_id", "token", "cast(n as double) as w", "n", "ts")
    vocab = ev.vocabulary(counts, 2, 2)
    assert vocab == [("zz", 5, 1), ("a", 3, 2)]  # "b" (1 application) is below support

    def vectors(weighting: str) -> dict[int, list[float]]:
        ec = ev.settings(cfg_for(tmp_path, "movielens_tags", f"data.logs.weighting={weighting}"))[0]
        rows = ev.weighted(counts, vocab, ec).withColumn("reason", F.lit(None).cast("string"))
        vecs = long_vectors(rows.withColumn("meta", F.struct("source_id")), [t for t, _, _ in vocab], fill=True)
        return {r["item_id"]: r["vec"] for r in vecs.collect()}

    assert vectors("relevance") == {1: [0.0, 1.0], 2: [0.0, 1.0], 3: [1.0, 0.0]}
    tfidf = vectors("tfidf")
    idf_a, idf_zz = math.log(4 / 3) + 1, math.log(4 / 2) + 1  # 3 movies; a in 2, zz in 1
    assert tfidf[1] == pytest.approx([0.0, idf_a]) and tfidf[3] == pytest.approx([idf_zz, 0.0])


RATINGS = (
    "userId,movieId,rating,timestamp\n"
    f"1,1,5.0,{DAY1}\n"
    f"1,11,3.0,{DAY1}\n"  # user 1 mean 4.0
    f"2,1,4.0,{DAY1}\n"
    f"2,260,2.0,{DAY1}\n"  # user 2 mean 3.0
    f"2,260,7.0,{DAY1 + 1}\n"  # out of scale
    f"3,1,4.5,{DAY1}\n"  # user 3 has one rating: centred to 0
    f"3,1,4.5,{DAY1}\n"  # duplicate
)


def ingest_ratings(spark, tmp_path: Path) -> None:
    """The first ratings ingest of ``RATINGS`` (movies as entities, the 2 most active users as columns)."""
    write(tmp_path / "in" / "movies.csv", MOVIES)
    write(tmp_path / "in" / "ratings.csv", RATINGS)
    m = run_ingest(spark, cfg_for(tmp_path, "movielens_ratings", "data.ratings.width=2"))
    feats, manifest, quarantine = read_tables(spark, tmp_path / "out")
    # Users by ratings count desc, then id: user 1 (2), user 2 (2).
    assert manifest["feature_names"] == ["user_1", "user_2"]
    assert feats == {1: [1.0, 1.0], 11: [-1.0, 0.0], 260: [0.0, -1.0]}
    # user 3's rating has no column (width 2) -> its movie 1 still has a vector: used.
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"]) == (7, 5, 2)
    assert sorted(r for r, _ in quarantine) == sorted([BAD_RATING, DUPLICATE])


def test_ratings_item_vectors_are_mean_centred(spark, tmp_path):
    ingest_ratings(spark, tmp_path)


@pytest.mark.slow  # two ingests in sequence
def test_ratings_user_vectors_come_from_the_state_of_an_earlier_load(spark, tmp_path):
    ingest_ratings(spark, tmp_path)
    m = run_ingest(spark, cfg_for(tmp_path, "movielens_ratings", "data.ratings.entity=user", "data.ratings.columns=hash",
                                  "data.ratings.width=8"))
    feats, manifest, _ = read_tables(spark, tmp_path / "out")
    assert manifest["feature_names"][0] == "item_hash_0" and len(manifest["feature_names"]) == 8
    assert set(feats) == {1, 2, 3} and sorted(feats[1]) [0] == -1.0 and sorted(feats[1])[-1] == 1.0
    assert m["rows_in"] == 0  # everything was loaded by the first run; the state serves the user map


def test_missing_input_and_foreign_state_are_named(spark, tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(InputError, match=r"no tags.csv and no tags/date="):
        ev.check(cfg_for(tmp_path))
    write(tmp_path / "in" / "tags.csv", "userId,movieId,tag\n1,2,x\n")
    with pytest.raises(InputError, match="header"):
        ev.check(cfg_for(tmp_path))
    # A tags state (pairs of movieId/tag) under the root a ratings ingest is pointed at.
    state = spark.createDataFrame([("movielens_tags", "columns", None, "movieId", "tag") + (None,) * 7], ev.STATE)
    state.write.parquet(str(tmp_path / "out" / "state"))
    ratings = ev.settings(cfg_for(tmp_path, "movielens_ratings"))[0]
    with pytest.raises(InputError, match=r"state of source 'movielens_tags', not 'movielens_ratings'"):
        ev.read_state(spark, str(tmp_path / "out"), "movielens_ratings", ratings)
