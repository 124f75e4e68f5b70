"""Where a worker's jobs come from.

* :class:`DirectSource` — direct Postgres mode: claim ``pending`` rows with
  ``FOR UPDATE SKIP LOCKED``, woken by NOTIFY, polling as a fallback.
* :class:`BrokerSource` — any broker: receive deliveries, claim their jobs in
  Postgres (one owner per attempt), ack stale or malformed deliveries.

The runtime sees one shape, so a new broker plugs in without touching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._aio import bounded
from polyqueue._conn import HeldConnection
from polyqueue.brokers.base import Broker, Delivery
from polyqueue.errors import BrokerError, LeaseLostError
from polyqueue.listener import Listener
from polyqueue.queries import NEW_JOB_CHANNEL, ClaimedJob, job_any_due, job_claim_by_ids, job_claim_pending

__all__ = ["BrokerSource", "Claim", "DirectSource", "JobSource"]

log = logging.getLogger("polyqueue.worker")


#: How long a finished job waits for its lease renewal to stop before going on without it.
KEEPALIVE_STOP_WAIT = 2.0


@dataclass(slots=True)
class Claim:
    """A job this worker owns, and the broker delivery that brought it (None in direct mode)."""

    job: ClaimedJob
    delivery: Delivery | None = None


class JobSource(Protocol):
    async def fetch(self, worker_id: uuid.UUID, limit: int, wait: float) -> list[Claim]: ...

    async def done(self, claim: Claim) -> None: ...

    def keepalive(self, claim: Claim) -> contextlib.AbstractAsyncContextManager[None]: ...

    async def extend(self, claim: Claim) -> None: ...

    async def due_undelivered(self) -> bool:
        """Whether jobs of the source's queues are due but not deliverable yet (a burst worker
        that found nothing waits for them rather than stopping)."""
        ...

    async def close(self) -> None: ...


class DirectSource:
    """Claims straight from the jobs table (``queue_backend="direct"``)."""

    def __init__(
        self,
        engine: AsyncEngine,
        listener: Listener,
        queues: Sequence[str],
        poll_interval: float,
        *,
        transaction_pooling: bool = False,
    ) -> None:
        self._conn = HeldConnection(engine, transaction_pooling=transaction_pooling)
        self._queues = list(queues)
        self._poll = poll_interval
        self._wakeup = asyncio.Event()
        self._listener = listener
        listener.subscribe(NEW_JOB_CHANNEL, self._on_notify)

    def _on_notify(self, payload: str) -> None:
        if not payload or payload in self._queues:
            self._wakeup.set()

    async def fetch(self, worker_id: uuid.UUID, limit: int, wait: float) -> list[Claim]:
        self._wakeup.clear()  # before the claim: a NOTIFY during it wakes the wait below
        jobs = await self._claim(worker_id, limit)
        if not jobs and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(wait, self._poll))
            jobs = await self._claim(worker_id, limit)
        return [Claim(j) for j in jobs]

    async def _claim(self, worker_id: uuid.UUID, limit: int) -> list[ClaimedJob]:
        async with self._conn.use() as conn:
            return await job_claim_pending(conn, worker_id, self._queues, limit)

    async def done(self, claim: Claim) -> None:
        return None

    @contextlib.asynccontextmanager
    async def keepalive(self, claim: Claim) -> AsyncIterator[None]:
        yield

    async def extend(self, claim: Claim) -> None:
        return None  # no delivery, no lease: the job's row is all there is

    async def due_undelivered(self) -> bool:
        return False  # the claim that found nothing looked at the table itself

    async def close(self) -> None:
        self._listener.unsubscribe(NEW_JOB_CHANNEL, self._on_notify)
        await self._conn.close()


class BrokerSource:
    """Receives deliveries from a broker and claims their jobs in Postgres."""

    def __init__(
        self,
        engine: AsyncEngine,
        broker: Broker,
        queues: Sequence[str],
        lease_seconds: float,
        *,
        transaction_pooling: bool = False,
    ) -> None:
        self._conn = HeldConnection(engine, transaction_pooling=transaction_pooling)
        self._broker = broker
        self._queues = list(queues)
        self._lease = lease_seconds
        # Acks are sent in batches by one task: a finished job need not wait for its ack,
        # and ack_many sends a batch in as few round trips as the broker allows.
        self._acks: list[Delivery] = []
        self._ack_wakeup = asyncio.Event()
        self._ack_task: asyncio.Task[None] | None = None
        self._ack_closing = False

    async def fetch(self, worker_id: uuid.UUID, limit: int, wait: float) -> list[Claim]:
        try:
            deliveries = await self._broker.receive(self._queues, limit, wait)
        except BrokerError as exc:
            log.warning("receiving from %s failed: %s; retrying", self._broker.name, exc)
            await asyncio.sleep(min(wait, 1.0) if wait > 0 else 0.1)
            return []
        if not deliveries:
            return []
        good: dict[uuid.UUID, Delivery] = {}
        extra: list[Delivery] = []
        for d in deliveries:
            if d.job_id is None:
                log.error("dropping malformed message from %s queue %r: %s", self._broker.name, d.queue, d.error)
                extra.append(d)
            elif d.job_id in good:
                extra.append(d)  # the same job delivered twice in one batch
            else:
                good[d.job_id] = d
        jobs: list[ClaimedJob] = []
        if good:
            async with self._conn.use() as conn:
                jobs = await job_claim_by_ids(conn, worker_id, list(good), self._queues)
        claimed = {j.id for j in jobs}
        extra += [d for job_id, d in good.items() if job_id not in claimed]
        for d in extra:  # stale, duplicate or malformed: the record in Postgres says there is nothing to run
            self._ack_later(d)
        return [Claim(j, good[j.id]) for j in jobs]

    def _ack_later(self, delivery: Delivery) -> None:
        self._acks.append(delivery)
        self._ack_wakeup.set()
        if self._ack_task is None:
            self._ack_task = asyncio.create_task(self._ack_loop(), name="polyqueue-acks")

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wakeup.wait()
            self._ack_wakeup.clear()
            await self._send_acks()
            if self._ack_closing:
                return

    async def _send_acks(self) -> None:
        batch, self._acks = self._acks, []
        if not batch:
            return
        try:
            await self._broker.ack_many(batch)
        except BrokerError as exc:  # the broker redelivers them later; the claim then drops them
            log.warning("acking %d deliveries failed: %s", len(batch), exc)

    async def done(self, claim: Claim) -> None:
        """The attempt is over in Postgres (finished, retried or handed back): drop the delivery.

        A job that goes back to ``pending`` (retry, shutdown hand-back) is published anew by
        the relay when it is due; releasing the old delivery as well would deliver it twice.
        """
        if claim.delivery is not None:
            self._ack_later(claim.delivery)

    @contextlib.asynccontextmanager
    async def keepalive(self, claim: Claim) -> AsyncIterator[None]:
        """Extend the delivery's lease every third of it while the job runs."""
        if claim.delivery is None or not self._broker.capabilities.lease:
            yield
            return
        delivery = claim.delivery

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease / 3)
                try:
                    await self.extend(claim)
                except LeaseLostError:
                    log.warning("lease of job %s lost; Postgres ownership still guards its completion", delivery.job_id)
                    return
                except BrokerError as exc:
                    log.warning("lease extension of job %s failed: %s", delivery.job_id, exc)

        task = asyncio.create_task(renew(), name=f"polyqueue-lease-{delivery.job_id}")
        try:
            yield
        finally:
            task.cancel()
            # Bounded: a broker SDK call that ignores cancellation (a lock renewal on a dead
            # link) kept a finished job from completing for minutes in a chaos run.
            await bounded(f"stopping the lease extension of job {delivery.job_id}", task, log, KEEPALIVE_STOP_WAIT)

    async def extend(self, claim: Claim) -> None:
        """Extend the claim's lease by ``lease_seconds`` now (the keepalive loop, a handler's
        heartbeat); ``LeaseLostError`` or ``BrokerError`` as the broker raises them."""
        if claim.delivery is not None:
            await self._broker.extend(claim.delivery, self._lease)

    async def due_undelivered(self) -> bool:
        """Whether Postgres holds due jobs of these queues that the relay has still to publish,
        or whose deliveries are on the way; True when that cannot be checked now."""
        try:
            async with self._conn.use() as conn:
                return await job_any_due(conn, self._queues)
        except Exception as exc:
            log.warning("checking for due jobs failed: %s; retrying", exc)
            return True

    async def close(self) -> None:
        """Send the acks still due, then let go. A batch of acks in flight is let finish, not
        cancelled: cut off, its deliveries would come back after their lease for nothing."""
        if self._ack_task is not None:
            self._ack_closing = True
            self._ack_wakeup.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ack_task  # the caller bounds close()
            self._ack_task = None
        await self._send_acks()
        await self._conn.close()
