"""A real Spark standalone cluster on this machine: one master and N workers on 127.0.0.1.

Used by the test suite (the ``spark_cluster`` fixture) and by hand, to try ``spark-submit`` against
a cluster before there is a real one::

    python scripts/standalone_cluster.py start      # prints the master URL, leaves it running
    python scripts/standalone_cluster.py status
    python scripts/standalone_cluster.py stop

    with StandaloneCluster(base_dir) as cluster:     # from Python: torn down on exit
        submit(..., master=cluster.master_url)

Only the standard library: it runs the pyspark package's own ``bin/spark-class`` (that package dir is
a complete ``SPARK_HOME``). Every daemon gets free ports picked at start, its own work and log
directory, and its own process group, so stopping kills the executors and Python workers it
started too. Ports are bound with ``spark.port.maxRetries=0``: a port taken in the meantime makes
the start fail and retry with new ports, instead of Spark silently moving to the next port.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("standalone_cluster")

HOST = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
STATE_FILE = "cluster.json"
DEFAULT_BASE = Path("out/standalone-cluster")  # under /out/, which git ignores
START_ATTEMPTS = 3


class ClusterError(RuntimeError):
    """The cluster did not come up; the message says which daemon and ends with its log."""


@dataclass
class Daemon:
    name: str
    pid: int
    log: str

    def alive(self) -> bool:
        # The pid must still be our JVM: after a reboot or a long wait it may name another process.
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"org.apache.spark.deploy" in cmdline


@dataclass
class ClusterState:
    base_dir: str
    master_url: str = ""
    webui_url: str = ""
    daemons: list[Daemon] = field(default_factory=list)


def spark_home() -> Path:
    """The pyspark package directory: a full Spark distribution (bin/, jars/)."""
    spec = importlib.util.find_spec("pyspark")
    if spec is None or not spec.submodule_search_locations:
        raise ClusterError("pyspark is not installed in this interpreter; run `make setup` first")
    return Path(spec.submodule_search_locations[0])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: if the process that started the cluster dies without tearing
    # it down (pytest killed), the kernel sends SIGTERM, and the daemons' shutdown hooks kill their
    # executors. Survives the exec of spark-class into java.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


class StandaloneCluster:
    """One master and ``workers`` workers (``cores`` cores and ``memory`` each) on 127.0.0.1."""

    def __init__(
        self,
        base_dir: str | Path,
        workers: int = 2,
        cores: int = 1,
        memory: str = "1g",
        daemon_memory: str = "256m",
        timeout_s: float = 90.0,
        die_with_parent: bool = True,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.daemon_memory = daemon_memory
        self.timeout_s = timeout_s
        self.die_with_parent = die_with_parent
        self.state = ClusterState(base_dir=str(self.base_dir))
        self._procs: dict[int, subprocess.Popen] = {}

    @property
    def master_url(self) -> str:
        return self.state.master_url

    @property
    def webui_url(self) -> str:
        return self.state.webui_url

    # ------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Start the master and workers, wait until every worker registered; returns the master URL."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if (self.base_dir / STATE_FILE).exists():
            old = load_state(self.base_dir)
            if any(d.alive() for d in old.daemons):
                raise ClusterError(f"a cluster from {self.base_dir} is still running ({old.master_url}); stop it first")
        last: ClusterError | None = None
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start_once(attempt)
                return self.master_url
            except ClusterError as exc:
                self.stop()
                last = exc
                log.warning("cluster start attempt %d failed: %s", attempt, str(exc).splitlines()[0])
        assert last is not None
        raise last

    def _start_once(self, attempt: int) -> None:
        port, webui = free_port(), free_port()
        self.state = ClusterState(
            base_dir=str(self.base_dir),
            master_url=f"spark://{HOST}:{port}",
            webui_url=f"http://{HOST}:{webui}",
        )
        run = self.base_dir / f"run-{attempt}"
        master = self._spawn("master", [MASTER_CLASS, "--host", HOST, "--port", str(port), "--webui-port", str(webui)], run)
        self._wait(lambda info: info.get("status") == "ALIVE", "the master to come up", [master])
        for i in range(1, self.workers + 1):
            work_dir = run / f"worker-{i}" / "work"
            work_dir.mkdir(parents=True, exist_ok=True)
            args = [
                WORKER_CLASS, self.master_url,
                "--host", HOST,
                "--webui-port", str(free_port()),
                "--cores", str(self.cores),
                "--memory", self.memory,
                "--work-dir", str(work_dir),
            ]
            self._spawn(f"worker-{i}", args, run)
        self._wait(
            lambda info: sum(w.get("state") == "ALIVE" for w in info.get("workers", [])) >= self.workers,
            f"{self.workers} workers to register",
            self.state.daemons,
        )
        self._save()
        log.info("standalone cluster up: %s (web UI %s, logs under %s)", self.master_url, self.webui_url, run)

    def stop(self) -> None:
        """Kill every daemon's process group (executors and Python workers included). Idempotent."""
        stop_daemons(self.state.daemons)
        self.state.daemons = []
        state = self.base_dir / STATE_FILE
        if state.exists():
            state.unlink()

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ helpers

    def _spawn(self, name: str, args: list[str], run: Path) -> Daemon:
        log_dir = run / name / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_file = log_dir / f"{name}.out"
        home = spark_home()
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(home),
            SPARK_LOCAL_IP=HOST,
            SPARK_LOG_DIR=str(log_dir),
            SPARK_CONF_DIR=str(run / "conf"),  # empty: no spark-defaults.conf from elsewhere
            SPARK_DAEMON_MEMORY=self.daemon_memory,
            # Fail on a taken port (we retry with new ones) rather than bind the next port up.
            SPARK_DAEMON_JAVA_OPTS="-Dspark.port.maxRetries=0",
            # Executors and their Python workers run this interpreter unless a job says otherwise.
            PYSPARK_PYTHON=env.get("PYSPARK_PYTHON", sys.executable),
        )
        (run / "conf").mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as out:
            proc = subprocess.Popen(
                [str(home / "bin" / "spark-class"), *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(run),
                env=env,
                start_new_session=True,  # its own process group: stop() kills it and its children
                # Only prctl runs between fork and exec, which is safe even with threads about.
                preexec_fn=_die_with_parent if self.die_with_parent else None,  # noqa: PLW1509
            )
        daemon = Daemon(name=name, pid=proc.pid, log=str(log_file))
        self.state.daemons.append(daemon)
        self._procs[proc.pid] = proc
        return daemon

    def _wait(self, ready, what: str, daemons: list[Daemon]) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for d in daemons:
                proc = self._procs.get(d.pid)
                if proc is not None and proc.poll() is not None:
                    raise ClusterError(f"{d.name} exited with {proc.returncode} while waiting for {what}\n{_tail(d.log)}")
            info = master_info(self.webui_url)
            if info is not None and ready(info):
                return
            time.sleep(0.5)
        logs = "\n".join(f"--- {d.name}\n{_tail(d.log)}" for d in daemons)
        raise ClusterError(f"timed out after {self.timeout_s:.0f}s waiting for {what}\n{logs}")

    def _save(self) -> None:
        state = {**asdict(self.state)}
        (self.base_dir / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")


def master_info(webui_url: str) -> dict | None:
    """The master's JSON status page (workers, apps), or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{webui_url}/json/", timeout=2) as resp:
            return json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def load_state(base_dir: str | Path) -> ClusterState:
    path = Path(base_dir) / STATE_FILE
    if not path.exists():
        raise ClusterError(f"no cluster state in {path}: was `start` run with this --base-dir?")
    data = json.loads(path.read_text(encoding="utf-8"))
    return ClusterState(
        base_dir=data["base_dir"],
        master_url=data["master_url"],
        webui_url=data["webui_url"],
        daemons=[Daemon(**d) for d in data["daemons"]],
    )


def stop_daemons(daemons: list[Daemon], grace_s: float = 10.0) -> None:
    """SIGTERM each daemon's process group (workers first), then SIGKILL what is left.

    A group is only signalled while it still holds Spark processes (the daemon, or executors and
    Python workers it left behind), so a stale state file cannot make us kill someone else's pids.
    """
    ordered = sorted(daemons, key=lambda d: d.name == "master")  # workers, then the master
    groups = [d.pid for d in ordered if _spark_members(d.pid)]
    for pgid in groups:
        _killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for pgid in groups:
        while _spark_members(pgid) and time.monotonic() < deadline:
            _reap(pgid)
            time.sleep(0.2)
        if _spark_members(pgid):
            log.warning("process group %d did not stop on SIGTERM; killing it", pgid)
            _killpg(pgid, signal.SIGKILL)
        _reap(pgid)


def _spark_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of group ``pgid`` that are Spark JVMs or PySpark workers."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z" and (b"spark" in cmdline or b"pyspark" in cmdline):
            members.append(int(entry))
    return members


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A Spark standalone cluster on 127.0.0.1 for trying spark-submit.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--base-dir", default=str(DEFAULT_BASE), help="work dirs, logs and state (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="1g", help="memory per worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    if args.action == "start":
        cluster = StandaloneCluster(args.base_dir, args.workers, args.cores, args.memory, die_with_parent=False)
        sys.stdout.write(cluster.start() + "\n")
        return 0
    try:
        state = load_state(args.base_dir)
    except ClusterError as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    if args.action == "stop":
        stop_daemons(state.daemons)
        (Path(args.base_dir) / STATE_FILE).unlink()
        log.info("stopped %s", state.master_url)
        return 0
    info = master_info(state.webui_url)
    alive = [d.name for d in state.daemons if d.alive()]
    workers = [] if info is None else [w for w in info.get("workers", []) if w.get("state") == "ALIVE"]
    sys.stdout.write(
        json.dumps(
            {
                "master_url": state.master_url,
                "webui_url": state.webui_url,
                "status": None if info is None else info.get("status"),
                "alive_workers": len(workers),
                "running_apps": [] if info is None else [a.get("id") for a in info.get("activeapps", [])],
                "processes_alive": alive,
            },
            indent=2,
        )
        + "\n"
    )
    return 0 if info is not None and info.get("status") == "ALIVE" else 1


if __name__ == "__main__":
    sys.exit(main())
