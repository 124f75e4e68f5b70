"""Test helpers: run a worker in the background, wait for database conditions with deadlines,
run the ``polyqueue`` command line as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue
from polyqueue.brokers.base import Broker, BrokerAdapter
from polyqueue.queries import job_claim_pending, worker_register
from polyqueue.relay import Relay
from polyqueue.runner import WorkerProcess
from tests.services import url_str

ROOT = Path(__file__).resolve().parent.parent

#: Settings that make liveness and maintenance fast enough for tests.
FAST = {
    "poll_interval": 0.2,
    "heartbeat_interval": 0.2,
    "worker_dead_after": 1.5,
    "maintenance_interval": 0.2,
    "timeout_grace": 0.2,
    "completion_flush_interval": 0.01,
    "shutdown_grace": 5.0,
}


def make_app(**overrides: Any) -> Polyqueue:
    return Polyqueue(**{**FAST, **overrides})


@contextlib.asynccontextmanager
async def running_worker(
    app: Polyqueue, engine: AsyncEngine, *, broker: Broker | BrokerAdapter | None = None, **kwargs: Any
) -> AsyncIterator[WorkerProcess]:
    """A worker process (as ``polyqueue worker`` wires one) running in a background task;
    stopped (gracefully) on exit. A ``broker`` given is left open for the test to inspect."""
    worker = WorkerProcess(app, engine, broker=broker, **kwargs)
    task = asyncio.create_task(worker.run(), name="test-worker")
    try:
        started = asyncio.ensure_future(worker.worker.started.wait())
        await asyncio.wait([started, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if task.done():
            task.result()  # it failed to start: raise why
        assert worker.worker.started.is_set(), "the worker did not start within 30 s"
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(
    check: Callable[[], Awaitable[bool] | bool], *, timeout: float = 20.0, what: str = "condition"
) -> None:
    """Poll ``check`` (a coroutine function, or a plain one for a condition in memory) until it
    is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _holds(check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def heard_everything(engine: AsyncEngine, channel: str, heard: list[str]) -> None:
    """Wait until a listener appending payloads of ``channel`` to ``heard`` received all that was
    notified before now: a marker NOTIFY sent now arrives after them (Postgres delivers
    notifications in commit order), so waiting for it replaces sleeping. The marker is removed."""
    marker = f"marker-{uuid.uuid4()}"
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_notify(:c, :m)"), {"c": channel, "m": marker})
    await wait_until(lambda: marker in heard, timeout=10, what=f"the marker NOTIFY on {channel}")
    heard.remove(marker)


async def _holds(result: Awaitable[bool] | bool) -> bool:
    return await result if inspect.isawaitable(result) else result


async def scalar(engine: AsyncEngine, sql: str, **params: Any) -> Any:
    async with engine.connect() as conn:
        return await conn.scalar(text(sql), params)


async def rows(engine: AsyncEngine, sql: str, **params: Any) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(sql), params)).all())


async def wait_all_terminal(engine: AsyncEngine, expected: int, timeout: float = 30.0) -> None:
    async def done() -> bool:
        n = await scalar(
            engine, "SELECT count(*) FROM polyqueue_jobs WHERE status IN ('succeeded','failed','cancelled')"
        )
        return bool(n >= expected)

    await wait_until(done, timeout=timeout, what=f"{expected} jobs to finish")


def spawn_worker(
    db: URL, app_path: str, *, env: dict[str, str] | None = None, **settings: Any
) -> subprocess.Popen[bytes]:
    """Start a real worker process (``tests/apps/run_worker.py``) for ``app_path`` (module:attr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "POLYQUEUE_DATABASE_URL": url_str(db)}
    for key, value in {**FAST, **settings}.items():
        full_env[f"POLYQUEUE_{key.upper()}"] = str(value)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "tests.apps.run_worker", app_path], env=full_env, cwd=ROOT)


# -- shared by the end-to-end tests of every broker (tests/test_*_e2e.py) -------------------------
async def create_effect_tables(engine: AsyncEngine) -> None:
    """The ``effects``/``starts`` tables of tests/apps/effects.py."""
    from tests.apps.effects import EFFECTS_DDL

    async with engine.begin() as conn:
        for ddl in EFFECTS_DDL:
            await conn.execute(text(ddl))


async def enqueue_effects(engine: AsyncEngine, count: int, seconds: float = 0.0) -> None:
    """``count`` jobs of tests/apps/effects.py's ``record`` in one committed transaction."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from polyqueue import enqueue_many
    from tests.apps.effects import Effect

    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Effect(n=i, seconds=seconds) for i in range(count)])


def stop_processes(*procs: subprocess.Popen[bytes]) -> None:
    """SIGTERM worker processes and wait; one stuck past 20 s dumps its stacks (SIGUSR1) and is killed."""
    import signal
    import time

    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGUSR1)  # tests/apps/run_worker.py prints where it hung
            time.sleep(1)
            p.kill()
            p.wait()


class Crash(Exception):
    """A process dying between two statements of a transaction."""


class RelayDyingBeforeItsMark(Relay):
    """A relay whose ``run_once`` publishes, then raises :class:`Crash` instead of marking its
    jobs ``enqueued``: its transaction rolls back, as when the process dies there."""

    async def _mark(self, conn: AsyncConnection, ids: list[uuid.UUID]) -> None:
        raise Crash


async def assert_exactly_once(engine: AsyncEngine, count: int) -> None:
    """Every one of ``count`` jobs succeeded and took effect exactly once."""
    assert await scalar(engine, "SELECT count(*) FROM effects") == count
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded'") == count


# -- the command line, run as users run it (tests/test_cli.py, test_bad_urls.py, test_inspect_cli.py) --
CLI = [sys.executable, "-m", "polyqueue.cli"]


@dataclass
class Ran:
    """A finished CLI run: exit code, stdout, stderr."""

    code: int | None
    out: str
    err: str


def cli_env(database_url: URL | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any POLYQUEUE_* variable, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYQUEUE_")}
    if database_url is not None:
        env["POLYQUEUE_DATABASE_URL"] = url_str(database_url)
    env.setdefault("COLUMNS", "120")
    return {**env, **extra}


async def run_cli(*args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 90) -> Ran:
    """Run ``polyqueue ARGS`` to its end (killed after ``timeout`` seconds)."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Ran(proc.returncode, out.decode(), err.decode())


async def dead_workers_job(engine: AsyncEngine, payload: BaseModel, app: Polyqueue | None = None) -> uuid.UUID:
    """A running job (of ``app``'s task for ``payload``) whose worker's heartbeat is a minute old:
    only maintenance brings it back."""
    async with AsyncSession(engine) as s, s.begin():
        await enqueue(s, payload, app=app)
    worker = uuid.uuid4()
    async with engine.begin() as conn:
        await worker_register(
            conn, worker_id=worker, hostname="h", pid=1, queues=["default"], broker="direct", concurrency=1
        )
        await conn.execute(
            text("UPDATE polyqueue_workers SET heartbeat_at = now() - interval '60 seconds' WHERE id = :w"),
            {"w": worker},
        )
        [claimed] = await job_claim_pending(conn, worker, ["default"], 1)
    return claimed.id
