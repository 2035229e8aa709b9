"""Scheduling shipped with nightly retraining: the Airflow DAG's task graph (checked without Airflow,
and through Airflow itself when it is installed) and the Kubernetes CronJob manifest."""

from __future__ import annotations

from pathlib import Path

import yaml

from jobs import nightly_dag
from pipelines.nightly import STEP_FUNCTIONS, STEPS

ROOT = Path(__file__).resolve().parent.parent


def test_dag_task_graph_is_the_steps_in_order():
    # Plain Python: runs whether or not Airflow is installed.
    # Written out, not derived from STEPS: a reordered or dropped step must fail here.
    assert nightly_dag.TASKS == {
        "ingest": [],
        "train": ["ingest"],
        "evaluate": ["train"],
        "promote": ["evaluate"],
        "publish": ["promote"],
        "report": ["publish"],
    }
    assert list(nightly_dag.TASKS) == STEPS == list(STEP_FUNCTIONS)
    cmd = nightly_dag.command("train", "conf/x.yaml")
    assert cmd.split() == ["sae", "nightly", "--config", "conf/x.yaml", "--step", "train", "nightly.date={{ds}}"]


def test_dag_step_commands_parse_with_the_cli():
    from jobs.cli import build_parser

    for step in STEPS:
        args = build_parser().parse_args(nightly_dag.command(step, "conf/local.yaml", "2024-01-02").split()[1:])
        assert args.step == [step] and args.overrides == ["nightly.date=2024-01-02"]


def test_kubernetes_cronjob_manifest():
    doc = yaml.safe_load((ROOT / "docker" / "nightly-cronjob.yaml").read_text())
    assert doc["apiVersion"] == "batch/v1" and doc["kind"] == "CronJob"
    spec = doc["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    fields = spec["schedule"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"]  # once a day
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    cmd = container["command"]
    assert cmd[:2] == ["/opt/sae/.venv/bin/sae", "nightly"] and cmd[cmd.index("--config") + 1] == "/config/nightly.yaml"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/data", "/config"} <= mounts
