"""Benchmark: the real jobs through spark-submit on the 2-worker standalone cluster vs local mode.

    .venv/bin/python benchmarks/bench_cluster.py                          # 20,000 items (quick)
    .venv/bin/python benchmarks/bench_cluster.py --items 1000000 --tags 64  # the issue's size

Synthetic data (``data.source=synthetic``). For each master (``local[2]``, then the cluster: master +
two 1-core/1g workers on 127.0.0.1) it times ``jobs/ingest.py`` and, unless ``--no-infer``,
``jobs/infer.py`` with one small model trained once beforehand (in local mode, not timed). While a
job runs, every process it started (spark-submit's tree, the workers' executors and Python workers)
is sampled every 0.2 s; the table shows wall time and the peak RSS (VmHWM) per process kind:
the driver JVM, the driver's Python, each executor JVM, the Python workers (largest one). In local
mode the executors live in the driver JVM. Not a timed test; the machine is shared, so numbers vary.

Measured 2026-11-28 on the shared 2-core dev VM (other engineers' jobs running: load average 16-22
during the first run, lower in the second), 20,000 items x 64 tags, driver 2g, executors 1g; peak
RSS MiB per process:
    run 1 (with infer; its driver column still counted spark-class's launcher JVM, now filtered out)
    master       job      wall s  driver JVM  driver py  executor JVMs     py worker (max)
    local[2]     ingest     84.9       639        120            -              60 (x3)
    local[2]     infer     139.7       627        472            -           1,013 (x3)
    cluster 2x1  ingest    106.8       436        120    436 / 358             60 (x4)
    cluster 2x1  infer     141.1       462        292    447 / 358 / 348    1,065 (x4)
    run 2 (--no-infer, quieter machine)
    local[2]     ingest     22.8       782        120            -              60 (x3)
    cluster 2x1  ingest     47.2  457 / 399       119    452 / 444             60 (x4)
Two driver-side JVMs matched in the cluster run (not yet explained). At this size start-up (JVMs,
executors registering, Python workers importing torch) dominates and the one-machine "cluster" is
slower than local[2].

Measured 2026-11-29 on the same machine with nothing else running, the issue's size
(``--items 1000000 --tags 64``, 6 min 26 s in all, model training untimed):
    master       job      wall s   driver JVM  driver py   executor JVMs  py worker (max)
    local[2]     ingest     77.1        1,663        137               -          60 (x3)
    local[2]     infer      67.3        1,325        642               -         618 (x6)
    cluster 2x1  ingest     97.7          454        137 886 / 853 / 416          60 (x4)
    cluster 2x1  infer      95.5          854        463       792 / 770         678 (x8)
Both produce 1,000,000 items. Two 1-core workers on the same two cores cost 1.27x (ingest) and
1.42x (infer) of local[2]: every shuffle block crosses the loopback network and each executor has
1 GiB instead of the driver's 2 GiB; memory moves from the driver JVM (local mode holds the
executors) to the executors. A third executor JVM (416 MiB) appeared during the cluster ingest;
with two 1-core workers that means one executor was replaced; the log was not kept, so why is
not known.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "scripts" / "submit.sh"


def load_cluster_module():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("standalone_cluster", ROOT / "scripts" / "standalone_cluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["standalone_cluster"] = module
    spec.loader.exec_module(module)
    return module


def kind_of(cmdline: list[str]) -> str | None:
    line = " ".join(cmdline)
    if "CoarseGrainedExecutorBackend" in line:
        return "executor JVM"
    if "org.apache.spark.deploy.SparkSubmit" in line:
        # Not spark-class's bash wrappers nor its short-lived launcher JVM (org.apache.spark.launcher.Main).
        return "driver JVM" if cmdline[0].endswith("java") and "launcher.Main" not in line else None
    if "pyspark.daemon" in line or "pyspark.worker" in line or "pyspark/daemon" in line:
        return "python worker"
    if "jobs/" in line and "python" in line:
        return "driver python"
    return None


def peak_kib(p: psutil.Process) -> int:
    try:
        for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """Peak RSS of every process under the given roots (spark-submit, cluster daemons), by kind."""

    def __init__(self, roots: list[int]) -> None:
        super().__init__(daemon=True)
        self.roots, self.stop_flag = roots, threading.Event()
        self.peaks: dict[tuple[str, int], int] = {}

    def run(self) -> None:
        while not self.stop_flag.is_set():
            for root in self.roots:
                try:
                    procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for p in procs:
                    try:
                        kind = kind_of(p.cmdline())
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    if kind:
                        key = (kind, p.pid)
                        self.peaks[key] = max(self.peaks.get(key, 0), peak_kib(p))
            time.sleep(0.2)

    def summary(self) -> dict[str, str]:
        by_kind: dict[str, list[int]] = defaultdict(list)
        for (kind, _), kib in self.peaks.items():
            by_kind[kind].append(kib)
        out = {}
        for kind, values in sorted(by_kind.items()):
            mib = sorted((v / 1024 for v in values), reverse=True)
            out[kind] = " / ".join(f"{m:,.0f}" for m in mib) if kind != "python worker" else f"{mib[0]:,.0f} (x{len(mib)})"
        return out


def submit(master: str, job: str, args: list[str], roots: list[int], workdir: Path) -> tuple[float, dict[str, str], dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK_", "SPARK_", "SAE_"))}
    env.update(SAE_DIST=str(workdir / "dist"), SPARK_LOCAL_IP="127.0.0.1")
    cmd = [
        str(SUBMIT), "--master", master, "--driver-memory", "2g",
        "--conf", "spark.executor.memory=1g", "--conf", "spark.cores.max=2",
        "--conf", "spark.scheduler.minRegisteredResourcesRatio=1.0",
        "--conf", "spark.ui.enabled=false", "--conf", "spark.driver.host=127.0.0.1",
        str(ROOT / "jobs" / job), *args,
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler([proc.pid, *roots])
    sampler.start()
    out, err = proc.communicate()
    wall = time.monotonic() - t0
    sampler.stop_flag.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{job} on {master} failed:\n{err[-4000:]}")
    return wall, sampler.summary(), json.loads(out.strip().splitlines()[-1])


def train_model(root: Path, data: list[str], tags: int) -> str:
    from jobs.train import run
    from pipelines.config import load_config

    cfg = load_config(None, [
        *data, f"paths.root={root}", f"model.layers=[{tags},32,2]", "pretrain.epochs=1", "finetune.epochs=1",
        "pretrain.batch_size=256", "finetune.batch_size=256", "train.progress=false", "mlflow.registered_model=bench",
    ])
    return run(cfg)["model_uri"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--tags", type=int, default=64)
    parser.add_argument("--no-infer", action="store_true")
    parser.add_argument("--dir", default=None, help="parent of the work directory (default: the system temp dir); the work directory is removed after")
    args = parser.parse_args()
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    cluster_mod = load_cluster_module()
    data = ["data.source=synthetic", f"data.synthetic.items={args.items}", f"data.synthetic.tags={args.tags}"]
    rows: list[tuple[str, str, float, dict[str, str], str]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-", dir=args.dir) as tmp:
        work = Path(tmp)
        model_uri = tracking = None
        with cluster_mod.StandaloneCluster(work / "cluster") as cluster:
            daemons = [d.pid for d in cluster.state.daemons]
            for name, master, roots in (("local[2]", "local[2]", []), ("cluster 2x1", cluster.master_url, daemons)):
                root = work / name.split()[0].replace("[", "").replace("]", "")
                wall, mem, out = submit(master, "ingest.py", [*data, f"paths.root={root}"], roots, work)
                rows.append((name, "ingest", wall, mem, f"{out['items_out']:,} items"))
                if args.no_infer:
                    continue
                if model_uri is None:  # trained on the first (local) features/, not timed
                    model_uri = train_model(root, data, args.tags)
                    tracking = f"sqlite:///{root / 'mlflow.db'}"
                wall, mem, out = submit(
                    master, "infer.py",
                    [*data, f"paths.root={root}", f"infer.model_uri={model_uri}", f"mlflow.tracking_uri={tracking}"],
                    roots, work,
                )
                rows.append((name, "infer", wall, mem, f"{out.get('items', '?'):,} items"))
    print(f"\n{args.items:,} synthetic items x {args.tags} tags; peak RSS MiB per process (VmHWM)")
    print(f"{'master':<12} {'job':<7} {'wall s':>7}  {'driver JVM':>11} {'driver py':>10} {'executor JVMs':>15} {'py worker (max)':>16}  result")
    for name, job, wall, mem, what in rows:
        print(
            f"{name:<12} {job:<7} {wall:>7.1f}  {mem.get('driver JVM', '-'):>11} {mem.get('driver python', '-'):>10} "
            f"{mem.get('executor JVM', '-'):>15} {mem.get('python worker', '-'):>16}  {what}"
        )


if __name__ == "__main__":
    main()
