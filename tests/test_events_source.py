"""The events source on a tiny explicit log: a Latin-1, ';'-separated CSV without a header, the
vocabulary by support, the weightings against hand-computed values, the counting contract, and
incremental loads by event identity (a late event is loaded; a re-run changes nothing)."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pyspark.sql import functions as F

from pipelines.config import load_config
from pipelines.ingest import check_inputs, run_ingest
from pipelines.sources import events
from pipelines.sources.shaping import long_vectors

LOG = [
    "u1;café;1;100",
    "u1;café;1;100",  # the same event again: a duplicate
    "u1;jazz;2;101",
    "u2;jazz;1;102",
    "u2;rock;3;103",
    "u3;rock;1;abc",  # bad timestamp
    ";rock;1;104",  # no entity
    "u4;polka;1;105",  # polka has 1 event < min_support: u4 gets no vector
    "u3;café;1;106",
]
# Valid events per token: café 2 (u1, u3), jazz 2 (u1, u2), rock 1, polka 1 -> vocabulary [café, jazz].


def write_log(path: Path, lines: list[str]) -> Path:
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


def cfg_for(tmp_path: Path, path: Path, *extra: str):
    return load_config(None, [
        "data.source=events", f"data.input={path}", f"paths.root={tmp_path / 'out'}", "data.events.format=csv",
        "data.options.sep=;", "data.options.encoding=ISO-8859-1", "data.events.columns=[user,tag,weight,ts]",
        "data.events.entity_column=user", "data.events.token_column=tag", "data.events.weight_column=weight",
        "data.events.timestamp_column=ts", "data.events.min_support=2", *extra,
    ])


def vectors(root: Path) -> dict[str, list[float]]:
    ids = {r["item_id"]: r["source_id"] for r in pq.read_table(str((root / "items").resolve())).to_pylist()}
    return {ids[r["item_id"]]: r["features"] for r in pq.read_table(str((root / "features").resolve())).to_pylist()}


def counts(m: dict) -> tuple[int, int, int]:
    return m["rows_in"], m["rows_used"], m["rows_quarantined"]


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_counts_contract_and_late_events(spark, tmp_path):
    path = write_log(tmp_path / "events.csv", LOG)
    cfg = cfg_for(tmp_path, path)
    check_inputs(cfg)
    m = run_ingest(spark, cfg)
    root = tmp_path / "out"
    assert m["feature_names"] == ["café", "jazz"]  # Latin-1 decoded; tie on 2 events broken by token
    assert vectors(root) == {"u1": [1.0, 2.0], "u2": [0.0, 1.0], "u3": [1.0, 0.0]}
    assert counts(m) == (9, 5, 4)
    reasons = sorted(r["reason"] for r in pq.read_table(str((root / "quarantine").resolve())).to_pylist())
    assert reasons == ["duplicate event", "entity has no token in the vocabulary", "null or empty entity",
                       "unparseable timestamp"]

    # A late event (older timestamp than any loaded) appended: only it is this load's, and it is used.
    write_log(path, [*LOG, "u2;café;1;50"])
    m = run_ingest(spark, cfg)
    assert counts(m) == (1, 1, 0) and m["events"]["already_loaded"] == 9
    assert vectors(root) == {"u1": [1.0, 2.0], "u2": [1.0, 1.0], "u3": [1.0, 0.0]}

    # The same file again: nothing new, nothing changes.
    m = run_ingest(spark, cfg)
    assert counts(m) == (0, 0, 0) and m["events"]["already_loaded"] == 10
    assert vectors(root) == {"u1": [1.0, 2.0], "u2": [1.0, 1.0], "u3": [1.0, 0.0]}


def weighted_vectors(spark, tmp_path, weighting: str) -> dict[str, list[float]]:
    """The pure transforms on LOG, without publishing: parse -> pairs -> vocabulary -> weights -> pivot."""
    cfg = cfg_for(tmp_path, tmp_path / "unused.csv", f"data.events.weighting={weighting}")
    rows = [tuple(line.split(";")) + ("l", "f") for line in LOG]
    table = spark.createDataFrame(rows, "user string, tag string, weight string, ts string, _load string, _file string")
    good = events.parse(table, cfg.data.events).filter("reason is null")
    pairs = events.merge_pairs(None, good)
    vocab = events.vocabulary(pairs, 10, 2)
    assert [t for t, _, _ in vocab] == ["café", "jazz"]
    w = events.weighted(pairs, vocab, cfg.data.events).withColumn("reason", F.lit(None).cast("string"))
    vecs = long_vectors(w.withColumn("meta", F.struct("source_id")), ["café", "jazz"], fill=True)
    return {r["meta"]["source_id"]: r["vec"] for r in vecs.collect()}


@pytest.mark.parametrize("weighting", ["tfidf", "bm25", "binary", "mean_centred"])
def test_weightings(spark, tmp_path, weighting):
    got = weighted_vectors(spark, tmp_path, weighting)
    # N = 4 entities with a valid event (u1..u4); café and jazz are each in 2. Vocabulary totals
    # (len): u1 3, u2 1, u3 1; mean 5/3.
    if weighting == "tfidf":
        idf = math.log(5 / 3) + 1
        want = {"u1": [idf / 3, 2 * idf / 3], "u2": [0.0, idf], "u3": [idf, 0.0]}
    elif weighting == "bm25":
        idf = math.log(1 + (4 - 2 + 0.5) / (2 + 0.5))

        def bm(w: float, length: float) -> float:
            return idf * w * 2.2 / (w + 1.2 * (1 - 0.75 + 0.75 * length / (5 / 3)))

        want = {"u1": [bm(1, 3), bm(2, 3)], "u2": [0.0, bm(1, 1)], "u3": [bm(1, 1), 0.0]}
    elif weighting == "binary":
        want = {"u1": [1.0, 1.0], "u2": [0.0, 1.0], "u3": [1.0, 0.0]}
    else:  # each entity's vocabulary weights minus their mean; absent tokens stay 0
        want = {"u1": [-0.5, 0.5], "u2": [0.0, 0.0], "u3": [0.0, 0.0]}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k


def test_limit_keeps_the_smallest_entities(spark, tmp_path):
    # Integer entities (an id column): data.limit=2 keeps entities 1 and 2; entity 3's two events are
    # quarantined as beyond the limit, and all three stay in the state for later loads.
    path = tmp_path / "ev.csv"
    path.write_text("user,tag\n3,a\n1,a\n2,b\n3,b\n")
    cfg = load_config(None, [
        "data.source=events", f"data.input={path}", f"paths.root={tmp_path / 'out'}", "data.events.entity_column=user",
        "data.events.token_column=tag", "data.events.id_columns=[user]", "data.limit=2",
    ])
    check_inputs(cfg)
    m = run_ingest(spark, cfg)
    root = tmp_path / "out"
    got = {r["item_id"]: r["features"] for r in pq.read_table(str((root / "features").resolve())).to_pylist()}
    assert m["feature_names"] == ["a", "b"] and got == {1: [1.0, 0.0], 2: [0.0, 1.0]}
    assert counts(m) == (4, 2, 2)
    reasons = [r["reason"] for r in pq.read_table(str((root / "quarantine").resolve())).to_pylist()]
    assert reasons == ["beyond data.limit", "beyond data.limit"]
    pairs = {r["item_id"] for r in pq.read_table(str((root / "state").resolve())).to_pylist() if r["kind"] == "pair"}
    assert pairs == {1, 2, 3}


def test_check_reads_a_header_line_with_the_reader_options(tmp_path):
    # A Latin-1, ';'-separated log with a header line: checked as Spark will read it (it was refused as
    # "cannot be read ... damaged or not gzip?" and its header as 'user;tag;weight;ts').
    path = write_log(tmp_path / "events.csv", ["user;tag;weight;ts", *LOG])
    cfg = cfg_for(tmp_path, path, "data.options.header=true")
    check_inputs(cfg)  # passes
    with pytest.raises(events.InputError, match=r"header is 'user,tag,wt,ts', expected 'user,tag,weight,ts'"):
        check_inputs(cfg_for(tmp_path, write_log(tmp_path / "bad.csv", ["user;tag;wt;ts", *LOG]), "data.options.header=true"))
    utf8 = cfg_for(tmp_path, path, "data.options.header=true", "data.options.encoding=UTF-8")
    with pytest.raises(events.InputError, match=r"events.csv: not utf-8 text .*set data.options.encoding"):
        check_inputs(utf8)
    with pytest.raises(events.InputError, match=r"data.options.encoding: unknown encoding 'latn1'"):
        check_inputs(cfg_for(tmp_path, path, "data.options.header=true", "data.options.encoding=latn1"))


def test_a_data_file_among_the_partitions_is_refused_not_dropped(tmp_path):
    # tags/extra.csv beside tags/date=.../ was never read and never counted: its events vanished.
    from pipelines.config import load_config as load

    day = tmp_path / "in" / "tags" / "date=2024-01-02"
    day.mkdir(parents=True)
    (day / "part.csv").write_text("userId,movieId,tag,timestamp\n1,1,funny,100\n")
    (day.parent / "_SUCCESS").write_text("")  # markers and hidden files are not data
    cfg = load(None, [f"data.input={tmp_path / 'in'}", f"paths.root={tmp_path / 'out'}"], preset="movielens_tags")
    assert events.find_loads(cfg.data.input, "tags") == [("date=2024-01-02", [str(day / "part.csv")])]
    (day.parent / "extra.csv").write_text("userId,movieId,tag,timestamp\n2,1,dark,101\n")
    with pytest.raises(events.InputError, match=r"tags/extra.csv: a data file beside the KEY=VALUE/ partitions"):
        check_inputs(cfg)


def test_an_empty_log_is_one_input_error_before_spark(tmp_path):
    # A 0-byte log without a header line got as far as Spark and ended in "no token has
    # data.events.min_support=2 events; nothing to build", which does not say the file is empty.
    path = tmp_path / "empty log.csv"
    path.write_bytes(b"")
    with pytest.raises(events.InputError, match=r"empty log.csv: empty file; no events to load"):
        check_inputs(cfg_for(tmp_path, path))
