"""The table source on tiny explicit inputs: every shape and format, the counting contract, a
string-id round trip, and incremental loads of date=... partitions that change nothing when re-run."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.config import load_config
from pipelines.ingest import check_inputs, run_ingest
from pipelines.sources import InputError


def cfg_for(tmp_path: Path, input_path, *extra: str):
    return load_config(None, ["data.source=table", f"data.input={input_path}", f"paths.root={tmp_path / 'out'}", *extra])


def rows(root: Path, name: str) -> list[dict]:
    return pq.read_table(str((root / name).resolve())).to_pylist()


def features(root: Path) -> dict[int, list[float]]:
    return {r["item_id"]: r["features"] for r in rows(root, "features")}


def counts(m: dict) -> tuple[int, int, int]:
    return m["rows_in"], m["rows_used"], m["rows_quarantined"]


def test_wide_csv_string_ids_round_trip_and_label(spark, tmp_path):
    # ';'-separated, a quoted title holding the separator, string ids, a label, a bad number, a blank id.
    path = tmp_path / "export.csv"
    path.write_text(
        "key;a;b;genre;title\n"
        'u-1;1.5;2;rock;"Hits; vol. 1"\n'
        "u-2;0;-1;jazz;Blue\n"
        "u-3;x;1;jazz;Broken\n"
        ";1;1;pop;No id\n"
    )
    cfg = cfg_for(
        tmp_path, path, "data.options.sep=;", "data.table.id_column=key", "data.table.label_column=genre",
        "data.table.metadata_columns=[title]",
    )
    check_inputs(cfg)
    m = run_ingest(spark, cfg)
    root = tmp_path / "out"
    assert m["feature_names"] == ["a", "b"]  # the numeric columns; genre/title are metadata
    assert counts(m) == (4, 2, 2)
    items = {r["source_id"]: r for r in rows(root, "items")}
    assert set(items) == {"u-1", "u-2"}
    assert (items["u-1"]["label"], items["u-1"]["title"]) == ("rock", "Hits; vol. 1")
    # Round trip: the published item_id <-> source_id mapping is Spark's xxhash64 of the string, and
    # the vector under that id is the one of that row.
    ids = dict(spark.sql("select s, xxhash64(s) from values ('u-1'), ('u-2') t(s)").collect())
    assert {k: r["item_id"] for k, r in items.items()} == ids
    assert features(root)[ids["u-1"]] == [1.5, 2.0]
    reasons = sorted(r["reason"] for r in rows(root, "quarantine"))
    assert reasons == ["null or non-integer id", "null or non-numeric value in a"]


def test_long_json_lines(spark, tmp_path):
    path = tmp_path / "long.json"
    path.write_text(
        '{"id": 1, "feature": "f0", "value": 1.0}\n{"id": 1, "feature": "f1", "value": 2.0}\n'
        '{"id": 2, "feature": "f1", "value": 3.0}\n{"id": 2, "feature": "f1", "value": 4.0}\n'
        '{"id": 3, "feature": "f0", "value": 5.0}\n{"id": 3, "feature": null, "value": 6.0}\n'
    )
    m = run_ingest(spark, cfg_for(tmp_path, path, "data.table.shape=long"))
    assert m["feature_names"] == ["f0", "f1"]
    # id 2's two f1 rows are duplicates (both out, so id 2 has no vector); id 3's null feature is out.
    assert features(tmp_path / "out") == {1: [1.0, 2.0], 3: [5.0, 0.0]}
    assert counts(m) == (6, 3, 3)


def test_array_parquet_and_wide_orc_and_catalog(spark, tmp_path):
    path = tmp_path / "arrays.parquet"
    spark.createDataFrame(
        [(1, [1.0, 2.0, 3.0], "a"), (2, [0.0, 0.5, 1.0], "b"), (3, [1.0, 2.0], "c"), (4, [1.0, None, 2.0], "d")],
        "id long, vec array<double>, label string",
    ).write.parquet(str(path))
    m = run_ingest(spark, cfg_for(tmp_path, path, "data.table.shape=array", "data.table.array_column=vec",
                                  "data.table.label_column=label"))
    assert m["feature_names"] == ["vec[0]", "vec[1]", "vec[2]"]
    assert features(tmp_path / "out") == {1: [1.0, 2.0, 3.0], 2: [0.0, 0.5, 1.0]}
    assert counts(m) == (4, 2, 2)
    assert sorted(r["reason"] for r in rows(tmp_path / "out", "quarantine")) == [
        "array length differs from the vector width in vec: 2 values, expected 3", "null element in vec",
    ]

    wide = spark.createDataFrame([(7, 1.0, 2), (8, 3.0, 4)], "id int, x double, y int")
    wide.write.orc(str(tmp_path / "wide.orc"))
    m = run_ingest(spark, cfg_for(tmp_path, tmp_path / "wide.orc"))
    assert features(tmp_path / "out") == {7: [1.0, 2.0], 8: [3.0, 4.0]} and counts(m) == (2, 2, 0)

    wide.createOrReplaceTempView("sae_test_wide")
    m = run_ingest(spark, cfg_for(tmp_path, "sae_test_wide", "data.table.format=catalog",
                                  "data.table.feature_columns=[y]"))
    assert features(tmp_path / "out") == {7: [2.0], 8: [4.0]} and m["feature_names"] == ["y"]


@pytest.mark.slow  # three or more ingests of a growing input in sequence
def test_partitions_load_incrementally(spark, tmp_path):
    base = tmp_path / "events"

    def part(day: str, data: list[tuple]) -> None:
        spark.createDataFrame(data, "id string, a double, b double").coalesce(1).write.parquet(str(base / f"date={day}"))

    part("2024-01-01", [("x", 1.0, 1.0), ("y", 2.0, 2.0)])
    part("2024-01-02", [("y", 3.0, 3.0), ("z", 4.0, None)])
    cfg = cfg_for(tmp_path, base)
    check_inputs(cfg)
    m = run_ingest(spark, cfg)
    root = tmp_path / "out"
    ids = dict(spark.sql("select s, xxhash64(s) from values ('x'), ('y'), ('z') t(s)").collect())
    # y's 01-02 row replaces its 01-01 row (quarantined as superseded); z has a null value.
    assert features(root) == {ids["x"]: [1.0, 1.0], ids["y"]: [3.0, 3.0]}
    assert counts(m) == (4, 2, 2) and m["table"]["loads"] == ["date=2024-01-01", "date=2024-01-02"]
    first = features(root)

    # Re-run: nothing new is read and nothing changes.
    m = run_ingest(spark, cfg)
    assert counts(m) == (0, 0, 0) and m["table"]["loads"] == []
    assert features(root) == first
    assert {r["source_id"] for r in rows(root, "items")} == {"x", "y"}

    # A new day: z gets a vector, x a new one; y stays as published.
    part("2024-01-03", [("z", 5.0, 5.0), ("x", 6.0, 6.0)])
    m = run_ingest(spark, cfg)
    assert counts(m) == (2, 2, 0) and m["table"]["loads"] == ["date=2024-01-03"]
    assert features(root) == {ids["x"]: [6.0, 6.0], ids["y"]: [3.0, 3.0], ids["z"]: [5.0, 5.0]}
    assert sorted(r["load"] for r in rows(root, "loads")) == ["date=2024-01-01", "date=2024-01-02", "date=2024-01-03"]


def test_check_names_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check_inputs(cfg_for(tmp_path, tmp_path / "missing.parquet"))
    (tmp_path / "odd.bin").write_text("?")
    with pytest.raises(InputError, match="data.table.format"):
        check_inputs(cfg_for(tmp_path, tmp_path / "odd.bin"))


# make test-fast keeps the wide shape; the long one is the same rule through the pivot.
@pytest.mark.parametrize("shape", ["wide", pytest.param("long", marks=pytest.mark.slow)])
def test_limit_keeps_the_smallest_ids_and_quarantines_the_rest(spark, tmp_path, shape):
    # data.limit=2: ids 1 and 3 (the two smallest valid ones) are published, 5 and 9 quarantined as
    # beyond the limit; the bad row (id 2, a non-number) does not take a place.
    if shape == "wide":
        text = "id,a,b\n9,1,1\n3,2,2\n5,3,3\n1,4,4\n2,x,5\n"
        extra = []
    else:
        text = "id,feature,value\n9,a,1\n3,a,2\n3,b,2\n5,a,3\n1,b,4\n2,a,x\n"
        extra = ["data.table.shape=long"]
    path = tmp_path / "t.csv"
    path.write_text(text)
    m = run_ingest(spark, cfg_for(tmp_path, path, "data.limit=2", "data.table.id_type=long", *extra))
    root = tmp_path / "out"
    assert features(root) == ({1: [4.0, 4.0], 3: [2.0, 2.0]} if shape == "wide" else {1: [0.0, 4.0], 3: [2.0, 2.0]})
    reasons = sorted(r["reason"] for r in rows(root, "quarantine"))
    assert reasons == sorted(["beyond data.limit", "beyond data.limit",
                              "null or non-numeric value in " + ("a" if shape == "wide" else "value")])
    assert counts(m) == ((5, 2, 3) if shape == "wide" else (6, 3, 3))


def test_a_data_file_among_the_partitions_is_refused_not_dropped(tmp_path):
    # Only KEY=VALUE/ folders are read: a file put beside them would be dropped without a word.
    base = tmp_path / "events"
    (base / "date=2024-01-01").mkdir(parents=True)
    (base / "date=2024-01-01" / "a.csv").write_text("id,a\nx,1\n")
    (base / "2024-01-02.csv").write_text("id,a\ny,2\n")
    with pytest.raises(InputError, match=r"2024-01-02.csv: a data file beside the KEY=VALUE/ partitions"):
        check_inputs(cfg_for(tmp_path, base, "data.table.format=csv"))
