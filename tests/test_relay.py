"""The relay's flow control (``relay_max_enqueued``), against a real Postgres and the in-process broker.

Without it a backlog sat in the broker, and each of its jobs still waiting after
``redispatch_after`` was re-dispatched as though its delivery were lost: a 10,000-job chaos
run on the Service Bus test peer re-dispatched the backlog every 3 s and never went quiet.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue_many
from polyqueue.brokers.memory import MemoryBroker
from polyqueue.brokers.redis import RedisBroker
from polyqueue.queries import job_claim_by_ids
from polyqueue.relay import RETRY_CAP, Relay
from tests.apps.effects import Effect
from tests.helpers import create_effect_tables, rows, wait_until
from tests.redis_service import RedisServer, redis_server_exe
from tests.services import url_str


async def _by_status(engine: AsyncEngine) -> dict[tuple[str, str], int]:
    got = await rows(engine, "SELECT queue, status, count(*) FROM polyqueue_jobs GROUP BY queue, status")
    return {(q, s): n for q, s, n in got}


async def test_a_queue_gets_no_more_than_max_enqueued_the_rest_wait_pending_in_priority_order(
    engine: AsyncEngine, db_url: URL
) -> None:
    await create_effect_tables(engine)
    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Effect(n=i) for i in range(60)], queue="busy", priority=5)
        await enqueue_many(s, [Effect(n=i) for i in range(40)], queue="busy", priority=1)  # run first
        await enqueue_many(s, [Effect(n=i) for i in range(10)], queue="quiet")
    app = Polyqueue(database_url=url_str(db_url), queue_backend="memory", relay_max_enqueued=30, relay_batch_size=20)
    broker = MemoryBroker()
    relay = Relay(engine, broker, None, app.settings)

    while await relay.run_once():
        pass
    assert await _by_status(engine) == {("busy", "enqueued"): 30, ("busy", "pending"): 70, ("quiet", "enqueued"): 10}
    assert relay.held_back
    held = await rows(
        engine, "SELECT DISTINCT priority FROM polyqueue_jobs WHERE status = 'enqueued' AND queue = 'busy'"
    )
    assert held == [(1,)]  # the broker got the urgent ones; the rest wait in Postgres, where priority holds

    # A worker takes 25 of them: room for 25 more, and no more.
    got = await broker.receive(["busy"], 25, 1.0)
    async with engine.begin() as conn:
        claimed = await job_claim_by_ids(conn, uuid.uuid4(), [d.job_id for d in got if d.job_id], ["busy"])
    assert len(claimed) == 25
    while await relay.run_once():
        pass
    counts = await _by_status(engine)
    assert (counts[("busy", "running")], counts[("busy", "enqueued")], counts[("busy", "pending")]) == (25, 30, 45)


async def test_zero_means_no_limit(engine: AsyncEngine, db_url: URL) -> None:
    await create_effect_tables(engine)
    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Effect(n=i) for i in range(50)])
    app = Polyqueue(database_url=url_str(db_url), queue_backend="memory", relay_max_enqueued=0, relay_batch_size=20)
    relay = Relay(engine, MemoryBroker(), None, app.settings)
    while await relay.run_once():
        pass
    assert await _by_status(engine) == {("default", "enqueued"): 50}
    assert not relay.held_back


async def test_after_a_redis_outage_the_backlog_is_published_within_the_retry_cap(
    engine: AsyncEngine, db_url: URL, tmp_path: Path
) -> None:
    """Issue #14: the relay's retry wait doubled to 30 s, so a backlog committed during a Redis
    outage waited up to 15 s more once Redis was back. Now the wait is capped at ``RETRY_CAP``:
    after many failed publishes (6: the old wait would have grown to 16 s), a restarted
    redis-server gets the whole backlog within about one cap."""
    exe = redis_server_exe()
    if exe is None:
        pytest.skip("no redis-server on PATH: this test stops and restarts one of its own")
    server = RedisServer(exe, tmp_path / "redis")
    await server.start()
    app = Polyqueue(
        database_url=url_str(db_url), queue_backend="redis", broker_url=server.url, poll_interval=30.0
    )  # a long poll interval: only the retry loop (or a NOTIFY, none here) may wake the relay
    broker = RedisBroker(server.url)
    relay = Relay(engine, broker, None, app.settings)
    stopping = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await broker.ensure(["default"])
        await server.stop()
        await create_effect_tables(engine)
        async with AsyncSession(engine) as s, s.begin():
            await enqueue_many(s, [Effect(n=i) for i in range(50)])
        task = asyncio.create_task(relay.run(stopping))
        # the longest the 6 failures may take: each publish attempt plus at most RETRY_CAP after it
        await relay.failures.reach(6, timeout=6 * (RETRY_CAP + 5.0))
        assert await _by_status(engine) == {("default", "pending"): 50}
        await server.start()
        loop = asyncio.get_running_loop()
        back = loop.time()
        bound = RETRY_CAP + 5.0  # one wait of at most the cap, then a reconnect and one publish: seconds spare

        async def all_enqueued() -> bool:
            return await _by_status(engine) == {("default", "enqueued"): 50}

        await wait_until(all_enqueued, timeout=bound, what=f"the backlog published within {bound:.0f}s of Redis")
        assert loop.time() - back < bound
    finally:
        stopping.set()
        if task is not None:
            await task
        await broker.close()
        await server.stop()
    assert relay.failures.count >= 6
