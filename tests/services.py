"""Finding (or starting) the real services the tests talk to.

Postgres: ``POLYQUEUE_TEST_DATABASE_URL`` when set, else 127.0.0.1:5432 when it
answers, else an embedded Postgres started for this test run. Every test creates
its own databases and drops only those.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import uuid
from pathlib import Path

import asyncpg
from sqlalchemy.engine import URL, make_url

from polyqueue.db import asyncpg_url


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


_admin_url: URL | None = None


def admin_url() -> URL:
    """An asyncpg URL of a Postgres server on which the tests may create databases."""
    global _admin_url
    if _admin_url is not None:
        return _admin_url
    configured = os.environ.get("POLYQUEUE_TEST_DATABASE_URL")
    if configured:
        _admin_url = asyncpg_url(configured)
    elif _reachable("127.0.0.1", 5432):
        _admin_url = asyncpg_url("postgresql://postgres@127.0.0.1:5432/postgres")
    else:
        from polyqueue.embedded import start_embedded

        directory = Path(tempfile.gettempdir()) / f"polyqueue-test-pg-{os.getpid()}"
        _admin_url = asyncpg_url(start_embedded(directory))
    return _admin_url


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


async def _connect(url: URL) -> asyncpg.Connection:
    host = url.query.get("host")
    kwargs: dict[str, object] = {}
    if host:
        kwargs["host"] = host if isinstance(host, str) else host[0]
        url = url.set(query={})
    return await asyncpg.connect(_dsn(url), **kwargs)


async def create_database(template: str | None = None, prefix: str = "pqtest") -> URL:
    """Create a fresh database (optionally cloned from ``template``) and return its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await _connect(admin_url())
    try:
        clause = f' TEMPLATE "{template}"' if template else ""
        for _ in range(20):
            try:
                await conn.execute(f'CREATE DATABASE "{name}"{clause}')
                break
            except asyncpg.ObjectInUseError:  # template briefly busy
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return admin_url().set(database=name)


async def drop_database(url: URL) -> None:
    """Drop a database this test run created (never anything else)."""
    name = url.database
    assert name and name.startswith(("pqtest_", "pqtpl_", "pqmig_", "pqbench_")), name
    conn = await _connect(admin_url())
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def url_str(url: URL) -> str:
    return url.render_as_string(hide_password=False)


def parse(url: str) -> URL:
    return make_url(url)
