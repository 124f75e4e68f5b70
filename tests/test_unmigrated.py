"""A database that was never migrated (issue #14, A): every entry point says how to migrate,
as one ConfigurationError, instead of a raw ``relation "polyqueue_jobs" does not exist``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import ConfigurationError, enqueue, enqueue_many
from polyqueue.db import make_engine, missing_tables
from polyqueue.runner import run_relay, run_worker
from tests.helpers import make_app

app = make_app()


class Ping(BaseModel):
    n: int


@app.register
async def unmigrated_ping(payload: Ping) -> int:
    return payload.n


HINTS = ("polyqueue db upgrade", "alembic upgrade heads")


@pytest.fixture
async def bare(empty_db: URL) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(empty_db, pool_size=2)
    yield engine
    await engine.dispose()


def _says_how_to_migrate(exc: BaseException) -> None:
    for hint in HINTS:
        assert hint in str(exc), str(exc)


async def test_enqueue_on_an_unmigrated_database_names_the_migration(bare: AsyncEngine) -> None:
    async with AsyncSession(bare) as session, session.begin():
        with pytest.raises(ConfigurationError) as raised:
            await enqueue(session, Ping(n=1))
    _says_how_to_migrate(raised.value)
    assert str(bare.url.database) in str(raised.value)  # names the database (its URL, password masked)


async def test_enqueue_many_on_an_unmigrated_database_names_the_migration(bare: AsyncEngine) -> None:
    async with AsyncSession(bare) as session, session.begin():
        with pytest.raises(ConfigurationError) as raised:
            await enqueue_many(session, [Ping(n=1), Ping(n=2)])
    _says_how_to_migrate(raised.value)


async def test_other_programming_errors_of_the_callers_transaction_are_not_translated(engine: AsyncEngine) -> None:
    """Only an undefined polyqueue table becomes ConfigurationError; the caller's own mistakes stay theirs."""
    from sqlalchemy.exc import ProgrammingError

    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(ProgrammingError):
            await session.execute(text("SELECT * FROM no_such_table_of_the_user"))


async def test_run_worker_on_an_unmigrated_database_fails_at_start(bare: AsyncEngine) -> None:
    with pytest.raises(ConfigurationError) as raised:
        await asyncio.wait_for(run_worker(app, engine=bare, burst=True, run_maintenance=False), 20)
    _says_how_to_migrate(raised.value)


async def test_run_relay_on_an_unmigrated_database_fails_at_start(bare: AsyncEngine) -> None:
    relay_app = make_app(queue_backend="memory")
    stop = asyncio.Event()
    with pytest.raises(ConfigurationError) as raised:
        await asyncio.wait_for(run_relay(relay_app, engine=bare, stopping=stop), 20)
    _says_how_to_migrate(raised.value)


async def test_one_check_for_the_tables(bare: AsyncEngine, engine: AsyncEngine) -> None:
    async with bare.connect() as conn:
        assert await missing_tables(conn) == ["polyqueue_jobs", "polyqueue_leader", "polyqueue_workers"]
    async with engine.connect() as conn:
        assert await missing_tables(conn) == []
