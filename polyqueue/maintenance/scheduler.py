"""Periodic jobs: enqueue each due cron slot of an app's schedules exactly once.

For each schedule, :meth:`Scheduler.run_once` takes the latest slot at or before ``now`` and
enqueues it with ``unique_key = "cron:{name}:{slot}"`` unless a job with that key ever
existed. So a scheduler that was down over several slots enqueues one job, for the
latest, not one per missed slot; and two leaders racing in a failover never enqueue a
slot twice:

* a transaction-scoped advisory lock on the key serialises competing schedulers, so
  the second one's check runs after the first one's insert committed;
* the check looks at live jobs through the partial unique index and at finished ones
  (which that index does not cover) through the primary key: ids are time-ordered
  (UUIDv7), so a job enqueued for a slot has an id at or after the slot's time, less a
  clock-skew margin; only that range of the table is read.

A :class:`Scheduler` also remembers the slots it has settled, so the maintenance leader
does that work once per slot, not once per pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue._service import Service, steady
from polyqueue.enqueue import enqueue
from polyqueue.queries.schedule import schedule_lock_slot, schedule_slot_taken
from polyqueue.registry import Polyqueue, Schedule

__all__ = ["CLOCK_SKEW", "Enqueued", "Scheduler", "latest_slot", "slot_key"]

log = logging.getLogger("polyqueue.scheduler")

#: How far clocks of different hosts may disagree; widens the range of ids the check reads.
CLOCK_SKEW = dt.timedelta(minutes=1)

#: First key of the advisory locks taken per slot (pg_advisory_xact_lock(int, int)).
_LOCK_CLASS = 0x706F6C79  # "poly"


@dataclass(frozen=True, slots=True)
class Enqueued:
    """A slot this pass enqueued."""

    schedule: str
    slot: dt.datetime
    job_id: uuid.UUID


def latest_slot(cron: str, now: dt.datetime) -> dt.datetime:
    """The latest time at or before ``now`` (UTC) that ``cron`` names."""
    from croniter import croniter  # type: ignore[import-untyped]

    now = now.astimezone(dt.UTC)
    # croniter's get_prev is strictly before its start: start just after now so now itself counts.
    slot: dt.datetime = croniter(cron, now + dt.timedelta(microseconds=1)).get_prev(dt.datetime)
    return slot.astimezone(dt.UTC)


def slot_key(schedule: Schedule, slot: dt.datetime) -> str:
    """The ``unique_key`` of ``schedule``'s job for ``slot``."""
    return f"cron:{schedule.name}:{slot.isoformat()}"


def _id_floor(when: dt.datetime) -> uuid.UUID:
    """The smallest UUIDv7 of the millisecond ``when``: every id made at or after it sorts after it."""
    ms = max(0, int(when.timestamp() * 1000))
    return uuid.UUID(int=(ms & ((1 << 48) - 1)) << 80)


async def _settle(engine: AsyncEngine, schedule: Schedule, slot: dt.datetime) -> uuid.UUID | None:
    """Enqueue ``schedule``'s job for ``slot`` unless one exists; its id, or None."""
    key = slot_key(schedule, slot)
    since = min(slot, dt.datetime.now(dt.UTC)) - CLOCK_SKEW
    async with engine.connect() as conn:
        async with conn.begin():
            await schedule_lock_slot(conn, _LOCK_CLASS, key)
            if await schedule_slot_taken(conn, key, _id_floor(since)):
                return None
            session = AsyncSession(bind=conn, join_transaction_mode="create_savepoint")
            try:
                job = await enqueue(
                    session,
                    schedule.payload,
                    task=schedule.task,
                    unique_key=key,
                    meta={"schedule": schedule.name, "cron": schedule.cron, "slot": slot.isoformat()},
                )
                job_id = job.id
                await session.commit()  # releases the session's savepoint; conn.begin() commits
            finally:
                await session.close()
        return job_id


class Scheduler(Service[list[Enqueued]]):
    """Enqueues due slots of ``app``'s schedules; remembers the slots it settled. One of the
    passes the maintenance leader runs (``interval`` and ``backoff`` apply when run alone)."""

    name = "schedules"

    def __init__(self, engine: AsyncEngine, app: Polyqueue, *, interval: float = 1.0) -> None:
        super().__init__(interval=interval, backoff=steady(interval), log=log)
        self.engine = engine
        self.app = app
        self.settled: dict[str, dt.datetime] = {}

    async def run_once(self, now: dt.datetime | None = None) -> list[Enqueued]:
        """One pass: for each schedule, its latest slot at or before ``now`` (default: the clock)."""
        now = now or dt.datetime.now(dt.UTC)
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        out: list[Enqueued] = []
        for schedule in list(self.app.schedules.values()):
            slot = latest_slot(schedule.cron, now)
            last = self.settled.get(schedule.name)
            if last is not None and slot <= last:
                continue
            job_id = await _settle(self.engine, schedule, slot)
            self.settled[schedule.name] = slot
            if job_id is not None:
                log.info("enqueued %s for %s (job %s)", schedule.name, slot.isoformat(), job_id)
                out.append(Enqueued(schedule.name, slot, job_id))
        return out
