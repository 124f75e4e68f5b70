"""The passes the maintenance leader runs, one service each (see :mod:`polyqueue._service`):
rescue, re-dispatch, prune, and the queue-depth sample. Each is safe to run concurrently
with itself in another process (a failover may briefly have two leaders): every statement
re-checks in its ``WHERE`` what it changes."""

from __future__ import annotations

import collections
import logging
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._service import Service, steady
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import job_count_live, job_prune, job_redispatch_stale, job_rescue
from polyqueue.settings import Settings

__all__ = ["DepthReporter", "MaintenancePass", "Pruner", "Redispatcher", "Rescuer"]

log = logging.getLogger("polyqueue.maintenance")

T = TypeVar("T")


class MaintenancePass(Service[T]):
    """A maintenance pass over the jobs of ``engine``'s database."""

    def __init__(self, engine: AsyncEngine, settings: Settings, metrics: GuardedMetrics) -> None:
        super().__init__(interval=settings.maintenance_interval, backoff=steady(settings.maintenance_interval), log=log)
        self.engine = engine
        self.settings = settings
        self.metrics = metrics


class Rescuer(MaintenancePass[list[tuple[str, str]]]):
    """Running jobs of dead workers, and attempts past ``timeout_at`` plus ``timeout_grace``:
    back to ``pending`` or failed by their strategy. Returns ``(job id, new status)`` pairs."""

    name = "rescue"

    async def run_once(self) -> list[tuple[str, str]]:
        s = self.settings
        async with self.engine.begin() as conn:
            rescued = await job_rescue(conn, dead_after=s.worker_dead_after, timeout_grace=s.timeout_grace)
        for job_id, status, _ in rescued:
            log.warning("rescued job %s → %s", job_id, status)
        for (queue, status), count in collections.Counter((q, st) for _, st, q in rescued).items():
            self.metrics.job_rescued(queue, status, count)
        return [(str(i), st) for i, st, _ in rescued]


class Redispatcher(MaintenancePass[int]):
    """Jobs ``enqueued`` longer than ``redispatch_after`` (their delivery was lost): back to
    ``pending`` for the relay. Returns how many."""

    name = "re-dispatch"

    async def run_once(self) -> int:
        after = self.settings.redispatch_after
        async with self.engine.begin() as conn:
            count = await job_redispatch_stale(conn, older_than=after)
        if count:
            log.warning("re-dispatched %d jobs enqueued longer than %.0fs", count, after)
        return count


class Pruner(MaintenancePass[int]):
    """Finished jobs older than ``retention_seconds``: deleted. Returns how many."""

    name = "prune"

    async def run_once(self) -> int:
        async with self.engine.begin() as conn:
            return await job_prune(conn, older_than=self.settings.retention_seconds)


class DepthReporter(MaintenancePass[None]):
    """Live jobs per queue and status, to the metrics hook (a pair drained since the last
    sample is reported as 0)."""

    name = "queue depth"

    def __init__(self, engine: AsyncEngine, settings: Settings, metrics: GuardedMetrics) -> None:
        super().__init__(engine, settings, metrics)
        self._reported: set[tuple[str, str]] = set()

    async def run_once(self) -> None:
        async with self.engine.connect() as conn:
            depth = await job_count_live(conn)
        seen = {(q, st) for q, st, _ in depth}
        for queue, status, count in depth:
            self.metrics.queue_depth(queue, status, count)
        for queue, status in self._reported - seen:
            self.metrics.queue_depth(queue, status, 0)
        self._reported = seen
