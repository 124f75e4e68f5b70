"""Handlers for the chaos runner (tests/chaos). Two families:

* ``exact`` writes its effect through ``ctx.session``: the bar is exactly once.
* ``loose`` writes its effect on its own connection, outside the job's transaction:
  the bar is at least once, a duplicate allowed only for an attempt a fault cut short.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue import Backoff, JobContext, Polyqueue

app = Polyqueue()

DDL = (
    "CREATE TABLE IF NOT EXISTS chaos_exact (job_id uuid NOT NULL, attempt int NOT NULL, pid int NOT NULL)",
    "CREATE TABLE IF NOT EXISTS chaos_loose (job_id uuid NOT NULL, attempt int NOT NULL, pid int NOT NULL)",
)
RETRY = Backoff(base=0.05, maximum=0.5)


class Work(BaseModel):
    n: int
    sleep_ms: int = 0


@app.register(max_attempts=100, backoff=RETRY)
async def exact(payload: Work, ctx: JobContext) -> int:
    if payload.sleep_ms:
        await asyncio.sleep(payload.sleep_ms / 1000)
    await ctx.session.execute(
        text("INSERT INTO chaos_exact VALUES (:j, :a, :p)"), {"j": ctx.job_id, "a": ctx.attempt, "p": os.getpid()}
    )
    return payload.n


@app.register(max_attempts=100, backoff=RETRY)
async def loose(payload: Work, ctx: JobContext) -> int:
    if payload.sleep_ms:
        await asyncio.sleep(payload.sleep_ms / 1000)
    engine = ctx.session.bind
    assert isinstance(engine, AsyncEngine)
    async with engine.begin() as conn:
        await conn.execute(
            text("INSERT INTO chaos_loose VALUES (:j, :a, :p)"), {"j": ctx.job_id, "a": ctx.attempt, "p": os.getpid()}
        )
    return payload.n
