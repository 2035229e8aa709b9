"""Unit tests of the ingest transforms on tiny explicit DataFrames."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipelines.config import SyntheticConfig
from pipelines.sources import InputError, mnist, synthetic
from pipelines.sources import tag_genome as tg
from pipelines.sources.csvfiles import check_header

TAG_IDS = [10, 20, 30]  # width 3; vector order follows tagId


def _lines(spark, rows):
    """The rows as a genome-scores.csv file, read back by the job's own reader: a row is
    (movieId, tagId, relevance, None) or, for a line of the wrong shape, (None, None, None, line)."""
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / "genome-scores.csv"
    path.write_text("movieId,tagId,relevance\n" + "".join((r[3] if r[3] is not None else ",".join(r[:3])) + "\n" for r in rows))
    return tg.read_scores(spark, str(path))


def test_classify_gives_each_bad_line_its_reason(spark):
    rows = [
        ("1", "10", "0.5", None),
        (None, None, None, "1,2"),  # too few fields
        ("1", "30", '"0.25"', None),  # quoted
        (" 2", "10 ", "0.5", None),  # blanks around fields
        ("x", "10", "0.5", None),
        ("1", "20", "abc", None),
        ("1", "20", "1.5", None),
        ("1", "20", "NaN", None),
        ("1", "99", "0.5", None),
    ]
    # A good line has no raw text (the aggregate never needs it); its parsed fields say what it was.
    got = [
        (r["reason"], r["raw"] if r["reason"] else (r["movie_id"], r["idx"], r["rel"]))
        for r in tg.classify_scores(_lines(spark, rows), TAG_IDS, spark).collect()
    ]
    assert sorted(got, key=str) == sorted(
        [
            (None, (1, 0, 0.5)),
            (None, (1, 2, 0.25)),
            (None, (2, 0, 0.5)),
            (tg.MALFORMED, "1,2"),
            (tg.BAD_ID, "x,10,0.5"),
            (tg.NON_NUMERIC, "1,20,abc"),
            (tg.OUT_OF_RANGE, "1,20,1.5"),
            (tg.OUT_OF_RANGE, "1,20,NaN"),
            (tg.UNKNOWN_TAG, "1,99,0.5"),
        ],
        key=str,
    )


def _pivot(spark, rows, limit_id=None):
    classified = tg.classify_scores(_lines(spark, rows), TAG_IDS, spark)
    movies = tg.aggregate_movies(classified, len(TAG_IDS))
    features = {r["item_id"]: r["features"] for r in tg.vectors(movies, limit_id).collect()}
    quarantine = tg.bad_lines(movies, "scores.csv").collect()
    quarantine += tg.unused_lines(movies, TAG_IDS, "scores.csv", limit_id).collect()
    return features, quarantine


def test_pivot_orders_by_tag_id_and_quarantines_incomplete_and_duplicated_movies(spark):
    rows = [
        # movie 1: complete, lines out of order -> vector ordered by tagId
        ("1", "30", "0.3", None), ("1", "10", "0.1", None), ("1", "20", "0.2", None),
        # movie 2: one tag missing (a real export's last movie) -> 2 lines quarantined, no zero-fill
        ("2", "10", "0.1", None), ("2", "20", "0.2", None),
        # movie 3: tag 20 twice, tag 30 missing: 4 lines, both copies marked duplicate
        ("3", "10", "0.1", None), ("3", "20", "0.2", None), ("3", "20", "0.25", None),
        # movie 4: all tags but one line out of range -> that line + the 2 others quarantined
        ("4", "10", "0.1", None), ("4", "20", "7", None), ("4", "30", "0.3", None),
    ]
    features, quarantine = _pivot(spark, rows)
    assert features == {1: pytest.approx([0.1, 0.2, 0.3])}
    reasons = sorted((r["raw"], r["reason"]) for r in quarantine)
    assert reasons == sorted([
        ("2,10,0.1", tg.INCOMPLETE), ("2,20,0.2", tg.INCOMPLETE),
        ("3,10,0.1", tg.INCOMPLETE), ("3,20,0.2", tg.DUPLICATE), ("3,20,0.25", tg.DUPLICATE),
        ("4,20,7.0", tg.OUT_OF_RANGE), ("4,10,0.1", tg.INCOMPLETE), ("4,30,0.3", tg.INCOMPLETE),
    ])
    # (a line rejected for its parsed values is re-assembled from them: "7" -> "7.0")
    # every line is either in a vector or in quarantine
    assert len(rows) == 3 * len(features) + len(quarantine)
    assert {r["source_file"] for r in quarantine} == {"scores.csv"}


def test_limit_quarantines_the_lines_of_later_complete_movies(spark):
    rows = [(str(m), str(t), "0.5", None) for m in (1, 2) for t in TAG_IDS]
    features, quarantine = _pivot(spark, rows, limit_id=1)
    assert list(features) == [1]
    assert sorted(r["reason"] for r in quarantine) == [tg.OVER_LIMIT] * 3


def test_movie_items_splits_genres_and_keeps_items_missing_from_movies(spark):
    movies = spark.createDataFrame(
        [("1", "Toy Story (1995)", "Adventure|Animation", None), ("2", "X", "(no genres listed)", None),
         ("bad", "Y", "Drama", None)],
        "movieId string, title string, genres string, _corrupt_record string",
    )
    ids = spark.createDataFrame([(1,), (2,), (3,)], "item_id long")
    got = {r["item_id"]: (r["title"], r["genres"]) for r in tg.movie_items(movies, ids).collect()}
    assert got == {1: ("Toy Story (1995)", ["Adventure", "Animation"]), 2: ("X", []), 3: (None, None)}


def test_check_header_names_the_file_and_the_expected_header(tmp_path):
    wrong = tmp_path / "genome-scores.csv"
    wrong.write_text("movie,tag,score\n1,1,0.5\n")
    with pytest.raises(InputError, match=r"genome-scores.csv: header is 'movie,tag,score', expected 'movieId,tagId,relevance'"):
        check_header(str(wrong), tg.SCORES_HEADER)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty.csv: file is empty"):
        check_header(str(empty), tg.SCORES_HEADER)
    header_only = tmp_path / "h.csv"
    header_only.write_text('"movieId","tagId","relevance"\n')
    with pytest.raises(InputError, match="h.csv: no data lines"):
        check_header(str(header_only), tg.SCORES_HEADER)


def test_mnist_truncated_or_wrong_magic_is_an_error_naming_the_file(tmp_path):
    good = np.zeros((2, 28, 28), np.uint8)
    header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
    path = tmp_path / "x-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + good.tobytes()[:-10]))
    with pytest.raises(InputError, match=r"x-images-idx3-ubyte.gz: 1574 bytes, expected 1584 .*truncated"):
        mnist.parse_idx(path, mnist.IMAGES_MAGIC, 3)
    with pytest.raises(InputError, match="magic number 0x00000803, expected 0x00000801"):
        mnist.parse_idx(path, mnist.LABELS_MAGIC, 1)


def test_synthetic_is_deterministic_bounded_and_genre_structured(spark):
    sc = SyntheticConfig(items=200, tags=16, genres=4, seed=3)
    a = synthetic.wide(spark, sc).orderBy("item_id").collect()
    b = synthetic.wide(spark, SyntheticConfig(items=200, tags=16, genres=4, seed=3, partitions=5))
    assert a == b.orderBy("item_id").collect()  # same seed, other partitioning -> same data
    assert a != synthetic.wide(spark, SyntheticConfig(items=200, tags=16, genres=4, seed=4)).orderBy("item_id").collect()
    x = np.array([r["features"] for r in a])
    assert x.shape == (200, 16) and x.min() >= 0.0 and x.max() <= 1.0
    assert np.median(x) < 0.3  # skewed towards small relevances, like the real genome
    genre = [r["primary_genre"] for r in synthetic.items(spark, sc).orderBy("item_id").collect()]
    # items sharing a primary genre are closer than items that do not
    same = [np.linalg.norm(x[i] - x[j]) for i in range(50) for j in range(i) if genre[i] == genre[j]]
    diff = [np.linalg.norm(x[i] - x[j]) for i in range(50) for j in range(i) if genre[i] != genre[j]]
    assert np.mean(same) < np.mean(diff)


def test_identical_rejected_lines_are_each_quarantined(spark):
    # rejected lines are grouped by raw text in the one shuffle; every copy must still come out
    rows = [(str(m), str(t), "0.5", None) for m in (1,) for t in TAG_IDS]
    rows += [("1", "99", "0.5", None)] * 3 + [("x", "10", "0.5", None)] * 2 + [(None, None, None, "junk")] * 2
    features, quarantine = _pivot(spark, rows)
    assert list(features) == [1]
    got = sorted((r["raw"], r["reason"]) for r in quarantine)
    assert got == sorted([("1,99,0.5", tg.UNKNOWN_TAG)] * 3 + [("x,10,0.5", tg.BAD_ID)] * 2 + [("junk", tg.MALFORMED)] * 2)
    assert len(rows) == 3 * len(features) + len(quarantine)


def test_vector_summary_checks_widths_and_holes_and_gives_per_dimension_stats(spark):
    from pipelines.ingest import vector_summary

    schema = "item_id long, features array<float>"
    good = spark.createDataFrame([(1, [0.0, 0.5, 1.0]), (2, [0.25, 0.5, 0.0]), (2, [0.5, 0.5, 0.5])], schema)
    s = vector_summary(good.repartition(2), 3)
    assert (s["n"], s["ids"], s["min_w"], s["max_w"], s["holes"]) == (3, 2, 3, 3, 0)  # ids: 2 distinct of 3
    assert s["stats"] == {"min": [0.0, 0.5, 0.0], "max": [0.5, 0.5, 1.0], "mean": pytest.approx([0.25, 0.5, 0.5])}
    bad = spark.createDataFrame([(1, [0.0, None, 1.0]), (2, [float("nan"), 0.5, 0.0]), (3, [0.5]), (4, None)], schema)
    s = vector_summary(bad, 3)
    assert (s["n"], s["min_w"], s["max_w"], s["holes"]) == (4, -1, 3, 2) and "stats" not in s
    s = vector_summary(bad.unionByName(good), 3)  # some good vectors: still no statistics for a bad table
    assert (s["n"], s["holes"]) == (7, 2) and "stats" not in s
    s = vector_summary(good.filter("item_id > 9"), 3)
    assert (s["n"], s["ids"], s["holes"]) == (0, 0, 0) and "stats" not in s


def test_contiguous_tag_ids_take_the_arithmetic_path_with_the_same_answers(spark):
    rows = [("5", "1", "0.1", None), ("5", "3", "0.3", None), ("5", "0", "0.5", None), ("5", "4", "0.5", None)]
    got = {
        r["raw"] or f"5,{r['idx'] + 1},{r['rel']:.1f}": (r["idx"], r["reason"])
        for r in tg.classify_scores(_lines(spark, rows), [1, 2, 3], spark).collect()
    }
    assert got == {"5,1,0.1": (0, None), "5,3,0.3": (2, None), "5,0,0.5": (None, tg.UNKNOWN_TAG), "5,4,0.5": (None, tg.UNKNOWN_TAG)}


def test_unused_lines_name_the_tag_id_alike_for_contiguous_and_sparse_tag_tables(spark):
    # Movie 7 lacks one tag (incomplete) and repeats another: its lines are re-assembled with the
    # tag id, computed (contiguous ids 1..3) or looked up (sparse ids 10, 20, 30).
    for tag_ids in ([1, 2, 3], [10, 20, 30]):
        a, c = tag_ids[0], tag_ids[2]
        rows = [("7", str(a), "0.1", None), ("7", str(c), "0.3", None), ("7", str(c), "0.4", None)]
        movies = tg.aggregate_movies(tg.classify_scores(_lines(spark, rows), tag_ids, spark), 3)
        got = sorted((r["raw"], r["reason"]) for r in tg.unused_lines(movies, tag_ids, "s.csv").collect())
        assert got == [(f"7,{a},0.1", tg.INCOMPLETE), (f"7,{c},0.3", tg.DUPLICATE), (f"7,{c},0.4", tg.DUPLICATE)]


def test_every_configurable_source_has_a_reader_and_no_other():
    import pipelines.ingest  # noqa: F401  (registers the readers)
    from pipelines.config import SOURCES as NAMES
    from pipelines.sources import SOURCES as READERS

    assert sorted(READERS) == sorted(NAMES)
