"""Property test of the job state machine (hypothesis) against a real Postgres.

Any sequence of claim / finish (succeed, fail, retry) / hand back / worker death + rescue /
timeout rescue / operator requeue, fail and cancel, by any of several actors, each acting
on what it last believed (so stale, late finishes happen), must leave every job in a legal
state with a legal history, and a succeeded job can only leave that state by requeue.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue import admin
from polyqueue.db import make_engine
from polyqueue.queries import (
    ClaimedJob,
    Outcome,
    job_claim_pending,
    job_complete_many,
    job_hand_back,
    job_rescue,
    worker_register,
)
from polyqueue.types import JobStatus
from polyqueue.worker.executor import error_record
from tests import services

WORKERS = 3
JOBS = 3
OPS = st.one_of(
    st.tuples(st.just("claim"), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.sampled_from(["succeed", "fail", "retry", "hand_back"]), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.sampled_from(["kill", "revive"]), st.integers(0, WORKERS - 1), st.just(0)),
    st.tuples(st.sampled_from(["timeout", "requeue", "op_fail", "cancel"]), st.just(0), st.integers(0, JOBS - 1)),
)


@dataclass
class World:
    engine: AsyncEngine
    workers: list[uuid.UUID]
    jobs: list[uuid.UUID]
    held: dict[int, list[ClaimedJob]]  # what each worker believes it runs (possibly stale)


@pytest.fixture(scope="module")
def database(template_db: str) -> Iterator[URL]:
    loop = asyncio.new_event_loop()
    url = loop.run_until_complete(services.create_database(template=template_db))
    yield url
    loop.run_until_complete(services.drop_database(url))
    loop.close()


async def _fresh(engine: AsyncEngine) -> World:
    workers = [uuid.uuid4() for _ in range(WORKERS)]
    jobs = [uuid.uuid4() for _ in range(JOBS)]
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM polyqueue_jobs"))
        await conn.execute(text("DELETE FROM polyqueue_workers"))
        for w in workers:
            await worker_register(conn, worker_id=w, hostname="h", pid=1, queues=["default"], broker="x", concurrency=1)
        for j in jobs:
            await conn.execute(
                text("INSERT INTO polyqueue_jobs (id, task, payload, max_attempts) VALUES (:i, 't', '{}', 3)"), {"i": j}
            )
    return World(engine, workers, jobs, {i: [] for i in range(WORKERS)})


async def _apply(world: World, op: str, actor: int, target: int) -> None:
    e, w = world.engine, world.workers[actor]
    async with e.begin() as conn:
        if op == "claim":
            world.held[actor] += await job_claim_pending(conn, w, ["default"], 1)
        elif op in ("succeed", "fail", "retry") and world.held[actor]:
            job = world.held[actor].pop(0)  # may be long stale: the guard must refuse it
            status = {"succeed": JobStatus.SUCCEEDED, "fail": JobStatus.FAILED, "retry": JobStatus.PENDING}[op]
            err = None if op == "succeed" else error_record(job.attempt, "X", op)
            await job_complete_many(conn, [Outcome(job.id, job.attempt, job.worker_id, status, "1", err)])
        elif op == "hand_back" and world.held[actor]:
            job = world.held[actor].pop(0)
            await job_hand_back(conn, job.worker_id, [job.id])
        elif op == "kill":
            await conn.execute(
                text("UPDATE polyqueue_workers SET heartbeat_at = now() - interval '1 hour' WHERE id = :w"), {"w": w}
            )
            await job_rescue(conn, dead_after=60, timeout_grace=0)
        elif op == "revive":  # the dead worker comes back under a new id; its old beliefs stay stale
            world.workers[actor] = uuid.uuid4()
            await worker_register(
                conn, worker_id=world.workers[actor], hostname="h", pid=1, queues=["default"], broker="x", concurrency=1
            )
        elif op == "timeout":
            await conn.execute(
                text(
                    "UPDATE polyqueue_jobs SET timeout_at = now() - interval '1 minute' "
                    "WHERE id = :j AND status = 'running'"
                ),
                {"j": world.jobs[target]},
            )
            await job_rescue(conn, dead_after=3600, timeout_grace=0)
    job_id = world.jobs[target]
    if op == "requeue":
        await admin.requeue(e, [job_id])
    elif op == "op_fail":
        await admin.fail(e, [job_id])
    elif op == "cancel":
        await admin.cancel(e, [job_id])


async def _check(engine: AsyncEngine, history: dict[uuid.UUID, list[str]]) -> None:
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text("SELECT id, status, attempt, worker_id, started_at, finished_at, errors FROM polyqueue_jobs")
            )
        ).all()
    for job_id, status, attempt, worker_id, started_at, finished_at, errors in rows:
        where = f"job {job_id}: {status} attempt={attempt} history={history[job_id]}"
        assert status in ("pending", "enqueued", "running", "succeeded", "failed", "cancelled"), where
        assert attempt >= 0, where
        if status == "running":
            assert worker_id is not None and started_at is not None and finished_at is None, where
        if status in ("pending", "enqueued"):
            assert worker_id is None and finished_at is None, where
        if status in ("succeeded", "failed", "cancelled"):
            assert finished_at is not None, where
        assert all(int(e.get("attempt") or 0) <= max(attempt, 1) for e in errors), where
        previous = history[job_id][-1] if history[job_id] else "pending"
        if previous == "succeeded" and status != "succeeded":
            assert status == "pending", f"a succeeded job may only be requeued: {where}"
        history[job_id].append(status)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=1, max_size=30))
def test_any_sequence_of_operations_keeps_jobs_legal(database: URL, ops: list[tuple[str, int, int]]) -> None:
    async def scenario() -> None:
        engine = make_engine(database)
        try:
            world = await _fresh(engine)
            history: dict[uuid.UUID, list[str]] = {j: [] for j in world.jobs}
            for op, actor, target in ops:
                await _apply(world, op, actor, target)
                await _check(engine, history)
        finally:
            await engine.dispose()

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
