"""The Redis deployment's app: run with POLYQUEUE_QUEUE_BACKEND=redis and POLYQUEUE_BROKER_URL.

polyqueue relay jobs:app               # forwards committed jobs to Redis
polyqueue worker jobs:app --no-relay   # runs them (start as many as you like)
"""

from __future__ import annotations

import os

from pydantic import BaseModel

from polyqueue import JobContext, Polyqueue

app = Polyqueue()  # POLYQUEUE_QUEUE_BACKEND, POLYQUEUE_BROKER_URL, POLYQUEUE_DATABASE_URL ...


class Resize(BaseModel):
    image_id: int
    width: int


class Resized(BaseModel):
    image_id: int
    width: int
    worker_pid: int


@app.register(max_attempts=3, max_run_seconds=30)
async def resize(payload: Resize, ctx: JobContext) -> Resized:
    return Resized(image_id=payload.image_id, width=payload.width, worker_pid=os.getpid())
