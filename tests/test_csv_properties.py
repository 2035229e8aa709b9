"""Property tests (Hypothesis) of the CSV sources: files written with random RFC 4180 quoting, a BOM
or not, CRLF or LF line ends, separators, quotes and line breaks inside fields, Unicode and NA
spellings come back whole through ingest, and ``rows_in = rows_used + rows_quarantined`` always holds.

Each example is a whole ingest on the session's Spark, so the example counts are small."""

from __future__ import annotations

import unicodedata

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipelines.ingest as ingest
from pipelines.config import load_config

SETTINGS = settings(max_examples=3, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text with the characters CSV writers and readers get wrong: separators, quotes, line breaks,
# accents in both Unicode forms, CJK, an emoji, and the spellings of "missing" that must stay text.
CHARS = st.sampled_from(list("ab Z,\"\n'|;é\u0301中😀\t"))
NA = st.sampled_from(["NA", "N/A", "null", "NULL", "NaN", "-", "None", "nan"])
TEXT = st.one_of(NA, st.text(CHARS, min_size=1, max_size=12)).filter(lambda t: t.strip() and t == t.strip())
GENRES = st.one_of(st.just(["(no genres listed)"]),
                   st.lists(st.sampled_from(["Drama", "Comedy", "Sci-Fi", "Film-Noir"]), min_size=1, max_size=3,
                            unique=True))
JUNK = ["garbage", "1,2", "x,1,0.5", "1,2,3,4", "", '"unclosed,1,0.5']


def field(value: str, quote: bool) -> str:
    """One CSV field: quoted (quotes doubled) when asked or when the text needs it."""
    if quote or any(c in value for c in ',"\n\r') or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_text(header: str, rows: list[list[str]], quotes: list[bool], crlf: bool, bom: bool) -> bytes:
    end = "\r\n" if crlf else "\n"
    lines = [header] + [",".join(field(v, q) for v, q in zip(r, quotes, strict=False)) for r in rows]
    return (("\ufeff" if bom else "") + end.join(lines) + end).encode("utf-8")


@st.composite
def genome_input(draw):
    n_tags = draw(st.integers(1, 3))
    tags = draw(st.lists(TEXT, min_size=n_tags, max_size=n_tags))
    n_movies = draw(st.integers(1, 4))
    titles = draw(st.lists(TEXT, min_size=n_movies, max_size=n_movies))
    genres = [draw(GENRES) for _ in range(n_movies)]
    listed = draw(st.lists(st.booleans(), min_size=n_movies, max_size=n_movies))  # in movies.csv or not
    scores = [[str(m + 1), str(t + 1), str(draw(st.integers(0, 1000)) / 1000)]
              for m in range(n_movies) for t in range(n_tags)]
    junk = draw(st.lists(st.sampled_from(JUNK), max_size=3))
    style = draw(st.fixed_dictionaries({k: st.booleans() for k in ("crlf", "bom", "quote_ids", "quote_text")}))
    return tags, titles, genres, listed, scores, junk, style


def manifest_of(spark, tmp_path_factory, source, files: dict[str, bytes], *more):
    d = tmp_path_factory.mktemp("in")
    for name, data in files.items():
        (d / name).write_bytes(data)
    root = tmp_path_factory.mktemp("out")
    cfg = load_config(None, [f"data.source={source}", f"data.input={d}", f"paths.root={root}", *more])
    ingest.check_inputs(cfg)
    return ingest.run_ingest(spark, cfg), root


def rows(root, table):
    return pq.read_table(str((root / table).resolve())).to_pylist()


@pytest.mark.slow  # an ingest per generated example, in sequence
@SETTINGS
@given(genome_input())
def test_tag_genome_files_round_trip_and_counts_reconcile(spark, tmp_path_factory, case):
    tags, titles, genres, listed, scores, junk, style = case
    crlf, bom, qi, qt = style["crlf"], style["bom"], style["quote_ids"], style["quote_text"]
    movies = [[str(i + 1), t, "|".join(g)] for i, (t, g, keep) in enumerate(zip(titles, genres, listed, strict=True))
              if keep]
    if not movies:  # movies.csv needs one data line; an unlisted movie is still published
        movies = [["999", "Elsewhere", "Drama"]]
    scores_text = csv_text("movieId,tagId,relevance", scores, [qi, qi, qi], crlf, bom)
    end = b"\r\n" if crlf else b"\n"
    scores_text += b"".join(j.encode() + end for j in junk)
    files = {
        "genome-scores.csv": scores_text,
        "genome-tags.csv": csv_text("tagId,tag", [[str(i + 1), t] for i, t in enumerate(tags)], [qi, qt], crlf, bom),
        "movies.csv": csv_text("movieId,title,genres", movies, [qi, qt, qt], crlf, bom),
    }
    m, root = manifest_of(spark, tmp_path_factory, "tag_genome", files)
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"]
    # Every line of the scores file is counted: the good ones used, the junk ones (blank lines aside) quarantined.
    assert m["rows_in"] == len(scores) + len([j for j in junk if j])
    assert m["feature_names"] == tags
    assert m["rows_used"] == len(scores) and m["items_out"] == len(titles)
    items = {r["item_id"]: (r["title"], r["genres"]) for r in rows(root, "items")}
    expected = {i + 1: ((t, [] if g == ["(no genres listed)"] else g) if keep else (None, None))
                for i, (t, g, keep) in enumerate(zip(titles, genres, listed, strict=True))}
    assert items == expected
    assert m["items_without_metadata"] == listed.count(False)


@st.composite
def tags_input(draw):
    n = draw(st.integers(1, 6))
    events = [[str(draw(st.integers(1, 3))), str(draw(st.integers(1, 2))), draw(TEXT), str(1445714994 + i)]
              for i in range(n)]
    junk = draw(st.lists(st.sampled_from(["6,1,toys", "x,1,a,5", "7,1,a,yesterday"]), max_size=2))
    style = draw(st.fixed_dictionaries({k: st.booleans() for k in ("crlf", "bom", "quote")}))
    return events, junk, style


def fold(tag: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", tag).lower().split())


@pytest.mark.slow  # an ingest per generated example, in sequence
@SETTINGS
@given(tags_input())
def test_tag_log_round_trips_and_counts_reconcile(spark, tmp_path_factory, case):
    events, junk, style = case
    q = style["quote"]
    text = csv_text("userId,movieId,tag,timestamp", events + [j.split(",") for j in junk], [q, q, q, q],
                    style["crlf"], style["bom"])
    movies = csv_text("movieId,title,genres", [["1", "One, The", "Drama"], ["2", "NA", "Comedy"]], [q, q, q],
                      style["crlf"], style["bom"])
    m, root = manifest_of(spark, tmp_path_factory, "movielens_tags", {"tags.csv": text, "movies.csv": movies},
                          "data.logs.min_support=1")
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"] == len(events) + len(junk)
    distinct = {(u, i, fold(t), ts) for u, i, t, ts in events if fold(t)}
    assert m["rows_used"] == len(distinct)
    assert sorted(m["feature_names"]) == sorted({fold(t) for _, _, t, _ in events if fold(t)})
    titles = {r["item_id"]: r["title"] for r in rows(root, "items")}
    assert set(titles.values()) <= {"One, The", "NA"} and set(titles) == {int(i) for _, i, t, _ in events if fold(t)}
