"""Retries, time limits and waiting for results: ``python examples/retries_and_limits.py``.

Five jobs, each showing one behaviour, run by an in-process worker:

* a flaky handler that fails twice and succeeds on its third attempt (backoff between);
* a handler asking to be retried later with ``Retry(delay=...)``;
* a handler giving up with ``TerminalError`` (no retry, whatever attempts remain);
* a slow handler with ``timeout_strategy="retry"``: each attempt is cut at its time limit
  until the attempts run out;
* the same with ``timeout_strategy="fail"``: failed at the first time limit.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from polyqueue import (
    Backoff,
    JobContext,
    JobFailedError,
    Polyqueue,
    Retry,
    TerminalError,
    enqueue,
    run_worker,
    wait_for_result,
)
from polyqueue.db import database_url, make_engine
from polyqueue.migrations import upgrade

app = Polyqueue(poll_interval=0.1)
QUICK = Backoff(base=0.05, factor=2, maximum=0.5)  # short waits so the example finishes fast


class Call(BaseModel):
    name: str


class Sleep(BaseModel):
    seconds: float


@app.register(max_attempts=5, backoff=QUICK)
async def flaky(payload: Call, ctx: JobContext) -> str:
    if ctx.attempt < 3:
        raise ConnectionError(f"{payload.name}: connection reset (attempt {ctx.attempt})")
    return f"{payload.name} succeeded on attempt {ctx.attempt}"


@app.register(max_attempts=3)
async def rate_limited(payload: Call, ctx: JobContext) -> str:
    if ctx.attempt == 1:
        raise Retry(delay=0.2, reason="429 Too Many Requests")
    return f"{payload.name} succeeded after Retry, on attempt {ctx.attempt}"


@app.register(max_attempts=5)
async def declined(payload: Call) -> str:
    raise TerminalError(f"{payload.name}: card declined")


@app.register(max_attempts=2, max_run_seconds=0.2, timeout_strategy="retry", backoff=QUICK)
async def slow_retry(payload: Sleep) -> str:
    await asyncio.sleep(payload.seconds)
    return "finished"


@app.register(max_attempts=5, max_run_seconds=0.2, timeout_strategy="fail")
async def slow_fail(payload: Sleep) -> str:
    await asyncio.sleep(payload.seconds)
    return "finished"


async def main() -> None:
    # POLYQUEUE_DATABASE_URL, else the embedded Postgres.
    engine = make_engine(database_url(app.settings.database_url, app.settings.embedded_dir, embedded_by_default=True))
    await upgrade(engine)
    async with AsyncSession(engine) as session, session.begin():
        jobs = {
            "flaky": (await enqueue(session, Call(name="flaky"), task="flaky")).id,
            "rate_limited": (await enqueue(session, Call(name="rate_limited"), task="rate_limited")).id,
            "declined": (await enqueue(session, Call(name="declined"), task="declined")).id,
            "slow_retry": (await enqueue(session, Sleep(seconds=5), task="slow_retry")).id,
            "slow_fail": (await enqueue(session, Sleep(seconds=5), task="slow_fail")).id,
        }
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(app, engine=engine, stopping=stop))
    try:
        for name, job_id in jobs.items():
            try:
                result = await wait_for_result(job_id, engine=engine, timeout=20)
                print(f"{name}: succeeded: {result}")
            except JobFailedError as exc:
                last = exc.last_error or {}
                print(
                    f"{name}: {exc.status} at attempt {last.get('attempt')}: {last.get('type')}: {last.get('message')}"
                )
    finally:
        stop.set()
        await worker
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
