"""End to end with queue_backend="pgmq": real worker processes (each with its relay), PGMQ
installed (SQL-only) into the test's own database, or into a second database where the
test needs the broker to be unavailable while the jobs' database is not.

Effects go through ctx.session under a unique constraint, so the bar is exactly once.
Also here: the same-database transactional publish (``publish_in``), ``create()``'s choice
of database, queue-name mapping and ``polyqueue db install-pgmq``.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue
from polyqueue.brokers.base import BrokerConfig, Capabilities, Delivery, Message
from polyqueue.brokers.pgmq import PgmqBroker, create
from polyqueue.pgmq_install import install_pgmq
from polyqueue.queries import job_mark_enqueued, job_take_for_dispatch
from polyqueue.relay import Relay
from polyqueue.runner import run_relay
from tests import services
from tests.apps.effects import EFFECTS_DDL, Effect
from tests.brokers.harness_pgmq import pgmq_database, set_connectable
from tests.helpers import (
    Crash,
    RelayDyingBeforeItsMark,
    assert_exactly_once,
    enqueue_effects,
    scalar,
    spawn_worker,
    stop_processes,
    wait_all_terminal,
    wait_until,
)
from tests.services import url_str

APP = "tests.apps.effects:app"
QUEUE_TABLE = "pgmq.q_polyqueue_default"


@pytest.fixture
async def pgmq_engine(engine: AsyncEngine) -> AsyncEngine:
    """The test's database with polyqueue's tables, the effects tables and PGMQ."""
    assert await install_pgmq(engine) == "sql"  # no pgmq extension on the test servers
    async with engine.begin() as conn:
        for ddl in EFFECTS_DDL:
            await conn.execute(text(ddl))
    return engine


@pytest.fixture
async def broker_db() -> AsyncIterator[URL]:
    """A second database holding only PGMQ (the broker), which the test may make unavailable."""
    url = await pgmq_database()
    yield url
    await set_connectable(url, True)
    await services.drop_database(url)


def _env(**extra: str) -> dict[str, str]:
    return {"POLYQUEUE_QUEUE_BACKEND": "pgmq", "POLYQUEUE_LEASE_SECONDS": "2", **extra}


async def _count(engine: AsyncEngine, sql: str, at_least: int) -> bool:
    return bool(await scalar(engine, sql) >= at_least)


async def _queued(engine: AsyncEngine) -> int:
    return int(await scalar(engine, f"SELECT count(*) FROM {QUEUE_TABLE}"))  # noqa: S608 - test constant


async def _empty(engine: AsyncEngine) -> bool:
    return await _queued(engine) == 0


async def _purge(engine: AsyncEngine) -> int:
    async with engine.begin() as conn:
        return int(await conn.scalar(text("SELECT pgmq.purge_queue('polyqueue_default')")))


# -- end to end ----------------------------------------------------------------------------------
async def test_two_racing_workers_run_each_job_exactly_once(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    await enqueue_effects(pgmq_engine, 400)
    workers = [spawn_worker(db_url, APP, env=_env()) for _ in range(2)]
    try:
        await wait_all_terminal(pgmq_engine, 400, timeout=60)
    finally:
        stop_processes(*workers)
    await assert_exactly_once(pgmq_engine, 400)
    assert await scalar(pgmq_engine, "SELECT count(*) FROM polyqueue_jobs WHERE attempt <> 1") == 0
    assert await scalar(pgmq_engine, "SELECT count(DISTINCT pid) FROM effects") == 2  # both really worked
    assert await _queued(pgmq_engine) == 0  # every ack landed
    assert all(w.returncode == 0 for w in workers)


async def test_sigkill_mid_job_is_redelivered_after_visibility_expiry(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    # archive=true keeps acked messages (with their read_ct) in pgmq.a_*, to see the redelivery
    env = _env(POLYQUEUE_BROKER_URL=url_str(db_url) + "?archive=true")
    async with AsyncSession(pgmq_engine) as s, s.begin():
        job_id = (await enqueue(s, Effect(n=1, seconds=60))).id
    victim = spawn_worker(db_url, APP, env=env)
    try:
        await wait_until(lambda: _count(pgmq_engine, "SELECT count(*) FROM starts", 1), what="the job to start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop_processes(victim)
    rescuer = spawn_worker(db_url, APP, env=env)
    try:
        await wait_all_terminal(pgmq_engine, 1, timeout=30)
        # The killed worker's message comes back once its visibility timeout runs out, whether
        # before the rescue (then it carries attempt 2) or after (then it is acked as stale).
        await wait_until(lambda: _empty(pgmq_engine), what="the killed worker's message to be redelivered")
    finally:
        stop_processes(rescuer)
    await assert_exactly_once(pgmq_engine, 1)
    assert await scalar(pgmq_engine, "SELECT attempt FROM polyqueue_jobs") == 2
    reads = "SELECT max(read_ct) FROM pgmq.a_polyqueue_default WHERE message->>'id' = :id"
    assert await scalar(pgmq_engine, reads, id=str(job_id)) >= 2


async def test_jobs_committed_while_pgmq_is_unavailable_all_run_once_it_is_back(
    pgmq_engine: AsyncEngine, db_url: URL, broker_db: URL
) -> None:
    await set_connectable(broker_db, False)  # PGMQ's database refuses everyone; the jobs' does not
    worker = spawn_worker(db_url, APP, env=_env(POLYQUEUE_BROKER_URL=url_str(broker_db)))
    try:
        await enqueue_effects(pgmq_engine, 50)  # enqueue never needs the broker
        registered = "SELECT count(*) FROM polyqueue_workers"
        await wait_until(lambda: _count(pgmq_engine, registered, 1), what="the worker to register while PGMQ is down")
        await asyncio.sleep(1.0)  # the relay's publishes fail meanwhile
        assert await scalar(pgmq_engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'pending'") == 50
        await set_connectable(broker_db, True)
        await wait_all_terminal(pgmq_engine, 50, timeout=60)
    finally:
        stop_processes(worker)
    await assert_exactly_once(pgmq_engine, 50)
    assert worker.returncode == 0
    assert await scalar(pgmq_engine, "SELECT to_regclass('pgmq.q_polyqueue_default')") is None  # not in the jobs' DB


async def test_purged_queue_is_repaired_by_the_redispatch_backstop(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    await enqueue_effects(pgmq_engine, 30)
    relay_app = Polyqueue(database_url=url_str(db_url), queue_backend="pgmq", poll_interval=0.1)
    stopping = asyncio.Event()
    relay = asyncio.create_task(run_relay(relay_app, engine=pgmq_engine, stopping=stopping))
    enqueued = "SELECT count(*) FROM polyqueue_jobs WHERE status = 'enqueued'"
    await wait_until(lambda: _count(pgmq_engine, enqueued, 30), what="the relay to publish every job")
    stopping.set()
    await relay
    assert await _purge(pgmq_engine) == 30  # the deliveries are gone; Postgres still says enqueued
    assert await _queued(pgmq_engine) == 0
    worker = spawn_worker(db_url, APP, env=_env(POLYQUEUE_REDISPATCH_AFTER="1"))
    try:
        await wait_all_terminal(pgmq_engine, 30, timeout=60)
    finally:
        stop_processes(worker)
    await assert_exactly_once(pgmq_engine, 30)


# -- same-database transactional publish ---------------------------------------------------------


async def test_publish_in_commits_and_rolls_back_with_the_callers_transaction(
    pgmq_engine: AsyncEngine, db_url: URL
) -> None:
    """The relay's batch, done by hand: a crash after publish and before commit leaves no message."""
    broker = create(BrokerConfig(None, 2.0, url_str(db_url)))
    assert broker.same_database
    try:
        await broker.ensure(["default"])
        await enqueue_effects(pgmq_engine, 5)
        with pytest.raises(Crash):
            async with pgmq_engine.begin() as conn:
                rows = await job_take_for_dispatch(conn, 100)
                await broker.publish_in(conn, [Message(r.id, r.queue) for r in rows])
                raise Crash  # before job_mark_enqueued and commit
        assert await _queued(pgmq_engine) == 0  # rolled back with the transaction: nothing to double-publish
        assert await scalar(pgmq_engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'pending'") == 5

        # The same crash with publish() (its own connection): the messages stay behind.
        with pytest.raises(Crash):
            async with pgmq_engine.begin() as conn:
                rows = await job_take_for_dispatch(conn, 100)
                await broker.publish([Message(r.id, r.queue) for r in rows])
                raise Crash
        assert await _queued(pgmq_engine) == 5
        await _purge(pgmq_engine)

        async with pgmq_engine.begin() as conn:
            rows = await job_take_for_dispatch(conn, 100)
            await broker.publish_in(conn, [Message(r.id, r.queue) for r in rows])
            await job_mark_enqueued(conn, [r.id for r in rows])
        assert await _queued(pgmq_engine) == 5
        got = await broker.receive(["default"], 10, 2.0)
        assert sorted(d.job_id for d in got if d.job_id) == sorted(r.id for r in rows)
    finally:
        await broker.close()


@pytest.mark.skipif(
    "transactional_publish" not in Capabilities.__dataclass_fields__,
    reason="the relay does not publish inside its transaction yet (Capabilities.transactional_publish)",
)
async def test_relay_crash_between_publish_and_mark_leaves_no_message(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    app = Polyqueue(database_url=url_str(db_url), queue_backend="pgmq")
    broker = create(BrokerConfig(None, 2.0, url_str(db_url)))
    try:
        await broker.ensure(["default"])
        await enqueue_effects(pgmq_engine, 5)

        with pytest.raises(Crash):
            await RelayDyingBeforeItsMark(pgmq_engine, broker, None, app.settings).run_once()
        assert await _queued(pgmq_engine) == 0
        assert await Relay(pgmq_engine, broker, None, app.settings).run_once() == 5
        assert await _queued(pgmq_engine) == 5
    finally:
        await broker.close()


# -- configuration -------------------------------------------------------------------------------
async def test_create_uses_the_jobs_database_unless_broker_url_names_another(db_url: URL) -> None:
    jobs = url_str(db_url)
    other = url_str(db_url.set(database="elsewhere"))
    cases = [(None, True), (jobs, True), (jobs + "?archive=true&queue_prefix=pq_", True), (other, False)]
    for broker_url, same in cases:
        broker = create(BrokerConfig(broker_url, 30.0, jobs))
        assert broker.same_database is same, broker_url
        await broker.close()
    broker = create(BrokerConfig(jobs + "?archive=1&queue_prefix=pq_&poll_interval=0.5", 30.0, None))
    assert (broker.archive, broker.queue_prefix, broker.poll_interval) == (True, "pq_", 0.5)
    assert "@" not in repr(broker)
    await broker.close()


async def test_unsafe_queue_names_map_to_distinct_valid_pgmq_names(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    broker = PgmqBroker(url_str(db_url), lease_seconds=5)
    try:
        queues = ["default", "Emails-High", "emails_high", "a.b", "x" * 60, "x" * 61, "Ünïcode; DROP TABLE"]
        names = [broker.pgmq_name(q) for q in queues]
        assert names[0] == "polyqueue_default"
        assert len(set(names)) == len(names)
        assert all(len(n) <= 47 and n.replace("_", "").isalnum() and n.isascii() and n == n.lower() for n in names)
        assert names == [broker.pgmq_name(q) for q in queues]  # stable: every process agrees
        sent = [Message(uuid.uuid4(), q) for q in queues]
        await broker.publish(sent)
        got: list[Delivery] = []
        while len(got) < len(sent) and (batch := await broker.receive(queues, 10, 2.0)):
            got += batch
        assert sorted((str(d.job_id), d.queue) for d in got) == sorted((str(m.job_id), m.queue) for m in sent)
    finally:
        await broker.close()


async def test_db_install_pgmq_command(db_url: URL) -> None:
    async def run() -> tuple[int | None, str, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "polyqueue.cli", "db", "install-pgmq", "--database-url", url_str(db_url)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        return proc.returncode, out.decode(), err.decode()

    code, out, err = await run()
    assert code == 0, err
    assert "from the SQL bundled in the pgmq package" in out and "***" not in out.split(":")[0]
    code, out, err = await run()
    assert code == 0, err
    assert "already installed" in out


async def test_ack_many_acks_only_what_is_still_ours(pgmq_engine: AsyncEngine, db_url: URL) -> None:
    stale = PgmqBroker(url_str(db_url), lease_seconds=1, poll_interval=0.05)
    owner = PgmqBroker(url_str(db_url), lease_seconds=30, poll_interval=0.05)
    try:
        sent = [Message(uuid.uuid4(), "default") for _ in range(3)]
        await stale.publish(sent)
        first = await stale.receive(["default"], 3, 2.0)
        assert len(first) == 3
        await stale.extend(first[0], 30)  # kept; the other two run out and are taken over
        taken = await owner.receive(["default"], 3, 5.0)
        assert {d.job_id for d in taken} == {d.job_id for d in first[1:]}
        await stale.ack_many(first)  # acks first[0]; the other two are the owner's now
        assert await _queued(pgmq_engine) == 2
        await owner.ack_many([*taken, *taken])  # duplicates and all: acked once
        assert await _queued(pgmq_engine) == 0
    finally:
        await stale.close()
        await owner.close()
