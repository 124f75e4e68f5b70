"""The metrics hook: what polyqueue reports, and the guard that keeps a broken hook harmless.

Implement any subset of :class:`MetricsHook`'s methods (a class with none of them is a
valid no-op hook) and pass it as ``Polyqueue(metrics=...)`` or ``polyqueue.main(app,
metrics=...)``. Ready-made hooks: :mod:`polyqueue.metrics.prometheus`,
:mod:`polyqueue.metrics.cloudwatch`, :mod:`polyqueue.metrics.otel`.

Events carry the task and queue as labels. ``job_finished``'s ``outcome`` is one of
``succeeded``, ``failed``, ``retried``, ``timed_out`` (a time limit ended the attempt;
the job was retried or failed), ``cancelled``, ``lost`` (the worker no longer owned the
attempt when it finished).
"""

from __future__ import annotations

import logging
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
            if name not in self._warned:
                self._warned.add(name)
                log.exception("metrics hook %s.%s failed (logged once)", type(self.hook).__name__, name)

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        self._call("job_enqueued", task, queue, count)

    def job_dispatched(self, queue: str, count: int) -> None:
        self._call("job_dispatched", queue, count)

    def job_started(self, task: str, queue: str, queue_wait_seconds: float) -> None:
        self._call("job_started", task, queue, queue_wait_seconds)

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        self._call("job_finished", task, queue, outcome, run_seconds)

    def job_rescued(self, queue: str, status: str, count: int) -> None:
        self._call("job_rescued", queue, status, count)

    def queue_depth(self, queue: str, status: str, count: int) -> None:
        self._call("queue_depth", queue, status, count)
