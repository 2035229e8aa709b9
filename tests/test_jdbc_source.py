"""The JDBC source against a real PostgreSQL server started on 127.0.0.1 for this module."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.common import record_config, spark_conf
from pipelines.config import load_config
from pipelines.ingest import check_inputs, run_ingest
from pipelines.sources import InputError, jdbc
from tests.pgserver import pg_server

PASSWORD = "pw-Zq7!secret"
N = 60  # rows of the wide table


@pytest.fixture(scope="module")
def pg():
    with pg_server(password=PASSWORD) as server:
        rows = "".join(f"{i},{i * 0.5},{-i},{i % 3},item {i}\n" for i in range(1, N + 1))
        rows += "61,,1,1,null value\n61,1,1,1,duplicate id\n"  # id 61: a null and a duplicate
        server.psql("CREATE TABLE wide (id bigint, a float8, b float8, c int, title text)")
        server.psql("COPY wide FROM STDIN WITH (FORMAT csv)", stdin=rows)
        long_rows = "".join(f"{i},f{j},{i * 10 + j}\n" for i in range(1, 6) for j in range(3) if (i, j) != (5, 2))
        long_rows += "6,f0,NaN\n"
        server.psql("CREATE TABLE long (entity int, feature text, value float8)")
        server.psql("COPY long FROM STDIN WITH (FORMAT csv)", stdin=long_rows)
        yield server


@pytest.fixture
def creds(monkeypatch, pg):
    monkeypatch.setenv("SAE_JDBC_USER", pg.user)
    monkeypatch.setenv("SAE_JDBC_PASSWORD", pg.password)


def cfg_for(tmp_path: Path, url: str, *extra: str):
    return load_config(None, ["data.source=jdbc", f"data.jdbc.url={url}", f"paths.root={tmp_path / 'out'}", *extra])


def features(root: Path) -> dict[int, list[float]]:
    return {r["item_id"]: r["features"] for r in pq.read_table(str((root / "features").resolve())).to_pylist()}


def test_wide_table_partitioned_read(spark, pg, creds, tmp_path, caplog, capfd):
    # Our loggers at DEBUG; py4j stays at WARNING as jobs.common.setup_logging sets it (its DEBUG log
    # echoes every gateway command, the reader's password option included).
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="pipelines")
    cfg = cfg_for(
        tmp_path, pg.url, "data.jdbc.table=wide", "data.jdbc.metadata_columns=[title]",
        "data.jdbc.partition_column=id", "data.jdbc.lower_bound=1", f"data.jdbc.upper_bound={N}",
        "data.jdbc.num_partitions=3",
    )
    check_inputs(cfg)
    assert jdbc.load_table(spark, cfg.data.jdbc).rdd.getNumPartitions() == 3
    manifest = run_ingest(spark, cfg)
    root = tmp_path / "out"
    assert manifest["feature_names"] == ["a", "b", "c"]  # numeric columns in table order, title is metadata
    assert (manifest["rows_in"], manifest["items_out"], manifest["rows_quarantined"]) == (N + 2, N, 2)
    got = features(root)
    assert got[4] == [2.0, -4.0, 1.0] and len(got) == N
    reasons = sorted(r["reason"] for r in pq.read_table(str((root / "quarantine").resolve())).to_pylist())
    assert reasons == ["duplicate id", "null or non-numeric value in a"]
    items = {r["item_id"]: r["title"] for r in pq.read_table(str((root / "items").resolve())).to_pylist()}
    assert items[7] == "item 7"

    # The password appears in none of the outputs, the recorded config, MLflow params or the logs.
    recorded = record_config(cfg, "ingest")
    texts = [p.read_bytes() for p in root.rglob("*") if p.is_file()]
    texts += [json.dumps(manifest).encode(), json.dumps(cfg.flat()).encode(), recorded.read_bytes()]
    out, err = capfd.readouterr()
    texts += [caplog.text.encode(), out.encode(), err.encode()]
    assert not any(PASSWORD.encode() in t for t in texts)
    assert "jdbc" in manifest and manifest["jdbc"]["url"] == pg.url


def test_limit_keeps_the_smallest_valid_ids_as_the_other_sources_do(spark, pg, creds, tmp_path):
    # data.limit=3 of the wide table: ids 1-3 published, 4..N quarantined as beyond the limit; id 61's
    # two bad rows keep their own reasons and take no place. The counts still reconcile.
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=wide", "data.jdbc.metadata_columns=[title]",
                                  "data.limit=3"))
    root = tmp_path / "out"
    assert sorted(features(root)) == [1, 2, 3]
    reasons = [r["reason"] for r in pq.read_table(str((root / "quarantine").resolve())).to_pylist()]
    assert sorted(set(reasons)) == ["beyond data.limit", "duplicate id", "null or non-numeric value in a"]
    assert reasons.count("beyond data.limit") == N - 3
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"]) == (N + 2, 3, N - 1)


def test_long_shape_from_a_query_with_secrets_file(spark, pg, tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_JDBC_USER", raising=False)
    secrets = tmp_path / "secrets.json"
    secrets.write_text(json.dumps({"user": pg.user, "password": pg.password}))
    cfg = cfg_for(
        tmp_path, pg.url, "data.jdbc.shape=long", "data.jdbc.query=SELECT entity, feature, value FROM long",
        "data.jdbc.id_column=entity", f"data.jdbc.secrets_file={secrets}",
    )
    manifest = run_ingest(spark, cfg)
    got = features(tmp_path / "out")
    assert manifest["feature_names"] == ["f0", "f1", "f2"]
    assert got[1] == [10.0, 11.0, 12.0] and got[5] == [50.0, 51.0, 0.0]  # missing pair filled with 0
    assert 6 not in got and manifest["rows_quarantined"] == 1  # its only value is NaN
    # Without filling, id 5 is incomplete: its 2 rows are quarantined too.
    manifest = run_ingest(spark, cfg_for(
        tmp_path, pg.url, "data.jdbc.shape=long", "data.jdbc.table=long", "data.jdbc.id_column=entity",
        f"data.jdbc.secrets_file={secrets}", "data.jdbc.fill_missing=false",
    ))
    assert sorted(features(tmp_path / "out")) == [1, 2, 3, 4]
    assert (manifest["rows_in"], manifest["rows_used"], manifest["rows_quarantined"]) == (15, 12, 3)


def test_unreachable_database_and_bad_query_touch_no_output(spark, pg, creds, tmp_path):
    good = cfg_for(tmp_path, pg.url, "data.jdbc.table=wide", "data.jdbc.feature_columns=[a,b]")
    run_ingest(spark, good)
    before = features(tmp_path / "out")
    link = (tmp_path / "out" / "features").resolve()

    dead = pg.url.replace(str(pg.port), "1")  # nothing listens on port 1
    with pytest.raises(InputError) as err:
        run_ingest(spark, cfg_for(tmp_path, dead, "data.jdbc.table=wide"))
    msg = str(err.value)
    assert "jdbc:postgresql://127.0.0.1:1/postgres" in msg and "table 'wide'" in msg and PASSWORD not in msg

    with pytest.raises(InputError, match=r"query 'SELECT nope FROM wide'.*nope"):
        run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.query=SELECT nope FROM wide"))
    assert (tmp_path / "out" / "features").resolve() == link and features(tmp_path / "out") == before


def test_config_checks_and_driver_jar_on_classpath(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_JDBC_USER", raising=False)
    cfg = cfg_for(tmp_path, "jdbc:postgresql://127.0.0.1:5432/db", "data.jdbc.table=t")
    with pytest.raises(InputError, match="SAE_JDBC_USER"):
        check_inputs(cfg)
    assert cfg.data.jdbc.driver_jar in spark_conf(cfg)["spark.jars"].split(",")
    assert "spark.jars" not in spark_conf(load_config(None, ["data.source=mnist"]))
    with pytest.raises(InputError, match="driver_jar"):
        check_inputs(cfg_for(tmp_path, "jdbc:postgresql://h/db", "data.jdbc.table=t", "data.jdbc.driver_jar=/nope.jar"))
    assert jdbc.safe_url("jdbc:postgresql://h:1/db?ssl=true&password=x") == "jdbc:postgresql://h:1/db"


# ---------------------------------------------------------------- issue 16, kind 3: values a float32 vector can't hold

CASES = Path("/work/shared/cases")


def case_sql(name: str, fallback: str) -> str:
    """The shared case's table.sql when this checkout sits beside it, else the same statements."""
    path = CASES / name / "table.sql"
    return path.read_text() if path.is_file() else fallback


def reasons_by_id(root: Path) -> dict[int, str]:
    return {json.loads(r["raw"])["id"]: r["reason"] for r in pq.read_table(str((root / "quarantine").resolve())).to_pylist()}


def test_numeric_nan_and_null_are_quarantined_naming_the_column(spark, pg, creds, tmp_path):
    # The jdbc-numeric-nan case: an unconstrained NUMERIC with 'NaN' (row 4) and NULL (row 5).
    pg.psql(case_sql("jdbc-numeric-nan", (
        "CREATE TABLE wide_numeric (id bigint, f1 numeric, f2 numeric, f3 double precision);"
        "INSERT INTO wide_numeric VALUES (1, 0.5, 0.25, 0.1), (2, 0.75, 0.5, 0.2), (3, 0.1, 0.9, 0.3),"
        " (4, 'NaN', 0.3, 0.4), (5, NULL, 0.2, 0.5);")))
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=wide_numeric"))
    assert features(tmp_path / "out") == {1: [0.5, 0.25, pytest.approx(0.1)], 2: [0.75, 0.5, pytest.approx(0.2)],
                                          3: [pytest.approx(0.1), pytest.approx(0.9), pytest.approx(0.3)]}
    assert reasons_by_id(tmp_path / "out") == {4: "NaN or infinite value in f1", 5: "null or non-numeric value in f1"}
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"]) == (5, 3, 2)


def test_infinities_and_numbers_beyond_decimal_or_float32_are_quarantined(spark, pg, creds, tmp_path):
    pg.psql("CREATE TABLE wide_extreme (id bigint, a numeric, b double precision, c real);"
            "INSERT INTO wide_extreme VALUES (1, 1.5, 2.5, 3.5), (2, 'Infinity', 0, 0), (3, '-Infinity', 0, 0),"
            " (4, 1e40, 0, 0), (5, 123456789012345678901234567890.5, 0, 0), (6, 0, 'Infinity', 0),"
            " (7, 0, 1e300, 0), (8, 0, 0, 'NaN'), (9, 1e-30, 0, 0);")
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=wide_extreme"))
    # Row 5 has 30 integer digits, beyond Spark's DECIMAL(38,18) (20) but within float32: published.
    assert features(tmp_path / "out") == {1: [1.5, 2.5, 3.5], 5: [pytest.approx(1.2345679e29), 0.0, 0.0],
                                          9: [pytest.approx(1e-30), 0.0, 0.0]}
    assert reasons_by_id(tmp_path / "out") == {
        2: "NaN or infinite value in a", 3: "NaN or infinite value in a", 4: "value beyond float32 range in a",
        6: "NaN or infinite value in b", 7: "value beyond float32 range in b", 8: "NaN or infinite value in c",
    }
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"] == 9


def test_array_column_is_the_vector_and_bad_arrays_are_quarantined(spark, pg, creds, tmp_path):
    # The jdbc-array-column case, found without naming the column and when named as the tool advised.
    pg.psql(case_sql("jdbc-array-column", (
        "CREATE TABLE emb_array (id bigint, emb double precision[]);"
        "INSERT INTO emb_array VALUES (1, '{0.1,0.2,0.3}'), (2, '{0.4,NULL,0.6}'), (3, '{0.7,0.8,0.9}');")))
    for extra in ([], ["data.jdbc.feature_columns=[emb]"]):
        m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=emb_array", *extra))
        assert features(tmp_path / "out") == {1: pytest.approx([0.1, 0.2, 0.3]), 3: pytest.approx([0.7, 0.8, 0.9])}
        assert reasons_by_id(tmp_path / "out") == {2: "null element in emb"}
        assert m["feature_names"] == ["emb[0]", "emb[1]", "emb[2]"] and m["jdbc"]["shape"] == "array"
    # real[] and numeric[] too; ragged, null, NaN and out-of-range rows quarantined.
    pg.psql("CREATE TABLE emb_more (id bigint, r real[], n numeric[]);"
            "INSERT INTO emb_more VALUES (1, '{1,2}', '{1,2}'), (2, '{1,2,3}', '{1,2,3}'), (3, NULL, NULL),"
            " (4, '{NaN,1}', '{NaN,1}'), (5, '{3,4}', '{1e40,1}'), (6, '{5,6}', '{5,6}');")
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=emb_more", "data.jdbc.feature_columns=[r]"))
    assert features(tmp_path / "out") == {1: [1.0, 2.0], 5: [3.0, 4.0], 6: [5.0, 6.0]}
    assert reasons_by_id(tmp_path / "out") == {
        2: "array length differs from the vector width in r: 3 values, expected 2", 3: "null array in r",
        4: "NaN or infinite element in r"}
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=emb_more", "data.jdbc.feature_columns=[n]"))
    assert features(tmp_path / "out") == {1: [1.0, 2.0], 6: [5.0, 6.0]}
    assert reasons_by_id(tmp_path / "out")[5] == "element beyond float32 range in n"
    assert m["rows_in"] == m["rows_used"] + m["rows_quarantined"] == 6
    with pytest.raises(InputError, match=r"'r' is an array column; .* must be the only feature column"):
        run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=emb_more", "data.jdbc.feature_columns=[r,id]"))


def test_long_shape_numeric_nan_and_infinity_are_quarantined_naming_the_column(spark, pg, creds, tmp_path):
    pg.psql("CREATE TABLE long_numeric (id int, feature text, amount numeric);"
            "INSERT INTO long_numeric VALUES (1, 'a', 1), (1, 'b', 2), (2, 'a', 'NaN'), (2, 'b', 3),"
            " (3, 'a', 'Infinity'), (3, 'b', 1e50);")
    m = run_ingest(spark, cfg_for(tmp_path, pg.url, "data.jdbc.table=long_numeric", "data.jdbc.shape=long",
                                  "data.jdbc.value_column=amount", "data.jdbc.fill_missing=false"))
    assert features(tmp_path / "out") == {1: [1.0, 2.0]}
    got = sorted(r["reason"] for r in pq.read_table(str((tmp_path / "out" / "quarantine").resolve())).to_pylist())
    assert got == ["NaN or infinite value in amount", "NaN or infinite value in amount", "incomplete vector",
                   "value beyond float32 range in amount"]
    assert (m["rows_in"], m["rows_used"], m["rows_quarantined"]) == (6, 2, 4)
