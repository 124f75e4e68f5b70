"""``polyqueue.admin``: requeue, fail, cancel, prune — on a real Postgres, with real workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import JobContext, admin, enqueue
from polyqueue.listener import Listener
from polyqueue.queries import CANCEL_CHANNEL, DONE_CHANNEL, NEW_JOB_CHANNEL
from tests import services
from tests.apps.effects import EFFECTS_DDL, Effect
from tests.helpers import ROOT, make_app, rows, running_worker, scalar, spawn_worker, wait_until

app = make_app()


class Sleep(BaseModel):
    seconds: float = 0.0
    tag: str = ""


@app.register(name="admin_sleep", max_attempts=2)
async def admin_sleep(payload: Sleep, ctx: JobContext) -> str:
    await ctx.session.execute(text("SELECT 1"))  # the job's own transaction is in use
    await asyncio.sleep(payload.seconds)
    return payload.tag


@app.register(name="admin_other", queue="other")
async def admin_other(payload: Sleep) -> None:
    return None


async def _jobs(engine: AsyncEngine, *payloads: Sleep, task: str = "admin_sleep") -> list[uuid.UUID]:
    async with AsyncSession(engine) as s, s.begin():
        return [(await enqueue(s, p, task=task)).id for p in payloads]


async def _set(engine: AsyncEngine, status: str, ids: list[uuid.UUID]) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE polyqueue_jobs SET status = :s, finished_at = now() WHERE id = ANY(:ids)"),
            {"s": status, "ids": ids},
        )


async def _status(engine: AsyncEngine, job_id: uuid.UUID) -> str:
    return str(await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job_id))


async def test_match_everything_is_refused_unless_all(engine: AsyncEngine) -> None:
    [a] = await _jobs(engine, Sleep())
    for action in (admin.cancel, admin.fail, admin.requeue):
        with pytest.raises(ValueError, match="all=True"):
            await action(engine)
    assert await _status(engine, a) == "pending"
    changed = await admin.cancel(engine, all=True)
    assert [(c.id, c.old_status, c.new_status) for c in changed] == [(a, "pending", "cancelled")]


async def test_status_filter_outside_what_the_action_applies_to_is_refused(engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="failed or cancelled"):
        await admin.requeue(engine, status="running")
    with pytest.raises(ValueError, match="pending or enqueued or running"):
        await admin.cancel(engine, status="succeeded")


async def test_cancel_pending_never_runs_and_records_an_error(engine: AsyncEngine) -> None:
    a, b = await _jobs(engine, Sleep(tag="a"), Sleep(tag="b"))
    changed = await admin.cancel(engine, [a], reason="not needed")
    assert [c.id for c in changed] == [a]
    async with running_worker(app, engine) as worker:
        await wait_until(lambda: _is(engine, b, "succeeded"), what="b to succeed")
    assert worker.processed == 1
    [(status, attempt, errors)] = await rows(
        engine, "SELECT status, attempt, errors FROM polyqueue_jobs WHERE id=:i", i=a
    )
    assert (status, attempt) == ("cancelled", 0)
    assert errors[-1]["type"] == "Cancelled" and errors[-1]["message"] == "not needed"
    assert await admin.cancel(engine, [a]) == []  # already finished: nothing changes


async def _is(engine: AsyncEngine, job_id: uuid.UUID, status: str) -> bool:
    return await _status(engine, job_id) == status


async def test_filters_and_dry_run(engine: AsyncEngine) -> None:
    sleeps = await _jobs(engine, Sleep(), Sleep())
    [other] = await _jobs(engine, Sleep(), task="admin_other")
    preview = await admin.fail(engine, queue="other", reason="bad data", dry_run=True)
    assert [c.id for c in preview] == [other]
    assert await _status(engine, other) == "pending"  # dry run changed nothing
    assert [c.id for c in await admin.fail(engine, task="admin_other", reason="bad data")] == [other]
    assert await _status(engine, other) == "failed"
    errors = await scalar(engine, "SELECT errors FROM polyqueue_jobs WHERE id = :i", i=other)
    assert errors[-1]["type"] == "FailedByOperator" and errors[-1]["message"] == "bad data"
    # values are bound parameters: a hostile task name is just a name that matches nothing
    assert await admin.cancel(engine, task="x' OR '1'='1") == []
    assert {await _status(engine, i) for i in sleeps} == {"pending"}


async def test_requeue_failed_and_cancelled_with_and_without_reset(engine: AsyncEngine) -> None:
    a, b, c = await _jobs(engine, Sleep(tag="a"), Sleep(tag="b"), Sleep(tag="c"))
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET attempt = 2"))
    await _set(engine, "failed", [a, b])
    await _set(engine, "cancelled", [c])
    listener = Listener(engine)
    heard: list[str] = []
    listener.subscribe(NEW_JOB_CHANNEL, heard.append)
    await listener.start()
    try:
        changed = await admin.requeue(engine, [a], reset_attempts=True)
        assert [(x.id, x.old_status, x.new_status) for x in changed] == [(a, "failed", "pending")]
        changed = await admin.requeue(engine, status="cancelled")
        assert [(x.id, x.old_status) for x in changed] == [(c, "cancelled")]
        await wait_until(lambda: "default" in heard, what="NOTIFY polyqueue_new")
    finally:
        await listener.close()
    attempts = dict(await rows(engine, "SELECT id, attempt FROM polyqueue_jobs"))
    assert attempts == {a: 0, b: 2, c: 2}
    async with running_worker(app, engine):
        await wait_until(lambda: _all(engine, {a: "succeeded", c: "succeeded", b: "failed"}), what="requeued to run")
    # c was at attempt 2 of 2 and was requeued without reset: it got one more attempt (3)
    assert dict(await rows(engine, "SELECT id, attempt FROM polyqueue_jobs")) == {a: 1, b: 2, c: 3}


async def _all(engine: AsyncEngine, want: dict[uuid.UUID, str]) -> bool:
    return all([await _is(engine, k, v) for k, v in want.items()])


async def test_requeue_skips_a_job_whose_unique_key_is_live_again(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as s, s.begin():
        old = (await enqueue(s, Sleep(), task="admin_sleep", unique_key="k1")).id
    await _set(engine, "failed", [old])
    async with AsyncSession(engine) as s, s.begin():
        new = (await enqueue(s, Sleep(), task="admin_sleep", unique_key="k1")).id
    assert new != old
    assert await admin.requeue(engine, [old]) == []
    assert await _status(engine, old) == "failed"


async def test_prune_deletes_only_old_finished_jobs(engine: AsyncEngine) -> None:
    a, b, c = await _jobs(engine, Sleep(), Sleep(), Sleep())
    await _set(engine, "succeeded", [a, b])
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE polyqueue_jobs SET finished_at = now() - interval '2 hours' WHERE id = :a"), {"a": a}
        )
    assert await admin.prune(engine, 3600, dry_run=True) == 1
    assert await admin.prune(engine, 3600, status="failed") == 0
    assert await admin.prune(engine, 3600) == 1
    assert {r[0] for r in await rows(engine, "SELECT id FROM polyqueue_jobs")} == {b, c}
    assert await admin.prune(engine, 0) == 1  # b; c is live and never pruned
    assert {r[0] for r in await rows(engine, "SELECT id FROM polyqueue_jobs")} == {c}


async def test_cancel_and_fail_running_jobs_in_process(engine: AsyncEngine) -> None:
    listener = Listener(engine)
    cancels: list[str] = []
    dones: list[str] = []
    listener.subscribe(CANCEL_CHANNEL, cancels.append)
    listener.subscribe(DONE_CHANNEL, dones.append)
    await listener.start()
    try:
        slow1, slow2 = await _jobs(engine, Sleep(seconds=60, tag="1"), Sleep(seconds=60, tag="2"))
        async with running_worker(app, engine, concurrency=4) as worker:
            await wait_until(lambda: _all(engine, {slow1: "running", slow2: "running"}), what="both running")
            [changed] = await admin.cancel(engine, [slow1])
            assert (changed.old_status, changed.new_status) == ("running", "cancelled")
            [changed] = await admin.fail(engine, [slow2], reason="stuck")
            assert (changed.old_status, changed.new_status) == ("running", "failed")
            await wait_until(lambda: not worker.worker.running, what="the worker to stop both handlers")
            [quick] = await _jobs(engine, Sleep(tag="next"))
            await wait_until(lambda: _is(engine, quick, "succeeded"), what="the next job")
        await wait_until(lambda: str(slow2) in ",".join(dones), what="done notifications")
    finally:
        await listener.close()
    assert str(slow1) in ",".join(cancels) and str(slow2) in ",".join(cancels)
    assert await _status(engine, slow1) == "cancelled"  # the worker wrote nothing over it
    assert await _status(engine, slow2) == "failed"
    errors = await scalar(engine, "SELECT errors FROM polyqueue_jobs WHERE id = :i", i=slow2)
    assert [e["type"] for e in errors] == ["FailedByOperator"]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_admin_cancel_from_another_process_stops_a_running_job(engine: AsyncEngine, db_url: URL) -> None:
    async with engine.begin() as conn:
        for ddl in EFFECTS_DDL:
            await conn.execute(text(ddl))
    async with AsyncSession(engine) as s, s.begin():
        job_id = (await enqueue(s, Effect(n=1, seconds=60))).id
    worker = spawn_worker(db_url, "tests.apps.effects:app")
    try:
        await wait_until(lambda: _is(engine, job_id, "running"), what="the job to run")
        await wait_until(lambda: _count(engine, "SELECT count(*) FROM starts", 1), what="the handler to start")
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYQUEUE_")}
        env["POLYQUEUE_DATABASE_URL"] = services.url_str(db_url)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "polyqueue.cli", "admin", "cancel", str(job_id), "--json",
            env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert f'"id": "{job_id}"' in out.decode()
        async with AsyncSession(engine) as s, s.begin():
            next_id = (await enqueue(s, Effect(n=2))).id
        await wait_until(lambda: _is(engine, next_id, "succeeded"), what="the worker to serve the next job")
        assert worker.poll() is None
    finally:
        _stop(worker)
    assert worker.returncode == 0
    assert await _status(engine, job_id) == "cancelled"
    assert await scalar(engine, "SELECT count(*) FROM effects WHERE job_id = :j", j=job_id) == 0
    assert await scalar(engine, "SELECT count(*) FROM effects") == 1  # the next job's
    assert await scalar(engine, "SELECT count(*) FROM starts WHERE job_id = :j", j=job_id) == 1  # never re-run


async def _count(engine: AsyncEngine, sql: str, n: int) -> bool:
    return bool(await scalar(engine, sql) >= n)
