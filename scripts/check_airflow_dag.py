"""Check jobs/nightly_dag.py under a real Apache Airflow (an optional extra, not in the test suite).

    pip install apache-airflow && python scripts/check_airflow_dag.py

The suite checks the DAG's task graph without Airflow (tests/test_nightly_schedule.py); this adds the
import under Airflow itself, where it is installed.
"""

from __future__ import annotations

import sys

from jobs import nightly_dag
from pipelines.nightly import STEPS


def main() -> int:
    if nightly_dag.DAG is None:
        print("Apache Airflow is not importable here: pip install apache-airflow first", file=sys.stderr)
        return 2
    dag = nightly_dag.dag
    assert dag.dag_id == "sae_nightly", dag.dag_id
    assert [t.task_id for t in dag.topological_sort()] == STEPS
    for step, upstream in nightly_dag.TASKS.items():
        assert sorted(dag.get_task(step).upstream_task_ids) == upstream, step
    print(f"ok: {dag.dag_id} with tasks {STEPS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
