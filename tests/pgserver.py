"""A throwaway PostgreSQL server for tests: initdb into a temp dir, listen on 127.0.0.1 at a free port,
stop and delete on exit. As root, the server runs as the ``postgres`` user (initdb refuses root)."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SETUP_HINT = "run scripts/setup_system.sh (installs postgresql and libpostgresql-jdbc-java)"


def bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(dirs[-1]).parent if dirs else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class PgServer:
    port: int
    user: str
    password: str
    database: str
    bindir: Path

    @property
    def url(self) -> str:
        return f"jdbc:postgresql://127.0.0.1:{self.port}/{self.database}"

    def psql(self, sql: str, stdin: str | None = None) -> str:
        """Run SQL (and COPY ... FROM STDIN data) through psql over TCP with the password."""
        env = {**os.environ, "PGPASSWORD": self.password}
        cmd = [str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
               "-p", str(self.port), "-U", self.user, "-d", self.database, "-c", sql]
        if not (self.bindir / "psql").exists():
            cmd[0] = shutil.which("psql") or "psql"
        out = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"psql failed: {out.stderr}")
        return out.stdout


@contextmanager
def pg_server(user: str = "sae", password: str = "pw-Zq7!secret", database: str = "postgres") -> Iterator[PgServer]:
    bins = bindir()
    if bins is None:
        raise RuntimeError(f"PostgreSQL server binaries (initdb, pg_ctl) not found; {SETUP_HINT}")
    as_root = os.geteuid() == 0
    workdir = Path(tempfile.mkdtemp(prefix="sae-pg-"))
    data, sock, pwfile, logfile = workdir / "data", workdir / "sock", workdir / "pw", workdir / "log"
    sock.mkdir()
    pwfile.write_text(password + "\n")
    run_as: list[str] = []
    if as_root:
        import pwd

        pw = pwd.getpwnam("postgres")
        for p in (workdir, sock, pwfile):
            os.chown(p, pw.pw_uid, pw.pw_gid)
        os.chmod(workdir, 0o700)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*cmd: str) -> None:
        out = subprocess.run([*run_as, *cmd], capture_output=True, text=True, check=False)
        if out.returncode:
            raise RuntimeError(f"{cmd[0]} failed: {out.stdout}\n{out.stderr}")

    started = False
    try:
        run(str(bins / "initdb"), "-D", str(data), "-U", user, f"--pwfile={pwfile}", "--auth=scram-sha-256",
            "-E", "UTF8", "--locale=C", "--no-sync")
        opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB"
        run(str(bins / "pg_ctl"), "-D", str(data), "-l", str(logfile), "-o", opts, "-w", "-t", "60", "start")
        started = True
        yield PgServer(port=port, user=user, password=password, database=database, bindir=bins)
    finally:
        if started:
            subprocess.run([*run_as, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, check=False)
        shutil.rmtree(workdir, ignore_errors=True)
