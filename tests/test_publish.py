"""Publishing as one transaction: kills at every step, a reader during publishes, retention, history.

The kills are real (``os._exit`` in a forked process, so no ``finally`` or ``except`` runs), placed
by the ``on_step`` hook that ``publishing`` calls at each step of its commit.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import socket
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.publish import (
    STEPS,
    current_version,
    history,
    pin,
    published_versions,
    publishing,
    repair,
    restore,
    version_path,
)

TABLES = ["features", "items"]


def _write(path: str, gen: int, rows: int = 3) -> None:
    Path(path).mkdir(parents=True)
    pq.write_table(pa.table({"item_id": list(range(rows)), "gen": [gen] * rows}), f"{path}/part-0.parquet")


def publish_gen(root: str, gen: int, **kw) -> str:
    meta = {"job": "test", "model_version": kw.pop("model_version", None), "config_hash": f"cfg{gen}"}
    with publishing(root, TABLES, meta=meta, **kw) as pub:
        for t in TABLES:
            _write(pub.staging(t), gen)
    return pub.version


def read_pair(root: str) -> tuple[int, int]:
    """(features' generation, items' generation), both from one pinned version."""
    p = pin(root, "ingest")
    return tuple(pq.read_table(p.path(t), columns=["gen"])["gen"][0].as_py() for t in TABLES)


def on_disk(root: str) -> set[str]:
    d = Path(root) / ".sets" / "ingest"
    return {p.name for p in d.iterdir() if p.is_dir() and not p.is_symlink() and p.name != "history"}


def _killed_publish(root: str, gen: int, kill_at: str) -> int:
    def child() -> None:
        if kill_at == "writing":  # dies inside the job, one table written, the other not
            with publishing(root, TABLES) as pub:
                _write(pub.staging("features"), gen)
                os._exit(137)

        def hook(step: str) -> None:
            if step == kill_at:
                os._exit(137)

        publish_gen(root, gen, on_step=hook)
        os._exit(0)

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(30)
    return proc.exitcode


@pytest.mark.parametrize("kill_at", ["writing", *STEPS])
def test_kill_at_every_step_leaves_all_old_or_all_new_and_next_run_repairs(tmp_path, kill_at, caplog):
    root = str(tmp_path)
    v0 = publish_gen(root, 0)
    assert _killed_publish(root, 1, kill_at) == 137
    new = kill_at not in ("writing", "staged")  # CURRENT moved at step "pointer"
    assert read_pair(root) == ((1, 1) if new else (0, 0))
    if not new:
        assert current_version(root, "ingest") == v0
        assert len(on_disk(root)) == 2  # the orphan is still there until the next start

    caplog.set_level(logging.INFO, logger="pipelines.publish")
    repair(root, "ingest")
    current = current_version(root, "ingest")
    assert history(root, "ingest")[-1]["version"] == current  # the history names what is current
    assert on_disk(root) == set(published_versions(root, "ingest"))  # no orphan left
    for t in TABLES:  # the convenience links follow CURRENT again
        assert (tmp_path / t).resolve() == Path(version_path(root, "ingest", current), t)
    if not new:
        assert on_disk(root) == {v0}
        assert "removing orphan version" in caplog.text
    if kill_at == "pointer":  # the kill skipped the history entry: repair wrote it
        assert [e["event"] for e in history(root, "ingest")] == ["publish", "repair"]
        assert history(root, "ingest")[-1]["config_hash"] == "cfg1"

    v2 = publish_gen(root, 2)
    assert read_pair(root) == (2, 2) and current_version(root, "ingest") == v2
    assert on_disk(root) == set(published_versions(root, "ingest"))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir() if p.name != ".sets")  # no temp link left


def test_reader_during_two_publishes_sees_no_error_and_no_mixed_pair(tmp_path):
    root = str(tmp_path)
    publish_gen(root, 0)
    reads, errors, mixed, seen = [0], [], [], set()
    cond = threading.Condition()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                pair = read_pair(root)
                seen.add(pair)
                if pair[0] != pair[1]:
                    mixed.append(pair)
            except Exception as exc:  # noqa: BLE001 - any failure of a read is what we count
                errors.append(repr(exc))
            with cond:
                reads[0] += 1
                cond.notify_all()

    def let_reader_run(step: str = "") -> None:
        # Every step of the commit waits for three more reads: reads interleave with each step.
        with cond:
            target = reads[0] + 3
            assert cond.wait_for(lambda: reads[0] >= target, timeout=20), "the reader stopped"

    t = threading.Thread(target=reader)
    t.start()
    try:
        for gen in (1, 2):
            with publishing(root, TABLES, on_step=let_reader_run) as pub:
                for table in TABLES:
                    _write(pub.staging(table), gen)
                    let_reader_run()
        let_reader_run()
    finally:
        stop.set()
        t.join()
    assert errors == [] and mixed == []
    assert {(0, 0), (2, 2)} <= seen and reads[0] >= 2 * (len(STEPS) + 2) * 3


def test_retention_keeps_last_published_and_protected_models(tmp_path, caplog):
    root = str(tmp_path)
    champion_tables = publish_gen(root, 0, model_version="1", keep=2)
    for gen in (1, 2, 3):
        publish_gen(root, gen, model_version="2", keep=2, protect_models=["1"])
    published = [e["version"] for e in history(root, "ingest")]
    assert len(published) == 4  # the log keeps every publication
    assert on_disk(root) == {champion_tables, *published[-2:]}  # last 2 + the protected model's
    publish_gen(root, 4, model_version="3", keep=2)  # no longer protected: collected
    assert on_disk(root) == set(published[-1:]) | {current_version(root, "ingest")}
    # An orphan of a process that is gone is removed at the next start, with a log line.
    orphan = Path(version_path(root, "ingest", "29991231T000000000000-dead"))
    orphan.mkdir()
    dead = {"host": socket.gethostname(), "pid": 999999999, "started": 0}
    (orphan / "_staging.json").write_text(json.dumps(dead))
    caplog.set_level(logging.WARNING, logger="pipelines.publish")
    publish_gen(root, 5, keep=2)
    assert not orphan.exists() and "29991231T000000000000-dead" in caplog.text


def test_restore_makes_an_earlier_version_current_and_logs_it(tmp_path):
    root = str(tmp_path)
    v0, _ = publish_gen(root, 0), publish_gen(root, 1)
    restore(root, "ingest", v0, meta={"job": "rollback"})
    assert read_pair(root) == (0, 0) and (tmp_path / "features").resolve().parent.name == v0
    assert [(e["event"], e["job"]) for e in history(root, "ingest")][-1] == ("rollback", "rollback")
    with pytest.raises(RuntimeError, match="never published"):
        restore(root, "ingest", "20000101T000000000000-nope")


def test_failed_job_leaves_previous_outputs(tmp_path):
    root = str(tmp_path)
    v0 = publish_gen(root, 0)
    with pytest.raises(RuntimeError, match="boom"), publishing(root, TABLES) as pub:
        _write(pub.staging("features"), 1)
        raise RuntimeError("boom")
    assert read_pair(root) == (0, 0) and on_disk(root) == {v0}  # the aborted version is gone


def test_incomplete_publication_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="never written"), publishing(str(tmp_path), TABLES) as pub:
        _write(pub.staging("features"), 0)
    assert current_version(str(tmp_path), "ingest") is None
    assert not os.path.lexists(tmp_path / "features")


def test_plain_directory_from_older_layout_is_kept(tmp_path):
    for t in TABLES:
        _write(str(tmp_path / t), 7)
    publish_gen(str(tmp_path), 8)
    assert read_pair(str(tmp_path)) == (8, 8)
    legacy = [e["version"] for e in history(str(tmp_path), "ingest")][0]
    assert legacy.endswith("-legacy")
    restore(str(tmp_path), "ingest", legacy)
    assert read_pair(str(tmp_path)) == (7, 7)


def test_neighbors_lookup_reads_the_items_its_neighbours_were_computed_from(tmp_path, capsys):
    from jobs.neighbors import lookup

    root = str(tmp_path)

    def ingest(title: str) -> str:
        with publishing(root, ["features", "items", "quarantine"]) as pub:
            for t in ("features", "quarantine"):
                Path(pub.staging(t)).mkdir()
            Path(pub.staging("items")).mkdir()
            pq.write_table(pa.table({"item_id": [1, 2], "title": [f"{title} one", f"{title} two"]}), f"{pub.path}/items/p.parquet")
        return pub.version

    scored_from = ingest("old")
    with publishing(root, ["codes", "neighbors"], meta={"ingest_version": scored_from}) as pub:
        Path(pub.staging("codes")).mkdir()
        Path(pub.staging("neighbors")).mkdir()
        nb = {"item_id": [1], "neighbor_id": [2], "rank": [1], "distance": [0.5]}
        pq.write_table(pa.table(nb), f"{pub.path}/neighbors/p.parquet")
    ingest("new")  # a newer ingest, not scored yet
    assert lookup(root, "1") == 0
    out = capsys.readouterr().out
    assert "old one" in out and "old two" in out and "new" not in out


def test_publish_through_hadoop_filesystem_api(spark, tmp_path, monkeypatch):
    """The HDFS/S3 route (pointer file replaced by FileContext.rename OVERWRITE, history files, no
    links), run on Hadoop's local filesystem by treating a ``file:`` root as remote."""
    from pipelines import publish

    monkeypatch.setattr(publish, "is_local", lambda path: False)
    root = f"file:{tmp_path}"
    versions = []
    for gen in range(4):
        with publishing(root, ["features"], spark, keep=2) as pub:
            spark.createDataFrame([(1, gen)], "item_id long, gen int").write.parquet(pub.staging("features"))
        versions.append(pub.version)
        assert current_version(root, "ingest", spark) == pub.version
        assert spark.read.parquet(pin(root, "ingest", spark).path("features")).first()["gen"] == gen
    assert (tmp_path / ".sets" / "ingest" / "CURRENT").read_text() == versions[-1]
    assert [e["version"] for e in history(root, "ingest", spark)] == versions
    assert on_disk(str(tmp_path)) == set(versions[-2:])  # retention through the same API
    assert not (tmp_path / "features").exists()  # no per-table links off a local root
    restore(root, "ingest", versions[-2], spark)
    assert spark.read.parquet(pin(root, "ingest", spark).path("features")).first()["gen"] == 2
