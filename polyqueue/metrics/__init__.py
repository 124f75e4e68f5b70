"""The metrics hook: what polyqueue reports, and the guard that keeps a broken hook harmless.

Implement any subset of :class:`MetricsHook`'s methods (a class with none of them is a
valid no-op hook) and pass it as ``Polyqueue(metrics=...)`` or ``polyqueue.main(app,
metrics=...)``. Ready-made hooks: :mod:`polyqueue.metrics.prometheus`,
:mod:`polyqueue.metrics.cloudwatch`, :mod:`polyqueue.metrics.otel`.

Events carry the task and queue as labels. ``job_finished``'s ``outcome`` is one of
``succeeded``, ``failed``, ``retried``, ``timed_out`` (a time limit ended the attempt;
the job was retried or failed), ``cancelled``, ``lost`` (the worker no longer owned the
attempt when it finished).

Two optional hooks carry tracing (:mod:`polyqueue.metrics.otel` implements them):
``inject_meta(meta)`` may add context (a W3C ``traceparent``) to a job's ``meta`` before
it is inserted, and ``job_span(task, queue, job_id, attempt, meta)`` returns a context
manager the worker wraps each attempt in. Like the others they are guarded: a failing
hook is logged once and the job goes on without it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol

__all__ = ["GuardedMetrics", "MetricsHook", "NoMetrics"]

log = logging.getLogger("polyqueue.metrics")


class MetricsHook(Protocol):
    """What a metrics backend may receive. Every method is optional; none may block for long."""

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        """Jobs were added by ``enqueue``/``enqueue_many`` (in this process, before commit)."""

    def job_dispatched(self, queue: str, count: int) -> None:
        """The relay handed jobs of ``queue`` to the broker."""

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        """An attempt began; ``queue_wait_seconds`` since the job became due."""

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        """An attempt ended (see the module docstring for ``outcome``)."""

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        """Maintenance rescued jobs of a dead worker or past their time limit (new ``status``)."""

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        """A gauge sample of live jobs by queue and status, taken by the maintenance leader."""

    def loop_blocked(self, seconds: float) -> None:
        """A worker's event loop was blocked this long (a handler ran blocking code); every job
        of that worker waited meanwhile."""

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        """One call on the broker (``ensure``, ``publish``, ``publish_in``, ``receive``, ``extend``,
        ``ack``, ``ack_many``, ``close``) took ``seconds``; ``ok`` is False when it raised. A
        ``receive`` includes its wait for messages."""

    def inject_meta(self, meta: dict[str, Any]) -> None:
        """Add to a job's ``meta`` before insert (e.g. the enqueuing span's ``traceparent``)."""

    def job_span(
        self, task: str, queue: str, job_id: str, attempt: int, meta: dict[str, Any]
    ) -> AbstractContextManager[object]:
        """A context manager the worker runs the attempt in (e.g. a span linked to ``meta``'s context)."""
        return contextlib.nullcontext()


class NoMetrics:
    """The default hook: records nothing."""


class GuardedMetrics:
    """Wraps a hook so that a missing method is a no-op and a raising one is logged, never raised."""

    def __init__(self, hook: object | None) -> None:
        self.hook = hook if hook is not None else NoMetrics()
        self._warned: set[str] = set()

    def _call(self, name: str, *args: Any) -> None:
        method = getattr(self.hook, name, None)
        if method is None:
            return
        try:
            method(*args)
        except Exception:  # a failing hook never breaks a job
            self._failed(name)

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        """Forward to the hook (guarded)."""
        self._call("job_enqueued", task, queue, count)

    def job_dispatched(self, queue: str, count: int) -> None:
        """Forward to the hook (guarded)."""
        self._call("job_dispatched", queue, count)

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        """Forward to the hook (guarded)."""
        self._call("job_started", task, queue, queue_wait_seconds)

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        """Forward to the hook (guarded)."""
        self._call("job_finished", task, queue, outcome, run_seconds)

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        """Forward to the hook (guarded)."""
        self._call("job_rescued", queue, status, count)

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        """Forward to the hook (guarded)."""
        self._call("queue_depth", queue, status, count)

    def loop_blocked(self, seconds: float) -> None:
        """Forward to the hook (guarded)."""
        self._call("loop_blocked", seconds)

    def broker_call(self, operation: str, backend: str, seconds: float, ok: bool) -> None:
        """Forward to the hook (guarded)."""
        self._call("broker_call", operation, backend, seconds, ok)

    def inject_meta(self, meta: dict[str, Any]) -> None:
        """Forward to the hook (guarded)."""
        self._call("inject_meta", meta)

    @contextlib.contextmanager
    def job_span(self, task: str, queue: str, job_id: str, attempt: int, meta: dict[str, Any]) -> Iterator[None]:
        """The hook's ``job_span``, entered and exited under the guard; the job's own
        exceptions (including cancellation) pass through unchanged."""
        span: AbstractContextManager[object] | None = None
        method = getattr(self.hook, "job_span", None)
        if method is not None:
            try:
                span = method(task, queue, job_id, attempt, meta)
                span.__enter__()
            except Exception:
                span = None
                self._failed("job_span")
        if span is None:
            yield
            return
        try:
            yield
        except BaseException as exc:
            self._exit(span, exc)
            raise
        self._exit(span, None)

    def _exit(self, span: AbstractContextManager[object], exc: BaseException | None) -> None:
        try:
            span.__exit__(type(exc) if exc is not None else None, exc, exc.__traceback__ if exc is not None else None)
        except Exception:
            self._failed("job_span")

    def _failed(self, name: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.exception("metrics hook %s.%s failed (logged once)", type(self.hook).__name__, name)
