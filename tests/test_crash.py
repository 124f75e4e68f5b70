"""Crash recovery with real worker processes: SIGKILL mid-job, and a worker frozen
(SIGSTOP) past its liveness deadline that wakes up late. The handler's effect goes
through ctx.session, so the bar is exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid

from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import enqueue
from tests.apps.effects import EFFECTS_DDL, Effect
from tests.helpers import rows, scalar, spawn_worker, wait_all_terminal, wait_until

APP = "tests.apps.effects:app"


async def _setup(engine: AsyncEngine, seconds: float) -> uuid.UUID:
    async with engine.begin() as conn:
        for ddl in EFFECTS_DDL:
            await conn.execute(text(ddl))
    async with AsyncSession(engine) as s, s.begin():
        job = await enqueue(s, Effect(n=7, seconds=seconds))
        return job.id


async def _started(engine: AsyncEngine, count: int = 1) -> None:
    async def check() -> bool:
        return bool(await scalar(engine, "SELECT count(*) FROM starts") >= count)

    await wait_until(check, what=f"{count} handler start(s)")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_sigkill_mid_job_is_rescued_and_runs_exactly_once(engine: AsyncEngine, db_url: URL) -> None:
    job = await _setup(engine, seconds=60)
    victim = spawn_worker(db_url, APP)
    try:
        await _started(engine)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        _stop(victim)
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs") == "running"  # orphaned
    rescuer = spawn_worker(db_url, APP)
    try:
        await wait_all_terminal(engine, 1, timeout=30)
    finally:
        _stop(rescuer)
    assert rescuer.returncode == 0
    [(status, attempt, errors, result)] = await rows(
        engine, "SELECT status, attempt, errors, result FROM polyqueue_jobs"
    )
    assert (status, attempt, result) == ("succeeded", 2, 7)
    assert [e["type"] for e in errors] == ["WorkerLost"]
    assert await scalar(engine, "SELECT count(*) FROM effects") == 1
    assert await scalar(engine, "SELECT attempt FROM effects WHERE job_id = :j", j=job) == 2
    assert await scalar(engine, "SELECT status FROM polyqueue_workers WHERE pid = :p", p=victim.pid) == "dead"


async def test_frozen_worker_that_wakes_late_cannot_complete_its_reaped_job(engine: AsyncEngine, db_url: URL) -> None:
    await _setup(engine, seconds=3)
    sleeper = spawn_worker(db_url, APP)
    rescuer: subprocess.Popen[bytes] | None = None
    try:
        await _started(engine)
        os.kill(sleeper.pid, signal.SIGSTOP)  # frozen: no heartbeats, no progress
        rescuer = spawn_worker(db_url, APP)
        await wait_all_terminal(engine, 1, timeout=30)
        os.kill(sleeper.pid, signal.SIGCONT)  # wakes up, finishes its sleep, tries to commit attempt 1

        async def late_attempt_over() -> bool:
            # the frozen worker notices it was declared dead and re-registers under a new id
            return bool(
                await scalar(engine, "SELECT count(*) FROM polyqueue_workers WHERE pid = :p", p=sleeper.pid) >= 2
            )

        await wait_until(late_attempt_over, timeout=20, what="the frozen worker to re-register")
    finally:
        _stop(sleeper)
        if rescuer is not None:
            _stop(rescuer)
    assert sleeper.returncode == 0
    assert await scalar(engine, "SELECT count(*) FROM effects") == 1
    assert await scalar(engine, "SELECT attempt FROM effects") == 2
    assert await rows(engine, "SELECT status, attempt FROM polyqueue_jobs") == [("succeeded", 2)]
