"""A relay process and a worker process on Redis, driven from here: ``python examples/redis_deployment/run.py``.

Starts ``polyqueue relay jobs:app`` and ``polyqueue worker jobs:app --no-relay`` as
subprocesses with ``queue_backend=redis``, enqueues jobs in one transaction, waits for
their results, and stops both processes with SIGTERM (a graceful shutdown).
Redis: ``POLYQUEUE_BROKER_URL``, default ``redis://127.0.0.1:6379/0``.
Postgres: ``POLYQUEUE_DATABASE_URL``, else the embedded one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession

HERE = Path(__file__).resolve().parent
os.environ["POLYQUEUE_QUEUE_BACKEND"] = "redis"
os.environ.setdefault("POLYQUEUE_BROKER_URL", "redis://127.0.0.1:6379/0")

from jobs import Resize, Resized, app  # noqa: E402  (after the environment it reads)

from polyqueue import enqueue_many, wait_for_result  # noqa: E402
from polyqueue.db import database_url, make_engine  # noqa: E402
from polyqueue.migrations import upgrade  # noqa: E402

JOBS = 20


def start(*args: str) -> subprocess.Popen[bytes]:
    # The children run polyqueue's CLI with this Python, from this folder (so `jobs:app` imports).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "polyqueue.cli", *args], cwd=HERE, env=env)


async def main() -> None:
    url = database_url(app.settings.database_url, app.settings.embedded_dir, embedded_by_default=True)
    os.environ["POLYQUEUE_DATABASE_URL"] = url  # the children use the same database
    engine = make_engine(url)
    await upgrade(engine)  # polyqueue db upgrade
    relay = start("relay", "jobs:app")
    worker = start("worker", "jobs:app", "--no-relay", "--concurrency", "8")
    try:
        async with AsyncSession(engine) as session, session.begin():
            ids = await enqueue_many(session, [Resize(image_id=i, width=320) for i in range(JOBS)])
        results = [await wait_for_result(i, engine=engine, timeout=60, model=Resized) for i in ids]
        assert [r.image_id for r in results] == list(range(JOBS))
        pids = {r.worker_pid for r in results}
        print(f"{len(results)} jobs ran through Redis: relay pid {relay.pid} -> worker pid(s) {sorted(pids)}")
        print("worker process ran them all:", pids == {worker.pid})
    finally:
        for proc in (worker, relay):
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=60) for proc in (worker, relay)]
        await engine.dispose()
    print("relay and worker stopped on SIGTERM, exit codes:", codes)


if __name__ == "__main__":
    asyncio.run(main())
