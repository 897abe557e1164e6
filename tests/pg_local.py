"""A throwaway PostgreSQL server for tests: initdb into a temporary directory, listening only on a unix
socket in that directory (no TCP at all), stopped and deleted at the end.

Uses Debian's postgresql package (/usr/lib/postgresql/<version>/bin; .ci/run installs it when missing).
initdb and postgres refuse to run as root, so as root they run as the package's ``postgres`` user
(else ``nobody``) in a directory owned by that user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


def pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


class LocalPostgres:
    """``durable=False`` (the default, fast for tests): fsync and synchronous commit off, so a crash may lose
    commits. ``durable=True``: PostgreSQL's own defaults, what the credit accounting relies on in production."""

    def __init__(self, durable: bool = False):
        self.durable = durable
        self.bin = pg_bin()
        if self.bin is None:
            raise RuntimeError("PostgreSQL is not installed (no initdb); .ci/run installs Debian's postgresql package")
        self.root = Path(tempfile.mkdtemp(prefix="sd3pg-"))  # short: unix socket paths are limited to ~107 bytes
        self.data, self.sock = self.root / "data", self.root / "sock"
        self.sock.mkdir()
        self.user = None
        if os.geteuid() == 0:
            for name in ("postgres", "nobody"):
                try:
                    self.user = pwd.getpwnam(name)
                    break
                except KeyError:
                    continue
            os.chmod(self.root, 0o755)
            for p in (self.root, self.sock):
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self.url = f"postgresql:///postgres?host={self.sock}&user=sd3trt"

    def _run(self, *cmd: str, timeout: float = 60) -> None:
        def demote():
            if self.user is not None:
                os.setgid(self.user.pw_gid)
                os.setuid(self.user.pw_uid)
        out = subprocess.run(list(cmd), preexec_fn=demote, capture_output=True, text=True, timeout=timeout,
                             cwd=self.root, env={**os.environ, "LC_ALL": "C"})
        if out.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({out.returncode}): {out.stdout}{out.stderr}")

    def start(self) -> "LocalPostgres":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "sd3trt", "-A", "trust", "--no-sync",
                  "-E", "UTF8")
        return self.resume()

    def resume(self) -> "LocalPostgres":
        """Start the server on its existing data directory (after ``pause``)."""
        fast = "" if self.durable else "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
        opts = f"-k {self.sock} -c listen_addresses='' {fast}-c max_connections=100 -c shared_buffers=32MB"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "pg.log"),
                  "-w", "-t", "60", "start", timeout=90)
        return self

    def pause(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data: ``fast`` disconnects every client and shuts down cleanly,
        ``immediate`` is a crash (recovery from the WAL at the next start)."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def fresh_database(self, name: str) -> str:
        """A new empty database on this server; its URL."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}"')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql:///{name}?host={self.sock}&user=sd3trt"
