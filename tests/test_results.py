"""Results API: clear errors, typed reads, and wait_for_result woken by the completion NOTIFY."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import (
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    ResultTimeoutError,
    TerminalError,
    enqueue,
    get_job_result,
    wait_for_result,
)
from tests.helpers import make_app, running_worker

app = make_app()


class Square(BaseModel):
    n: int


class Squared(BaseModel):
    value: int


@app.register
async def square(payload: Square) -> Squared:
    if payload.n < 0:
        raise TerminalError("negative input")
    return Squared(value=payload.n**2)


async def _enqueue(engine: AsyncEngine, n: int) -> uuid.UUID:
    async with AsyncSession(engine) as s, s.begin():
        return (await enqueue(s, Square(n=n))).id


async def test_errors_for_unknown_unfinished_and_failed_jobs(engine: AsyncEngine) -> None:
    job = await _enqueue(engine, 3)
    async with AsyncSession(engine) as s:
        with pytest.raises(JobNotFoundError):
            await get_job_result(s, uuid.uuid4())
        with pytest.raises(JobNotFinishedError, match="pending"):
            await get_job_result(s, job)
    with pytest.raises(ResultTimeoutError):
        await wait_for_result(job, engine=engine, timeout=0.2)


async def test_wait_for_result_wakes_on_notify_not_on_polling(engine: AsyncEngine) -> None:
    ok = await _enqueue(engine, 12)
    bad = await _enqueue(engine, -1)
    # poll_interval is far beyond the timeout: only the NOTIFY can wake these waits in time
    waits = [
        asyncio.create_task(wait_for_result(ok, engine=engine, timeout=15, poll_interval=600, model=Squared)),
        asyncio.create_task(wait_for_result(bad, engine=engine, timeout=15, poll_interval=600)),
    ]
    await asyncio.sleep(0.3)  # both waiters are listening before the worker starts
    async with running_worker(app, engine):
        done = await asyncio.gather(*waits, return_exceptions=True)
    assert done[0] == Squared(value=144)
    assert isinstance(done[1], JobFailedError) and "negative input" in str(done[1])


async def test_wait_for_result_returns_at_once_for_a_finished_job(engine: AsyncEngine) -> None:
    job = await _enqueue(engine, 2)
    async with running_worker(app, engine):
        assert await wait_for_result(job, engine=engine, timeout=15) == {"value": 4}
    assert await wait_for_result(str(job), engine=engine, timeout=0.01) == {"value": 4}
