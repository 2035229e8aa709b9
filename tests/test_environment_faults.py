"""Kind 9 of the bad-input contract: a full or read-only disk, a missing permission.

One line naming the path and the cause, exit 2, the full trace in a debug log (named in the line),
published tables left as they were. Handled once, in ``jobs.common.guarded``, which ``sae`` and every
job's ``__main__`` (the spark-submit entry points) run through.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli
from jobs.common import environment_fault, guarded

REPO = Path(__file__).resolve().parent.parent

# As Spark 4 reports a failed Parquet write on a full disk (abridged: the real one is ~600 lines).
JAVA_ENOSPC = """An error occurred while calling o123.parquet.
: org.apache.spark.SparkException: Job aborted due to stage failure: Task 0 in stage 3.0 failed 1 times
\tat org.apache.spark.scheduler.DAGScheduler.failJobAndIndependentStages(DAGScheduler.scala:2856)
Caused by: java.io.IOException: /data/root/.versions/features/2026/part-00000.snappy.parquet (No space left on device)
\tat java.base/java.io.FileOutputStream.writeBytes(Native Method)
"""


class FakePy4JError(Exception):
    """Stands in for py4j's Py4JJavaError, whose str() is the Java trace."""


def _raise(exc: BaseException):  # noqa: ANN202
    def main() -> int:
        raise exc

    return main


@pytest.mark.parametrize(
    "exc, want",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/root/runs/x.yaml"), ("/data/root/runs/x.yaml", "No space left on device")),
        (PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/root"), ("/data/root", "Permission denied")),
        (OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/features"), ("/mnt/ro/features", "Read-only file system")),
        (FakePy4JError(JAVA_ENOSPC), ("/data/root/.versions/features/2026/part-00000.snappy.parquet", "No space left on device")),
        (RuntimeError("(sqlite3.OperationalError) database or disk is full"), (None, "No space left on device")),
        (RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"), (None, "Read-only file system")),
        (ValueError("features table: column 'x' is missing"), None),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x"), None),  # not the machine's fault
    ],
)
def test_faults_are_recognised_with_path_and_cause(exc, want):
    assert environment_fault(exc) == want


# As Spark 4 words it when the cause's own line names no path (measured on a 1 MB tmpfs).
SPARK_TASK_ENOSPC = """[TASK_WRITE_FAILED] Task failed while writing rows to file:/data/run #1/.versions/features/v2. SQLSTATE: 58030
Caused by: org.apache.hadoop.fs.FSError: java.io.IOException: No space left on device
"""


def test_a_path_with_spaces_is_read_whole_from_the_root_on():
    got = environment_fault(FakePy4JError(SPARK_TASK_ENOSPC), "/data/run #1")
    assert got == ("/data/run #1/.versions/features/v2", "No space left on device")


def test_a_fault_wrapped_by_a_library_is_found_through_the_chain():
    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("MlflowException: failed to log") from inner
    except RuntimeError as exc:
        assert environment_fault(exc) == (None, "No space left on device")


def test_guard_prints_one_line_with_path_cause_and_log(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAE_LOG_DIR", str(tmp_path / "logs"))
    code = guarded(_raise(FakePy4JError(JAVA_ENOSPC)), ["ingest", "paths.root=/data/root"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    line = err[0]
    assert line.startswith(
        "environment error: /data/root/.versions/features/2026/part-00000.snappy.parquet: No space left on device (full trace in "
    )
    log = Path(line.split("full trace in ", 1)[1].rstrip(")"))
    assert log.parent == tmp_path / "logs" and "DAGScheduler" in log.read_text()


def test_guard_names_paths_root_when_the_error_names_no_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SAE_LOG_DIR", str(tmp_path / "logs"))
    code = guarded(_raise(RuntimeError("database or disk is full")), ["train", f"paths.root={tmp_path}/r #1"])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"environment error: {tmp_path}/r #1: No space left on device (full trace in ")


def test_guard_lets_bugs_through():
    with pytest.raises(KeyError):
        guarded(_raise(KeyError("a bug")), [])


def _unwritable(path: Path) -> None:
    """Make ``path`` read-only: a read-only bind mount when root may mount, else mode 0555."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
    else:
        path.chmod(0o555)


def _writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["umount", str(path)], check=True)
    else:
        path.chmod(0o755)


def test_read_only_root_is_one_line_and_nothing_changes(tmp_path, capsys, monkeypatch):
    """In process, without Spark: ``sae rollback`` writes nothing before its lock, which fails first."""
    monkeypatch.setenv("SAE_LOG_DIR", str(tmp_path / "logs"))
    root = tmp_path / "root"
    (root / ".versions" / "codes" / "v1").mkdir(parents=True)
    os.symlink(".versions/codes/v1", root / "codes")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    _unwritable(root)
    try:
        code = cli.main(["rollback", f"paths.root={root}"])
    finally:
        _writable(root)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"environment error: {root}") and ("Read-only file system" in err[-1] or "Permission denied" in err[-1])
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before


def test_spark_submit_entry_point_gives_the_same_line(tmp_path):
    """``jobs/ingest.py`` run as a script, as spark-submit runs it: the guard holds there too."""
    root = tmp_path / "root"
    root.mkdir()
    _unwritable(root)
    try:
        r = subprocess.run(
            [sys.executable, "jobs/ingest.py", f"paths.root={root}", "data.source=synthetic", "data.synthetic.items=50"],
            check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO), SAE_LOG_DIR=str(tmp_path / "logs")),
        )
    finally:
        _writable(root)
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"environment error: {root}") and "full trace in " + str(tmp_path / "logs") in last
    assert "Traceback" not in r.stderr and "Py4J" not in r.stderr


def _small_disk(path: Path) -> dict:
    """A 1 MB disk at ``path``: a tmpfs where this process may mount one, else a 1 MB cap on file
    sizes for the child (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with 'File too large').
    Returns subprocess.run keyword arguments for the child."""
    import resource
    import signal

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)], check=False, capture_output=True
    ).returncode == 0:
        return {}

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    return {"preexec_fn": cap}


@pytest.mark.slow
def test_full_disk_in_a_spark_write_is_one_line_and_keeps_the_published_tables(tmp_path):
    disk = tmp_path / "disk"
    limits = _small_disk(disk)
    root = disk / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO), SAE_LOG_DIR=str(tmp_path / "logs"))

    def ingest(items: int, tags: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "jobs.cli", "ingest", "--config", "conf/local.yaml", f"paths.root={root}",
             "data.source=synthetic", f"data.synthetic.items={items}", f"data.synthetic.tags={tags}", "spark.master=local[2]"],
            check=False, cwd=REPO, capture_output=True, text=True, timeout=900, env=env, **limits,
        )

    try:
        first = ingest(200, 16)
        assert first.returncode == 0, first.stderr[-3000:]
        published = os.readlink(root / "features")
        versions = sorted(p.name for p in (root / ".versions").rglob("*"))
        full = ingest(20000, 64)  # ~5 MB of features: does not fit
        lines = full.stderr.strip().splitlines()
        assert full.returncode == 2, full.stderr[-3000:]
        assert lines[-1].startswith(f"environment error: {root}/") and "full trace in " + str(tmp_path / "logs") in lines[-1]
        assert ("No space left on device" if not limits else "File too large") in lines[-1]
        # No Java or Python trace on the console (it was ~500 lines of Java before).
        assert not any(line.startswith(("\tat ", "Traceback", "Caused by")) for line in lines) and len(lines) < 40
        assert os.readlink(root / "features") == published
        assert sorted(p.name for p in (root / ".versions").rglob("*")) == versions
    finally:
        if not limits:
            subprocess.run(["umount", str(disk)], check=False)
