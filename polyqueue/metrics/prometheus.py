"""Prometheus metrics (extra ``polyqueue[prometheus]``, the ``prometheus-client`` library).

>>> metrics = PrometheusMetrics()            # registers on prometheus_client.REGISTRY
>>> app = Polyqueue(metrics=metrics)
>>> start_http_server(9464)                  # or expose REGISTRY from your own web app

``polyqueue worker APP --metrics-port 9464`` does both. Metric names (labels):

* ``polyqueue_jobs_enqueued_total`` (task, queue), ``polyqueue_jobs_dispatched_total`` (queue)
* ``polyqueue_jobs_started_total`` (task, queue), ``polyqueue_job_queue_wait_seconds`` histogram (task, queue)
* ``polyqueue_jobs_finished_total`` (task, queue, outcome), ``polyqueue_job_run_seconds`` histogram (task, queue)
* ``polyqueue_jobs_running`` gauge (task, queue): attempts running in this process
* ``polyqueue_jobs_rescued_total`` (queue, status), ``polyqueue_queue_depth`` gauge (queue, status)
"""

from __future__ import annotations

from typing import Any

from polyqueue.errors import ConfigurationError

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError(
        "polyqueue.metrics.prometheus needs prometheus-client: pip install 'polyqueue[prometheus]'"
    ) from exc

__all__ = ["PrometheusMetrics", "start_http_server"]

#: Run and wait times span milliseconds to hours.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class PrometheusMetrics:
    """A :class:`~polyqueue.metrics.MetricsHook` recording into a Prometheus registry.

    ``registry`` defaults to ``prometheus_client.REGISTRY`` (what ``start_http_server``
    and most web integrations expose); pass a fresh ``CollectorRegistry()`` to keep
    several instances in one process apart.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, namespace: str = "polyqueue") -> None:
        self.registry = registry if registry is not None else prometheus_client.REGISTRY
        r, ns = self.registry, namespace
        self.enqueued = Counter("jobs_enqueued", "Jobs enqueued.", ["task", "queue"], namespace=ns, registry=r)
        self.dispatched = Counter("jobs_dispatched", "Jobs handed to the broker.", ["queue"], namespace=ns, registry=r)
        self.started = Counter("jobs_started", "Attempts started.", ["task", "queue"], namespace=ns, registry=r)
        self.finished = Counter(
            "jobs_finished", "Attempts finished, by outcome.", ["task", "queue", "outcome"], namespace=ns, registry=r
        )
        self.rescued = Counter(
            "jobs_rescued", "Jobs rescued by maintenance.", ["queue", "status"], namespace=ns, registry=r
        )
        self.queue_wait = Histogram(
            "job_queue_wait_seconds",
            "Seconds from a job being due to its attempt starting.",
            ["task", "queue"],
            namespace=ns,
            registry=r,
            buckets=BUCKETS,
        )
        self.run_time = Histogram(
            "job_run_seconds", "Seconds an attempt ran.", ["task", "queue"], namespace=ns, registry=r, buckets=BUCKETS
        )
        self.running = Gauge(
            "jobs_running", "Attempts running in this process.", ["task", "queue"], namespace=ns, registry=r
        )
        self.depth = Gauge(
            "queue_depth", "Live jobs by queue and status (maintenance leader).", ["queue", "status"],
            namespace=ns, registry=r,
        )  # fmt: skip
        self.loop_blocked_seconds = Histogram(
            "event_loop_blocked_seconds",
            "Seconds a worker's event loop was blocked (a handler ran blocking code).",
            namespace=ns,
            registry=r,
            buckets=(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
        )
        self.broker_call_seconds = Histogram(
            "broker_call_seconds",
            "Seconds a call on the broker took (a receive's wait included); ok is false when it raised.",
            ["operation", "backend", "ok"],
            namespace=ns,
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, float("inf")),
        )

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.enqueued.labels(task, queue).inc(count)

    def job_dispatched(self, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.dispatched.labels(queue).inc(count)

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.started.labels(task, queue).inc()
        self.queue_wait.labels(task, queue).observe(queue_wait_seconds)
        self.running.labels(task, queue).inc()

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.finished.labels(task, queue, outcome).inc()
        self.run_time.labels(task, queue).observe(run_seconds)
        self.running.labels(task, queue).dec()

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.rescued.labels(queue, status).inc(count)

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.depth.labels(queue, status).set(count)

    def loop_blocked(self, seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.loop_blocked_seconds.observe(seconds)

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self.broker_call_seconds.labels(operation, backend, "true" if ok else "false").observe(seconds)


def start_http_server(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None) -> Any:
    """Serve ``registry`` (default ``prometheus_client.REGISTRY``) at ``http://addr:port/metrics``
    from a daemon thread; returns the server (``server.shutdown()`` stops it)."""
    try:
        server, _thread = prometheus_client.start_http_server(
            port, addr, registry if registry is not None else prometheus_client.REGISTRY
        )
    except OSError as exc:
        raise ConfigurationError(f"cannot serve Prometheus metrics on {addr}:{port}: {exc}") from exc
    return server
