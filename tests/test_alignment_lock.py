import json
import os
import subprocess
import sys

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


def test_lock_refuses_second_holder_and_takes_over_stale(tmp_path):
    lock = tmp_path / "nightly.lock"
    with run_lock(lock):
        with pytest.raises(LockHeld, match="another run holds"), run_lock(lock):
            pass
    assert not lock.exists()
    # A lock left by a process that died is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": int(dead.stdout), "started": 0}))
    with run_lock(lock) as me:
        assert json.loads(lock.read_text())["pid"] == me["pid"] == os.getpid()


def test_lock_being_written_is_not_taken_over(tmp_path):
    # Between the exclusive create and the write the file is empty: that is a live owner, not a stale lock.
    lock = tmp_path / "nightly.lock"
    lock.write_text("")
    with pytest.raises(LockHeld, match="right now"), run_lock(lock):
        pass
    os.utime(lock, (0, 0))  # an empty file left for long: its writer died, so it is taken over
    with run_lock(lock):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
