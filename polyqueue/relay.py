"""The relay: forwards committed, due ``pending`` jobs to the broker (the outbox pattern).

Per batch, in one transaction: lock due pending rows (``SKIP LOCKED``, so several
relays share the work), publish them, mark them ``enqueued``, commit. If publishing
fails the transaction rolls back and the jobs stay ``pending``. If the commit fails
after a publish, the next pass publishes again and the worker's claim drops the
duplicate — except for a broker with ``capabilities.transactional_publish`` (PGMQ in
the jobs' database), whose publish joins this transaction and rolls back with it.

Flow control: a queue with ``relay_max_enqueued`` jobs enqueued (published, not yet
claimed) gets no more until workers take some; the rest wait ``pending`` in Postgres, in
priority order. Without it a backlog sat in the broker, and every job of it still waiting
after ``redispatch_after`` was re-dispatched as if its delivery were lost: a copy of the
whole backlog per period, which workers then had to claim and drop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue._aio import wait_any, wait_any_future
from polyqueue._service import Service
from polyqueue.brokers.base import Broker, Message
from polyqueue.errors import BrokerError
from polyqueue.listener import Listener
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import (
    NEW_JOB_CHANNEL,
    Dispatchable,
    job_count_enqueued,
    job_mark_enqueued,
    job_take_for_dispatch,
)
from polyqueue.retry import Backoff
from polyqueue.settings import Settings

__all__ = ["Relay", "ensure_queues"]

log = logging.getLogger("polyqueue.relay")

#: Seconds a batch still publishing when the relay is told to stop gets to finish.
STOP_GRACE = 5.0
#: How often a relay holding jobs back (``relay_max_enqueued``) looks for room again.
HELD_BACK_POLL = 0.25
#: Longest a relay goes on its own estimate of the room under ``relay_max_enqueued`` (see ``Relay._room``).
RECOUNT_AFTER = 1.0
#: First wait after a failed publish (or database error, or ``ensure``) while the broker is down.
RETRY_FIRST = 0.25
#: Longest wait between retries. It bounds how long a backlog waits once the broker is back: with
#: a 30 s cap, jobs committed during an outage waited up to 15 s more after Redis returned. One
#: retry a second costs a down broker nothing (a refused connect), so there is no reason to wait longer.
RETRY_CAP = 1.0
#: The retry delays: doubling from ``RETRY_FIRST`` to ``RETRY_CAP``, with equal jitter (so relays
#: and workers that failed together do not all come back in the same instant).
RETRY_BACKOFF = Backoff(base=RETRY_FIRST, factor=2.0, maximum=RETRY_CAP)


async def ensure_queues(broker: Broker, queues: Sequence[str], stopping: asyncio.Event) -> None:
    """Create the broker's queues, retrying while the broker is down: a worker or relay that
    starts during a broker outage runs meanwhile (its receives and publishes retry too)."""
    failures = 0
    while not stopping.is_set():
        try:
            await broker.ensure(queues)
            return
        except BrokerError as exc:
            failures += 1
            delay = RETRY_BACKOFF.delay(failures)
            log.error("broker %s unreachable (%s); retrying in %.1fs", broker.name, exc, delay)
            await wait_any(stopping, seconds=delay)


class Relay(Service[int]):
    """Moves ``pending`` → broker → ``enqueued``. ``run_once`` is one batch; ``run`` loops,
    waking on NOTIFY and polling as a fallback, retrying failures after ``RETRY_BACKOFF``."""

    name = "relay"

    def __init__(
        self,
        engine: AsyncEngine,
        broker: Broker,
        listener: Listener | None,
        settings: Settings,
        metrics: GuardedMetrics | None = None,
    ) -> None:
        super().__init__(interval=settings.poll_interval, backoff=RETRY_BACKOFF, log=log)
        self.metrics = metrics or GuardedMetrics(None)
        self.engine = engine
        self.broker = broker
        self.listener = listener
        self.batch_size = settings.relay_batch_size
        self.max_enqueued = settings.relay_max_enqueued
        #: The last batch stopped at ``max_enqueued`` for some queue: look again soon, as
        #: claims (which send no NOTIFY the relay hears) make room.
        self.held_back = False
        self._room_estimate: dict[str, int] | None = None  # see _room
        self._counted_at = 0.0
        self._wakeup = asyncio.Event()

    def _on_notify(self, _payload: str) -> None:
        self._wakeup.set()

    async def run_once(self) -> int:
        """Publish one batch of due pending jobs; returns how many were published."""
        async with self.engine.begin() as conn:
            rows = await self._take(conn)
            if not rows:
                return 0
            messages = [Message(r.id, r.queue, r.dispatch_key) for r in rows]
            if self.broker.capabilities.transactional_publish:
                await self.broker.publish_in(conn, messages)  # commits or rolls back with the mark below
            else:
                await self.broker.publish(messages)
            await self._mark(conn, [r.id for r in rows])
        for queue, count in collections.Counter(r.queue for r in rows).items():
            self.metrics.job_dispatched(queue, count)
        return len(rows)

    async def _mark(self, conn: AsyncConnection, ids: list[uuid.UUID]) -> None:
        """Mark published jobs ``enqueued`` in the batch's transaction (tests make a relay die here)."""
        await job_mark_enqueued(conn, ids)

    async def _take(self, conn: AsyncConnection) -> list[Dispatchable]:
        """A batch of due pending jobs, none beyond a queue's room under ``max_enqueued``."""
        if not self.max_enqueued:
            return await job_take_for_dispatch(conn, self.batch_size)
        room = await self._room(conn)
        full = [q for q, free in room.items() if free <= 0]
        rows = await job_take_for_dispatch(conn, self.batch_size, skip_queues=full)
        taken: list[Dispatchable] = []
        for r in rows:  # the rows not taken stay pending: their locks go with this transaction
            free = room.get(r.queue, self.max_enqueued)
            if free > 0:
                taken.append(r)
                room[r.queue] = free - 1  # a batch that rolls back leaves room under-stated until the next count
        self.held_back = bool(full) or len(taken) < len(rows)
        return taken

    async def _room(self, conn: AsyncConnection) -> dict[str, int]:
        """Room per queue under ``max_enqueued`` (the live estimate): counted, or from the last count.

        The estimate is the last count plus this relay's own publishes since; claims since only
        make more room, so it under-states room, never over-states it (other relays aside: it is
        recounted after ``RECOUNT_AFTER`` seconds, and whenever a queue looks nearly full).
        """
        now = time.monotonic()
        estimate = self._room_estimate
        if (
            estimate is None
            or now - self._counted_at > RECOUNT_AFTER
            or min(estimate.values(), default=self.max_enqueued) < self.batch_size
        ):
            counts = await job_count_enqueued(conn)
            estimate = self._room_estimate = {q: self.max_enqueued - n for q, n in counts.items()}
            self._counted_at = now
        return estimate

    async def _attempt(self, stop: asyncio.Event) -> int:
        """``run_once``, but a stop request gives a batch in flight ``STOP_GRACE`` seconds, then
        abandons it: a relay blocked on a slow broker must still stop on SIGTERM. An abandoned
        batch's transaction rolls back, so its jobs stay pending (any copies already published
        are harmless duplicates: a job runs only for the worker that claims it in Postgres)."""
        self._wakeup.clear()  # before the batch: a NOTIFY during it wakes the rest after it
        once = asyncio.ensure_future(self.run_once())
        if await wait_any_future(once, stop):
            return once.result()
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(once), STOP_GRACE)
        if not once.done():
            log.warning("relay: stopping; abandoning a batch still publishing after %.0f s", STOP_GRACE)
            once.cancel()
        await asyncio.gather(once, return_exceptions=True)
        return 0

    async def _rest(self, stop: asyncio.Event, result: int, recovered: bool) -> None:
        if result >= self.batch_size or (recovered and result):
            return  # more may be waiting; after an outage, go straight on with the backlog
        wait = min(self.interval, HELD_BACK_POLL) if self.held_back else self.interval
        await wait_any(stop, self._wakeup, seconds=wait)

    def _failed(self, exc: Exception, delay: float) -> None:
        if isinstance(exc, BrokerError):
            log.error(
                "relay: publishing to %s failed (%s); jobs stay pending, retrying in %.1fs",
                self.broker.name,
                exc,  # adapters never put URLs (or secrets) in their errors
                delay,
            )
        else:
            log.error("relay: database error (%s); retrying in %.1fs", exc, delay)

    async def run(self, stop: asyncio.Event) -> None:
        """Publish until ``stop`` is set."""
        if self.listener is not None:
            self.listener.subscribe(NEW_JOB_CHANNEL, self._on_notify)
        try:
            await super().run(stop)
        finally:
            if self.listener is not None:
                self.listener.unsubscribe(NEW_JOB_CHANNEL, self._on_notify)
