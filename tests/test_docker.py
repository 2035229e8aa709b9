"""docker/ without a Docker engine: the compose file is consistent, the image pins match pyproject,
and the GPU discovery script prints exactly the JSON Spark's resource scheduling reads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DISCOVERY = DOCKER / "gpu_discovery.sh"
IMAGE_ROOT = "/opt/sae"  # WORKDIR of the image: docker/ is copied to /opt/sae/docker


@pytest.fixture(scope="module")
def compose():
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def _command(service: dict) -> list[str]:
    return [str(part) for part in service["command"]]


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def _mount_targets(service: dict) -> set[str]:
    return {v.rsplit(":", 1)[1] for v in service.get("volumes", [])}  # "${DISK:-./d}:/data1" has two


def test_services_wire_up(compose):
    services = compose["services"]
    assert set(services) == {"spark-master", "spark-worker-gpu", "postgres", "mlflow"}
    master = _command(services["spark-master"])
    worker = _command(services["spark-worker-gpu"])
    assert "org.apache.spark.deploy.master.Master" in master
    assert "org.apache.spark.deploy.worker.Worker" in worker
    # The worker joins the master by its service name and port.
    assert f"spark://{_flag(master, '--host')}:{_flag(master, '--port')}" in worker
    # Every named volume a service mounts is declared (bind mounts start with . / or $).
    named = {
        v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if not v.startswith((".", "/", "$"))
    }
    assert named <= set(compose["volumes"]), named - set(compose["volumes"])


def test_published_ports_are_local_unique_and_match_what_listens(compose):
    services = compose["services"]
    host_ports = []
    for name, service in services.items():
        for mapping in service.get("ports", []):
            ip, host, container = mapping.split(":")
            assert ip == "127.0.0.1", f"{name} publishes {mapping} beyond this host"
            host_ports.append(host)
    assert len(host_ports) == len(set(host_ports))
    assert "8080:8080" in " ".join(services["spark-master"]["ports"])
    assert _flag(_command(services["spark-master"]), "--webui-port") == "8080"
    assert _flag(_command(services["spark-worker-gpu"]), "--webui-port") == "8081"
    assert _flag(_command(services["mlflow"]), "--port") == "5000"


def test_gpu_worker_reserves_a_gpu_and_tells_spark_about_it(compose):
    worker = compose["services"]["spark-worker-gpu"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    opts = dict(o.removeprefix("-D").split("=", 1) for o in worker["environment"]["SPARK_WORKER_OPTS"].split())
    assert opts["spark.worker.resource.gpu.amount"] == "1"  # = the devices reserved above
    script = opts["spark.worker.resource.gpu.discoveryScript"]
    assert script == f"{IMAGE_ROOT}/docker/{DISCOVERY.name}" and DISCOVERY.exists()
    assert "COPY docker ./docker" in (DOCKER / "Dockerfile").read_text()


def test_shuffle_goes_to_every_local_disk(compose):
    worker = compose["services"]["spark-worker-gpu"]
    local_dirs = worker["environment"]["SPARK_LOCAL_DIRS"].split(",")
    disks = _mount_targets(worker)
    assert len(local_dirs) >= 2 and {"/" + d.strip("/").split("/")[0] for d in local_dirs} == disks
    assert _flag(_command(worker), "--work-dir").split("/")[1] in {d.strip("/") for d in disks}
    # The driver (spark-submit in the master container) sees the same disks for paths.root.
    assert _mount_targets(compose["services"]["spark-master"]) == disks


def test_mlflow_uses_postgres_and_a_local_artefact_volume(compose):
    services = compose["services"]
    cmd = _command(services["mlflow"])
    pg = services["postgres"]["environment"]
    store = _flag(cmd, "--backend-store-uri")
    m = re.fullmatch(r"postgresql://(\w+):[^@]+@(\w+):5432/(\w+)", store)
    assert m and m.groups() == (pg["POSTGRES_USER"], "postgres", pg["POSTGRES_DB"]), store
    assert _flag(cmd, "--artifacts-destination") in _mount_targets(services["mlflow"])
    assert services["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_image_pins_match_pyproject():
    pyproject = tomllib.loads((DOCKER.parent / "pyproject.toml").read_text())
    torch_pin = next(d for d in pyproject["project"]["dependencies"] if d.startswith("torch=="))
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in dockerfile
    assert "python3.11" in dockerfile and "openjdk-17" in dockerfile


def _discover(tmp_path: Path, fake_output: str | None) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env"):  # a PATH of only these: no real nvidia-smi can leak in
        (bin_dir / tool).symlink_to(subprocess.check_output(["which", tool], text=True).strip())
    if fake_output is not None:
        fake = bin_dir / "nvidia-smi"
        fake.write_text(f"#!{bin_dir / 'bash'}\n[ \"$*\" = '--query-gpu=index --format=csv,noheader' ] || exit 9\n"
                        f"printf '{fake_output}'\n")
        fake.chmod(0o755)
    out = subprocess.run(
        [str(bin_dir / "bash"), str(DISCOVERY)], env={"PATH": str(bin_dir)}, check=True, capture_output=True, text=True
    ).stdout
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


@pytest.mark.parametrize(
    "fake_output, addresses",
    [("0\\n1\\n", ["0", "1"]), ("0\\n", ["0"]), (" 3\\n", ["3"]), (None, [])],
    ids=["two-gpus", "one-gpu", "padded", "no-nvidia-smi"],
)
def test_gpu_discovery_prints_what_spark_reads(tmp_path, fake_output, addresses):
    # Spark parses {"name": ..., "addresses": [strings]} and rejects other shapes.
    assert _discover(tmp_path, fake_output) == {"name": "gpu", "addresses": addresses}


def test_gpu_discovery_reports_none_when_nvidia_smi_fails(tmp_path):
    bin_dir = tmp_path / "fail"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    out = subprocess.run(
        ["bash", str(DISCOVERY)], env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
        check=True, capture_output=True, text=True,
    ).stdout
    assert json.loads(out) == {"name": "gpu", "addresses": []}


def test_shell_scripts_pass_shellcheck():
    # shellcheck comes with `make setup` (scripts/setup_system.sh); a missing one fails here, not skips.
    root = DOCKER.parent
    scripts = sorted([*root.glob("docker/*.sh"), *root.glob("scripts/*.sh"), root / ".ci" / "run"])
    assert DISCOVERY in scripts and len(scripts) >= 5
    r = subprocess.run(["shellcheck", "--severity=info", *map(str, scripts)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout
