import json
import multiprocessing
import os
import random
import signal
import socket
import threading

import numpy as np
import pytest

from pipelines.alignment import procrustes
from pipelines.lock import LockHeld, run_lock


def test_procrustes_undoes_rotation_flip_scale_and_shift():
    rng = np.random.default_rng(0)
    old = rng.normal(size=(200, 2))
    theta = 2.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    flip = np.array([[1.0, 0.0], [0.0, -1.0]])
    new = 3.0 * old @ rot @ flip + np.array([5.0, -2.0])
    al = procrustes(new, old)
    assert al.residual < 1e-9
    np.testing.assert_allclose(al.apply(new), old, atol=1e-5)
    assert al.scale == pytest.approx(1 / 3.0)


def test_procrustes_residual_reports_real_drift():
    rng = np.random.default_rng(1)
    old = rng.normal(size=(100, 2))
    noisy = old + rng.normal(scale=0.1, size=old.shape)
    al = procrustes(noisy, old, scaling=False)
    assert 0.05 < al.residual < 0.2 and al.scale == 1.0
    with pytest.raises(ValueError, match="same shape"):
        procrustes(old[:5], old[:6])


def test_lock_refuses_second_holder_and_is_free_after_release(tmp_path):
    lock = tmp_path / "nightly.lock"
    with run_lock(lock) as me:
        assert json.loads((tmp_path / "nightly.lock.owner").read_text())["pid"] == me["pid"] == os.getpid()
        with pytest.raises(LockHeld, match=rf"another run holds .*pid {os.getpid()} on .*exiting without doing anything"):
            with run_lock(lock):
                pass
    assert not (tmp_path / "nightly.lock.owner").exists()
    with run_lock(lock):  # released: the next run gets it
        pass


def _hold_until_killed(path: str, held) -> None:
    with run_lock(path):
        held.set()
        threading.Event().wait()  # until SIGKILL


def test_lock_of_a_killed_run_is_free_at_once(tmp_path):
    lock = str(tmp_path / "nightly.lock")
    ctx = multiprocessing.get_context("fork")
    held = ctx.Event()
    proc = ctx.Process(target=_hold_until_killed, args=(lock, held))
    proc.start()
    assert held.wait(20)
    with pytest.raises(LockHeld, match=f"pid {proc.pid}"), run_lock(lock):
        pass
    os.kill(proc.pid, signal.SIGKILL)  # kill -9: no clean-up runs, the owner file stays behind
    proc.join(20)
    assert json.loads((tmp_path / "nightly.lock.owner").read_text())["pid"] == proc.pid
    with run_lock(lock) as me:
        assert json.loads((tmp_path / "nightly.lock.owner").read_text())["pid"] == me["pid"] == os.getpid()


def _contend(path: str, start, tried, seed: int) -> None:
    spin = random.Random(seed).randrange(20000)  # a seeded head start, so rounds interleave differently
    start.wait()
    for _ in range(spin):
        pass
    try:
        with run_lock(path):
            tried.wait()  # hold it until the other one has tried
            code = 10
    except LockHeld:
        tried.wait()
        code = 11
    os._exit(code)


def test_two_runs_racing_for_a_dead_runs_lock_exactly_one_wins(tmp_path):
    ctx = multiprocessing.get_context("fork")
    for seed in range(40):
        lock = tmp_path / f"round{seed}.lock"
        # What a killed run of the old O_EXCL lock left behind: a lock naming a dead process.
        dead = {"host": socket.gethostname(), "pid": 999999999, "started": 0}
        lock.write_text(json.dumps(dead))
        lock.with_name(lock.name + ".owner").write_text(json.dumps(dead))
        start, tried = ctx.Barrier(2), ctx.Barrier(2)
        procs = [ctx.Process(target=_contend, args=(str(lock), start, tried, seed * 2 + i)) for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(p.exitcode for p in procs) == [10, 11], f"seed {seed}"
