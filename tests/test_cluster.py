"""Cluster mode: spark-submit through a real standalone cluster, with the project shipped as a zip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyfiles_zip_holds_exactly_the_packages_pyproject_ships(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_pyfiles.py"), "-o", str(tmp_path / "sae.zip")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    names = zipfile.ZipFile(out).namelist()
    assert {n.split("/")[0] for n in names} == {"jobs", "pipelines", "sae_model"}
    assert "pipelines/publish.py" in names and not any("__pycache__" in n for n in names)
    first = Path(out).read_bytes()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_pyfiles.py"), "-o", out], check=True)
    assert Path(out).read_bytes() == first  # same sources, same bytes


def test_conf_dir_can_be_set_for_code_imported_from_a_zip(tmp_path, monkeypatch):
    from pipelines.config import load_config

    (tmp_path / "base.yaml").write_text("paths:\n  root: /elsewhere\n")
    monkeypatch.setenv("SAE_CONF_DIR", str(tmp_path))
    assert load_config().paths.root == "/elsewhere"


@pytest.mark.slow
def test_submitted_job_runs_shipped_code_on_both_executors(spark_cluster, tmp_path):
    cwd = tmp_path / "cwd"  # not the checkout: nothing may be imported through the working dir
    cwd.mkdir()
    root = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_", "SAE_"))}
    env["SAE_DIST"] = str(tmp_path / "dist")
    env["SPARK_LOCAL_IP"] = "127.0.0.1"  # the driver binds here too, never to the machine's address
    proc = subprocess.run(
        [
            str(ROOT / "scripts" / "submit.sh"),
            "--master", spark_cluster,
            "--conf", "spark.executor.memory=512m",
            "--conf", "spark.cores.max=2",
            # Start tasks only once both executors are up, so the partitions spread over them.
            "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
            "--conf", "spark.scheduler.maxRegisteredResourcesWaitingTime=60s",
            "--conf", "spark.ui.enabled=false",
            "--conf", "spark.driver.host=127.0.0.1",
            str(ROOT / "jobs" / "cluster_check.py"),
            f"paths.root={root}",
            "--partitions", "4",
        ],
        check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=180,
    )
    errors = "\n".join(line for line in proc.stderr.splitlines() if " INFO " not in line)
    assert proc.returncode == 0, errors[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["master"] == spark_cluster
    assert summary["rows"] == 4 * 5  # 4 partitions of 5 rows
    assert summary["executors"] == 2  # one per worker

    table = pq.read_table(root / "cluster_check")
    assert table.num_rows == 20
    assert table.schema.field("item_id").type == "int64"
    assert sorted(table.column("item_id").to_pylist()) == list(range(20))
    # The modules the executors ran came from the shipped zip, never from the source tree.
    for column in ("schemas_file", "publish_file"):
        for path in set(table.column(column).to_pylist()):
            assert "sae.zip" in path and not path.startswith(str(ROOT)), path
    # Both workers ran tasks (each executor works in its own worker's work dir).
    workers = {Path(d).parts[-4] for d in table.column("executor_cwd").to_pylist()}
    assert workers == {"worker-1", "worker-2"}, workers
    assert (root / "cluster_check").is_symlink()  # published through the atomic link swap
