"""The worker: slots, the fetch loop, heartbeats, shutdown.

Flow per job: source.fetch (claim) → executor (run) → completer (persist: batched, or in
the handler's own transaction when it used ``ctx.session``) → source.done (ack).

The worker sees only its job source; what feeds the source (a broker and the relay, or the
table itself), the LISTEN connection and the maintenance service are built and run beside it
by :mod:`polyqueue.runner`, the one place that wires a process together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._aio import bounded, wait_any, wait_any_future
from polyqueue._service import Service, steady
from polyqueue.context import JobContext
from polyqueue.db import while_unreachable
from polyqueue.listener import Listener
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import (
    CANCEL_CHANNEL,
    ClaimedJob,
    Outcome,
    job_hand_back,
    job_hand_back_unknown,
    job_held,
    job_progress,
    job_stopped_by_operator,
    worker_heartbeat,
    worker_register,
    worker_stop,
)
from polyqueue.registry import Polyqueue
from polyqueue.types import JobStatus
from polyqueue.worker.completer import Completer
from polyqueue.worker.executor import execute, retry_or_fail
from polyqueue.worker.sources import Claim, JobSource
from polyqueue.worker.watchdog import LoopWatchdog

__all__ = ["Worker"]

log = logging.getLogger("polyqueue.worker")

#: How often a burst worker with a broker looks again while due jobs are still to be delivered.
BURST_RECHECK = 0.05
#: Longest wait between hand-backs of a job whose task this worker does not know (0.5 s doubling).
UNKNOWN_TASK_MAX_DELAY = 60.0
job_log = logging.getLogger("polyqueue.job")


def worker_label() -> str:
    """How errors and logs name a worker: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _outcome_name(outcome: Outcome) -> str:
    if outcome.error_type == "TimeLimitExceeded":
        return "timed_out"
    return "retried" if outcome.status == JobStatus.PENDING else outcome.status


class Heartbeat(Service[None]):
    """The worker's heartbeat, every ``interval`` seconds, failures retried at the same pace
    (a worker that beats less often than that risks being declared dead)."""

    name = "heartbeat"
    rest_first = True  # registering was the first beat

    def __init__(self, beat: Callable[[], Awaitable[None]], interval: float) -> None:
        super().__init__(interval=interval, backoff=steady(interval), log=log)
        self._beat = beat

    async def run_once(self) -> None:
        await self._beat()


class Worker:
    """Runs the app's handlers for jobs of ``queues`` from ``source``, ``concurrency`` at a time.

    ``listener`` is the process's LISTEN connection (started and closed by whoever built it):
    the worker subscribes to cancel requests on it. ``backend`` names what feeds the source
    (``"direct"`` when there is no broker), for the worker registry and the logs.
    """

    def __init__(
        self,
        app: Polyqueue,
        engine: AsyncEngine,
        source: JobSource,
        listener: Listener,
        *,
        queues: Sequence[str],
        concurrency: int,
        backend: str,
        metrics: GuardedMetrics,
    ) -> None:
        s = app.settings
        self.app = app
        self.engine = engine
        self.source = source
        self.listener = listener
        self.queues = list(queues)
        self.concurrency = concurrency
        self.backend = backend
        self.settings = s
        self.worker_id = uuid.uuid4()
        self.label = worker_label()
        self.metrics = metrics
        self.listener.subscribe(CANCEL_CHANNEL, self._on_cancel)
        self._cancel_requested: set[uuid.UUID] = set()
        self._checks: set[asyncio.Task[None]] = set()  # cancel NOTIFYs being confirmed against their rows
        self._finishing: set[uuid.UUID] = set()  # jobs whose handler returned: their outcome is being written
        self.completer = Completer(
            engine,
            flush_interval=s.completion_flush_interval,
            batch_size=s.completion_batch_size,
            transaction_pooling=s.pool_mode == "transaction",
        )
        self._running: dict[asyncio.Task[None], Claim] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self.processed = 0
        self.heartbeat = Heartbeat(self._beat, s.heartbeat_interval)
        #: Set once the worker is registered and claiming (tests await it).
        self.started = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop: no new claims; running jobs get ``shutdown_grace`` seconds."""
        self._stopping.set()

    @property
    def running(self) -> int:
        """How many jobs this worker runs now."""
        return len(self._running)

    async def run(self, *, burst: bool = False) -> None:
        """Run until :meth:`stop`; with ``burst``, also once no job is due and none is running."""
        await while_unreachable(self._register, wait=self.settings.startup_wait, what="registering the worker")
        self.completer.start()
        self._background.append(asyncio.create_task(self.heartbeat.run(self._stopping), name="polyqueue-heartbeat"))
        watchdog = LoopWatchdog(self.settings.blocked_loop_threshold, self._on_loop_blocked)
        self._background.append(asyncio.create_task(watchdog.run(), name="polyqueue-watchdog"))
        log.info(
            "worker %s started: queues=%s concurrency=%d broker=%s",
            self.worker_id,
            ",".join(self.queues),
            self.concurrency,
            self.backend,
        )
        self.started.set()
        try:
            await self._fetch_loop(burst)
        finally:
            await self._shutdown()

    async def _register(self) -> None:
        async with self.engine.begin() as conn:
            await worker_register(
                conn,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
                broker=self.backend,
                concurrency=self.concurrency,
            )

    async def _beat(self) -> None:
        """One heartbeat: prove we are alive, then reconcile what runs here with Postgres."""
        async with self.engine.begin() as conn:
            alive = await worker_heartbeat(conn, self.worker_id)
        if not alive:
            # Declared dead (we were frozen or cut off): our jobs were rescued. Their late
            # outcomes will be refused by the ownership guard; come back as a new worker.
            old, self.worker_id = self.worker_id, uuid.uuid4()
            log.error("worker %s was declared dead by maintenance; re-registering as %s", old, self.worker_id)
            await self._register()
        else:
            await self._reconcile()

    async def _reconcile(self) -> None:
        """Make what runs here agree with Postgres.

        Hand back jobs Postgres says we run but we do not know of: a claim whose reply was lost
        (connection cut after the UPDATE committed) leaves such a job, which would otherwise stay
        'running' for as long as we live. And stop handlers of jobs an operator cancelled or
        failed meanwhile, whose cancel NOTIFY we missed (the listener was reconnecting).
        """
        async with self.engine.begin() as conn:
            held = await job_held(conn, self.worker_id, older_than=2 * self.settings.heartbeat_interval)
            known = {c.job.id for c in self._running.values()} | self.completer.pending_ids()
            orphans = [job_id for job_id in held if job_id not in known]
            if orphans:
                count = await job_hand_back(conn, self.worker_id, orphans)
                log.warning("handed back %d jobs claimed by this worker whose claim reply was lost", count)
        await self._cancel_confirmed(set(known))

    def _on_loop_blocked(self, seconds: float, culprit: str | None) -> None:
        self.metrics.loop_blocked(seconds)

    # -- the fetch loop --------------------------------------------------------------------------
    async def _free_slots(self, low_water: int) -> int:
        """Free slots once there are any; while busy, linger up to 5 ms so claims come in batches."""
        lingered = False
        while not self._stopping.is_set():
            free = self.concurrency - len(self._running)
            if free >= low_water or (free > 0 and (lingered or not self._running)):
                return free
            self._slot_freed.clear()
            lingered = free > 0
            await wait_any(self._slot_freed, self._stopping, seconds=0.005 if free > 0 else None)
        return 0

    async def _fetch_loop(self, burst: bool) -> None:
        low_water = max(1, self.concurrency // 4)
        while not self._stopping.is_set():
            free = await self._free_slots(low_water)
            if free <= 0:
                continue
            wait = 0.0 if (burst or self._running) else self.settings.poll_interval
            try:
                claims = await self._fetch_unless_stopped(free, wait)
            except Exception as exc:
                log.warning("claiming jobs failed: %s; retrying", exc)
                await wait_any(self._stopping, seconds=1.0)
                continue
            for claim in claims:
                task = asyncio.create_task(self._run_one(claim), name=f"polyqueue-job-{claim.job.id}")
                self._running[task] = claim
                task.add_done_callback(self._job_finished)
            if not claims:
                if burst and not self._running:
                    if not await self.source.due_undelivered():
                        return
                    await wait_any(self._stopping, seconds=BURST_RECHECK)
                    continue
                if self._running:
                    # Nothing due now: wait for a running job to finish, or poll again.
                    self._slot_freed.clear()
                    await wait_any(self._slot_freed, self._stopping, seconds=self.settings.poll_interval)

    def _on_cancel(self, payload: str) -> None:
        """A NOTIFY says running jobs were cancelled (``admin cancel``/``fail``). Anyone who can
        connect can send one, so it only makes us look: the handlers stop once their rows confirm."""
        named = {p.strip() for p in payload.split(",")}
        ids = {c.job.id for c in self._running.values() if str(c.job.id) in named}
        if ids:
            check = asyncio.create_task(self._cancel_confirmed(ids), name="polyqueue-cancel-check")
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _cancel_confirmed(self, ids: set[uuid.UUID]) -> None:
        """Cancel the handlers of ``ids`` whose attempt Postgres says an operator stopped."""
        claims = {c.job.id: c for c in self._running.values() if c.job.id in ids}
        if not claims:
            return
        try:
            async with self.engine.connect() as conn:
                attempts = [(c.job.id, c.job.attempt, c.job.worker_id) for c in claims.values()]
                stopped = await job_stopped_by_operator(conn, attempts)
        except Exception as exc:  # the heartbeat's reconcile looks again
            log.warning("checking %d cancelled jobs failed: %s", len(claims), exc)
            return
        for task, claim in list(self._running.items()):
            # A job whose outcome exists already was stopped by us (its failure is being written),
            # not by an operator: its task only waits for the write.
            if claim.job.id in stopped and claims.get(claim.job.id) is claim and claim.job.id not in self._finishing:
                log.info("job %s was stopped by an operator; cancelling its handler", claim.job.id)
                self._cancel_requested.add(claim.job.id)
                task.cancel()

    async def _fetch_unless_stopped(self, free: int, wait: float) -> list[Claim]:
        """``source.fetch``, abandoned when a stop is requested (a broker SDK can block on a dead link).

        Jobs an abandoned fetch had already claimed stay 'running' under this worker, which is
        then marked stopped, so maintenance rescues them; their deliveries are redelivered.
        """
        fetch = asyncio.ensure_future(self.source.fetch(self.worker_id, free, wait))
        if not await wait_any_future(fetch, self._stopping):
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await fetch
            return []
        return fetch.result()

    def _job_finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._slot_freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", exc_info=task.exception())

    # -- one job ---------------------------------------------------------------------------------
    async def _run_one(self, claim: Claim) -> None:
        job = claim.job
        spec = self.app.tasks.get(job.task)
        if spec is None:
            await self._hand_back_unknown(claim)
            return

        async def heartbeat() -> None:
            async with self.engine.begin() as conn:
                await job_progress(conn, job.worker_id, job.id, job.attempt)
            await self.source.extend(claim)  # the broker lease, where the job came with one

        with self.metrics.job_span(job.task, job.queue, str(job.id), job.attempt, job.meta):
            ctx: JobContext | None = None
            self.metrics.job_started(job.task, job.queue, max(0.0, (job.started_at - job.run_at).total_seconds()))
            began = time.perf_counter()
            try:
                try:
                    async with self.source.keepalive(claim):
                        outcome, ctx = await execute(job, spec, engine=self.engine, heartbeat=heartbeat)
                except asyncio.CancelledError:
                    if job.id not in self._cancel_requested:
                        raise  # shutdown: the runtime hands the job back
                    self._cancel_requested.discard(job.id)
                    self._report(job, JobStatus.CANCELLED, time.perf_counter() - began, None)
                    await self.source.done(claim)  # Postgres already says cancelled
                    return
                self._finishing.add(job.id)
                self._report(job, _outcome_name(outcome), time.perf_counter() - began, outcome.error_type)
                acked = partial(self._ack, claim)
                if ctx is not None and ctx.session_used:
                    retry = partial(retry_or_fail, job, spec)
                    await self.completer.complete_in_session(ctx.session, outcome, acked, retry)
                else:
                    self.completer.add(outcome, acked)
                    await self.completer.wait_for_room()  # backpressure: keep the slot while writes lag
                self.processed += 1
            finally:
                self._finishing.discard(job.id)
                self._cancel_requested.discard(job.id)
                if ctx is not None and ctx.session_used:
                    await asyncio.shield(ctx.session.close())

    def _report(self, job: ClaimedJob, outcome: str, seconds: float, error_type: str | None) -> None:
        """One structured log record and one metrics event per finished attempt."""
        self.metrics.job_finished(job.task, job.queue, outcome, seconds)
        level = logging.INFO if outcome in (JobStatus.SUCCEEDED, JobStatus.CANCELLED) else logging.WARNING
        if job_log.isEnabledFor(level):
            job_log.log(
                level,
                "job %s %s attempt %d %s in %.1f ms%s",
                job.id,
                job.task,
                job.attempt,
                outcome,
                seconds * 1000,
                f" ({error_type})" if error_type else "",
                extra={
                    "job_id": str(job.id),
                    "task": job.task,
                    "queue": job.queue,
                    "attempt": job.attempt,
                    "outcome": outcome,
                    "duration_ms": round(seconds * 1000, 3),
                    "error_type": error_type,
                },
            )

    async def _ack(self, claim: Claim, _outcome: Outcome, _written: bool) -> None:
        await self.source.done(claim)

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self._stopping.set()
        if self._running:
            log.info("waiting up to %.1fs for %d running jobs", self.settings.shutdown_grace, len(self._running))
            _, pending = await asyncio.wait(list(self._running), timeout=self.settings.shutdown_grace)
            if pending:
                claims = [self._running[t] for t in pending if t in self._running]
                for t in pending:
                    t.cancel()
                await bounded(
                    "shutdown: cancelling unfinished jobs", asyncio.gather(*pending, return_exceptions=True), log
                )
                await self._hand_back(claims)
        await self.completer.close()
        for t in [*self._background, *self._checks]:
            t.cancel()
        stopping = asyncio.gather(*self._background, *self._checks, return_exceptions=True)
        await bounded("shutdown: stopping background loops", stopping, log)
        self._background.clear()
        try:
            async with self.engine.begin() as conn:
                await worker_stop(conn, self.worker_id)
        except Exception as exc:
            log.warning("could not mark worker %s stopped: %s", self.worker_id, exc)
        await bounded("shutdown: closing the job source", self.source.close(), log)
        self.listener.unsubscribe(CANCEL_CHANNEL, self._on_cancel)
        log.info("worker %s stopped after %d jobs", self.worker_id, self.processed)

    async def _hand_back_unknown(self, claim: Claim) -> None:
        """This worker has no handler for the job's task: during a rolling deploy a newer worker
        may have it. Hand the job back without counting the attempt; it fails only once
        ``unknown_task_grace`` passed since the first worker lacked it."""
        job = claim.job
        try:
            async with self.engine.begin() as conn:
                status = await job_hand_back_unknown(
                    conn,
                    job_id=job.id,
                    worker_id=job.worker_id,
                    attempt=job.attempt,
                    worker_label=self.label,
                    grace=self.settings.unknown_task_grace,
                    max_delay=UNKNOWN_TASK_MAX_DELAY,
                )
        except Exception as exc:  # the job stays running under us; reconcile or maintenance hands it back
            log.error("handing back job %s of unknown task %r failed: %s", job.id, job.task, exc)
            return
        if status == JobStatus.FAILED:
            log.error(
                "job %s failed: no worker that claimed it has a handler for task %r within unknown_task_grace "
                "(%.0f s); this worker knows %s",
                job.id,
                job.task,
                self.settings.unknown_task_grace,
                sorted(self.app.tasks),
            )
        elif status is not None:
            log.warning(
                "job %s: no handler for task %r in this worker (it knows %s); handed back for a worker that "
                "has it (a rolling deploy?), attempt not counted",
                job.id,
                job.task,
                sorted(self.app.tasks),
            )
        await self.source.done(claim)

    async def _hand_back(self, claims: list[Claim]) -> None:
        by_worker: dict[uuid.UUID, list[uuid.UUID]] = {}
        for c in claims:
            by_worker.setdefault(c.job.worker_id, []).append(c.job.id)
        try:
            async with self.engine.begin() as conn:
                count = sum([await job_hand_back(conn, w, ids) for w, ids in by_worker.items()])
            log.warning("handed back %d unfinished jobs (pending again, attempt not counted)", count)
        except Exception as exc:
            log.error("handing back %d jobs failed (%s); maintenance will rescue them", len(claims), exc)
        for c in claims:
            await self.source.done(c)
