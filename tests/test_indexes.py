"""The hot queries touch only the rows they need, even beside a million finished jobs (DESIGN.md §6)."""

from __future__ import annotations

import json

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

FINISHED = 1_000_000


async def _plan(engine: AsyncEngine, sql: str, **params: object) -> str:
    async with engine.connect() as conn:
        result = await conn.execute(text(f"EXPLAIN (FORMAT JSON) {sql}"), params)
        plan = result.scalar_one()
        await conn.rollback()
    return json.dumps(plan)


async def test_claim_and_maintenance_queries_use_partial_indexes(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                """
                INSERT INTO polyqueue_jobs (id, task, payload, status, finished_at, attempt)
                SELECT gen_random_uuid(), 't', '{}', 'succeeded', now() - (g || ' seconds')::interval, 1
                FROM generate_series(1, :n) g
                """
            ),
            {"n": FINISHED},
        )
        await conn.execute(
            text(
                "INSERT INTO polyqueue_jobs (id, task, payload, queue) "
                "SELECT gen_random_uuid(), 't', '{}', 'q' || (g % 3) FROM generate_series(1, 300) g"
            )
        )
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE polyqueue_jobs"))

    claim = await _plan(
        engine,
        """
        SELECT id FROM polyqueue_jobs
        WHERE status = 'pending' AND queue = ANY(CAST(:queues AS text[])) AND run_at <= now()
        ORDER BY priority, run_at LIMIT 32 FOR UPDATE SKIP LOCKED
        """,
        queues=["q1"],
    )
    assert "ix_polyqueue_jobs_dispatch" in claim
    assert "Seq Scan" not in claim

    relay = await _plan(
        engine,
        "SELECT id, queue FROM polyqueue_jobs WHERE status = 'pending' AND run_at <= now() "
        "ORDER BY priority, run_at LIMIT 500 FOR UPDATE SKIP LOCKED",
    )
    assert "ix_polyqueue_jobs_due" in relay and "Seq Scan" not in relay

    timeout = await _plan(engine, "SELECT id FROM polyqueue_jobs WHERE status = 'running' AND timeout_at < now()")
    # either partial index over running rows serves; what matters is never reading the finished ones
    assert (
        "ix_polyqueue_jobs_timeout" in timeout or "ix_polyqueue_jobs_worker" in timeout
    ) and "Seq Scan" not in timeout

    prune = await _plan(
        engine,
        "SELECT id FROM polyqueue_jobs WHERE finished_at < now() - interval '7 days' LIMIT 10000",
    )
    assert "ix_polyqueue_jobs_finished" in prune and "Seq Scan" not in prune

    stale = await _plan(
        engine,
        "SELECT id FROM polyqueue_jobs WHERE status = 'enqueued' AND dispatched_at < now() - interval '5 minutes'",
    )
    assert "ix_polyqueue_jobs_enqueued" in stale and "Seq Scan" not in stale


async def test_completion_joins_on_the_primary_key_beside_many_running_jobs(engine: AsyncEngine) -> None:
    """Statistics taken while nothing ran must not lure the completion onto a partial index."""
    import uuid

    from polyqueue._conn import HeldConnection
    from polyqueue.queries._base import CHANNEL_PARAMS
    from polyqueue.queries.jobs import _COMPLETE_MANY
    from polyqueue.types import NOTIFY_IDS_PER_PAYLOAD

    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("ANALYZE polyqueue_jobs"))  # empty: "no running rows"
    worker = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO polyqueue_jobs (id, task, payload, status, attempt, worker_id) "
                "SELECT gen_random_uuid(), 't', '{}', 'running', 1, :w FROM generate_series(1, 5000)"
            ),
            {"w": worker},
        )
        ids = [r[0] for r in (await conn.execute(text("SELECT id FROM polyqueue_jobs LIMIT 100"))).all()]
    params = {
        "workers": [worker] * 100,
        "ids": ids,
        "attempts": [1] * 100,
        "statuses": ["succeeded"] * 100,
        "results": ["null"] * 100,
        "errors": [None] * 100,
        "delays": [0.0] * 100,
        "per_notify": NOTIFY_IDS_PER_PAYLOAD,
        **CHANNEL_PARAMS,  # the statement's own bound values: EXPLAIN of its text needs them passed
    }
    held = HeldConnection(engine)  # the completer's kind of connection
    async with held.use() as conn:
        explain = text(f"EXPLAIN (FORMAT JSON) {_COMPLETE_MANY.text}")
        plan = json.dumps((await conn.execute(explain, params)).scalar_one())
    await held.close()
    assert "Seq Scan" not in plan
    assert "pk_polyqueue_jobs" in plan
    assert "ix_polyqueue_jobs_worker" not in plan and "ix_polyqueue_jobs_timeout" not in plan
