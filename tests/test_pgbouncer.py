"""polyqueue through a real pgbouncer in transaction mode (``pool_mode="transaction"``).

pgbouncer hands a server connection to another client after every transaction, so nothing
may rely on a session: prepared statements (collided: ``prepared statement
"__asyncpg_stmt_..." already exists``), session ``SET`` (leaked to pgbouncer's other clients),
``LISTEN`` (delivered to nobody) and a session advisory lock (two maintenance leaders at once).
Each test starts its own pgbouncer (Debian's ``pgbouncer`` package) in front of its database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue
from polyqueue.brokers import make_broker
from polyqueue.db import make_engine
from polyqueue.listener import Listener
from polyqueue.maintenance.service import Maintenance
from polyqueue.runner import run_relay, run_worker
from tests.helpers import dead_workers_job, make_app, rows, scalar, wait_until
from tests.pgbouncer_service import PgBouncer, pgbouncer_exe, private_directory
from tests.redis_service import configured_url
from tests.services import url_str

#: pgbouncer's server connections per database; the pooled engines may use all of them.
SERVER_POOL = 6
JOBS = 60


class Bounced(BaseModel):
    n: int


async def bounced(payload: Bounced) -> int:
    return payload.n


@pytest.fixture
async def pgbouncer() -> AsyncIterator[PgBouncer]:
    exe = pgbouncer_exe()
    if exe is None:
        pytest.skip("no pgbouncer binary: install the Debian package pgbouncer")
    directory = private_directory()
    bouncer = PgBouncer(exe, directory, pool_size=SERVER_POOL)
    try:
        await bouncer.start()
        yield bouncer
    finally:
        await bouncer.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def pooled(pgbouncer: PgBouncer, db_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on the test's database through pgbouncer, as ``pool_mode="transaction"`` makes it."""
    engine = make_engine(pgbouncer.url(db_url), pool_size=SERVER_POOL, transaction_pooling=True)
    yield engine
    await engine.dispose()


async def enqueue_pings(engine: AsyncEngine, app: Polyqueue, count: int) -> None:
    async with AsyncSession(engine) as s, s.begin():
        for n in range(count):
            await enqueue(s, Bounced(n=n), app=app)


async def all_succeeded(engine: AsyncEngine) -> bool:
    left = await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status <> 'succeeded'")
    return bool(left == 0)


async def server_settings(engine: AsyncEngine) -> list[str]:
    """``enable_seqscan`` on every pgbouncer server connection: ``SERVER_POOL`` transactions held
    open at once, each on a server connection of its own."""
    async with contextlib.AsyncExitStack() as stack:
        conns: list[AsyncConnection] = []
        for _ in range(SERVER_POOL):
            conn = await stack.enter_async_context(engine.connect())
            await conn.begin()
            conns.append(conn)
        pids = {await c.scalar(text("SELECT pg_backend_pid()")) for c in conns}
        assert len(pids) == SERVER_POOL
        return [str(await c.scalar(text("SHOW enable_seqscan"))) for c in conns]


def unexpected_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors polyqueue logged, but the rescue the test set up."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.getMessage().startswith("rescued job")
    ]


@pytest.mark.parametrize("listen", ["poll", "direct"])
async def test_direct_postgres_worker_and_maintenance_through_pgbouncer(
    listen: str, pooled: AsyncEngine, db_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """Every job succeeds, nothing is logged at WARNING or above, one maintenance leader rescues
    the dead worker's job, and no server connection is left with a session setting."""
    caplog.set_level(logging.INFO, "polyqueue")
    settings = {"listen_database_url": url_str(db_url)} if listen == "direct" else {}
    app = make_app(pool_mode="transaction", **settings)
    app.register(bounced)
    rescued = await dead_workers_job(pooled, Bounced(n=-1), app)
    await enqueue_pings(pooled, app, JOBS)
    stopping = asyncio.Event()
    worker = asyncio.create_task(run_worker(app, engine=pooled, stopping=stopping))
    try:
        await wait_until(lambda: all_succeeded(pooled), what="every job to succeed")
        leaders = await rows(pooled, "SELECT name FROM polyqueue_leader WHERE expires_at > now()")
        await enqueue_pings(pooled, app, 5)  # found by polling, or woken by NOTIFY on the direct connection
        await wait_until(lambda: all_succeeded(pooled), what="late jobs to succeed")
    finally:
        stopping.set()
        await asyncio.wait_for(worker, 30)
    assert await scalar(pooled, "SELECT attempt FROM polyqueue_jobs WHERE id = :i", i=rescued) == 2
    assert await scalar(pooled, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded'") == JOBS + 6
    assert unexpected_warnings(caplog) == []
    assert await server_settings(pooled) == ["on"] * SERVER_POOL
    assert leaders == [("maintenance",)]
    assert await scalar(pooled, "SELECT count(*) FROM polyqueue_leader") == 0  # resigned on stop


async def test_redis_relay_worker_and_maintenance_through_pgbouncer(
    pooled: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    redis_url, why = configured_url()
    if redis_url is None:
        pytest.skip(f"redis: {why}")
    caplog.set_level(logging.INFO, "polyqueue")
    prefix = f"pqtest_{uuid.uuid4().hex[:12]}"
    app = make_app(
        pool_mode="transaction", queue_backend="redis", broker_url=f"{redis_url}?key_prefix={prefix}", lease_seconds=2
    )
    app.register(bounced)
    rescued = await dead_workers_job(pooled, Bounced(n=-1), app)
    await enqueue_pings(pooled, app, JOBS)
    stopping = asyncio.Event()
    relay = asyncio.create_task(run_relay(app, engine=pooled, stopping=stopping))
    worker = asyncio.create_task(
        run_worker(app, engine=pooled, broker=make_broker(app.settings), run_relay=False, stopping=stopping)
    )
    try:
        await wait_until(lambda: all_succeeded(pooled), what="every job to succeed")
    finally:
        stopping.set()
        await asyncio.wait_for(asyncio.gather(relay, worker), 30)
        client = aioredis.from_url(redis_url)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    assert await scalar(pooled, "SELECT attempt FROM polyqueue_jobs WHERE id = :i", i=rescued) == 2
    assert await scalar(pooled, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded'") == JOBS + 1
    assert unexpected_warnings(caplog) == []
    assert await server_settings(pooled) == ["on"] * SERVER_POOL


async def test_two_maintenance_processes_through_pgbouncer_have_one_leader(pooled: AsyncEngine) -> None:
    """A session advisory lock through pgbouncer is held by a server connection, which the next
    client gets: the second process "took" the lock the first one held. The lease row is not fooled."""
    settings = make_app(pool_mode="transaction").settings
    a, b = Maintenance(pooled, settings), Maintenance(pooled, settings)
    for _ in range(20):  # over every server connection, in turn
        assert await a._try_lead() is True
        assert await b._try_lead() is False
    await a._resign()
    assert await b._try_lead() is True
    assert await a._try_lead() is False
    await b._resign()


async def test_listener_without_a_direct_url_polls_and_never_blocks_on_connected(pooled: AsyncEngine) -> None:
    listener = Listener(pooled, transaction_pooling=True)
    listener.subscribe("polyqueue_test", lambda _payload: None)
    await listener.start()
    try:
        assert listener.polling_only
        await asyncio.wait_for(listener.connected.wait(), 1)
    finally:
        await listener.close()


async def test_listener_with_a_direct_url_hears_notify_sent_through_pgbouncer(pooled: AsyncEngine, db_url: URL) -> None:
    """LISTEN through pgbouncer in transaction mode hears nothing; on the direct URL it does."""
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = Listener(pooled, direct_url=url_str(db_url), transaction_pooling=True)
    listener.subscribe("polyqueue_test", lambda payload: heard.put_nowait(payload) if payload else None)
    await listener.start()
    try:
        await asyncio.wait_for(listener.connected.wait(), 5)
        async with pooled.begin() as conn:
            await conn.execute(text("SELECT pg_notify('polyqueue_test', 'hello')"))
        assert await asyncio.wait_for(heard.get(), 5) == "hello"
    finally:
        await listener.close()
