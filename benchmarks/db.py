"""The benchmark's own database: found server, fresh ``pqbench_<random>`` database, migrated, dropped.

Server: ``POLYQUEUE_BENCH_DATABASE_URL`` (or ``--database-url``) when set, else
127.0.0.1:5432 when it answers, else an embedded Postgres in a temporary directory.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL

from polyqueue.db import asyncpg_url, make_engine

__all__ = ["BenchDatabase", "create_database", "drop_database", "find_server", "migrate"]

PREFIX = "pqbench_"


@dataclass
class BenchDatabase:
    """Where the benchmark runs: the server's admin URL, the fresh database's URL, how it was found."""

    admin: URL
    url: URL
    origin: str  # "env", "localhost" or "embedded"
    local: bool  # the server runs on this machine (its processes' CPU can be read from /proc)

    @property
    def url_str(self) -> str:
        return self.url.render_as_string(hide_password=False)


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _is_local(url: URL) -> bool:
    host = url.host
    return not host or host in ("127.0.0.1", "localhost", "::1") or bool(url.query.get("host"))


def find_server(configured: str | None = None) -> tuple[URL, str]:
    """The admin URL of a Postgres on which the benchmark may create a database, and its origin."""
    configured = configured or os.environ.get("POLYQUEUE_BENCH_DATABASE_URL")
    if configured:
        return asyncpg_url(configured), "env"
    if _reachable("127.0.0.1", 5432):
        return asyncpg_url("postgresql://postgres@127.0.0.1:5432/postgres"), "localhost"
    from polyqueue.embedded import start_embedded

    # One data directory reused across runs (start_embedded starts or reuses it): no initdb each time,
    # nothing left behind per run; each run still creates and drops its own database in it.
    directory = Path(tempfile.gettempdir()) / "polyqueue-bench-pg"
    return asyncpg_url(start_embedded(directory)), "embedded"


async def _connect(url: URL) -> asyncpg.Connection:
    kwargs: dict[str, object] = {}
    host = url.query.get("host")
    if host:  # Unix-socket URL of the embedded server
        kwargs["host"] = host if isinstance(host, str) else host[0]
        url = url.set(query={})
    dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
    return await asyncpg.connect(dsn, **kwargs)


async def create_database(configured: str | None = None) -> BenchDatabase:
    """Create a fresh, empty ``pqbench_<random>`` database."""
    admin, origin = find_server(configured)
    name = f"{PREFIX}{uuid.uuid4().hex[:12]}"
    conn = await _connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return BenchDatabase(admin=admin, url=admin.set(database=name), origin=origin, local=_is_local(admin))


async def migrate(url: URL) -> str:
    """Create polyqueue's tables; returns how (``migrations`` or ``create_all``)."""
    engine = make_engine(url, pool_size=1)
    try:
        try:
            from polyqueue.migrations import upgrade
        except ImportError:
            from polyqueue.models import metadata

            async with engine.begin() as conn:
                await conn.run_sync(metadata.create_all)
            return "metadata.create_all"
        await upgrade(engine)
        if os.environ.get("PQBENCH_QUEUE_BACKEND") == "pgmq":  # PGMQ in the jobs' database
            from polyqueue.pgmq_install import install_pgmq

            await install_pgmq(engine)
        return "polyqueue.migrations.upgrade"
    finally:
        await engine.dispose()


async def drop_database(db: BenchDatabase) -> None:
    """Drop the benchmark's database (only ever one this run created)."""
    name = db.url.database
    if not name or not name.startswith(PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a benchmark database")
    conn = await _connect(db.admin)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
