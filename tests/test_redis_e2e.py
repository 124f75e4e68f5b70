"""End to end with queue_backend="redis": real worker processes (each with its relay), a
private redis-server this test owns (so it may stop and flush it), real Postgres.

Effects go through ctx.session under a unique constraint, so the bar is exactly once.
"""

from __future__ import annotations

import signal
import uuid

import pytest
import redis.asyncio as aioredis
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import enqueue
from polyqueue.brokers.base import Message, encode_message
from polyqueue.runner import run_relay
from tests.apps.effects import Effect
from tests.helpers import (
    assert_exactly_once,
    create_effect_tables,
    enqueue_effects,
    rows,
    scalar,
    spawn_worker,
    stop_processes,
    wait_all_terminal,
    wait_until,
)
from tests.redis_service import RedisServer

APP = "tests.apps.effects:app"


def _redis_env(server: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "POLYQUEUE_QUEUE_BACKEND": "redis",
        "POLYQUEUE_BROKER_URL": server.url,
        "POLYQUEUE_LEASE_SECONDS": "2",
        **extra,
    }


async def test_two_racing_workers_run_each_job_exactly_once(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer
) -> None:
    await create_effect_tables(engine)
    await enqueue_effects(engine, 400)
    workers = [spawn_worker(db_url, APP, env=_redis_env(redis_server)) for _ in range(2)]
    try:
        await wait_all_terminal(engine, 400, timeout=60)
    finally:
        stop_processes(*workers)
    await assert_exactly_once(engine, 400)
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE attempt <> 1") == 0
    assert await scalar(engine, "SELECT count(DISTINCT pid) FROM effects") == 2  # both really worked
    assert all(w.returncode == 0 for w in workers)


async def test_sigkill_mid_job_recovers_through_lease_and_rescue(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer
) -> None:
    await create_effect_tables(engine)
    async with AsyncSession(engine) as s, s.begin():
        await enqueue(s, Effect(n=1, seconds=60))
    victim = spawn_worker(db_url, APP, env=_redis_env(redis_server))
    try:
        await wait_until(lambda: _count(engine, "starts", 1), what="the job to start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop_processes(victim)
    rescuer = spawn_worker(db_url, APP, env=_redis_env(redis_server))
    try:
        await wait_all_terminal(engine, 1, timeout=30)
    finally:
        stop_processes(rescuer)
    await assert_exactly_once(engine, 1)
    assert await scalar(engine, "SELECT attempt FROM polyqueue_jobs") == 2


async def test_bad_messages_are_dropped_with_a_reason_and_the_worker_keeps_serving(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue #7. Bad deliveries among real jobs, on the real stream a worker process reads: not
    JSON, no id, an id that is not a UUID, an oversized body, a message naming another queue,
    and well-formed ones for a job that does not exist and for one that already succeeded. Each
    is dropped (acked and deleted), the malformed ones with their reason logged; no job row is
    created or changed, and every real job runs exactly once."""
    await create_effect_tables(engine)
    await enqueue_effects(engine, 20)
    worker = spawn_worker(db_url, APP, env=_redis_env(redis_server))
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await wait_all_terminal(engine, 20)
        finished = await scalar(engine, "SELECT id FROM polyqueue_jobs LIMIT 1")
        before = await rows(engine, "SELECT id, status, attempt, finished_at FROM polyqueue_jobs ORDER BY id")
        bad = {
            b"not json at all": "not JSON",
            b'{"queue": "default"}': "without a string 'id'",
            b'{"id": "not-a-uuid", "queue": "default"}': "is not a UUID",
            b'{"id": "' + str(uuid.uuid4()).encode() + b'", "pad": "' + b"x" * 5000 + b'"}': "exceeds 4096",
            b'{"id": "' + str(uuid.uuid4()).encode() + b'", "queue": "elsewhere"}': "arrived on 'default'",
        }
        good_but_pointless = [
            encode_message(Message(uuid.uuid4(), "default")),  # no such job
            encode_message(Message(finished, "default")),  # its job already succeeded
        ]
        for body in [*bad, *good_but_pointless]:
            await raw.xadd("polyqueue:default", {"body": body})
        await enqueue_effects(engine, 20)  # the worker must still serve these

        async def stream_drained() -> bool:
            return bool(await raw.xlen("polyqueue:default") == 0)

        await wait_all_terminal(engine, 40)
        await wait_until(stream_drained, what="every bad delivery acked and deleted")
    finally:
        stop_processes(worker)
        await raw.aclose()
    assert worker.returncode == 0
    await assert_exactly_once(engine, 40)
    after = await rows(engine, "SELECT id, status, attempt, finished_at FROM polyqueue_jobs ORDER BY id")
    assert [r for r in after if r[0] in {b[0] for b in before}] == before  # untouched, none re-run
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs") == 40  # no row made from a message
    log = capfd.readouterr().err
    for reason in bad.values():
        assert any("dropping malformed message" in line and reason in line for line in log.splitlines()), reason


async def test_jobs_committed_while_redis_is_down_all_run_once_it_is_back(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer
) -> None:
    await create_effect_tables(engine)
    await redis_server.stop()
    worker = spawn_worker(db_url, APP, env=_redis_env(redis_server))
    try:
        await enqueue_effects(engine, 50)  # enqueue never needs the broker
        await wait_until(
            lambda: _count(engine, "polyqueue_workers", 1), what="the worker to register while Redis is down"
        )
        assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'pending'") == 50
        await redis_server.start()
        await wait_all_terminal(engine, 50, timeout=60)
    finally:
        stop_processes(worker)
    await assert_exactly_once(engine, 50)
    assert worker.returncode == 0


async def test_flushall_of_enqueued_jobs_is_repaired_by_the_redispatch_backstop(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer
) -> None:
    import asyncio

    from polyqueue import Polyqueue
    from tests.services import url_str

    await create_effect_tables(engine)
    await enqueue_effects(engine, 30)
    relay_app = Polyqueue(
        database_url=url_str(db_url), queue_backend="redis", broker_url=redis_server.url, poll_interval=0.1
    )
    stopping = asyncio.Event()
    relay = asyncio.create_task(run_relay(relay_app, engine=engine, stopping=stopping))
    await wait_until(lambda: _where(engine, "status = 'enqueued'", 30), what="the relay to publish every job")
    stopping.set()
    await relay
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()  # the deliveries are gone; Postgres still says enqueued
    await client.aclose()
    worker = spawn_worker(db_url, APP, env=_redis_env(redis_server, POLYQUEUE_REDISPATCH_AFTER="1"))
    try:
        await wait_all_terminal(engine, 30, timeout=60)
    finally:
        stop_processes(worker)
    await assert_exactly_once(engine, 30)


async def _count(engine: AsyncEngine, table: str, at_least: int) -> bool:
    return bool(await scalar(engine, f"SELECT count(*) FROM {table}") >= at_least)  # noqa: S608 - test constant


async def _where(engine: AsyncEngine, condition: str, at_least: int) -> bool:
    return bool(await scalar(engine, f"SELECT count(*) FROM polyqueue_jobs WHERE {condition}") >= at_least)  # noqa: S608


async def test_a_relay_started_while_redis_is_down_waits_for_it(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay (re)started during a broker outage keeps retrying instead of exiting (found by the
    chaos runner: relays respawned during an outage died, and with them every delivery)."""
    import asyncio

    from polyqueue import Polyqueue
    from polyqueue.brokers import make_broker
    from polyqueue.runner import run_worker
    from tests.apps.effects import app as effects_app
    from tests.services import url_str

    await create_effect_tables(engine)
    await redis_server.stop()
    relay_app = Polyqueue(
        database_url=url_str(db_url), queue_backend="redis", broker_url=redis_server.url, poll_interval=0.1
    )
    stopping = asyncio.Event()
    relay = asyncio.create_task(run_relay(relay_app, engine=engine, stopping=stopping))
    worker_broker = make_broker(relay_app.settings)
    worker = asyncio.create_task(
        run_worker(effects_app, engine=engine, broker=worker_broker, run_relay=False, stopping=stopping)
    )
    try:
        await enqueue_effects(engine, 20)

        async def relay_failed_twice() -> bool:
            failures = [r for r in caplog.records if r.getMessage().startswith("relay: publishing to redis failed")]
            return len(failures) >= 2 or relay.done()

        await wait_until(relay_failed_twice, what="the relay to fail publishing twice")
        assert not relay.done(), relay.done() and relay.exception()
        await redis_server.start()
        await wait_all_terminal(engine, 20, timeout=60)
    finally:
        stopping.set()
        await asyncio.gather(relay, worker)
    await assert_exactly_once(engine, 20)


async def test_a_relay_blocked_on_a_silent_broker_still_stops(engine: AsyncEngine, db_url: URL) -> None:
    """A broker that accepts connections and never answers (a hung server) must not keep a relay
    from stopping: the batch in flight is abandoned after the grace and its jobs stay pending."""
    import asyncio
    import time

    from polyqueue import Polyqueue
    from polyqueue.relay import STOP_GRACE
    from tests.services import url_str

    swallowed = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            swallowed.set()
            pass  # read everything, answer nothing
        writer.close()

    silent = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        await enqueue_effects(engine, 5)
        relay_app = Polyqueue(
            database_url=url_str(db_url), queue_backend="redis", broker_url=f"redis://127.0.0.1:{port}/0"
        )
        stopping = asyncio.Event()
        relay = asyncio.create_task(run_relay(relay_app, engine=engine, stopping=stopping))
        await asyncio.wait_for(swallowed.wait(), 20)  # the relay is talking to the silent broker
        assert not relay.done()
        stopping.set()
        started = time.monotonic()
        await asyncio.wait_for(relay, STOP_GRACE + 15)  # grace, then the bounded broker close
        assert time.monotonic() - started < STOP_GRACE + 12
        assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'pending'") == 5
    finally:
        silent.close()


async def test_a_forged_deeply_nested_entry_does_not_stall_the_real_jobs_read_with_it(
    engine: AsyncEngine, db_url: URL, redis_server: RedisServer, capfd: pytest.CaptureFixture[str]
) -> None:
    """Issue #14. A forged entry of 2,000 ``[`` (within the size cap, nested past ``json.loads``'s
    recursion limit) sits on the live stream ahead of real jobs, so the worker's first read takes
    them together. It used to fail that whole read ("claiming jobs failed ... retrying"), leaving
    every real delivery of the batch pending until the lease ran out. Now the forged entry is
    dropped on its own and every real job runs well before the lease."""
    import asyncio

    from polyqueue import Polyqueue
    from tests.services import url_str

    lease = 60.0
    jobs = 20  # fewer than the worker's concurrency (16 by default) plus one: two reads at most
    await create_effect_tables(engine)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        await raw.xadd("polyqueue:default", {"body": b"[" * 2000})
        await enqueue_effects(engine, jobs)
        relay_app = Polyqueue(
            database_url=url_str(db_url), queue_backend="redis", broker_url=redis_server.url, poll_interval=0.1
        )
        stopping = asyncio.Event()
        relay = asyncio.create_task(run_relay(relay_app, engine=engine, stopping=stopping))
        await wait_until(lambda: _where(engine, "status = 'enqueued'", jobs), what="the relay to publish every job")
        stopping.set()
        await relay
        assert await raw.xlen("polyqueue:default") == jobs + 1
        worker = spawn_worker(db_url, APP, env=_redis_env(redis_server, POLYQUEUE_LEASE_SECONDS=str(lease)))
        try:
            await wait_all_terminal(engine, jobs, timeout=lease / 3)  # no delivery waited for the lease

            async def stream_drained() -> bool:
                return bool(await raw.xlen("polyqueue:default") == 0)

            await wait_until(stream_drained, timeout=lease / 3, what="the forged entry acked and deleted")
        finally:
            stop_processes(worker)
    finally:
        await raw.aclose()
    assert worker.returncode == 0
    await assert_exactly_once(engine, jobs)
    log = capfd.readouterr().err
    assert "claiming jobs failed" not in log
    assert any("dropping malformed message" in line and "nested too deep" in line for line in log.splitlines())
