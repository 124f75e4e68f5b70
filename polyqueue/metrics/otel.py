"""OpenTelemetry metrics and traces (extra ``polyqueue[otel]``, the ``opentelemetry-api``).

>>> app = Polyqueue(metrics=OtelMetrics())   # the global meter and tracer providers

Metrics are recorded through the OTel metrics API (counters, histograms, an up-down
counter of running attempts, a gauge of queue depth) with ``polyqueue.task`` and
``polyqueue.queue`` attributes; whatever exporter your ``MeterProvider`` has sends them.

Traces: when a job is enqueued inside a span, that span's context is written into the
job's ``meta`` as a W3C ``traceparent`` (and ``tracestate``). The worker runs each
attempt in a ``CONSUMER`` span, ``polyqueue.run <task>``, **linked** to that context (a
link, not a parent: an attempt may run hours later, and a retried job has several).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from polyqueue.errors import ConfigurationError
from polyqueue.types import JobStatus

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError("polyqueue.metrics.otel needs opentelemetry-api: pip install 'polyqueue[otel]'") from exc

__all__ = ["OtelMetrics"]

_PROPAGATOR = TraceContextTextMapPropagator()


class OtelMetrics:
    """A :class:`~polyqueue.metrics.MetricsHook` for OpenTelemetry: metrics, and spans
    linked across the queue. Providers default to the global ones."""

    def __init__(
        self, meter_provider: otel_metrics.MeterProvider | None = None, tracer_provider: Any | None = None
    ) -> None:
        meter = (meter_provider or otel_metrics.get_meter_provider()).get_meter("polyqueue")
        self.tracer = (tracer_provider or trace.get_tracer_provider()).get_tracer("polyqueue")
        self.enqueued = meter.create_counter("polyqueue.jobs.enqueued", "{job}", "Jobs enqueued.")
        self.dispatched = meter.create_counter("polyqueue.jobs.dispatched", "{job}", "Jobs handed to the broker.")
        self.started = meter.create_counter("polyqueue.jobs.started", "{attempt}", "Attempts started.")
        self.finished = meter.create_counter("polyqueue.jobs.finished", "{attempt}", "Attempts finished.")
        self.rescued = meter.create_counter("polyqueue.jobs.rescued", "{job}", "Jobs rescued by maintenance.")
        self.running = meter.create_up_down_counter("polyqueue.jobs.running", "{attempt}", "Attempts running.")
        self.queue_wait = meter.create_histogram("polyqueue.job.queue_wait", "s", "Seconds from due to started.")
        self.run_time = meter.create_histogram("polyqueue.job.run_time", "s", "Seconds an attempt ran.")
        self.depth = meter.create_gauge("polyqueue.queue.depth", "{job}", "Live jobs by queue and status.")
        self.broker_call_time = meter.create_histogram(
            "polyqueue.broker.call_time", "s", "Seconds a call on the broker took (a receive's wait included)."
        )
        self.loop_blocked_time = meter.create_histogram(
            "polyqueue.worker.loop_blocked", "s", "Seconds a worker's event loop was blocked."
        )

    @staticmethod
    def _attrs(task: str | None, queue: str, **extra: str) -> dict[str, str]:
        attrs = {"polyqueue.queue": queue, **{f"polyqueue.{k}": v for k, v in extra.items()}}
        if task is not None:
            attrs["polyqueue.task"] = task
        return attrs

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.enqueued.add(count, self._attrs(task, queue))

    def job_dispatched(self, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.dispatched.add(count, self._attrs(None, queue))

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        attrs = self._attrs(task, queue)
        self.started.add(1, attrs)
        self.running.add(1, attrs)
        self.queue_wait.record(queue_wait_seconds, attrs)

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        attrs = self._attrs(task, queue)
        self.finished.add(1, {**attrs, "polyqueue.outcome": outcome})
        self.running.add(-1, attrs)
        self.run_time.record(run_seconds, attrs)
        span = trace.get_current_span()  # the attempt's span, when job_span opened one
        if span.is_recording():
            span.set_attribute("polyqueue.outcome", outcome)
            if outcome not in (JobStatus.SUCCEEDED, JobStatus.CANCELLED):
                span.set_status(trace.StatusCode.ERROR, outcome)

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.rescued.add(count, self._attrs(None, queue, status=status))

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.depth.set(count, self._attrs(None, queue, status=status))

    def loop_blocked(self, seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.loop_blocked_time.record(seconds)

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        attrs: dict[str, str | bool] = {
            "messaging.system": backend,
            "messaging.operation.name": operation,
            "polyqueue.ok": ok,
        }
        self.broker_call_time.record(seconds, attrs)

    def inject_meta(self, meta: dict[str, Any]) -> None:
        """Write the current span's context into ``meta`` (W3C ``traceparent``), unless it has one."""
        if "traceparent" not in meta:
            _PROPAGATOR.inject(meta)

    @contextlib.contextmanager
    def job_span(self, task: str, queue: str, job_id: str, attempt: int, meta: dict[str, Any]) -> Iterator[Any]:
        """A ``CONSUMER`` span for one attempt, linked to the enqueuing span found in ``meta``."""
        carrier = {k: v for k, v in meta.items() if k in ("traceparent", "tracestate") and isinstance(v, str)}
        origin = trace.get_current_span(_PROPAGATOR.extract(carrier)).get_span_context()
        links = [Link(origin)] if origin.is_valid else []
        attributes: dict[str, str | int] = {
            "messaging.system": "polyqueue",
            "messaging.operation.type": "process",
            "messaging.destination.name": queue,
            "messaging.message.id": job_id,
            "polyqueue.task": task,
            "polyqueue.queue": queue,
            "polyqueue.attempt": attempt,
        }
        with self.tracer.start_as_current_span(
            f"polyqueue.run {task}", kind=SpanKind.CONSUMER, links=links, attributes=attributes
        ) as span:
            yield span
