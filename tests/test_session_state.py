"""Polyqueue gives every connection back to the application's pool as it took it (issue #14).

A worker sharing the application's engine (``run_worker(app, engine=engine)``, the documented
test pattern) once left ``enable_seqscan = off`` from its held connections on pooled
connections, and the maintenance leader its ``idle_session_timeout``: the application's next
queries planned without sequential scans, or were cut off while idle.
"""

from __future__ import annotations

import asyncio
import contextlib

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from polyqueue import enqueue
from polyqueue.db import make_engine
from polyqueue.runner import run_worker
from tests.helpers import dead_workers_job, make_app, scalar, wait_until

POOL_SIZE = 5
app = make_app()


class StatePing(BaseModel):
    n: int


@app.register
async def session_state_ping(payload: StatePing) -> int:
    return payload.n


async def session_settings_of_every_pooled_connection(engine: AsyncEngine) -> list[tuple[str, str]]:
    """``enable_seqscan`` and ``idle_session_timeout`` of ``POOL_SIZE`` connections held at once:
    every connection the pool keeps."""
    async with contextlib.AsyncExitStack() as stack:
        conns: list[AsyncConnection] = [await stack.enter_async_context(engine.connect()) for _ in range(POOL_SIZE)]
        return [
            (await c.scalar(text("SHOW enable_seqscan")), await c.scalar(text("SHOW idle_session_timeout")))
            for c in conns
        ]


async def test_a_worker_on_the_apps_engine_leaves_its_pool_as_it_found_it(db_url: URL) -> None:
    engine = make_engine(db_url, pool_size=POOL_SIZE)
    try:
        rescued = await dead_workers_job(engine, StatePing(n=-1))
        async with AsyncSession(engine) as s, s.begin():
            for n in range(30):
                await enqueue(s, StatePing(n=n))
        stopping = asyncio.Event()
        worker = asyncio.create_task(run_worker(app, engine=engine, stopping=stopping))
        try:

            async def all_done() -> bool:
                left = await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status <> 'succeeded'")
                return bool(left == 0)

            await wait_until(all_done, what="every job, the rescued one included, to succeed")
        finally:
            stopping.set()
            await asyncio.wait_for(worker, 30)
        assert await scalar(engine, "SELECT attempt FROM polyqueue_jobs WHERE id = :i", i=rescued) == 2
        assert await session_settings_of_every_pooled_connection(engine) == [("on", "0")] * POOL_SIZE
    finally:
        await engine.dispose()
