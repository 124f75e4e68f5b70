"""``command_timeout``: a statement that Postgres never answers does not hold its job forever.

The handler's query waits on a row lock the test holds (a server that is alive but silent,
as a wedged connection looks to the client). With the setting, the statement is cancelled
on the server, the attempt fails with ``TimeoutError`` and the job is retried; once the lock
is gone the retry succeeds.
"""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Backoff, JobContext, enqueue, run_worker
from polyqueue.db import make_engine
from polyqueue.settings import Settings
from tests.helpers import make_app, rows, scalar, wait_until
from tests.services import url_str


class Row(BaseModel):
    id: int


async def test_a_statement_the_server_never_answers_fails_the_attempt_and_the_job_retries(
    db_url: URL, engine: AsyncEngine
) -> None:
    app = make_app(database_url=url_str(db_url), command_timeout=1.0)

    @app.register(max_attempts=3, backoff=Backoff(base=0.1, maximum=0.1))
    async def touch(payload: Row, ctx: JobContext) -> int:
        locked = await ctx.session.scalar(text("SELECT v FROM held WHERE id = :id FOR UPDATE"), {"id": payload.id})
        return int(locked)

    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE held (id int PRIMARY KEY, v int NOT NULL)"))
        await conn.execute(text("INSERT INTO held VALUES (1, 41)"))

    stopping = asyncio.Event()
    holder = engine.connect()
    conn = await holder.__aenter__()
    await conn.begin()
    await conn.execute(text("SELECT 1 FROM held WHERE id = 1 FOR UPDATE"))  # the handler's query waits on this
    worker = asyncio.create_task(run_worker(app, stopping=stopping))
    try:
        async with AsyncSession(engine) as s, s.begin():
            job = (await enqueue(s, Row(id=1), task="touch")).id
        began = time.monotonic()

        async def first_attempt_failed() -> bool:
            return bool(
                await scalar(engine, "SELECT jsonb_array_length(errors) FROM polyqueue_jobs WHERE id = :i", i=job)
            )

        await wait_until(first_attempt_failed, timeout=20, what="the first attempt to time out")
        assert time.monotonic() - began < 10
        # Cancelled on the server too: no session of the worker still waits on the lock.
        waiting = await scalar(
            engine,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        assert waiting == 0
    finally:
        await conn.rollback()  # the lock goes: the retry gets the row
        await holder.__aexit__(None, None, None)

    try:

        async def succeeded() -> bool:
            return bool(await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job) == "succeeded")

        await wait_until(succeeded, timeout=20, what="the retry to succeed")
    finally:
        stopping.set()
        await asyncio.wait_for(worker, 30)
    [(attempt, result, errors)] = await rows(
        engine, "SELECT attempt, result, errors FROM polyqueue_jobs WHERE id = :i", i=job
    )
    assert (attempt, result) == (2, 41)
    assert [e["type"] for e in errors] == ["TimeoutError"]


async def test_make_engine_bounds_statements_only_when_asked(db_url: URL) -> None:
    assert Settings().command_timeout == 300.0
    bounded = make_engine(url_str(db_url), command_timeout=0.3)
    unbounded = make_engine(url_str(db_url), command_timeout=None)
    try:
        began = time.monotonic()
        try:
            async with bounded.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(5)"))
        except TimeoutError:
            pass
        else:
            raise AssertionError("pg_sleep(5) finished under a 0.3 s command_timeout")
        assert time.monotonic() - began < 3
        async with unbounded.connect() as conn:
            assert await conn.scalar(text("SELECT 1 FROM pg_sleep(0.5)"))
    finally:
        await bounded.dispose()
        await unbounded.dispose()
