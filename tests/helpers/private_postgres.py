"""A PostgreSQL server of a test's own, that the test may stop and start (the shared server is never touched).

initdb and pg_ctl come from the PostgreSQL installation (`pg_config --bindir`, else /usr/lib/postgresql/*/bin).
PostgreSQL refuses to run as root: as root the server runs as the `postgres` user (runuser), in a folder of
/tmp that user owns. Without either, the test is skipped (a failure under DISTILLERY_TEST_REQUIRE_SERVICES=1).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.services import free_port, unavailable


def _bin_dir() -> Path | None:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and (Path(out.stdout.strip()) / "initdb").exists():
            return Path(out.stdout.strip())
    except FileNotFoundError:
        pass
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@dataclass
class PrivatePostgres:
    bin_dir: Path
    data: Path
    port: int
    as_user: list[str]  # the command prefix that runs a server tool as a user PostgreSQL accepts

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str) -> None:
        cmd = [*self.as_user, str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "20", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise AssertionError(f"pg_ctl {args[0]} failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data.parent} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg_ctl("start", "-l", str(self.data.parent / "server.log"), "-o", options)

    def stop(self) -> None:
        """Stop now, closing every client's connection (what clients see while a server restarts)."""
        self._pg_ctl("stop", "-m", "fast")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    """A started server on a free port, with a `postgres` superuser (trust); stopped and deleted on exit."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        unavailable("a PostgreSQL installation (initdb)", FileNotFoundError("initdb"))
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="distillery-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as e:
            shutil.rmtree(folder)
            unavailable("a `postgres` user to run PostgreSQL as (not root)", e)
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PrivatePostgres(bin_dir=bin_dir, data=folder / "data", port=free_port(), as_user=as_user)
    try:
        init = subprocess.run(
            [
                *as_user,
                str(bin_dir / "initdb"),
                "-D",
                str(server.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if init.returncode != 0:
            unavailable("initdb", RuntimeError(init.stderr[-2000:]))
        server.start()
        yield server
    finally:
        if (server.data / "postmaster.pid").exists():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
