"""Atomic publishing of output tables.

Each table under ``paths.root`` (``features/``, ``items/``, ``codes/`` ...) is a symbolic link to an
immutable version directory under ``.versions/<table>/``. A job writes every table of its output
set aside, and only when all of them were written does it swap the links, each swap an atomic
``rename``. A job that fails or is killed leaves the previous versions linked and readable; a re-run
replaces, never appends. The version before the current one is kept for rollback.

On non-local filesystems (``hdfs://``, ``s3a://``) there are no links; the swap falls back to
directory renames through Hadoop's FileSystem API, which is atomic per table on HDFS.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2  # current + previous


def is_local(path: str) -> bool:
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> Path:
    return Path(path[len("file://") :] if path.startswith("file://") else path).absolute()


def table_path(root: str, table: str) -> str:
    """Where readers find ``table`` (a local absolute path or a URI)."""
    return str(local_path(root) / table) if is_local(root) else f"{root.rstrip('/')}/{table}"


def table_uri(root: str, table: str) -> str:
    """``file://`` URI for local tables, as Petastorm and pyarrow expect."""
    p = table_path(root, table)
    return f"file://{p}" if is_local(root) else p


class Publication:
    """Staging directories of one output set; see :func:`publishing`."""

    def __init__(self, root: str, tables: list[str], spark: Any = None) -> None:
        self.root = root
        self.tables = list(tables)
        self.spark = spark
        # Sortable to the microsecond: rollback and clean-up go by name order.
        self.version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f") + "-" + uuid.uuid4().hex[:8]
        self._staged: dict[str, str] = {}

    def staging(self, table: str) -> str:
        """The directory to write ``table`` into (it does not exist yet)."""
        if table not in self.tables:
            raise KeyError(f"table {table!r} is not part of this publication {self.tables}")
        if is_local(self.root):
            path = str(local_path(self.root) / ".versions" / table / self.version)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        else:
            path = f"{self.root.rstrip('/')}/.staging/{table}/{self.version}"
        self._staged[table] = path
        return path

    def _commit(self) -> None:
        missing = [t for t in self.tables if t not in self._staged]
        if missing:
            raise RuntimeError(f"publication incomplete: tables {missing} were never written")
        for table in self.tables:
            if is_local(self.root):
                _swap_link(local_path(self.root), table, Path(self._staged[table]))
            else:
                _swap_hadoop(self.spark, self.root, table, self._staged[table])
        log.info("published %s under %s (version %s)", ", ".join(self.tables), self.root, self.version)

    def _abort(self) -> None:
        for path in self._staged.values():
            if is_local(self.root):
                shutil.rmtree(path, ignore_errors=True)
            else:
                _hadoop_fs(self.spark, path).delete(_hpath(self.spark, path), True)


@contextmanager
def publishing(root: str, tables: list[str], spark: Any = None) -> Iterator[Publication]:
    """Write a set of tables aside and swap them in only if the block succeeds.

    >>> with publishing(root, ["features", "quarantine"]) as pub:
    ...     df.write.parquet(pub.staging("features"))
    """
    pub = Publication(root, tables, spark)
    try:
        yield pub
    except BaseException:
        pub._abort()
        raise
    pub._commit()


def versions(root: str, table: str) -> list[Path]:
    """Local version directories of ``table``, oldest first."""
    vdir = local_path(root) / ".versions" / table
    return sorted(p for p in vdir.iterdir() if p.is_dir()) if vdir.exists() else []


def rollback(root: str, table: str) -> Path:
    """Point ``table`` back at the version before the current one."""
    base = local_path(root)
    current = (base / table).resolve()
    older = [v for v in versions(root, table) if v.resolve() != current and v.name < current.name]
    if not older:
        raise RuntimeError(f"no previous version of {table!r} under {root} to roll back to")
    _swap_link(base, table, older[-1], gc=False)
    return older[-1]


def _swap_link(base: Path, table: str, target: Path, gc: bool = True) -> None:
    link = base / table
    if link.exists() and not link.is_symlink():
        # A plain directory from an older layout: keep it as a version so nothing is lost.
        legacy = base / ".versions" / table / "00000000T000000000000-legacy"
        legacy.parent.mkdir(parents=True, exist_ok=True)
        os.replace(link, legacy)
    tmp = base / f".{table}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(target, base), tmp)
    os.replace(tmp, link)  # atomic on POSIX: readers see the old or the new table, never neither
    if gc:
        current = target.resolve()
        keep = [v for v in versions(str(base), table) if v.resolve() != current][-(KEEP_VERSIONS - 1) :]
        for v in versions(str(base), table):
            if v.resolve() != current and v not in keep:
                shutil.rmtree(v, ignore_errors=True)


def _hpath(spark: Any, path: str) -> Any:
    return spark._jvm.org.apache.hadoop.fs.Path(path)


def _hadoop_fs(spark: Any, path: str) -> Any:
    if spark is None:
        raise ValueError(f"publishing to {path} needs the SparkSession (pass spark=...)")
    return _hpath(spark, path).getFileSystem(spark._jsc.hadoopConfiguration())


def _swap_hadoop(spark: Any, root: str, table: str, staged: str) -> None:
    fs = _hadoop_fs(spark, root)
    dest = _hpath(spark, table_path(root, table))
    previous = _hpath(spark, f"{root.rstrip('/')}/.previous/{table}")
    if fs.exists(dest):
        fs.mkdirs(previous.getParent())
        if fs.exists(previous):
            fs.delete(previous, True)
        fs.rename(dest, previous)
    if not fs.rename(_hpath(spark, staged), dest):
        raise RuntimeError(f"could not move {staged} to {dest}")
