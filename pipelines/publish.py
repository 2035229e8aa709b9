"""Publishing output tables as one transaction per set, with a history, retention and pinned reads.

A *set* is the tables one job publishes together: ``ingest`` (``features/``, ``items/``,
``quarantine/``, plus a source's extra tables such as ``state/``; the manifest lives in
``features/``) and ``scores`` (``codes/``, ``neighbors/``). Layout under ``paths.root``::

    .sets/<set>/<version>/<table>/...      one folder per version, every table of the set in it
    .sets/<set>/<version>/_publication.json what it is: set, version, time, job, model/config
    .sets/<set>/CURRENT                    the one truth: which version is current
    .sets/<set>/history/<time>-<version>-<event>.json   append-only publication log
    <table>  ->  .sets/<set>/<version>/<table>          derived conveniences (local roots)

A job writes every table into a fresh version folder, then makes it current with **one** atomic
operation: on a local root ``CURRENT`` is a symbolic link replaced by ``rename`` (POSIX: readers see
the old or the new version, never neither); on HDFS it is a small file replaced by
``FileContext.rename(..., OVERWRITE)``, atomic in the NameNode; on S3 it is one object written by a
single PUT, which S3 makes visible whole. Only then is the history appended, the per-table links
re-derived from ``CURRENT`` and old versions removed. A kill at any point leaves the set all old
(before ``CURRENT`` moved) or all new (after); the next publish of the set (or :func:`repair`)
appends a history entry that a kill skipped, re-derives the links and deletes orphans: staging
versions whose process is gone.

Readers pin: :func:`pin` (or :func:`current_version`) resolves ``CURRENT`` once and a job reads
that version's paths for its whole run, so a publish in the middle of it cannot mix old and new
tables or pull files from under it. Retention keeps the last ``keep`` published versions (plus the
current one and those a caller protects), so a pinned job survives ``keep - 1`` later publishes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEEP_VERSIONS = 3  # published versions kept per set (publish.keep)
# A staging version whose owner runs on another host (not checkable from here) is an orphan
# once it is older than this: no publish runs for two days.
ORPHAN_AFTER_S = 2 * 24 * 3600
SETS_DIR = ".sets"
POINTER = "CURRENT"
PUBLICATION = "_publication.json"
STAGING = "_staging.json"
# Which set a table is published in; a table not listed is a set of its own name.
TABLE_SETS = {
    "features": "ingest", "items": "ingest", "quarantine": "ingest", "state": "ingest",
    "codes": "scores", "neighbors": "scores",
}
# Publish steps, in order, as passed to ``on_step`` (tests kill the process at each of them).
STEPS = ("staged", "pointer", "history", "links", "cleaned")


def is_local(path: str) -> bool:
    """True when ``path`` is a plain path or a ``file://`` URI."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> Path:
    """The absolute local path of ``path`` (a plain path or a ``file://`` URI)."""
    return Path(path[len("file://") :] if path.startswith("file://") else path).absolute()


def set_of(table: str) -> str:
    """The set ``table`` is published in (``features`` -> ``ingest``, ``codes`` -> ``scores``)."""
    return TABLE_SETS.get(table, table)


def _join(root: str, *parts: str) -> str:
    if is_local(root):
        return str(local_path(root).joinpath(*parts))
    return "/".join([root.rstrip("/"), *parts])


def set_dir(root: str, set_name: str) -> str:
    """The directory holding every published version of ``set_name`` under ``root``
    (``<root>/.sets/<set_name>``)."""
    return _join(root, SETS_DIR, set_name)


def version_path(root: str, set_name: str, version: str) -> str:
    """The folder of one version of a set (its tables are sub-folders)."""
    return _join(root, SETS_DIR, set_name, version)


# ---------------------------------------------------------------- filesystems


class _LocalFs:
    def exists(self, path: str) -> bool:
        return os.path.lexists(path)

    def mkdirs(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)

    def write_text(self, path: str, text: str) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(path))
        except FileNotFoundError:
            return []

    def delete(self, path: str) -> None:
        if os.path.islink(path) or os.path.isfile(path):
            os.unlink(path)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def set_pointer(self, path: str, version: str) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        os.symlink(version, tmp)
        os.replace(tmp, path)  # the one atomic step of a publish

    def get_pointer(self, path: str) -> str | None:
        try:
            return os.readlink(path)
        except (FileNotFoundError, OSError):
            return None

    def mtime(self, path: str) -> float:
        try:
            return os.lstat(path).st_mtime
        except FileNotFoundError:
            return 0.0


class _HadoopFs:
    """The same operations through Hadoop's FileSystem API (``hdfs://``, ``s3a://``, ...)."""

    def __init__(self, spark: Any, root: str) -> None:
        if spark is None:
            raise ValueError(f"publishing to {root} needs the SparkSession (pass spark=...)")
        self.spark, self.jvm = spark, spark._jvm
        self.conf = spark._jsc.hadoopConfiguration()
        self.fs = self._p(root).getFileSystem(self.conf)
        self.scheme = root.split("://", 1)[0]

    def _p(self, path: str) -> Any:
        return self.jvm.org.apache.hadoop.fs.Path(path)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self._p(path)))

    def mkdirs(self, path: str) -> None:
        self.fs.mkdirs(self._p(path))

    def write_text(self, path: str, text: str) -> None:
        out = self.fs.create(self._p(path), True)
        out.write(bytearray(text.encode("utf-8")))
        out.close()

    def read_text(self, path: str) -> str | None:
        if not self.exists(path):
            return None
        stream = self.fs.open(self._p(path))
        try:
            return self.jvm.org.apache.commons.io.IOUtils.toString(stream, "UTF-8")
        finally:
            stream.close()

    def list(self, path: str) -> list[str]:
        if not self.exists(path):
            return []
        return sorted(str(s.getPath().getName()) for s in self.fs.listStatus(self._p(path)))

    def delete(self, path: str) -> None:
        self.fs.delete(self._p(path), True)

    def set_pointer(self, path: str, version: str) -> None:
        if self.scheme.startswith("s3"):
            # An S3 object appears whole when its single PUT completes; S3A's rename is a copy.
            self.write_text(path, version)
            return
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        self.write_text(tmp, version)
        # FileSystem.rename refuses an existing target; FileContext's OVERWRITE replaces it
        # atomically on HDFS (one NameNode operation).
        fc = self.jvm.org.apache.hadoop.fs.FileContext.getFileContext(self.fs.getUri(), self.conf)
        opts = self.spark.sparkContext._gateway.new_array(self.jvm.org.apache.hadoop.fs.Options.Rename, 1)
        opts[0] = self.jvm.org.apache.hadoop.fs.Options.Rename.OVERWRITE
        fc.rename(self._p(tmp), self._p(path), opts)

    def get_pointer(self, path: str) -> str | None:
        text = self.read_text(path)
        return (text.strip() or None) if text is not None else None

    def mtime(self, path: str) -> float:
        if not self.exists(path):
            return 0.0
        return self.fs.getFileStatus(self._p(path)).getModificationTime() / 1000.0


def _fs(root: str, spark: Any = None) -> _LocalFs | _HadoopFs:
    if is_local(root):
        return _LocalFs()
    if spark is None:
        from pyspark.sql import SparkSession

        spark = SparkSession.getActiveSession()
    return _HadoopFs(spark, root)


# ---------------------------------------------------------------- reading: pinned versions


def current_version(root: str, set_name: str, spark: Any = None) -> str | None:
    """The current version id of ``set_name`` under ``root`` (read from ``CURRENT``), or None when
    the set was never published. Resolve it once per job and read :func:`version_path` (or a
    :class:`Pinned`) for the whole job: the per-table paths may move on to a newer version meanwhile."""
    return _fs(root, spark).get_pointer(_join(root, SETS_DIR, set_name, POINTER))


@dataclass(frozen=True)
class Pinned:
    """One version of one set, resolved once: every table path of a job comes from here."""

    root: str
    set_name: str
    version: str | None  # None: the set was never published in this layout (legacy paths are read)

    def path(self, table: str) -> str:
        """Where ``table`` of this version lies (a local absolute path or a URI)."""
        if table in TABLE_SETS and TABLE_SETS[table] != self.set_name:
            raise KeyError(f"table {table!r} belongs to set {set_of(table)!r}, not {self.set_name!r}")
        if self.version is None:
            return _join(self.root, table)
        return _join(self.root, SETS_DIR, self.set_name, self.version, table)

    def uri(self, table: str) -> str:
        """``file://`` URI for local tables, as Petastorm and pyarrow expect."""
        p = self.path(table)
        return f"file://{p}" if is_local(self.root) else p

    def exists(self, table: str, spark: Any = None) -> bool:
        """True when ``table`` of this version exists (on the local or Hadoop file system). Raises KeyError
        when ``table`` belongs to another set."""
        return _fs(self.root, spark).exists(self.path(table))


def pin(root: str, set_name: str, spark: Any = None) -> Pinned:
    """Resolve the current version of ``set_name`` once (see :func:`current_version`)."""
    return Pinned(root, set_name, current_version(root, set_name, spark))


def table_path(root: str, table: str, spark: Any = None) -> str:
    """Where ``table``'s current version lies, resolved now. A job reading two tables of one set
    pins the set instead (:func:`pin`), so both come from the same version."""
    return pin(root, set_of(table), spark).path(table)


def table_uri(root: str, table: str, spark: Any = None) -> str:
    """``file://`` URI of ``table``'s current version, as Petastorm and pyarrow expect."""
    return pin(root, set_of(table), spark).uri(table)


def publication(pinned: Pinned, spark: Any = None) -> dict[str, Any]:
    """What a version is (its ``_publication.json``: ``set``, ``version``, ``path``, ``tables``,
    ``time``, ``job``, ``model_version`` and ``ingest_version`` for scores); {} if unknown."""
    if pinned.version is None:
        return {}
    text = _fs(pinned.root, spark).read_text(f"{version_path(pinned.root, pinned.set_name, pinned.version)}/{PUBLICATION}")
    return json.loads(text) if text else {}


def scored_pair(root: str, spark: Any = None) -> tuple[Pinned, Pinned]:
    """(current scores version, the ingest version it was scored from): codes/neighbours and the
    items they describe, one consistent pair. The ingest version falls back to the current one
    when the scored one has been removed by retention."""
    scores = pin(root, "scores", spark)
    scored_from = publication(scores, spark).get("ingest_version")
    ingest = Pinned(root, "ingest", scored_from) if scored_from else pin(root, "ingest", spark)
    if scored_from and not _fs(root, spark).exists(version_path(root, "ingest", scored_from)):
        ingest = pin(root, "ingest", spark)
    return scores, ingest


def history(root: str, set_name: str, spark: Any = None) -> list[dict[str, Any]]:
    """The publication log of a set, oldest first: one dict per event (``publish``, ``rollback``,
    ``repair``) with ``version``, ``time`` (UTC ISO), ``job``, ``model_version``, ``config_hash``."""
    return _history(_fs(root, spark), root, set_name)


def _history(fs: _LocalFs | _HadoopFs, root: str, set_name: str) -> list[dict[str, Any]]:
    hdir = _join(root, SETS_DIR, set_name, "history")
    out = []
    for name in fs.list(hdir):
        if name.endswith(".json"):
            text = fs.read_text(f"{hdir}/{name}")
            if text:
                out.append(json.loads(text))
    return out


def published_versions(root: str, set_name: str, spark: Any = None) -> list[str]:
    """Version ids of a set that were ever made current and still exist, oldest publication first."""
    fs = _fs(root, spark)
    seen: list[str] = []
    for e in _history(fs, root, set_name):
        if e["version"] not in seen and fs.exists(version_path(root, set_name, e["version"])):
            seen.append(e["version"])
    return seen


# ---------------------------------------------------------------- writing


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _alive(owner: dict[str, Any], age_s: float) -> bool:
    if owner.get("host") != socket.gethostname():
        return age_s < ORPHAN_AFTER_S
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return age_s < ORPHAN_AFTER_S  # a pid reused by an unrelated long-lived process


class Publication:
    """The version folder of one output set being written; see :func:`publishing`."""

    def __init__(
        self,
        root: str,
        tables: list[str],
        spark: Any = None,
        set_name: str | None = None,
        meta: dict[str, Any] | None = None,
        keep: int = KEEP_VERSIONS,
        protect_models: Iterable[str] = (),
        on_step: Callable[[str], None] | None = None,
    ) -> None:
        self.root = root
        self.tables = list(tables)
        self.set_name = set_name or set_of(self.tables[0])
        self.spark = spark
        self.fs = _fs(root, spark)
        self.meta = dict(meta or {})
        self.keep = keep
        self.protect_models = {str(m) for m in protect_models if m is not None}
        self.on_step = on_step or (lambda step: None)
        repair(root, self.set_name, spark, keep=keep, protect_models=self.protect_models)
        # Sortable to the microsecond: the history orders by time, names only break ties.
        self.version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:8]
        self.path = version_path(root, self.set_name, self.version)
        self.fs.mkdirs(self.path)
        self.fs.write_text(f"{self.path}/{STAGING}", json.dumps(_owner()))
        self._staged: set[str] = set()

    def staging(self, table: str) -> str:
        """The directory to write ``table`` into (it does not exist yet)."""
        if table not in self.tables:
            raise KeyError(f"table {table!r} is not part of this publication {self.tables}")
        self._staged.add(table)
        return f"{self.path}/{table}"

    def pinned(self) -> Pinned:
        """This version, for reading its tables once it is published."""
        return Pinned(self.root, self.set_name, self.version)

    def _commit(self) -> None:
        missing = [t for t in self.tables if t not in self._staged]
        if missing:
            raise RuntimeError(f"publication incomplete: tables {missing} were never written")
        record = {
            "set": self.set_name, "version": self.version, "path": self.path, "tables": self.tables,
            "time": datetime.now(UTC).isoformat(timespec="microseconds"), **self.meta,
        }
        self.fs.write_text(f"{self.path}/{PUBLICATION}", json.dumps(record, indent=1))
        self.on_step("staged")
        with _set_lock(self.root, self.set_name):
            self.fs.set_pointer(_join(self.root, SETS_DIR, self.set_name, POINTER), self.version)
            self.on_step("pointer")
            _append_history(self.fs, self.root, self.set_name, record, "publish")
            self.on_step("history")
            self.fs.delete(f"{self.path}/{STAGING}")
            _derive_links(self.root, self.set_name, self.version)
            self.on_step("links")
            _retain(self.root, self.set_name, self.fs, self.keep, self.protect_models)
        self.on_step("cleaned")
        log.info("published %s under %s (set %s, version %s)", ", ".join(self.tables), self.root, self.set_name, self.version)

    def _abort(self) -> None:
        self.fs.delete(self.path)


@contextmanager
def publishing(
    root: str,
    tables: list[str],
    spark: Any = None,
    *,
    set_name: str | None = None,
    meta: dict[str, Any] | None = None,
    keep: int = KEEP_VERSIONS,
    protect_models: Iterable[str] = (),
    on_step: Callable[[str], None] | None = None,
) -> Iterator[Publication]:
    """Write a set of tables into a new version and make it current only if the block succeeds.

    ``meta``: recorded with the version and in the history (``job``, ``model_version``,
    ``config_hash``, ...). ``keep``: published versions kept (``publish.keep``). ``protect_models``:
    model versions whose latest published version is kept whatever ``keep`` says (the nightly's
    ``@champion`` and ``@previous``). ``on_step``: called with each name in :data:`STEPS` as the
    commit passes it (fault-injection tests kill the process there).
    Raises RuntimeError if a table of ``tables`` was never staged; re-raises the block's error after
    deleting the unpublished version.

    >>> with publishing(root, ["features", "items"]) as pub:
    ...     df.write.parquet(pub.staging("features"))
    """
    pub = Publication(root, tables, spark, set_name, meta, keep, protect_models, on_step)
    try:
        yield pub
    except BaseException:
        pub._abort()
        raise
    pub._commit()


def _set_lock(root: str, set_name: str) -> Any:
    """Serialises commits of one set on a local root (a publish from a manual job and the nightly)."""
    if not is_local(root):
        return nullcontext()
    from filelock import FileLock

    return FileLock(_join(root, SETS_DIR, set_name, ".commit.lock"))


def _append_history(fs: _LocalFs | _HadoopFs, root: str, set_name: str, record: dict[str, Any], event: str) -> None:
    hdir = _join(root, SETS_DIR, set_name, "history")
    fs.mkdirs(hdir)
    entry = {
        "event": event,
        "version": record["version"],
        "time": datetime.now(UTC).isoformat(timespec="microseconds"),
        "published_at": record.get("time"),
        "job": record.get("job"),
        "model_version": record.get("model_version"),
        "config_hash": record.get("config_hash"),
        "tables": record.get("tables"),
        # Whatever else the job recorded (e.g. the ingest version a scores set was computed from).
        **{k: v for k, v in record.items() if k not in ("set", "version", "path", "time", "tables")},
    }
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    # One new immutable file per event: append-only on every filesystem (S3 has no append).
    fs.write_text(f"{hdir}/{stamp}-{record['version']}-{event}.json", json.dumps(entry))


def _derive_links(root: str, set_name: str, version: str) -> None:
    """Per-table links (``root/<table>``) pointing into ``version``: conveniences, never the truth."""
    if not is_local(root):
        return
    base = local_path(root)
    vdir = base / SETS_DIR / set_name / version
    for table in (p.name for p in vdir.iterdir() if p.is_dir()):
        link = base / table
        target = os.path.relpath(vdir / table, base)
        if link.is_symlink() and os.readlink(link) == target:
            continue
        if link.exists() and not link.is_symlink():
            continue  # a plain directory the legacy adoption did not move (another set's table)
        tmp = base / f".{table}.link-{uuid.uuid4().hex[:8]}"
        os.symlink(target, tmp)
        os.replace(tmp, link)


def _retain(root: str, set_name: str, fs: _LocalFs | _HadoopFs, keep: int, protect_models: set[str]) -> None:
    """Delete versions beyond the last ``keep`` published ones (the current one and the latest of
    each protected model version excepted), and orphans: staging versions of no live process."""
    sdir = set_dir(root, set_name)
    current = fs.get_pointer(f"{sdir}/{POINTER}")
    entries = _history(fs, root, set_name)
    order: list[str] = []
    for e in entries:  # first publication order
        if e["version"] not in order:
            order.append(e["version"])
    keep_set = set(order[-keep:]) | {current}
    for model in protect_models:
        mine = [e["version"] for e in entries if str(e.get("model_version")) == model]
        if mine:
            keep_set.add(mine[-1])
    now = time.time()
    for name in fs.list(sdir):
        if name in (POINTER, "history") or name.startswith("."):
            continue
        vpath = f"{sdir}/{name}"
        if name in keep_set:
            continue
        if name in order:
            log.info("retention: removing version %s of set %s (publish.keep=%d)", name, set_name, keep)
            fs.delete(vpath)
            continue
        staging = fs.read_text(f"{vpath}/{STAGING}")
        owner = json.loads(staging) if staging else {}
        if owner and _alive(owner, now - float(owner.get("started", 0))):
            continue  # another job is writing it right now
        log.warning(
            "removing orphan version %s of set %s: never published, its writer (pid %s on %s) is gone",
            name, set_name, owner.get("pid"), owner.get("host"),
        )
        fs.delete(vpath)


def _adopt_legacy(root: str, set_name: str) -> None:
    """An older layout (``root/<table>`` a plain directory or a link into ``.versions/``): its
    current tables become version ``00000000T000000000000-legacy`` of the set, so nothing is lost."""
    if not is_local(root):
        return
    base = local_path(root)
    tables = [t for t, s in TABLE_SETS.items() if s == set_name] or [set_name]
    present = [t for t in tables if (base / t).exists()]
    if not present:
        return
    version = "00000000T000000000000-legacy"
    vdir = base / SETS_DIR / set_name / version
    vdir.mkdir(parents=True, exist_ok=True)
    for t in present:
        src = (base / t).resolve()
        os.replace(src, vdir / t)
        if (base / t).is_symlink():
            os.unlink(base / t)
    record = {"version": version, "tables": present, "job": "legacy", "time": None}
    (vdir / PUBLICATION).write_text(json.dumps(record), encoding="utf-8")
    fs = _LocalFs()
    fs.set_pointer(str(base / SETS_DIR / set_name / POINTER), version)
    _append_history(fs, root, set_name, record, "publish")
    log.warning("adopted the older layout's %s under %s as version %s of set %s", ", ".join(present), root, version, set_name)
    if (base / ".versions").exists():
        log.warning("%s holds the older layout's earlier versions, no longer used: delete it when you no longer need them", base / ".versions")


def repair(root: str, set_name: str, spark: Any = None, keep: int = KEEP_VERSIONS, protect_models: Iterable[str] = ()) -> None:
    """Bring a set back to a consistent state after a killed publish or rollback: the history gets
    the entry a kill skipped (``CURRENT`` is the truth), the per-table links follow ``CURRENT``,
    orphans are deleted and retention applied. Runs at the start of every publish; idempotent."""
    fs = _fs(root, spark)
    sdir = set_dir(root, set_name)
    if fs.get_pointer(f"{sdir}/{POINTER}") is None:
        _adopt_legacy(root, set_name)
    current = fs.get_pointer(f"{sdir}/{POINTER}")
    if current is None:
        fs.mkdirs(sdir)
        _retain(root, set_name, fs, keep, {str(m) for m in protect_models})
        return
    with _set_lock(root, set_name):
        entries = _history(fs, root, set_name)
        if not entries or entries[-1]["version"] != current:
            text = fs.read_text(f"{version_path(root, set_name, current)}/{PUBLICATION}")
            record = json.loads(text) if text else {"version": current}
            log.warning("set %s: CURRENT is %s but the history ends elsewhere (a killed job); recorded now", set_name, current)
            _append_history(fs, root, set_name, record, "repair")
        if fs.exists(f"{version_path(root, set_name, current)}/{STAGING}"):
            fs.delete(f"{version_path(root, set_name, current)}/{STAGING}")
        _derive_links(root, set_name, current)
        _retain(root, set_name, fs, keep, {str(m) for m in protect_models})


def restore(root: str, set_name: str, version: str, spark: Any = None, meta: dict[str, Any] | None = None) -> Pinned:
    """Make an earlier published ``version`` of a set current again (one atomic pointer swap),
    logged as a ``rollback`` event. Raises RuntimeError if it was never published or is gone."""
    fs = _fs(root, spark)
    if version not in published_versions(root, set_name, spark):
        raise RuntimeError(f"version {version} of set {set_name!r} under {root} was never published or has been deleted")
    text = fs.read_text(f"{version_path(root, set_name, version)}/{PUBLICATION}")
    record = {**(json.loads(text) if text else {"version": version}), **(meta or {})}
    with _set_lock(root, set_name):
        fs.set_pointer(f"{set_dir(root, set_name)}/{POINTER}", version)
        _append_history(fs, root, set_name, record, "rollback")
        _derive_links(root, set_name, version)
    log.info("set %s under %s: version %s is current again", set_name, root, version)
    return Pinned(root, set_name, version)
