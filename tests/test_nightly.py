"""Nightly retraining over three simulated nights of MovieLens tag logs (tests/nightly_data.py):

night 1 promotes the first model; night 2's damaged feed gives a worse challenger that is kept out;
night 3 is killed after training, then fails at publishing (yesterday's tables and champion keep
serving), then resumes from there without retraining, promotes, aligns the new map to the old one,
and a re-run does nothing. Then a rollback. Each night trains a 24-16-2 model for 1+2 epochs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.lock import run_lock
from pipelines.nightly import STEPS, NightState
from tests.nightly_data import overrides, write_day, write_movies

ROOT = Path(__file__).resolve().parent.parent
DATES = ["2024-01-02", "2024-01-03", "2024-01-04"]


def cfg_for(inp: Path, root: Path, date: str, *extra: str):
    return load_config(None, [*overrides(inp, root, date), *extra])


def champion_version(root: Path) -> str:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    return str(mlflow.MlflowClient().get_model_version_by_alias("sae", "champion").version)


def codes(path: Path) -> dict[int, np.ndarray]:
    t = pq.read_table(path, columns=["item_id", "code", "model_version"]).to_pydict()
    return {i: np.array(c) for i, c in zip(t["item_id"], t["code"], strict=True)}, set(t["model_version"])


def sae(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, **(env or {})), timeout=timeout, check=False,
    )


@pytest.fixture(scope="module")
def nights(spark, tmp_path_factory):
    """Runs the three nights once for the module; yields (input dir, root, {date: state})."""
    from jobs import nightly
    from pipelines import inference

    tmp = tmp_path_factory.mktemp("nightly")
    inp, root = tmp / "in", tmp / "out"
    write_movies(inp)
    states: dict[str, object] = {"events": {}}

    # Night 1: no champion yet -> the challenger is promoted.
    states["events"][DATES[0]] = write_day(inp, DATES[0], seed=1)
    nightly.run(cfg_for(inp, root, DATES[0]), spark=spark)
    states[DATES[0]] = NightState.load(str(root), DATES[0])

    # Night 2: a damaged feed (tags on random movies, six times the volume).
    states["events"][DATES[1]] = write_day(inp, DATES[1], seed=2, damaged=True)
    nightly.run(cfg_for(inp, root, DATES[1]), spark=spark)
    states[DATES[1]] = NightState.load(str(root), DATES[1])
    states["codes_after_2"] = (root / "codes").resolve()

    # Night 3, attempt 1: a separate process dies right after the train step (lock left behind).
    states["events"][DATES[2]] = write_day(inp, DATES[2], seed=3)
    # The damage of night 2 stays in the merged counts, so a generous margin lets night 3 promote
    # and exercise alignment and rollback.
    extra = ["nightly.margin=0.9"]
    killed = sae("nightly", *overrides(inp, root, DATES[2]), *extra, env={nightly.EXIT_AFTER_ENV: "train"})
    states["killed"] = killed
    states["after_kill"] = NightState.load(str(root), DATES[2])

    # Attempt 2 (in this process, taking over the dead process's lock): publishing fails midway.
    cfg3 = cfg_for(inp, root, DATES[2], *extra)
    real = inference.top_k_neighbors

    def broken(*a, **k):
        raise OSError("disk full (simulated)")

    inference.top_k_neighbors = broken
    try:
        with pytest.raises(OSError, match="disk full"):
            nightly.run(cfg3, spark=spark)
    finally:
        inference.top_k_neighbors = real
    states["after_fail"] = NightState.load(str(root), DATES[2])
    states["codes_after_fail"] = (root / "codes").resolve()
    states["champion_after_fail"] = champion_version(root)

    # Attempt 3 continues with publish; attempt 4 finds the night done.
    nightly.run(cfg3, spark=spark)
    states[DATES[2]] = NightState.load(str(root), DATES[2])
    states["rerun"] = nightly.run(cfg3, spark=spark)
    yield inp, root, states


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_first_night_promotes(nights):
    inp, root, s = nights
    st = s[DATES[0]]
    assert st.status == "succeeded" and st.completed == STEPS
    assert st.results["ingest"]["rows_in"] == s["events"][DATES[0]]
    assert st.results["train"]["warm_start"] is False  # nothing to warm-start from
    assert st.results["promote"]["promoted"] is True
    assert st.results["publish"]["items"] == st.results["ingest"]["items_out"] > 100
    report = (root / "reports" / f"{DATES[0]}.md").read_text()
    assert "no comparable champion" in report and "ae_squared_error" in report


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_damaged_night_is_not_promoted(nights):
    inp, root, s = nights
    st = s[DATES[1]]
    assert st.status == "succeeded"
    assert st.results["ingest"]["loads"] == [f"date={DATES[1]}"]  # incremental: only the new day
    assert st.results["train"]["warm_start"] is True
    ev = st.results["evaluate"]
    assert ev["challenger"]["ae_squared_error"] > 1.05 * ev["champion"]["ae_squared_error"], ev
    assert st.results["promote"]["promoted"] is False and "kept the champion" in st.results["promote"]["reason"]
    assert st.results["publish"]["version"] == st.results["promote"]["serving_version"] == "1"
    assert codes(s["codes_after_2"])[1] == {"1"}  # night 2 published the kept champion again


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_killed_night_resumes_and_failed_publish_keeps_yesterday_serving(nights):
    inp, root, s = nights
    assert s["killed"].returncode == 137, s["killed"].stderr[-2000:]
    assert s["after_kill"].completed == ["ingest", "train"]
    failed = s["after_fail"]
    assert failed.status == "failed" and failed.failed_step == "publish" and "disk full" in failed.error
    assert failed.completed == ["ingest", "train", "evaluate", "promote"]
    assert failed.results["promote"]["promoted"] is True
    # Yesterday's tables and champion still serve after the failure.
    assert s["codes_after_fail"] == s["codes_after_2"]
    assert s["champion_after_fail"] == "1"
    done = s[DATES[2]]
    assert done.status == "succeeded" and done.attempts == 3 and done.completed == STEPS
    assert done.results["train"]["run_id"] == s["after_kill"].results["train"]["run_id"]  # not retrained
    assert champion_version(root) == done.results["train"]["version"] == "3"
    assert s["rerun"] == {"date": DATES[2], "status": "succeeded", "skipped": True}


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_alignment_keeps_shared_items_close(nights):
    from sae_model.data import load_table
    from sae_model.loading import load_encoder

    inp, root, s = nights
    pub = s[DATES[2]].results["publish"]
    assert pub["alignment"] is not None and pub["map_drift_rms"] == pub["alignment"]["residual"]
    new, versions = codes(root / "codes")
    old, old_versions = codes(s["codes_after_2"])
    assert versions == {"3"} and old_versions == {"1"}
    shared = sorted(set(new) & set(old))
    aligned = np.stack([new[i] for i in shared])
    before = np.stack([old[i] for i in shared])
    ids, x = load_table(f"file://{root / 'features'}", 24)
    order = {int(i): k for k, i in enumerate(ids)}
    raw = load_encoder(pub["model_uri"]).encode(x[[order[i] for i in shared]])
    rms = lambda a: float(np.sqrt(((a - before) ** 2).sum(axis=1).mean()))  # noqa: E731
    # The published map is the aligned one: its drift is the recorded residual, and no more than unaligned.
    assert rms(aligned) == pytest.approx(pub["map_drift_rms"], rel=1e-3)
    assert rms(aligned) <= rms(raw) + 1e-9
    assert "map drift" in (root / "reports" / f"{DATES[2]}.md").read_text().lower()


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_concurrent_start_exits_at_once(nights, tmp_path):
    inp, root, s = nights
    from jobs.nightly import EXIT_LOCKED
    from pipelines.nightly import lock_path

    cfg = cfg_for(inp, root, "2024-01-05")
    with run_lock(lock_path(cfg)):
        out = sae("nightly", *overrides(inp, root, "2024-01-05"), timeout=120)
    assert out.returncode == EXIT_LOCKED, out.stderr[-2000:]
    assert "another run holds" in out.stderr and "exiting without doing anything" in out.stderr
    assert not (root / "nightly" / "2024-01-05.json").exists()


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_failure_names_the_step(nights, monkeypatch, capsys):
    from jobs import cli
    from jobs import nightly as job
    from pipelines import nightly

    inp, root, s = nights

    def boom(spark, cfg, state):
        raise ValueError("no space left")

    monkeypatch.setitem(nightly.STEP_FUNCTIONS, "ingest", boom)
    monkeypatch.setattr(job, "NEEDS_SPARK", set())  # the job would build (and stop) a session: not this one
    rc = cli.main(["nightly", "--step", "ingest", *overrides(inp, root, "2024-01-06")])
    assert rc == 1
    assert "nightly failed at step 'ingest': no space left" in capsys.readouterr().err
    st = NightState.load(str(root), "2024-01-06")
    assert st.status == "failed" and st.failed_step == "ingest" and st.completed == []


@pytest.mark.slow  # three nights through the CLI, one in a child process
def test_rollback_restores_previous_champion_and_tables(nights):
    from jobs import rollback

    inp, root, s = nights
    out = rollback.run(cfg_for(inp, root, DATES[2]))
    assert out["champion"] == "1" and out["rolled_back_from"] == "3"
    assert champion_version(root) == "1"
    assert (root / "codes").resolve() == s["codes_after_2"]
    assert codes(root / "codes")[1] == {"1"}


def test_nightly_config_is_checked():
    with pytest.raises(ConfigError, match="nightly.margin"):
        load_config(None, ["nightly.margin=1.5"])
    with pytest.raises(ConfigError, match="nightly.date"):
        load_config(None, ["nightly.date=tomorrow"])
    with pytest.raises(ConfigError, match="nightly.metric"):
        load_config(None, ["nightly.metric=accuracy"])


def test_state_file_is_json(tmp_path):
    st = NightState.load(str(tmp_path), "2024-01-02")
    st.completed.append("ingest")
    st.results["ingest"] = {"rows_in": 3}
    st.save()
    data = json.loads((tmp_path / "nightly" / "2024-01-02.json").read_text())
    assert data["completed"] == ["ingest"] and "path" not in data
    assert NightState.load(str(tmp_path), "2024-01-02").pending() == STEPS[1:]


def test_warm_start_copies_weights_and_checks_layers(tmp_path):
    import torch

    from sae_model.loading import save_model
    from sae_model.model import StackedAutoencoder
    from sae_model.trainer import TrainingError, warm_start

    torch.manual_seed(0)
    champ = StackedAutoencoder([24, 16, 2])
    path = save_model(champ, tmp_path / "champ")
    fresh = StackedAutoencoder([24, 16, 2])
    warm_start(fresh, str(path))
    for (k, a), b in zip(champ.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(TrainingError, match="differ from model.layers"):
        warm_start(StackedAutoencoder([24, 8, 2]), str(path))
