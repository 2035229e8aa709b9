"""Apache Airflow DAG for nightly retraining: one task per step of ``pipelines.nightly.STEPS``.

Copy (or symlink) this file into Airflow's ``dags/`` folder on a host where the project is installed.
Each task runs ``sae nightly --step NAME`` for the DAG run's date (``nightly.date={{ds}}``) in a
child process: the same library functions, lock and per-night state file as the one-command run,
so a cleared task resumes where it failed and a task retried after a success does nothing.

Airflow is an optional extra, never a dependency of the project: ``TASKS`` (the task graph) is plain
Python that tests check without Airflow, and only the last block needs Airflow.

Settings (environment of the Airflow worker): ``SAE_NIGHTLY_CONFIG`` (default ``conf/local.yaml``),
``SAE_NIGHTLY_SCHEDULE`` (cron, default ``30 2 * * *``), ``SAE_BIN`` (default ``sae``).
"""

from __future__ import annotations

import datetime as dt
import os

from pipelines.nightly import STEPS

DAG_ID = "sae_nightly"
SCHEDULE = os.environ.get("SAE_NIGHTLY_SCHEDULE", "30 2 * * *")
CONFIG = os.environ.get("SAE_NIGHTLY_CONFIG", "conf/local.yaml")
SAE = os.environ.get("SAE_BIN", "sae")

# task_id -> upstream task_ids: a chain in the order of STEPS.
TASKS: dict[str, list[str]] = {step: STEPS[i - 1 : i] for i, step in enumerate(STEPS)}


def command(step: str, config: str = CONFIG, date: str = "{{ds}}") -> str:
    """The shell command of one task (``date`` is Airflow's template of the run's logical date)."""
    return f"{SAE} nightly --config {config} --step {step} nightly.date={date}"


try:
    from airflow import DAG
    from airflow.operators.bash import BashOperator
except ImportError:  # Airflow not installed: TASKS and command() are still importable and tested
    DAG = None

if DAG is not None:
    with DAG(
        dag_id=DAG_ID,
        schedule=SCHEDULE,
        start_date=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        max_active_runs=1,  # one night at a time; the run lock enforces it anyway
        default_args={"retries": 1, "retry_delay": dt.timedelta(minutes=10)},
        tags=["sae"],
    ) as dag:
        # Exit 75 (another nightly run holds the lock) is a skip, not a failure.
        operators = {
            step: BashOperator(task_id=step, bash_command=command(step), skip_on_exit_code=75) for step in STEPS
        }
        for step, upstream in TASKS.items():
            for up in upstream:
                operators[up] >> operators[step]
