"""The text source: vocabulary and counts against hand-computed values on a tiny corpus, the
counting contract, encoding errors, the table layout with string ids, and one run on real posts."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.ingest import check_inputs, run_ingest
from pipelines.sources import InputError
from pipelines.sources.documents import folder_docs

NEWS20 = Path("/work/shared/data/news20/20news-bydate.tar.gz")

# label/file -> bytes. After stripping headers, quotes and signatures, with English stop words out
# and min_df=2, the words and their document frequencies are:
#   orbit: docs 3 (x4), 4 (x1)  -> total 5, df 2
#   ball:  docs 1 (x2), 2, 3    -> total 4, df 3
#   rocket: docs 3 (x2), 4 (x1) -> total 3, df 2
#   goal, hit, match, caf, unique, words: df 1 (out). "words" would have df 3 with the quote and the
#   signature of doc 1 left in, "subject" df 6 with the headers left in.
CORPUS = {
    "train/sport/1": b"From: a@b.c\nSubject: Goal!\n\nThe ball hit the goal. Goal goal ball.\n"
    b"> quoted nonsense words\nBob writes:\n--\nsig words here\n",
    "train/sport/2": b"Subject: Match\n\nball match match\n",
    "train/space/3": b"Subject: Orbit\n\norbit orbit orbit rocket rocket ball orbit\n",
    "test/space/4": b"Subject: Latin\n\nrocket caf\xe9 orbit\n",  # \xe9: Latin-1, invalid UTF-8
    "train/space/5": b"Subject: only quoted\n\n> orbit ball rocket\n",  # empty after stripping
    "train/sport/6": b"Subject: none\n\nunique words\n",  # no vocabulary word
}
STRIP = ["data.text.strip_headers=true", "data.text.strip_quotes=true", "data.text.strip_signatures=true"]


def write_corpus(base: Path) -> Path:
    for rel, data in CORPUS.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return base


def cfg_for(tmp_path: Path, input_path: Path | str, *extra: str):
    return load_config(
        None,
        ["data.source=text", f"data.input={input_path}", f"paths.root={tmp_path / 'out'}", "data.text.min_df=2", *extra],
    )


def table(root: Path, name: str) -> list[dict]:
    return pq.read_table(str((root / name).resolve())).to_pylist()


def by_doc(root: Path) -> dict[str, list[float]]:
    ids = {r["item_id"]: r["doc"] for r in table(root, "items")}
    return {ids[r["item_id"]]: r["features"] for r in table(root, "features")}


def test_folder_corpus_vocabulary_counts_and_contract(spark, tmp_path):
    cfg = cfg_for(tmp_path, write_corpus(tmp_path / "corpus"), *STRIP)
    check_inputs(cfg)
    manifest = run_ingest(spark, cfg)
    root = tmp_path / "out"
    assert manifest["feature_names"] == ["orbit", "ball", "rocket"]  # most frequent first
    assert by_doc(root) == {
        "train/sport/1": [0.0, 2.0, 0.0],
        "train/sport/2": [0.0, 1.0, 0.0],
        "train/space/3": [4.0, 1.0, 2.0],
        "test/space/4": [1.0, 0.0, 1.0],  # replaced byte, document kept
    }
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (6, 4, 2)
    assert manifest["text"]["encoding_errors"] == 1
    reasons = sorted((r["source_file"].split("corpus/")[1], r["reason"]) for r in table(root, "quarantine"))
    assert reasons == [("train/space/5", "empty document after cleaning"), ("train/sport/6", "no word in the vocabulary")]
    items = {r["doc"]: r for r in table(root, "items")}
    assert (items["train/sport/1"]["title"], items["train/sport/1"]["label"], items["train/sport/1"]["split"]) == (
        "Goal!", "sport", "train",
    )

    # The same run again gives the same ids (stable hashes of the paths) and vectors.
    again = run_ingest(spark, cfg)
    assert again["feature_names"] == manifest["feature_names"]
    assert {r["item_id"] for r in table(root, "items")} == {r["item_id"] for r in items.values()}


def test_without_stripping_headers_and_signatures_words_leak_in(spark, tmp_path):
    cfg = cfg_for(tmp_path, write_corpus(tmp_path / "corpus"), "data.text.vocab_size=50")
    names = run_ingest(spark, cfg)["feature_names"]
    assert "subject" in names and "words" in names


def test_quarantined_encoding_errors_and_tfidf_fitted_on_a_split(spark, tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = cfg_for(tmp_path, corpus, *STRIP, "data.text.on_encoding_error=quarantine")
    manifest = run_ingest(spark, cfg)
    # Doc 4 out: orbit and rocket are left in one document each.
    assert manifest["feature_names"] == ["ball"]
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (6, 3, 3)
    assert manifest["text"]["encoding_errors"] == 1
    reasons = {r["reason"] for r in table(tmp_path / "out", "quarantine")}
    assert "bytes not valid in the configured encoding" in reasons

    # tf-idf with the vocabulary and IDF fitted on the usable training documents only (1, 2, 3, 6;
    # 5 is empty, 4 is a test document): orbit and rocket are then in one document each, ball in 3 of
    # m = 4, and Spark's idf = log((m + 1) / (df + 1)) = log(5 / 4).
    cfg = cfg_for(tmp_path, corpus, *STRIP, "data.text.weighting=tfidf", "data.text.vocab_split=train")
    manifest = run_ingest(spark, cfg)
    assert manifest["feature_names"] == ["ball"]
    got = by_doc(tmp_path / "out")
    assert got["train/sport/1"] == pytest.approx([2 * math.log(5 / 4)], rel=1e-6)
    assert got["train/space/3"] == pytest.approx([math.log(5 / 4)], rel=1e-6)
    assert "test/space/4" not in got  # no training word: quarantined, counted
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (6, 3, 3)


def test_log1p_weighting(spark, tmp_path):
    cfg = cfg_for(tmp_path, write_corpus(tmp_path / "corpus"), *STRIP, "data.text.weighting=log1p")
    run_ingest(spark, cfg)
    assert by_doc(tmp_path / "out")["train/space/3"] == pytest.approx([math.log(5), math.log(2), math.log(3)], rel=1e-6)


@pytest.mark.slow  # a variant of test_log1p_weighting's ingest
def test_log1p_weighting_normalised_to_unit_length(spark, tmp_path):
    extra = ["data.text.weighting=log1p", "data.text.normalize=l2"]
    manifest = run_ingest(spark, cfg_for(tmp_path, write_corpus(tmp_path / "corpus"), *STRIP, *extra))
    got = by_doc(tmp_path / "out")
    norm = math.sqrt(math.log(5) ** 2 + math.log(2) ** 2 + math.log(3) ** 2)
    assert got["train/space/3"] == pytest.approx([math.log(5) / norm, math.log(2) / norm, math.log(3) / norm], rel=1e-6)
    assert got["train/sport/2"] == pytest.approx([0.0, 1.0, 0.0])  # one word: a unit vector
    assert manifest["text"]["normalize"] == "l2"


def test_table_layout_with_string_ids_round_trip(spark, tmp_path):
    rows = [("doc-a", "orbit rocket orbit", "space"), ("doc-b", "ball ball orbit", "sport"),
            ("doc-c", "rocket ball", "space"), ("doc-c", "duplicate id", "space"), (None, "no id", "x")]
    path = tmp_path / "docs.parquet"
    spark.createDataFrame(rows, "name string, body string, topic string").write.parquet(str(path))
    cfg = cfg_for(
        tmp_path, path, "data.text.id_column=name", "data.text.text_column=body", "data.text.label_column=topic",
        "data.text.min_df=1",
    )
    check_inputs(cfg)
    manifest = run_ingest(spark, cfg)
    # Both rows of the duplicated id and the null id are quarantined.
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (5, 2, 3)
    items = table(tmp_path / "out", "items")
    # The published mapping (item_id <-> doc) is the one Spark's xxhash64 gives, and round-trips.
    expected = dict(spark.sql("select s, xxhash64(s) from values ('doc-a'), ('doc-b') t(s)").collect())
    assert {r["doc"]: r["item_id"] for r in items} == expected
    assert {r["doc"]: r["label"] for r in items} == {"doc-a": "space", "doc-b": "sport"}
    assert manifest["feature_names"] == ["orbit", "ball", "rocket"]
    assert by_doc(tmp_path / "out")["doc-a"] == [2.0, 0.0, 1.0]


def test_csv_latin1_bytes_counted(spark, tmp_path):
    path = tmp_path / "lines.csv"
    path.write_bytes(b"id,text\n1,orbit ball\n2,ball caf\xe9 orbit\n3,orbit rocket\n")
    cfg = cfg_for(tmp_path, path, "data.text.on_encoding_error=quarantine")
    manifest = run_ingest(spark, cfg)
    assert manifest["text"]["encoding_errors"] == 1
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (3, 2, 1)
    # Read as Latin-1 instead, nothing is wrong.
    cfg = cfg_for(tmp_path, path, "data.text.on_encoding_error=quarantine", "data.options.encoding=ISO-8859-1")
    assert run_ingest(spark, cfg)["text"]["encoding_errors"] == 0


def test_check_names_the_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_inputs(cfg_for(tmp_path, tmp_path / "nope", "data.text.layout=folders"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.txt").write_text("no label folder")
    with pytest.raises(InputError, match="no <label>/<document> files"):
        check_inputs(cfg_for(tmp_path, tmp_path / "flat", "data.text.layout=folders"))


@pytest.mark.slow  # real data end to end, like the Tag Genome slice
@pytest.mark.skipif(not NEWS20.is_file(), reason="the shipped 20 Newsgroups archive is not on this machine")
def test_real_news_posts_end_to_end(spark, tmp_path):
    docs = folder_docs(str(NEWS20), "utf-8")
    assert len(docs) == 18846 and docs["label"].nunique() == 20
    cfg = cfg_for(tmp_path, NEWS20, *STRIP, "data.limit=300", "data.text.vocab_size=500", "data.text.weighting=log1p")
    check_inputs(cfg)
    manifest = run_ingest(spark, cfg)
    assert manifest["rows_in"] == 300
    assert manifest["rows_in"] == manifest["rows_used"] + manifest["rows_quarantined"]
    assert manifest["rows_used"] >= 280 and manifest["dim"] == 500
    names = manifest["feature_names"]
    # NNTP-Posting-Host: is in 131 of these headers and 1 body; "writes:" lines are quote markers.
    assert "nntp" not in names and "writes" not in names and "the" not in names
    items = table(tmp_path / "out", "items")
    assert len({r["label"] for r in items}) == 20  # the sample spreads over the groups
    assert {r["split"] for r in items} == {"20news-bydate-train", "20news-bydate-test"}
    assert all(r["title"] for r in items[:20])


def test_config_keys_and_news20_preset():
    from pipelines.config import ConfigError

    with pytest.raises(ConfigError, match="data.text.min_df"):
        load_config(None, ["data.text.min_df=0"])
    with pytest.raises(ConfigError, match="data.text.encoding"):
        load_config(None, ["data.text.encoding=klingon"])
    with pytest.raises(ConfigError, match="data.table.format"):
        load_config(None, ["data.table.format=xls"])
    with pytest.raises(ConfigError, match="data.events.top_k"):
        load_config(None, ["data.events.top_k=0"])
    cfg = load_config(preset="news20")
    assert (cfg.data.source, cfg.model.layers, cfg.data.text.vocab_size) == ("text", [2000, 500, 250, 125, 2], 2000)
    assert cfg.data.text.weighting == "log1p" and cfg.data.text.vocab_split == "20news-bydate-train"
    assert (cfg.data.text.normalize, cfg.train.split_column, cfg.train.train_value) == ("l2", "split", "20news-bydate-train")
