"""An app whose handlers record side effects in ``effects`` (unique per job), for crash tests.

``record`` writes through ``ctx.session``: the effect and the job's completion commit
together, so it must happen exactly once. Its first attempt waits ``seconds`` first (long enough to be killed mid-job).
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel
from sqlalchemy import text

from polyqueue import JobContext, Polyqueue

app = Polyqueue()

EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS effects (job_id uuid PRIMARY KEY, pid int NOT NULL, attempt int NOT NULL)",
    "CREATE TABLE IF NOT EXISTS starts (job_id uuid NOT NULL, pid int NOT NULL, attempt int NOT NULL)",
)


class Effect(BaseModel):
    n: int
    seconds: float = 0.0


@app.register(max_attempts=5)
async def record(payload: Effect, ctx: JobContext) -> int:
    # Outside the job's transaction: every start, including ones a crash cuts short.
    async with ctx.session.bind.connect() as conn:  # type: ignore[union-attr]
        await conn.execute(
            text("INSERT INTO starts VALUES (:j, :p, :a)"), {"j": ctx.job_id, "p": os.getpid(), "a": ctx.attempt}
        )
        await conn.commit()
    if payload.seconds and ctx.attempt == 1:  # only the first attempt is slow (the one we kill)
        await asyncio.sleep(payload.seconds)
    await ctx.session.execute(
        text("INSERT INTO effects VALUES (:j, :p, :a)"), {"j": ctx.job_id, "p": os.getpid(), "a": ctx.attempt}
    )
    return payload.n
