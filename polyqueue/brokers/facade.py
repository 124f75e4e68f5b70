"""The one object the runtime holds for a broker: an adapter behind the contract.

:class:`BrokerFacade` wraps any adapter (``make_broker`` returns one) and exposes
exactly :class:`~polyqueue.brokers.base.Broker`. For every call it

* maps whatever the adapter lets escape to ``BrokerError``, with the adapter's own
  :class:`~polyqueue.brokers.base.ErrorMap` deciding whether it is transient (polyqueue's
  own errors, ``LeaseLostError`` among them, pass unchanged; cancellation too);
* times the call into the metrics hook: ``broker_call(operation, backend, seconds, ok)``;
* runs it in an OpenTelemetry ``CLIENT`` span when ``opentelemetry-api`` is installed
  (a no-op until the application configures a tracer provider);

and it bounds ``close()``: an SDK stuck on a dead connection must not keep a process alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from polyqueue.brokers.base import BrokerAdapter, Delivery, Message
from polyqueue.errors import BrokerError, PolyqueueError
from polyqueue.metrics import GuardedMetrics

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

try:  # optional: tracing costs nothing without the OpenTelemetry API
    from opentelemetry import trace as _otel_trace
except ImportError:  # pragma: no cover - depends on the installed extras
    _otel_trace = None  # type: ignore[assignment]

__all__ = ["CLOSE_TIMEOUT", "BrokerFacade"]

log = logging.getLogger("polyqueue.brokers")

T = TypeVar("T")

#: Longest wait for an adapter's ``close()``; the connections it still holds are left to the process.
CLOSE_TIMEOUT = 5.0


class BrokerFacade:
    """An adapter behind the broker contract: errors mapped, calls timed and traced, close bounded.

    ``adapter`` is the adapter itself (its own options and helpers, for tests and tools);
    ``metrics`` a :class:`~polyqueue.metrics.MetricsHook` or a ``GuardedMetrics``;
    ``tracer_provider`` an OpenTelemetry one (default: the global provider).
    """

    def __init__(
        self,
        adapter: BrokerAdapter,
        *,
        metrics: object | None = None,
        tracer_provider: Any | None = None,
        close_timeout: float = CLOSE_TIMEOUT,
    ) -> None:
        self.adapter = adapter
        self.name = adapter.name
        self.capabilities = adapter.capabilities  # fixed once the adapter is made (SQS: by its options)
        self.metrics = metrics if isinstance(metrics, GuardedMetrics) else GuardedMetrics(metrics)
        self.close_timeout = close_timeout
        self._tracer: Any = None
        if _otel_trace is not None:
            self._tracer = (tracer_provider or _otel_trace.get_tracer_provider()).get_tracer("polyqueue.brokers")

    def __repr__(self) -> str:
        return f"BrokerFacade({self.adapter!r})"

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        await self._call("ensure", lambda: self.adapter.ensure(queues))

    async def publish(self, messages: Sequence[Message]) -> None:
        await self._call("publish", lambda: self.adapter.publish(messages))

    async def publish_in(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        await self._call("publish_in", lambda: self.adapter.publish_in(conn, messages))

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        return await self._call("receive", lambda: self.adapter.receive(queues, max_messages, wait))

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        await self._call("extend", lambda: self.adapter.extend(delivery, seconds))

    async def ack(self, delivery: Delivery) -> None:
        await self._call("ack", lambda: self.adapter.ack(delivery))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        await self._call("ack_many", lambda: self.adapter.ack_many(deliveries))

    async def close(self) -> None:
        """The adapter's ``close()``, given up after ``close_timeout`` seconds (logged, never raised)."""
        try:
            await self._call("close", self._bounded_close)
        except PolyqueueError as exc:  # best effort: what the adapter could not release, the process does
            log.warning("closing broker %s: %s", self.name, exc)

    async def _bounded_close(self) -> None:
        try:
            await asyncio.wait_for(self.adapter.close(), self.close_timeout)
        except TimeoutError:
            raise BrokerError(f"took over {self.close_timeout:g} s; left to the process", transient=False) from None

    # -- the boundary ----------------------------------------------------------------------------
    async def _call(self, op: str, call: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        ok = cancelled = False
        try:
            with self._span(op):
                try:
                    result = await call()
                except PolyqueueError:
                    raise  # BrokerError, LeaseLostError, ConfigurationError: already what callers expect
                except Exception as exc:  # an SDK error the adapter let escape (or its own bug)
                    raise self.adapter.errors.error(op, exc) from exc
            ok = True
            return result
        except asyncio.CancelledError:
            cancelled = True  # shutdown, or the caller gave up: not a broker failure
            raise
        finally:
            if not cancelled:
                self.metrics.broker_call(op, self.name, time.perf_counter() - started, ok)

    @contextlib.contextmanager
    def _span(self, op: str) -> Iterator[None]:
        if self._tracer is None:
            yield
            return
        attributes = {"messaging.system": self.name, "messaging.operation.name": op}
        kind = _otel_trace.SpanKind.CLIENT
        with self._tracer.start_as_current_span(f"polyqueue.broker {op}", kind=kind, attributes=attributes):
            yield
