"""Shared fixtures: a real Postgres per test, cloned from a migrated template."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.db import make_engine
from polyqueue.models import metadata
from tests import services
from tests.redis_service import RedisServer, redis_server_exe


@pytest.fixture(scope="session")
async def template_db() -> AsyncIterator[str]:
    """A database holding polyqueue's schema, cloned by each test that needs one."""
    url = await services.create_database(prefix="pqtpl")
    engine = make_engine(url)
    try:
        from polyqueue.migrations import upgrade
    except ImportError:  # migrations not available: fall back to the models' DDL
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
    else:
        await upgrade(engine)
    await engine.dispose()
    assert url.database
    yield url.database
    await services.drop_database(url)


@pytest.fixture
async def db_url(template_db: str) -> AsyncIterator[URL]:
    """A fresh, migrated database for this test alone."""
    url = await services.create_database(template=template_db)
    yield url
    await services.drop_database(url)


@pytest.fixture
async def empty_db() -> AsyncIterator[URL]:
    """A database with nothing in it, for this test alone."""
    url = await services.create_database(prefix="pqtest")
    try:
        yield url
    finally:
        await services.drop_database(url)


@pytest.fixture
async def engine(db_url: URL) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    yield eng
    await eng.dispose()


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running behind it."""
    before = asyncio.all_tasks()
    yield
    await asyncio.sleep(0)
    leaked = [t for t in asyncio.all_tasks() - before if not t.done() and t is not asyncio.current_task()]
    if leaked:
        for t in leaked:
            t.cancel()
        pytest.fail(f"test leaked asyncio tasks: {[t.get_name() for t in leaked]}")


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    """A private redis-server for this test alone, which it may stop, restart and flush."""
    exe = redis_server_exe()
    if exe is None:
        pytest.skip("no redis-server on PATH: this test needs a Redis it can stop and flush")
    server = RedisServer(exe, tmp_path / "redis")
    await server.start()
    yield server
    await server.stop()
