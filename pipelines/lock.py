"""A run lock for unattended jobs: one nightly run at a time, stale locks taken over.

The lock is a file created with O_EXCL holding the owner's host, pid and start time. A second
run finds it and exits at once; a lock whose process is gone (same host, pid not alive) is stale
and is taken over. On a shared filesystem a lock from another host is honoured until it is older
than ``stale_after`` seconds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live run holds the lock."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(info: dict, stale_after: float) -> bool:
    if info.get("host") == socket.gethostname():
        return not _alive(int(info.get("pid", -1)))
    return time.time() - float(info.get("started", 0)) > stale_after


def _young(path: Path, seconds: float = 60.0) -> bool:
    try:
        return time.time() - path.stat().st_mtime < seconds
    except OSError:
        return False


@contextmanager
def run_lock(path: str | Path, stale_after: float = 12 * 3600) -> Iterator[dict]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                info = json.loads(path.read_text() or "{}")
            except (OSError, ValueError):
                info = {}
            if not info and _young(path):
                # Created but not written yet: another run is taking the lock right now.
                raise LockHeld(f"another run is taking {path} right now; exiting without doing anything") from None
            if info and not _stale(info, stale_after):
                started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
                raise LockHeld(
                    f"another run holds {path} (pid {info['pid']} on {info['host']}, started {started}); "
                    "exiting without doing anything"
                ) from None
            # Stale: the owner died. Remove and retry the exclusive create once.
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise LockHeld(f"could not take {path}: another run took it over at the same moment")
    try:
        yield me
    finally:
        try:
            if json.loads(path.read_text()).get("pid") == me["pid"]:
                path.unlink()
        except (OSError, ValueError):
            pass
