"""End to end with queue_backend="sqs": real worker processes (each with its relay), a private
moto server this test owns (so it may stop, restart and purge it), real Postgres.

Effects go through ctx.session under a unique constraint, so the bar is exactly once.
The workers find moto through the broker URL's ``endpoint_url`` and sign in through the
standard AWS chain (fake credentials in their environment).

Where moto differs from SQS in ways these tests touch:
* a restarted moto is empty, queues included: the adapter re-creates a vanished queue on
  ``QueueDoesNotExist``. On AWS a deleted queue's name is blocked for 60 s
  (``QueueDeletedRecently``, transient: the relay and worker keep retrying).
* moto purges at once; SQS takes up to 60 s and allows one purge a minute.
* moto's ReceiveMessage is not atomic across threads: two workers polling at the same
  moment can both get one message. The claim in Postgres drops the duplicate.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, enqueue
from polyqueue.brokers import make_broker
from polyqueue.brokers.base import Message
from polyqueue.brokers.sqs import SqsBroker, SqsOptions
from polyqueue.errors import BrokerError, ConfigurationError
from polyqueue.runner import run_relay
from polyqueue.settings import Settings
from tests.apps.effects import Effect
from tests.helpers import (
    assert_exactly_once,
    create_effect_tables,
    enqueue_effects,
    scalar,
    spawn_worker,
    stop_processes,
    wait_all_terminal,
    wait_until,
)
from tests.moto_service import MotoServer, moto_available
from tests.redis_service import free_port
from tests.services import url_str

APP = "tests.apps.effects:app"


@pytest.fixture
async def moto() -> AsyncIterator[MotoServer]:
    if not moto_available():
        pytest.skip("moto[server] is not installed: the sqs end-to-end tests need a server they can restart")
    server = MotoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def prefix() -> str:
    return f"pqe-{uuid.uuid4().hex[:8]}-"


def _url(moto: MotoServer, prefix: str, **options: Any) -> str:
    """The broker URL without credentials: the workers take them from their environment."""
    return moto.service.broker_url(prefix=prefix, **options).replace("sqs://testing:testing@", "sqs://")


def _sqs_env(moto: MotoServer, prefix: str, *, fifo: bool = False, **extra: str) -> dict[str, str]:
    return {
        "POLYQUEUE_QUEUE_BACKEND": "sqs",
        "POLYQUEUE_BROKER_URL": _url(moto, prefix, fifo=str(fifo).lower()),
        "POLYQUEUE_LEASE_SECONDS": "2",
        **moto.service.env(),
        **extra,
    }


async def _where(engine: AsyncEngine, condition: str, at_least: int) -> bool:
    return bool(await scalar(engine, f"SELECT count(*) FROM polyqueue_jobs WHERE {condition}") >= at_least)  # noqa: S608


async def _queue_exists(moto: MotoServer, name: str) -> bool:
    async with moto.service.client() as sqs:
        listed = await sqs.list_queues(QueueNamePrefix=name)
    return bool(listed.get("QueueUrls"))


async def test_fifo_drops_a_dispatch_key_sent_again_but_delivers_a_new_one(moto: MotoServer, prefix: str) -> None:
    """FIFO deduplication by the relay's dispatch key: a re-publish of the same dispatch (a relay
    whose commit failed) is dropped, a re-dispatch of the same job and attempt is delivered."""
    broker = SqsBroker(moto.service.broker_url(prefix=prefix, fifo="true"), lease_seconds=5)
    job = uuid.uuid4()
    try:
        await broker.publish([Message(job, "default", f"{job}/0/100")])
        await broker.publish([Message(job, "default", f"{job}/0/100")])  # the same dispatch again
        await broker.publish([Message(job, "default", f"{job}/0/107")])  # re-dispatched: a new row version
        seen = 0
        for _ in range(4):  # one job is one message group: the next copy comes once this one is acked
            got = await broker.receive(["default"], 10, 1.0)
            for d in got:
                assert d.job_id == job
                await broker.ack(d)
            seen += len(got)
        assert seen == 2
    finally:
        await broker.close()


@pytest.mark.parametrize("fifo", [False, True], ids=["standard", "fifo"])
async def test_two_racing_workers_run_each_job_exactly_once(
    engine: AsyncEngine, db_url: URL, moto: MotoServer, prefix: str, fifo: bool
) -> None:
    await create_effect_tables(engine)
    await enqueue_effects(engine, 400)
    workers = [spawn_worker(db_url, APP, env=_sqs_env(moto, prefix, fifo=fifo)) for _ in range(2)]
    try:
        await wait_all_terminal(engine, 400, timeout=90)
    finally:
        stop_processes(*workers)
    await assert_exactly_once(engine, 400)
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE attempt <> 1") == 0
    assert await scalar(engine, "SELECT count(DISTINCT pid) FROM effects") == 2  # both really worked
    assert all(w.returncode == 0 for w in workers)


async def test_sigkill_mid_job_recovers_through_visibility_and_rescue(
    engine: AsyncEngine, db_url: URL, moto: MotoServer, prefix: str
) -> None:
    await create_effect_tables(engine)
    async with AsyncSession(engine) as s, s.begin():
        await enqueue(s, Effect(n=1, seconds=60))
    victim = spawn_worker(db_url, APP, env=_sqs_env(moto, prefix))
    try:
        await wait_until(lambda: _count_starts(engine, 1), what="the job to start")
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        stop_processes(victim)
    rescuer = spawn_worker(db_url, APP, env=_sqs_env(moto, prefix))
    try:
        await wait_all_terminal(engine, 1, timeout=30)
    finally:
        stop_processes(rescuer)
    await assert_exactly_once(engine, 1)
    assert await scalar(engine, "SELECT attempt FROM polyqueue_jobs") == 2


async def test_jobs_committed_while_sqs_is_down_all_run_once_it_is_back(
    engine: AsyncEngine, db_url: URL, moto: MotoServer, prefix: str
) -> None:
    await create_effect_tables(engine)
    worker = spawn_worker(db_url, APP, env=_sqs_env(moto, prefix))
    try:
        await wait_until(lambda: _queue_exists(moto, f"{prefix}default"), what="the worker to create its queue")
        await moto.stop()
        await enqueue_effects(engine, 50)  # enqueue never needs the broker
        await asyncio.sleep(0.5)  # the relay tries, fails, keeps them pending
        assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'pending'") == 50
        await moto.start()  # same port, but empty: the worker's queue URL now points at nothing
        await wait_all_terminal(engine, 50, timeout=90)
        assert await _queue_exists(moto, f"{prefix}default")  # created again by the adapter
    finally:
        stop_processes(worker)
    await assert_exactly_once(engine, 50)
    assert worker.returncode == 0


async def test_purged_queue_is_repaired_by_the_redispatch_backstop(
    engine: AsyncEngine, db_url: URL, moto: MotoServer, prefix: str
) -> None:
    await create_effect_tables(engine)
    await enqueue_effects(engine, 30)
    relay_app = Polyqueue(
        database_url=url_str(db_url),
        queue_backend="sqs",
        broker_url=moto.service.broker_url(prefix=prefix),  # this process signs in through the URL
        poll_interval=0.1,
    )
    stopping = asyncio.Event()
    relay = asyncio.create_task(run_relay(relay_app, engine=engine, stopping=stopping))
    await wait_until(lambda: _where(engine, "status = 'enqueued'", 30), what="the relay to publish every job")
    stopping.set()
    await relay
    async with moto.service.client() as sqs:
        queue_url = (await sqs.get_queue_url(QueueName=f"{prefix}default"))["QueueUrl"]
        await sqs.purge_queue(QueueUrl=queue_url)  # the deliveries are gone; Postgres still says enqueued
        attributes = await sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        assert attributes["Attributes"]["ApproximateNumberOfMessages"] == "0"
    worker = spawn_worker(db_url, APP, env=_sqs_env(moto, prefix, POLYQUEUE_REDISPATCH_AFTER="1"))
    try:
        await wait_all_terminal(engine, 30, timeout=60)
    finally:
        stop_processes(worker)
    await assert_exactly_once(engine, 30)


async def _count_starts(engine: AsyncEngine, at_least: int) -> bool:
    return bool(await scalar(engine, "SELECT count(*) FROM starts") >= at_least)


# -- configuration (no server needed) -----------------------------------------------------------------
def test_url_options_are_parsed_and_shape_the_queue_names() -> None:
    url = (
        "sqs://?region=eu-west-1&prefix=app-&fifo=true&group_by=queue&create=off&dead_letter_after=5&polls_per_queue=2"
    )
    broker = SqsBroker(url, lease_seconds=2.5)
    assert broker.options == SqsOptions(
        region="eu-west-1",
        prefix="app-",
        fifo=True,
        group_by="queue",
        create=False,
        dead_letter_after=5,
        polls_per_queue=2,
    )
    assert broker.queue_name("default") == "app-default.fifo"
    assert broker.dead_letter_queue_name("default") == "app-default-dead.fifo"
    assert broker.capabilities.dead_letter and not SqsBroker().capabilities.dead_letter


@pytest.mark.parametrize(
    "url",
    [
        "redis://localhost",
        "sqs://eu-west-1",  # options go in the query string
        "sqs://?bogus=1",
        "sqs://?fifo=maybe",
        "sqs://?dead_letter_after=some",
        "sqs://?polls_per_queue=0",
        "sqs://?group_by=tenant",
        "sqs://?prefix=a.b",
        "sqs://KEYONLY@?region=us-east-1",
    ],
)
def test_bad_urls_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError):
        SqsBroker(url)


def test_make_broker_builds_the_sqs_adapter_from_settings() -> None:
    broker = make_broker(Settings(queue_backend="sqs", broker_url="sqs://?region=us-east-1", lease_seconds=7))
    assert broker is not None
    adapter = broker.adapter  # make_broker hands the adapter back behind its facade
    assert isinstance(adapter, SqsBroker) and adapter.lease_seconds == 7
    assert adapter.queue_name("default") == "polyqueue-default"


async def test_an_unreachable_endpoint_is_a_transient_error_without_the_secret() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    query = urlencode({"region": "us-east-1", "endpoint_url": endpoint, "max_attempts": 1})
    broker = SqsBroker(f"sqs://AKIDEXAMPLE:{quote('s3cr/t+key', safe='')}@?{query}")
    try:
        with pytest.raises(BrokerError) as raised:
            await broker.publish([Message(uuid.uuid4(), "default")])
        assert raised.value.is_transient()
        assert "s3cr" not in str(raised.value) and "s3cr" not in repr(broker)
        with pytest.raises(BrokerError) as invalid:  # a name SQS would refuse: not worth a retry
            await broker.publish([Message(uuid.uuid4(), "x" * 80)])
        assert not invalid.value.is_transient()
    finally:
        await broker.close()
