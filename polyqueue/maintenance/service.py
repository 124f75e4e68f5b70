"""The maintenance loop: one leader at a time (a session advisory lock), each pass
running the services' ``run_once`` — rescue, re-dispatch, prune, and the app's periodic
jobs (``scheduler``)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue._aio import wait_any
from polyqueue.maintenance.scheduler import Scheduler
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import job_count_live, job_prune, job_redispatch_stale, job_rescue
from polyqueue.registry import Polyqueue
from polyqueue.settings import Settings

__all__ = ["LEADER_LOCK_KEY", "Maintenance", "MaintenanceResult"]

log = logging.getLogger("polyqueue.maintenance")

#: pg advisory lock key of the maintenance leader ("polyqueu" in ASCII).
LEADER_LOCK_KEY = 0x706F6C7971756575


@dataclass
class MaintenanceResult:
    """What one pass did."""

    rescued: list[tuple[str, str]] = field(default_factory=list)  # (job id, new status)
    redispatched: int = 0
    pruned: int = 0
    scheduled: list[tuple[str, str]] = field(default_factory=list)  # (schedule name, slot) enqueued


class Maintenance:
    """Runs maintenance passes while this process holds the leader lock."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        metrics: GuardedMetrics | None = None,
        app: Polyqueue | None = None,
    ) -> None:
        """With ``app``, each pass also enqueues the due slots of ``app.schedules``."""
        self.engine = engine
        self.scheduler = Scheduler(app) if app is not None else None
        self.settings = settings
        self.metrics = metrics or GuardedMetrics(None)
        self._leader_conn: AsyncConnection | None = None
        self._reported_depth: set[tuple[str, str]] = set()

    @property
    def is_leader(self) -> bool:
        return self._leader_conn is not None

    async def run_once(self) -> MaintenanceResult:
        """One pass, leader or not (tests and ``polyqueue admin`` call it directly)."""
        s = self.settings
        result = MaintenanceResult()
        async with self.engine.begin() as conn:
            rescued = await job_rescue(conn, dead_after=s.worker_dead_after, timeout_grace=s.timeout_grace)
        result.rescued = [(str(i), st) for i, st, _ in rescued]
        for job_id, status, _ in rescued:
            log.warning("rescued job %s → %s", job_id, status)
        for (queue, status), count in collections.Counter((q, st) for _, st, q in rescued).items():
            self.metrics.job_rescued(queue, status, count)
        async with self.engine.begin() as conn:
            result.redispatched = await job_redispatch_stale(conn, older_than=s.redispatch_after)
        if result.redispatched:
            log.warning("re-dispatched %d jobs enqueued longer than %.0fs", result.redispatched, s.redispatch_after)
        async with self.engine.begin() as conn:
            result.pruned = await job_prune(conn, older_than=s.retention_seconds)
            depth = await job_count_live(conn)
        seen = {(q, st) for q, st, _ in depth}
        for queue, status, count in depth:
            self.metrics.queue_depth(queue, status, count)
        for queue, status in self._reported_depth - seen:  # drained since the last sample: report 0
            self.metrics.queue_depth(queue, status, 0)
        self._reported_depth = seen
        if self.scheduler is not None and self.scheduler.app.schedules:
            enqueued = await self.scheduler.run_once(self.engine)
            result.scheduled = [(e.schedule, e.slot.isoformat()) for e in enqueued]
        return result

    async def _try_lead(self) -> bool:
        if self._leader_conn is not None:
            try:
                await self._leader_conn.execute(text("SELECT 1"))  # keeps the session from idling out
                return True
            except Exception as exc:
                log.warning("lost the maintenance leader connection: %s", exc)
                await self._resign()
        conn = await self.engine.connect()
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            got = await conn.scalar(text("SELECT pg_try_advisory_lock(:k)"), {"k": LEADER_LOCK_KEY})
            if got:
                # A leader frozen longer than this (SIGSTOP, a blocked event loop) has its session
                # ended by Postgres, which frees the lock for a live worker. Postgres 14+. Set only
                # on the leader's session, which never goes back to the pool (see _resign): a pooled
                # connection carrying it would be cut off under whoever idles on it next.
                idle_ms = int(1000 * max(self.settings.worker_dead_after, 3 * self.settings.maintenance_interval))
                try:
                    await conn.execute(text(f"SET idle_session_timeout = {idle_ms}"))
                except Exception:  # Postgres 13: no such setting; leadership then ends only with the connection
                    await conn.rollback()
        except BaseException:
            await conn.invalidate()
            raise
        if got:
            self._leader_conn = conn
            log.info("this process now leads maintenance")
            return True
        await conn.close()
        return False

    async def _resign(self) -> None:
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LEADER_LOCK_KEY})
            with contextlib.suppress(Exception):
                await conn.invalidate()  # closed, not pooled: its session carries idle_session_timeout

    async def run(self, stopping: asyncio.Event) -> None:
        """Every ``maintenance_interval``: if leader (or once leadership is won), run a pass."""
        try:
            while not stopping.is_set():
                try:
                    if await self._try_lead():
                        await self.run_once()
                except Exception as exc:
                    log.warning("maintenance pass failed: %s", exc)
                    await self._resign()
                await wait_any(stopping, seconds=self.settings.maintenance_interval)
        finally:
            await self._resign()
