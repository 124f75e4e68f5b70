"""Amazon CloudWatch metrics (extra ``polyqueue[sqs]``: aiobotocore), sent with ``PutMetricData``.

>>> metrics = CloudWatchMetrics(namespace="MyApp/Jobs", region="eu-west-1")
>>> app = Polyqueue(metrics=metrics)
>>> await metrics.start()      # in the running event loop: flushes every flush_interval seconds
>>> ...
>>> await metrics.aclose()     # a last flush, then the client is closed

The hook methods are synchronous and only add to an in-memory buffer, aggregated per
metric and dimensions as a statistic set (SampleCount, Sum, Minimum, Maximum), so a busy
worker sends a few dozen data points per flush whatever its throughput. Metrics (unit;
dimensions): ``JobsEnqueued`` (Count; Task, Queue), ``JobsDispatched`` (Count; Queue),
``JobsStarted`` (Count; Task, Queue), ``QueueWait`` (Seconds; Task, Queue),
``JobsFinished`` (Count; Task, Queue, Outcome), ``RunTime`` (Seconds; Task, Queue),
``JobsRescued`` (Count; Queue, Status), ``QueueDepth`` (Count; Queue, Status). A failed
send is logged and its data kept for the next flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from polyqueue.errors import ConfigurationError

try:
    from aiobotocore.session import AioSession  # type: ignore[import-untyped]
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ConfigurationError("polyqueue.metrics.cloudwatch needs aiobotocore: pip install 'polyqueue[sqs]'") from exc

__all__ = ["CloudWatchMetrics"]

log = logging.getLogger("polyqueue.metrics.cloudwatch")

#: Data points per PutMetricData call (the API takes up to 1,000 and 1 MB).
BATCH_SIZE = 500

Key = tuple[str, str, tuple[tuple[str, str], ...]]  # (metric name, unit, dimensions)


@dataclass
class _Stats:
    count: float = 0.0
    total: float = 0.0
    low: float = float("inf")
    high: float = float("-inf")

    def add(self, value: float, samples: float = 1.0) -> None:
        self.count += samples
        self.total += value
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def merge(self, other: _Stats) -> None:
        self.count += other.count
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)


class CloudWatchMetrics:
    """A :class:`~polyqueue.metrics.MetricsHook` that buffers data points and sends them to
    CloudWatch in batches, every ``flush_interval`` seconds, from a task started by :meth:`start`.

    ``dimensions`` are added to every data point (e.g. ``{"Service": "billing"}``);
    ``client_kwargs`` go to aiobotocore's ``create_client`` (credentials, ``config``).
    """

    def __init__(
        self,
        namespace: str = "Polyqueue",
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        flush_interval: float = 60.0,
        dimensions: Mapping[str, str] | None = None,
        session: Any | None = None,
        **client_kwargs: Any,
    ) -> None:
        if flush_interval <= 0:
            raise ConfigurationError("flush_interval must be > 0")
        self.namespace = namespace
        self.region = region
        self.endpoint_url = endpoint_url
        self.flush_interval = flush_interval
        self.dimensions = tuple(sorted((dimensions or {}).items()))
        self._session = session
        self._client_kwargs = client_kwargs
        self._buffer: dict[Key, _Stats] = {}
        self._client: Any = None
        self._exit = contextlib.AsyncExitStack()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.sent = 0  # data points accepted by CloudWatch so far

    # -- the hook (synchronous: buffer only) --------------------------------------------------------
    def _add(self, name: str, unit: str, value: float, samples: float = 1.0, **dims: str) -> None:
        key = (name, unit, tuple(sorted({**dict(self.dimensions), **dims}.items())))
        self._buffer.setdefault(key, _Stats()).add(value, samples)

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("JobsEnqueued", "Count", count, Task=task, Queue=queue)

    def job_dispatched(self, queue: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("JobsDispatched", "Count", count, Queue=queue)

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("JobsStarted", "Count", 1, Task=task, Queue=queue)
        self._add("QueueWait", "Seconds", queue_wait_seconds, Task=task, Queue=queue)

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("JobsFinished", "Count", 1, Task=task, Queue=queue, Outcome=outcome)
        self._add("RunTime", "Seconds", run_seconds, Task=task, Queue=queue)

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("JobsRescued", "Count", count, Queue=queue, Status=status)

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("QueueDepth", "Count", count, Queue=queue, Status=status)

    def loop_blocked(self, seconds: float) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        self._add("EventLoopBlocked", "Seconds", seconds)

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        """The :class:`~polyqueue.metrics.MetricsHook` event of that name."""
        outcome = "ok" if ok else "error"
        self._add("BrokerCall", "Seconds", seconds, Operation=operation, Backend=backend, Outcome=outcome)

    # -- sending --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the CloudWatch client and start the flush task (call in the running loop)."""
        if self._task is not None:
            return
        session = self._session or AioSession()
        self._client = await self._exit.enter_async_context(
            session.create_client(
                "cloudwatch", region_name=self.region, endpoint_url=self.endpoint_url, **self._client_kwargs
            )
        )
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name="polyqueue-cloudwatch-flush")

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.flush_interval)
            if self._stopping.is_set():
                return
            await self.flush()

    async def flush(self) -> int:
        """Send what is buffered now; returns the data points sent (kept for later on failure)."""
        if self._client is None or not self._buffer:
            return 0
        buffer, self._buffer = self._buffer, {}
        now = dt.datetime.now(dt.UTC)
        items = list(buffer.items())
        sent = 0
        for start in range(0, len(items), BATCH_SIZE):
            chunk = items[start : start + BATCH_SIZE]
            data = [
                {
                    "MetricName": name,
                    "Unit": unit,
                    "Timestamp": now,
                    "Dimensions": [{"Name": k, "Value": v} for k, v in dims],
                    "StatisticValues": {"SampleCount": s.count, "Sum": s.total, "Minimum": s.low, "Maximum": s.high},
                }
                for (name, unit, dims), s in chunk
            ]
            try:
                await self._client.put_metric_data(Namespace=self.namespace, MetricData=data)
            except Exception as exc:  # keep the data for the next flush; never break the worker
                log.warning("CloudWatch PutMetricData failed (%s); keeping %d data points", exc, len(chunk))
                for key, stats in chunk:
                    self._buffer.setdefault(key, _Stats()).merge(stats)
                continue
            sent += len(chunk)
        self.sent += sent
        return sent

    async def aclose(self) -> None:
        """Stop the flush task, send what is left, close the client."""
        if self._task is not None:
            self._stopping.set()
            await self._task
            self._task = None
        try:
            await self.flush()
        finally:
            self._client = None
            await self._exit.aclose()
