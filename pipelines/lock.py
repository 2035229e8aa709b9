"""A run lock for unattended jobs: one nightly run (or rollback) at a time.

The lock is an OS lock (``flock``, through ``filelock``) on ``nightly.lock``. The kernel holds it for
the owning process and drops it the moment that process ends, however it ends (``kill -9``
included), so there is no stale lock to judge and take over: a second run either gets the lock or
exits at once, and two runs racing for a lock left by a dead one cannot both get it. The owner's
host, pid and start time are written beside it (``nightly.lock.owner``) only to name the holder in
the refusal message; they decide nothing.

What it guarantees: on one machine's local filesystem, mutual exclusion, always. On a shared
filesystem it is as good as that filesystem's locks: NFSv4 and most cluster filesystems honour
``flock`` across hosts, while NFSv3 without lockd, SMB/FUSE mounts or object stores may not. There,
the scheduler's own concurrency guard (Airflow's ``max_active_runs=1``, the CronJob's
``concurrencyPolicy: Forbid``) is the real guard; this lock is a second line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


def _holder(owner_file: Path) -> str:
    try:
        info = json.loads(owner_file.read_text())
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f" (pid {info['pid']} on {info['host']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


@contextmanager
def run_lock(path: str | Path, stale_after: float = 12 * 3600) -> Iterator[dict]:
    """Hold the run lock at ``path`` for the block, or raise :class:`LockHeld` at once.

    ``stale_after`` (seconds): a holder older than this is only reported (log warning): the OS
    releases the lock of a process that died, so an old holder is a live, possibly hung run.
    Yields the owner record ``{"host", "pid", "started"}``. Source: ``filelock.FileLock``
    (``fcntl.flock`` on POSIX).
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner_file = path.with_name(path.name + ".owner")
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = _holder(owner_file)
        try:
            info = json.loads(owner_file.read_text())
            if time.time() - float(info["started"]) > stale_after:
                log.warning("the run holding %s has held it for over %.0f s; is it hung?", path, stale_after)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        raise LockHeld(f"another run holds {path}{who}; exiting without doing anything") from None
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    try:
        tmp = owner_file.with_name(f".{owner_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(me))
        os.replace(tmp, owner_file)
        yield me
    finally:
        owner_file.unlink(missing_ok=True)
        lock.release()
