"""Nightly retraining, safe to run unattended: what a scheduler runs once a night.

    sae nightly --config conf/local.yaml                      # tonight (UTC date)
    sae nightly --config conf/local.yaml nightly.date=2024-01-03 --step train   # one step (Airflow)
    spark-submit jobs/nightly.py --config conf/local.yaml

Steps (``pipelines.nightly.STEPS``): ingest, train, evaluate, promote, publish, report. One run at a
time (an OS lock under ``paths.root/nightly/``, released by the kernel when its process dies; a
second run exits at once with code 75). ``paths.root/nightly/DATE.json`` records the steps done: re-running a
night that succeeded does nothing; re-running one that failed continues with the step that failed.
A failure exits 1 naming the step; yesterday's codes/, neighbors/ and champion keep serving.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import nullcontext
from typing import Any

from jobs.common import (
    environment_fault,
    guarded,
    log,
    new_parser,
    record_config,
    resolve,
    setup_logging,
    spark_session,
)
from pipelines.config import Config

DESCRIPTION = (
    "Ingest what is new, train a challenger, compare it with the champion on a fixed holdout, promote "
    "it if not worse, publish aligned codes/ and neighbors/, and write a report. Resumable, one at a time."
)
# Test hook: the process dies (as if killed) right after this step is recorded.
EXIT_AFTER_ENV = "SAE_TEST_NIGHTLY_EXIT_AFTER"
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock; the scheduler may try again later
NEEDS_SPARK = {"ingest", "publish"}  # and "train" when training is distributed (see needs_spark)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--step", action="append", default=None, help="run only this step (repeatable); earlier steps must be done")


def needs_spark(cfg: Config, pending: list[str]) -> bool:
    """Whether one of the ``pending`` steps needs a SparkSession: ingest and publish always, train
    when ``train.distributed.num_processes > 1`` (TorchDistributor runs on Spark)."""
    steps = NEEDS_SPARK | ({"train"} if cfg.train.distributed.num_processes > 1 else set())
    return bool(steps & set(pending))


def _die_after(step: str) -> None:
    if os.environ.get(EXIT_AFTER_ENV) == step:
        log.warning("%s=%s: exiting now as if killed", EXIT_AFTER_ENV, step)
        logging.shutdown()
        os._exit(137)


def run(cfg: Config, only: list[str] | None = None, spark: Any = None) -> dict:
    """Run tonight's pending steps under the lock; returns the night's state as a dict.

    ``spark``: an existing session to use (and leave running), e.g. a test's; else one is built
    only if a pending step needs it.
    Raises ``LockHeld`` when another run holds the lock, and re-raises a step's error after the
    state file has recorded which step failed."""
    from pipelines.config import tracking_uri
    from pipelines.lock import run_lock
    from pipelines.nightly import NightState, lock_path, night_date, run_steps

    with run_lock(lock_path(cfg), stale_after=cfg.nightly.lock_stale_after_s):
        state = NightState.load(cfg.paths.root, night_date(cfg))
        if state.status == "succeeded" and not only:
            log.info("night %s already succeeded (%s); nothing to do", state.date, state.path)
            return {"date": state.date, "status": "succeeded", "skipped": True}
        state.attempts += 1
        state.tracking_uri = tracking_uri(cfg)
        pending = [s for s in (only or state.pending()) if s not in state.completed]
        if state.completed:
            log.info("night %s: continuing after %s", state.date, ", ".join(state.completed))
        record_config(cfg, "nightly")
        if spark is not None or not needs_spark(cfg, pending):
            ctx = nullcontext(spark)
        else:
            ctx = spark_session(cfg)
        with ctx as session:
            run_steps(session, cfg, state, only=only, after_step=_die_after)
        return {"date": state.date, "status": state.status, "completed": state.completed, "state": str(state.path)}


def main(argv: list[str] | None = None) -> int:
    parser = new_parser("sae nightly", DESCRIPTION)
    add_arguments(parser)
    return command(parser.parse_intermixed_args(argv))


def command(args: argparse.Namespace) -> int:
    from pipelines.lock import LockHeld
    from pipelines.nightly import NightState, night_date

    setup_logging()
    cfg = resolve(args)
    try:
        out = run(cfg, only=args.step)
    except LockHeld as exc:
        print(f"sae nightly: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except Exception as exc:  # noqa: BLE001 - any failure: name the step, exit non-zero
        if environment_fault(exc) is not None:
            raise  # a full or read-only disk: one line and exit 2 from jobs.common.guarded
        state = NightState.load(cfg.paths.root, night_date(cfg))
        step = state.failed_step or "setup"
        log.exception("nightly failed at step %r", step)
        print(f"nightly failed at step '{step}': {exc}", file=sys.stderr)
        print(f"(state: {state.path}; re-run the same command to continue from '{step}')", file=sys.stderr)
        return 1
    if out.get("skipped"):
        print(f"night {out['date']}: already succeeded; nothing to do")
    else:
        print(f"night {out['date']}: {out['status']} ({', '.join(out['completed'])})")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main))
