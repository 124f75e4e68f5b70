"""The maintenance loop: one leader at a time (a lease row in ``polyqueue_leader``), each
pass running the ``run_once`` of the leader's services (:mod:`polyqueue.maintenance.passes`:
rescue, re-dispatch, prune, queue depth; and the app's periodic jobs, ``scheduler``).

Leadership is a lease, in every pool mode: one ``INSERT ... ON CONFLICT DO UPDATE`` takes
the row when it is free or expired and renews it when it is already ours, with database
time on both sides (no clock skew between hosts). It keeps no session state and holds no
connection, so it survives pgbouncer in transaction mode, where a session advisory lock
does not (the session that took it is handed to other clients), and it leaves nothing on
a connection going back to the application's pool. A leader that freezes (SIGSTOP, a
blocked event loop) or dies stops renewing and loses the lease ``lease_ttl`` seconds after
its last renewal; one that stops cleanly deletes the row, and the next pass of another
process takes over. Two leaders for a moment (a frozen one waking up before it notices)
are harmless: every maintenance statement is safe to run concurrently (rescue re-checks
ownership in its ``WHERE``, schedules enqueue under unique keys, prune deletes what is
there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from dataclasses import dataclass, field
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._service import Service, steady
from polyqueue.maintenance.passes import (
    DepthReporter,
    Pruner,
    Redispatcher,
    Rescuer,
)
from polyqueue.maintenance.scheduler import Scheduler
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import leader_resign, leader_take
from polyqueue.registry import Polyqueue
from polyqueue.settings import Settings

__all__ = ["LEADER_NAME", "Maintenance", "MaintenanceResult", "lease_ttl"]

log = logging.getLogger("polyqueue.maintenance")

T = TypeVar("T")

#: The ``polyqueue_leader`` row of the maintenance leader.
LEADER_NAME = "maintenance"


def lease_ttl(settings: Settings) -> float:
    """Seconds a leader's lease lasts after each renewal: a frozen or dead leader is replaced
    this long after its last pass. Three passes, and never less than ``worker_dead_after`` (a
    leader is at least as alive as the workers it judges)."""
    return max(settings.worker_dead_after, 3 * settings.maintenance_interval)


@dataclass
class MaintenanceResult:
    """What one pass did."""

    rescued: list[tuple[str, str]] = field(default_factory=list)  # (job id, new status)
    redispatched: int = 0
    pruned: int = 0
    scheduled: list[tuple[str, str]] = field(default_factory=list)  # (schedule name, slot) enqueued


class _PassFailed(Exception):
    """Some services of a leader's pass failed (each logged on its turn): back off as for any failure."""

    def __init__(self, errors: list[Exception]) -> None:
        super().__init__(f"{len(errors)} maintenance services failed: {errors[0]}")


class Maintenance(Service[MaintenanceResult]):
    """Runs the maintenance passes while this process holds the leader lease."""

    name = "maintenance"

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        metrics: GuardedMetrics | None = None,
        app: Polyqueue | None = None,
    ) -> None:
        """With ``app``, each pass also enqueues the due slots of ``app.schedules``."""
        super().__init__(interval=settings.maintenance_interval, backoff=steady(settings.maintenance_interval), log=log)
        self.engine = engine
        self.settings = settings
        self.metrics = metrics or GuardedMetrics(None)
        self.rescuer = Rescuer(engine, settings, self.metrics)
        self.redispatcher = Redispatcher(engine, settings, self.metrics)
        self.pruner = Pruner(engine, settings, self.metrics)
        self.depth = DepthReporter(engine, settings, self.metrics)
        self.scheduler = Scheduler(engine, app, interval=settings.maintenance_interval) if app is not None else None
        #: Who this process is in ``polyqueue_leader.holder``: host, pid and a unique suffix.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._leading = False
        self._ever_led = False

    @property
    def is_leader(self) -> bool:
        """Whether the last attempt to take or renew the lease succeeded."""
        return self._leading

    async def run_once(self) -> MaintenanceResult:
        """One pass of every service, leader or not (tests and ``polyqueue admin`` call it
        directly). A service that fails does not keep the others from their turn; the first
        failure is raised once all had it."""
        result, errors = await self._pass()
        if errors:
            raise errors[0]
        return result

    async def _pass(self) -> tuple[MaintenanceResult, list[Exception]]:
        """Each service's turn, in order; what they did, and what failed (logged already)."""
        errors: list[Exception] = []
        result = MaintenanceResult(
            rescued=await self._turn(self.rescuer, [], errors),
            redispatched=await self._turn(self.redispatcher, 0, errors),
            pruned=await self._turn(self.pruner, 0, errors),
        )
        await self._turn(self.depth, None, errors)
        if self.scheduler is not None and self.scheduler.app.schedules:
            enqueued = await self._turn(self.scheduler, [], errors)
            result.scheduled = [(e.schedule, e.slot.isoformat()) for e in enqueued]
        return result, errors

    @staticmethod
    async def _turn(service: Service[T], default: T, errors: list[Exception]) -> T:
        """``service.run_once()``, or ``default`` when it fails (logged, kept in ``errors``)."""
        try:
            outcome = await service.run_once()
        except Exception as exc:
            log.warning("maintenance: %s failed: %s", service.name, exc)
            service.failures.fire()
            errors.append(exc)
            return default
        service.passes.fire()
        return outcome

    async def _try_lead(self) -> bool:
        """Take or renew the lease; whether this process leads until the next attempt."""
        try:
            async with self.engine.begin() as conn:
                won = await leader_take(conn, name=LEADER_NAME, holder=self.holder, ttl=lease_ttl(self.settings))
        except BaseException:
            self._leading = False  # unknown: the next attempt says
            raise
        if won and not self._leading:
            log.info("this process now leads maintenance")
        elif self._leading and not won:
            log.warning("lost the maintenance lease: it expired before this process renewed it")
        self._leading = won
        self._ever_led = self._ever_led or won
        return won

    async def _resign(self) -> None:
        """Give the lease up at once (the next process need not wait for it to expire)."""
        self._leading = False
        if not self._ever_led:  # else delete whatever is ours: a renewal that failed may have written it
            return
        try:
            async with self.engine.begin() as conn:
                await leader_resign(conn, name=LEADER_NAME, holder=self.holder)
        except Exception as exc:  # it expires by itself
            log.warning("could not give up the maintenance lease (it expires by itself): %s", exc)

    async def _attempt(self, stop: asyncio.Event) -> MaintenanceResult:
        """Take or renew the lease; lead a pass if it is ours."""
        if not await self._try_lead():
            return MaintenanceResult()
        result, errors = await self._pass()
        if errors:
            raise _PassFailed(errors)
        return result

    def _failed(self, exc: Exception, delay: float) -> None:
        if not isinstance(exc, _PassFailed):  # each service's failure was logged on its turn
            log.warning("maintenance pass failed: %s", exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Every ``maintenance_interval``: if leader (or once leadership is won), run a pass."""
        try:
            await super().run(stop)
        finally:
            await self._resign_even_if_cancelled()

    async def _resign_even_if_cancelled(self) -> None:
        """The worker sets ``stopping`` and cancels this loop moments later: a cancel must not cut the
        resignation short (the next leader would wait ``lease_ttl`` for nothing). Bounded at 5 s."""
        resigning = asyncio.ensure_future(self._resign())
        try:
            await asyncio.shield(resigning)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(resigning, 5)
            raise
