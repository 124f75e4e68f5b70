"""Metrics backends against real endpoints: Prometheus scraped over HTTP, CloudWatch on moto's
server, OpenTelemetry spans in the SDK's in-memory exporter; and a broken hook never breaks a job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, TerminalError, enqueue
from polyqueue.metrics.cloudwatch import CloudWatchMetrics
from polyqueue.metrics.otel import OtelMetrics
from polyqueue.metrics.prometheus import PrometheusMetrics, start_http_server
from tests.helpers import make_app, running_worker, scalar, wait_all_terminal


class Work(BaseModel):
    ok: bool = True


def _app(name: str, metrics: object) -> Polyqueue:
    app = make_app(metrics=metrics)

    async def handler(payload: Work) -> str:
        if not payload.ok:
            raise TerminalError("no")
        return "done"

    app.register(name=name)(handler)
    return app


async def _run(app: Polyqueue, engine: AsyncEngine, task: str, oks: list[bool]) -> None:
    async with AsyncSession(engine) as s, s.begin():
        for ok in oks:
            await enqueue(s, Work(ok=ok), task=task)
    async with running_worker(app, engine):
        await wait_all_terminal(engine, len(oks))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_prometheus_endpoint_counts_the_jobs_run(engine: AsyncEngine) -> None:
    metrics = PrometheusMetrics(CollectorRegistry())
    port = _free_port()
    server = start_http_server(port, "127.0.0.1", registry=metrics.registry)
    try:
        await _run(_app("prom_task", metrics), engine, "prom_task", [True, True, True, False])
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    finally:
        server.shutdown()
    assert 'polyqueue_jobs_enqueued_total{queue="default",task="prom_task"} 4.0' in body
    assert 'polyqueue_jobs_finished_total{outcome="succeeded",queue="default",task="prom_task"} 3.0' in body
    assert 'polyqueue_jobs_finished_total{outcome="failed",queue="default",task="prom_task"} 1.0' in body
    assert 'polyqueue_job_run_seconds_count{queue="default",task="prom_task"} 4.0' in body
    assert 'polyqueue_jobs_running{queue="default",task="prom_task"} 0.0' in body


async def test_otel_spans_link_to_the_enqueuing_span_and_metrics_record(engine: AsyncEngine) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    metrics = OtelMetrics(MeterProvider(metric_readers=[reader]), tracer_provider)
    app = _app("otel_task", metrics)
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("http request") as request_span:
        async with AsyncSession(engine) as s, s.begin():
            job_id = (await enqueue(s, Work(), task="otel_task")).id
    meta = await scalar(engine, "SELECT meta FROM polyqueue_jobs WHERE id = :i", i=job_id)
    ctx = request_span.get_span_context()
    assert meta["traceparent"].startswith(f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-")
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 1)
    [run] = [s for s in exporter.get_finished_spans() if s.name == "polyqueue.run otel_task"]
    assert [link.context.span_id for link in run.links] == [ctx.span_id]
    assert run.context.trace_id != ctx.trace_id  # linked, not a child
    assert run.attributes is not None and run.attributes["messaging.message.id"] == str(job_id)
    assert run.attributes["polyqueue.outcome"] == "succeeded"
    data = reader.get_metrics_data()
    assert data is not None
    points = {
        m.name: sum(getattr(p, "value", 0) for p in m.data.data_points)
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert points["polyqueue.jobs.enqueued"] == 1 and points["polyqueue.jobs.finished"] == 1


class Broken:
    def job_started(self, *args: Any) -> None:
        raise RuntimeError("metrics down")

    def inject_meta(self, meta: dict[str, Any]) -> None:
        raise RuntimeError("tracing down")

    def job_span(self, *args: Any) -> contextlib.AbstractContextManager[None]:
        @contextlib.contextmanager
        def span() -> Iterator[None]:
            yield
            raise RuntimeError("span exit failed")

        return span()


async def test_a_failing_hook_never_breaks_a_job(engine: AsyncEngine) -> None:
    await _run(_app("broken_hook_task", Broken()), engine, "broken_hook_task", [True, True])
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded'") == 2


@pytest.fixture
async def moto_url() -> AsyncIterator[str]:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                await asyncio.to_thread(lambda: urllib.request.urlopen(f"{url}/moto-api/", timeout=1).read())
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)


CREDS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


async def test_cloudwatch_data_points_reach_the_service(engine: AsyncEngine, moto_url: str) -> None:
    metrics = CloudWatchMetrics(
        "PolyqueueTest",
        "us-east-1",
        moto_url,
        flush_interval=0.1,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    await metrics.start()
    try:
        await _run(_app("cw_task", metrics), engine, "cw_task", [True, True, False])
    finally:
        await metrics.aclose()
    assert metrics.sent > 0
    from aiobotocore.session import AioSession  # type: ignore[import-untyped]

    async with AioSession().create_client("cloudwatch", region_name="us-east-1", endpoint_url=moto_url, **CREDS) as cw:
        listed = await cw.list_metrics(Namespace="PolyqueueTest")
        names = {m["MetricName"] for m in listed["Metrics"]}
        assert {"JobsEnqueued", "JobsStarted", "JobsFinished", "RunTime", "QueueWait"} <= names
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        stats = await cw.get_metric_statistics(
            Namespace="PolyqueueTest",
            MetricName="JobsFinished",
            Dimensions=[
                {"Name": "Outcome", "Value": "succeeded"},
                {"Name": "Queue", "Value": "default"},
                {"Name": "Task", "Value": "cw_task"},
            ],
            StartTime=now - dt.timedelta(minutes=10),
            EndTime=now + dt.timedelta(minutes=1),
            Period=60,
            Statistics=["Sum"],
        )
    assert sum(p["Sum"] for p in stats["Datapoints"]) == 2


def test_hook_modules_are_importable_without_side_effects() -> None:
    assert os.environ.get("POLYQUEUE_NEVER_SET") is None
    assert PrometheusMetrics(CollectorRegistry()).registry is not None
