"""The broker facade (``polyqueue.brokers.facade``) on real brokers: every call is timed into the
metrics hook and traced, whatever an adapter raises comes out as ``BrokerError`` with the right
transient flag (``LeaseLostError`` unchanged), and ``close()`` never raises. And the worker
reaches its broker through its job source only: a handler's ``ctx.heartbeat()`` included."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, cast

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import JobContext, Polyqueue, enqueue
from polyqueue.brokers import BrokerFacade, make_broker
from polyqueue.brokers.base import Capabilities, Delivery, Message
from polyqueue.brokers.memory import MemoryBroker
from polyqueue.brokers.redis import RedisBroker
from polyqueue.errors import BrokerError, LeaseLostError
from polyqueue.worker.sources import KEEPALIVE_STOP_WAIT, BrokerSource, Claim
from tests.helpers import make_app, running_worker, scalar, wait_until
from tests.redis_service import RedisServer

Q = "default"


class Recorder:
    """A metrics hook that keeps every ``broker_call``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, bool]] = []

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        self.calls.append((operation, backend, seconds, ok))


def _redis(url: str, recorder: Recorder, lease_seconds: float = 5.0) -> BrokerFacade:
    settings = Polyqueue(queue_backend="redis", broker_url=url, lease_seconds=lease_seconds).settings
    broker = make_broker(settings, metrics=recorder)
    assert isinstance(broker, BrokerFacade) and isinstance(broker.adapter, RedisBroker)
    return broker


async def test_every_call_is_timed_into_the_metrics_hook_and_traced(redis_server: RedisServer) -> None:
    recorder = Recorder()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    adapter = _redis(redis_server.url, recorder).adapter
    broker = BrokerFacade(adapter, metrics=recorder, tracer_provider=provider)
    msg = Message(uuid.uuid4(), Q)
    await broker.ensure([Q])
    await broker.publish([msg])
    [d] = await broker.receive([Q], 10, 2.0)
    assert d.job_id == msg.job_id
    await broker.extend(d, 5.0)
    await broker.ack_many([d])
    await broker.close()
    ops = ["ensure", "publish", "receive", "extend", "ack_many", "close"]
    assert [(op, backend, ok) for op, backend, _, ok in recorder.calls] == [(op, "redis", True) for op in ops]
    assert all(0 <= seconds < 5 for *_, seconds, _ in recorder.calls)
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [f"polyqueue.broker {op}" for op in ops]
    assert all(s.kind == SpanKind.CLIENT and (s.attributes or {}).get("messaging.system") == "redis" for s in spans)


async def test_a_broker_that_went_away_is_a_transient_broker_error(redis_server: RedisServer) -> None:
    recorder = Recorder()
    broker = _redis(redis_server.url, recorder, lease_seconds=5.0)
    try:
        await broker.publish([Message(uuid.uuid4(), Q)])
        [d] = await broker.receive([Q], 10, 2.0)
        await broker.ack(d)
        with pytest.raises(LeaseLostError):  # polyqueue's own errors pass unchanged
            await broker.extend(d, 5.0)
        await redis_server.stop()
        with pytest.raises(BrokerError) as raised:
            await broker.publish([Message(uuid.uuid4(), Q)])
        assert raised.value.is_transient() and not isinstance(raised.value, LeaseLostError)
        assert [(op, ok) for op, _, _, ok in recorder.calls[-2:]] == [("extend", False), ("publish", False)]
    finally:
        await broker.close()  # the server is gone: logged, never raised
    assert recorder.calls[-1][0] == "close"


async def test_a_refused_login_is_not_transient(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("redis://", "redis://:wrong-password@", 1)  # the server has no password
    broker = _redis(url, Recorder())
    try:
        with pytest.raises(BrokerError) as raised:
            await broker.ensure([Q])
        assert not raised.value.is_transient()
        assert "wrong-password" not in str(raised.value)
    finally:
        await broker.close()


async def test_what_an_adapter_lets_escape_is_mapped_by_the_facade() -> None:
    """The in-process broker maps nothing itself: the facade turns its failures into BrokerError."""
    recorder = Recorder()
    broker = BrokerFacade(MemoryBroker(), metrics=recorder)
    try:
        with pytest.raises(BrokerError) as raised:
            await broker.receive(None, 10, 0.0)  # type: ignore[arg-type]  # the adapter's TypeError
        assert isinstance(raised.value.__cause__, TypeError) and not raised.value.is_transient()
        assert "memory receive" in str(raised.value)
        with pytest.raises(BrokerError) as refused:  # the capability decides: no transactional publish here
            await broker.publish_in(None, [Message(uuid.uuid4(), Q)])  # type: ignore[arg-type]
        assert not broker.capabilities.transactional_publish and not refused.value.is_transient()
        assert [(op, ok) for op, _, _, ok in recorder.calls] == [("receive", False), ("publish_in", False)]
    finally:
        await broker.close()


async def test_a_failing_metrics_hook_never_fails_a_broker_call(redis_server: RedisServer) -> None:
    class Broken:
        def broker_call(self, *args: object) -> None:
            raise RuntimeError("hook bug")

    adapter = _redis(redis_server.url, Recorder()).adapter
    broker = BrokerFacade(adapter, metrics=Broken())
    try:
        await broker.publish([Message(uuid.uuid4(), Q)])
        assert len(await broker.receive([Q], 10, 2.0)) == 1
    finally:
        await broker.close()


def test_a_span_records_the_error_of_a_failed_call() -> None:
    """Only the span's status: no broker needed beyond the in-process one."""
    import asyncio

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = BrokerFacade(MemoryBroker(), tracer_provider=provider)
    with pytest.raises(BrokerError):
        asyncio.run(broker.receive(None, 1, 0.0))  # type: ignore[arg-type]
    [span] = exporter.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR


async def test_the_ready_made_hooks_record_broker_calls() -> None:
    """Prometheus and OpenTelemetry get ``broker_call`` as a histogram by operation, backend and outcome."""
    from prometheus_client import CollectorRegistry, generate_latest

    from polyqueue.metrics.otel import OtelMetrics
    from polyqueue.metrics.prometheus import PrometheusMetrics

    registry = CollectorRegistry()
    reader = InMemoryMetricReader()
    for hook in (PrometheusMetrics(registry), OtelMetrics(MeterProvider(metric_readers=[reader]))):
        broker = make_broker(Polyqueue(queue_backend="memory").settings, metrics=hook)
        assert broker is not None
        await broker.publish([Message(uuid.uuid4(), Q)])
        with pytest.raises(BrokerError):
            await broker.receive(None, 10, 0.0)  # type: ignore[arg-type]
        await broker.close()
    body = generate_latest(registry).decode()
    assert 'polyqueue_broker_call_seconds_count{backend="memory",ok="true",operation="publish"} 1.0' in body
    assert 'polyqueue_broker_call_seconds_count{backend="memory",ok="false",operation="receive"} 1.0' in body
    data = reader.get_metrics_data()
    assert data is not None
    [calls] = [m for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if "broker" in m.name]
    points = [p.attributes or {} for p in calls.data.data_points]
    seen = {(a.get("messaging.operation.name"), a.get("polyqueue.ok")) for a in points}
    assert seen == {("publish", True), ("receive", False), ("close", True)}


class Beats(BaseModel):
    n: int


beating = make_app()


@beating.register
async def beat(payload: Beats, ctx: JobContext) -> int:
    for _ in range(payload.n):
        await ctx.heartbeat()  # the job's row, and its delivery's lease through the worker's job source
    return payload.n


async def test_a_handlers_heartbeat_extends_its_lease_through_the_job_source(
    engine: AsyncEngine, redis_server: RedisServer
) -> None:
    recorder = Recorder()
    # lease 30 s: the source's own keepalive renews after 10 s, long after this job is over
    broker = _redis(redis_server.url, recorder, lease_seconds=30.0)
    async with AsyncSession(engine) as session, session.begin():
        job_id = (await enqueue(session, Beats(n=3), task="beat")).id

    async def succeeded() -> bool:
        return bool(await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :i", i=job_id) == "succeeded")

    try:
        async with running_worker(beating, engine, broker=broker):
            await wait_until(succeeded, what="the beating job")
    finally:
        await broker.close()
    extends = [ok for op, _, _, ok in recorder.calls if op == "extend"]
    assert extends == [True, True, True]


class SlowAcks(MemoryBroker):
    """The in-process broker, with acks that take a while (a broker far away)."""

    def __init__(self) -> None:
        super().__init__()
        self.acked: list[uuid.UUID | None] = []
        self.acking = asyncio.Event()

    async def ack(self, delivery: Delivery) -> None:
        self.acking.set()
        await asyncio.sleep(0.3)
        self.acked.append(delivery.job_id)


async def test_acks_in_flight_when_the_source_closes_still_land(engine: AsyncEngine) -> None:
    """A worker stopping right after its last jobs finished cancelled the batch of acks then in
    flight: those deliveries came back after their lease for nothing (seen as a message left in
    PGMQ after every job had succeeded). Closing the source now lets the batch finish."""
    broker = SlowAcks()
    source = BrokerSource(engine, BrokerFacade(broker), ["default"], 30.0)
    first, second = Delivery(uuid.uuid4(), "default"), Delivery(uuid.uuid4(), "default")
    await source.done(Claim(cast(Any, None), first))
    await asyncio.wait_for(broker.acking.wait(), 10)
    await source.done(Claim(cast(Any, None), second))  # queued behind the batch in flight
    await asyncio.wait_for(source.close(), 10)
    assert broker.acked == [first.job_id, second.job_id]


class StubbornLeases(MemoryBroker):
    """The in-process broker with leases whose renewal ignores the first cancel (as a broker
    SDK stuck on a dead link may)."""

    capabilities = Capabilities(lease=True, survives_restart=False)

    def __init__(self) -> None:
        super().__init__()
        self.extending = asyncio.Event()

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        self.extending.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)


async def test_a_lease_renewal_that_ignores_cancel_does_not_hold_the_job(engine: AsyncEngine) -> None:
    """A finished job waited for its lease renewal to stop, unbounded: a renewal stuck in a
    broker SDK kept a succeeded job from completing for minutes (a chaos run on Service Bus)."""
    broker = StubbornLeases()
    source = BrokerSource(engine, BrokerFacade(broker), ["default"], 0.3)
    delivery = Delivery(uuid.uuid4(), "default")
    claim = Claim(cast(Any, None), delivery)
    loop = asyncio.get_running_loop()
    async with source.keepalive(claim):
        await asyncio.wait_for(broker.extending.wait(), 10)
        left = loop.time()
    assert loop.time() - left < KEEPALIVE_STOP_WAIT + 1.0
    stuck = [t for t in asyncio.all_tasks() if t.get_name() == f"polyqueue-lease-{delivery.job_id}"]
    assert len(stuck) == 1 and not stuck[0].done()  # abandoned, not awaited
    stuck[0].cancel()  # the second cancel ends it (for the test's leak check)
    await asyncio.gather(*stuck, return_exceptions=True)
