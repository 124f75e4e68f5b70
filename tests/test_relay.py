"""The relay's flow control (``relay_max_enqueued``), against a real Postgres and the in-process broker.

Without it a backlog sat in the broker, and each of its jobs still waiting after
``redispatch_after`` was re-dispatched as though its delivery were lost: a 10,000-job chaos
run on the Service Bus test peer re-dispatched the backlog every 3 s and never went quiet.
"""

from __future__ import annotations

import uuid

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue_many
from polyqueue.brokers.memory import MemoryBroker
from polyqueue.queries import job_claim_by_ids
from polyqueue.relay import Relay
from tests.apps.effects import Effect
from tests.helpers import create_effect_tables, rows
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
        claimed = await job_claim_by_ids(conn, uuid.uuid4(), [d.job_id for d in got if d.job_id])
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
