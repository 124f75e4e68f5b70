"""A real pgbouncer in transaction mode in front of the tests' Postgres, for one test.

Debian's ``pgbouncer`` package (``/usr/sbin/pgbouncer``) or one on PATH; None when neither
exists, and the pgbouncer tests skip. The ini is generated in a private directory: listen on
127.0.0.1 on a free port, no Unix socket, ``auth_type = trust`` with an auth file naming the
tests' user, ``pool_mode = transaction`` (the mode most Postgres shops run), everything else at
pgbouncer's defaults. pgbouncer refuses to run as root, so as root it runs as ``nobody``, in a
directory of its own under the system's temporary directory (see :func:`private_directory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.engine import URL

from tests.redis_service import free_port
from tests.services import admin_url

__all__ = ["PgBouncer", "pgbouncer_exe", "private_directory"]


def pgbouncer_exe() -> str | None:
    """The pgbouncer binary, if installed."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None


def private_directory() -> Path:
    """A new directory directly under the temporary directory (which ``nobody`` can traverse, unlike
    pytest's ``tmp_path`` under a root-only parent). The caller removes it."""
    return Path(tempfile.mkdtemp(prefix="polyqueue-pgbouncer-"))


class PgBouncer:
    """One pgbouncer process this test owns, forwarding every database to the tests' server."""

    def __init__(self, exe: str, directory: Path, *, pool_mode: str = "transaction", pool_size: int = 10) -> None:
        self.exe = exe
        self.directory = directory
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.port = free_port()
        self._proc: asyncio.subprocess.Process | None = None

    def url(self, database_url: URL) -> URL:
        """``database_url`` (a database on the tests' server), reached through this pgbouncer."""
        return database_url.set(host="127.0.0.1", port=self.port, query={})

    def _ini(self) -> str:
        server = admin_url()
        host = server.query.get("host") or server.host or "127.0.0.1"
        host = host if isinstance(host, str) else host[0]
        user = server.username or "postgres"
        (self.directory / "userlist.txt").write_text(f'"{user}" ""\n')
        return "\n".join(
            [
                "[databases]",
                f"* = host={host} port={server.port or 5432}",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {self.directory / 'userlist.txt'}",
                f"pool_mode = {self.pool_mode}",
                f"default_pool_size = {self.pool_size}",
                "max_client_conn = 500",
                f"logfile = {self.directory / 'pgbouncer.log'}",
                f"pidfile = {self.directory / 'pgbouncer.pid'}",
                "",
            ]
        )

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        ini = self.directory / "pgbouncer.ini"
        ini.write_text(self._ini())
        args = [self.exe, str(ini)]
        if os.geteuid() == 0:  # "PgBouncer should not run as root": nobody writes its log and pid here
            self.directory.chmod(0o777)
            args += ["-u", "nobody"]
        with (self.directory / "stderr.txt").open("wb") as stderr:
            self._proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while not await self._answers():
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                err = (self.directory / "stderr.txt").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pgbouncer on port {self.port} did not start:\n{err}\n{self.log()}")
            await asyncio.sleep(0.02)

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.directory / "pgbouncer.log").read_text(errors="replace")[-4000:]
        return ""

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
        await self._proc.wait()
        self._proc = None

    async def _answers(self) -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True
