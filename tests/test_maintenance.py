"""Maintenance against a real Postgres: rescue by liveness, the timeout backstop,
re-dispatch of lost deliveries, pruning, one leader at a time (a lease row)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import enqueue
from polyqueue.maintenance.service import Maintenance, lease_ttl
from polyqueue.queries import job_claim_pending, worker_register
from tests.helpers import make_app, rows, scalar

app = make_app()


class Ping(BaseModel):
    n: int = 0


@app.register(max_attempts=2)
async def ping(payload: Ping) -> None:
    return None


async def _claimed_job(
    engine: AsyncEngine, *, worker_alive: bool, heartbeat_age: float = 0.0, **job: object
) -> uuid.UUID:
    """A running job held by a registered worker whose heartbeat is ``heartbeat_age`` seconds old."""
    async with AsyncSession(engine) as s, s.begin():
        await enqueue(s, Ping(), **job)  # type: ignore[arg-type]
    worker = uuid.uuid4()
    async with engine.begin() as conn:
        await worker_register(
            conn, worker_id=worker, hostname="h", pid=1, queues=["default"], broker="direct", concurrency=1
        )
        await conn.execute(
            text("UPDATE polyqueue_workers SET heartbeat_at = now() - :age * interval '1 second', status = :st"),
            {"age": heartbeat_age, "st": "running" if worker_alive else "stopped"},
        )
        [claimed] = await job_claim_pending(conn, worker, ["default"], 1)
    return claimed.id


async def test_job_of_a_worker_with_stale_heartbeat_is_rescued_and_worker_marked_dead(engine: AsyncEngine) -> None:
    job = await _claimed_job(engine, worker_alive=True, heartbeat_age=60)
    result = await Maintenance(engine, app.settings).run_once()
    assert result.rescued == [(str(job), "pending")]
    assert await scalar(engine, "SELECT status FROM polyqueue_workers") == "dead"
    [(status, worker_id, errors)] = await rows(engine, "SELECT status, worker_id, errors FROM polyqueue_jobs")
    assert (status, worker_id) == ("pending", None)
    assert errors[0]["type"] == "WorkerLost"


async def test_long_job_of_a_live_worker_is_left_alone(engine: AsyncEngine) -> None:
    """Rescue by liveness, never by elapsed time (River #682): a job running for hours is fine."""
    job = await _claimed_job(engine, worker_alive=True, heartbeat_age=0)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET started_at = now() - interval '10 hours'"))
    result = await Maintenance(engine, app.settings).run_once()
    assert result.rescued == []
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job) == "running"


async def test_rescue_on_last_attempt_fails_the_job(engine: AsyncEngine) -> None:
    await _claimed_job(engine, worker_alive=False, max_attempts=1)
    result = await Maintenance(engine, app.settings).run_once()
    assert [st for _, st in result.rescued] == ["failed"]
    assert await scalar(engine, "SELECT finished_at IS NOT NULL FROM polyqueue_jobs") is True


async def test_timeout_backstop_rescues_a_job_past_timeout_at(engine: AsyncEngine) -> None:
    """The worker could not act (blocked loop): maintenance enforces timeout_at, with the strategy."""
    retry = await _claimed_job(engine, worker_alive=True, max_run_seconds=0.01, timeout_strategy="retry")
    fail = await _claimed_job(engine, worker_alive=True, max_run_seconds=0.01, timeout_strategy="fail")
    ignore = await _claimed_job(engine, worker_alive=True, max_run_seconds=0.01, timeout_strategy="ignore")
    await asyncio.sleep(0.5)  # past timeout_at + timeout_grace (0.2 s)
    result = dict((await Maintenance(engine, app.settings).run_once()).rescued)
    assert result == {str(retry): "pending", str(fail): "failed"}
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=ignore) == "running"
    errors = await scalar(engine, "SELECT errors FROM polyqueue_jobs WHERE id = :i", i=fail)
    assert errors[-1]["type"] == "TimeLimitExceeded"


async def test_rescue_rechecks_state_so_a_job_finished_meanwhile_is_untouched(engine: AsyncEngine) -> None:
    """River #1302: the rescuer must not overwrite a job that completed between its read and its write."""
    job = await _claimed_job(engine, worker_alive=False)
    async with engine.connect() as holder:
        # The worker is mid-completion: it holds the row lock and marks the job succeeded.
        await holder.execute(text("UPDATE polyqueue_jobs SET status = 'succeeded', finished_at = now()"))
        # The rescue runs while the row is locked: it skips the row (SKIP LOCKED), never waits for it.
        result = await asyncio.wait_for(Maintenance(engine, app.settings).run_once(), 10)
        await holder.commit()
    assert result.rescued == []
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job) == "succeeded"


async def test_enqueued_jobs_with_lost_deliveries_are_redispatched(engine: AsyncEngine) -> None:
    settings = make_app(redispatch_after=60).settings
    async with AsyncSession(engine) as s, s.begin():
        await enqueue(s, Ping(n=1))
        await enqueue(s, Ping(n=2))
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET status = 'enqueued', dispatched_at = now()"))
        await conn.execute(
            text("UPDATE polyqueue_jobs SET dispatched_at = now() - interval '2 minutes' WHERE payload->>'n' = '1'")
        )
    result = await Maintenance(engine, settings).run_once()
    assert result.redispatched == 1
    assert await rows(engine, "SELECT payload->>'n', status FROM polyqueue_jobs ORDER BY 1") == [
        ("1", "pending"),
        ("2", "enqueued"),
    ]


async def test_prune_deletes_only_old_finished_jobs(engine: AsyncEngine) -> None:
    settings = make_app(retention_seconds=3600).settings
    async with AsyncSession(engine) as s, s.begin():
        for n in range(3):
            await enqueue(s, Ping(n=n))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE polyqueue_jobs SET status='succeeded', finished_at = now() - interval '2 hours' "
                "WHERE payload->>'n' = '0'"
            )
        )
        await conn.execute(
            text("UPDATE polyqueue_jobs SET status='failed', finished_at = now() WHERE payload->>'n' = '1'")
        )
    result = await Maintenance(engine, settings).run_once()
    assert result.pruned == 1
    assert await scalar(engine, "SELECT array_agg(payload->>'n' ORDER BY payload->>'n') FROM polyqueue_jobs") == [
        "1",
        "2",
    ]


async def test_only_one_leader_at_a_time(engine: AsyncEngine) -> None:
    a, b = Maintenance(engine, app.settings), Maintenance(engine, app.settings)
    assert await a._try_lead() is True
    assert await b._try_lead() is False
    await a._resign()
    assert await b._try_lead() is True
    await b._resign()


async def test_a_frozen_leader_loses_the_lease_once_it_expires(engine: AsyncEngine) -> None:
    """The lease lasts lease_ttl after each renewal; a leader that stops renewing (frozen, killed)
    is replaced once it expires, and learns it no longer leads at its next attempt."""
    a, b = Maintenance(engine, app.settings), Maintenance(engine, app.settings)
    assert await a._try_lead() is True
    left = await scalar(engine, "SELECT extract(epoch FROM expires_at - now()) FROM polyqueue_leader")
    assert 0 < left <= lease_ttl(app.settings) == max(app.settings.worker_dead_after, 3 * 0.2)
    assert await b._try_lead() is False
    async with engine.begin() as conn:  # a froze for lease_ttl: its lease ran out
        await conn.execute(text("UPDATE polyqueue_leader SET expires_at = now() - interval '1 second'"))
    assert await b._try_lead() is True
    assert await a._try_lead() is False
    assert (a.is_leader, b.is_leader) == (False, True)
    await a._resign()  # the late resignation of a former leader deletes nothing of the new one's
    assert await scalar(engine, "SELECT holder FROM polyqueue_leader") == b.holder
    await b._resign()
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_leader") == 0


async def test_leadership_never_leaves_its_idle_timeout_on_a_pooled_connection(engine: AsyncEngine) -> None:
    """The advisory-lock leader once set idle_session_timeout on its session (so a frozen leader lost
    the lock); a pooled connection carrying it was cut off under a worker idling on it (found by the
    chaos runner). The lease needs no session state at all."""
    a, b = Maintenance(engine, app.settings), Maintenance(engine, app.settings)
    assert await a._try_lead() is True
    assert await b._try_lead() is False  # the loser's connection goes back to the pool
    await a._resign()
    for _ in range(3):  # every connection the pool holds now
        async with engine.connect() as conn:
            assert await conn.scalar(text("SHOW idle_session_timeout")) == "0"


async def test_a_failing_service_does_not_keep_the_others_from_their_turn(engine: AsyncEngine) -> None:
    """The leader's pass runs each service in turn: when one cannot reach its database (here the
    pruner, pointed at a port where nothing listens), rescue still runs and the failure is raised
    once all had their turn."""
    import socket

    from polyqueue.db import make_engine
    from polyqueue.maintenance.passes import Pruner

    with socket.socket() as probe:  # a free port: connecting to it is refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = make_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/nowhere", pool_size=1)
    job = await _claimed_job(engine, worker_alive=True, heartbeat_age=60)
    maintenance = Maintenance(engine, app.settings)
    maintenance.pruner = Pruner(nowhere, app.settings, maintenance.metrics)
    try:
        with pytest.raises(OSError):
            await maintenance.run_once()
    finally:
        await nowhere.dispose()
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job) == "pending"
    assert (maintenance.rescuer.passes.count, maintenance.pruner.failures.count) == (1, 1)
    assert maintenance.depth.passes.count == 1  # the service after the failed one had its turn too
