"""The worker process: slots, the fetch loop, heartbeats, shutdown.

Flow per job: source.fetch (claim) → executor (run) → completer (persist, batched)
or, when the handler used ``ctx.session``, completion in the handler's own
transaction → source.done (ack).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._aio import wait_any, wait_any_future
from polyqueue.brokers.base import Broker
from polyqueue.context import JobContext
from polyqueue.db import while_unreachable
from polyqueue.listener import Listener
from polyqueue.maintenance.service import Maintenance
from polyqueue.metrics import GuardedMetrics
from polyqueue.queries import (
    CANCEL_CHANNEL,
    ClaimedJob,
    Outcome,
    job_any_due,
    job_complete_many,
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
from polyqueue.relay import Relay, ensure_queues
from polyqueue.settings import secret_value
from polyqueue.worker.completer import Completer
from polyqueue.worker.executor import execute, hide_sql_parameters, retry_or_fail
from polyqueue.worker.sources import BrokerSource, Claim, DirectSource, JobSource
from polyqueue.worker.watchdog import LoopWatchdog

__all__ = ["Worker"]

log = logging.getLogger("polyqueue.worker")

#: How often a burst worker with a broker looks again while due jobs are still to be delivered.
BURST_RECHECK = 0.05
#: Longest wait between hand-backs of a job whose task this worker does not know (0.5 s doubling).
UNKNOWN_TASK_MAX_DELAY = 60.0
job_log = logging.getLogger("polyqueue.job")


async def _bounded(what: str, awaitable: Awaitable[object], seconds: float = 10.0) -> None:
    """Await a shutdown step for at most ``seconds``: a broker SDK stuck on a dead link (or a
    handler that swallows cancellation) must not keep a stopping worker alive. Nothing is lost
    by moving on: Postgres holds every job, and the worker is marked stopped regardless."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
        log.error("shutdown: %s did not finish within %.0f s; going on without it", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("shutdown: %s failed: %s", what, task.exception())


def _outcome_name(outcome: Outcome) -> str:
    if outcome.error_type == "TimeLimitExceeded":
        return "timed_out"
    return "retried" if outcome.status == "pending" else outcome.status


class Worker:
    """Runs the app's handlers for jobs of ``queues``, ``concurrency`` at a time.

    ``broker=None`` means direct Postgres mode. With a broker, ``run_relay`` (on by
    default) also forwards committed jobs to it from this process.
    """

    def __init__(
        self,
        app: Polyqueue,
        engine: AsyncEngine,
        *,
        broker: Broker | None = None,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        run_relay: bool = True,
        run_maintenance: bool = True,
        metrics: object | None = None,
    ) -> None:
        s = app.settings
        self.app = app
        self.engine = engine
        self.broker = broker
        self.queues = list(queues or s.queues)
        self.concurrency = concurrency or s.concurrency
        self.settings = s
        self.worker_id = uuid.uuid4()
        self.label = f"{socket.gethostname()}:{os.getpid()}"  # how errors and logs name this worker
        self.metrics = GuardedMetrics(metrics) if metrics is not None else app.metrics
        pooled = s.pool_mode == "transaction"
        self.listener = Listener(engine, direct_url=secret_value(s.listen_database_url), transaction_pooling=pooled)
        self.listener.subscribe(CANCEL_CHANNEL, self._on_cancel)
        self._cancel_requested: set[uuid.UUID] = set()
        self._checks: set[asyncio.Task[None]] = set()  # cancel NOTIFYs being confirmed against their rows
        self._finishing: set[uuid.UUID] = set()  # jobs whose handler returned: their outcome is being written
        self.source: JobSource = (
            DirectSource(engine, self.listener, self.queues, s.poll_interval, transaction_pooling=pooled)
            if broker is None
            else BrokerSource(engine, broker, self.queues, s.lease_seconds, transaction_pooling=pooled)
        )
        self.completer = Completer(
            engine,
            flush_interval=s.completion_flush_interval,
            batch_size=s.completion_batch_size,
            transaction_pooling=pooled,
        )
        self.relay = Relay(engine, broker, self.listener, s, self.metrics) if broker is not None and run_relay else None
        self.maintenance = Maintenance(engine, s, self.metrics, app) if run_maintenance else None
        self._running: dict[asyncio.Task[None], Claim] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._background: list[asyncio.Task[None]] = []
        self.processed = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the worker to stop: no new claims; running jobs get ``shutdown_grace`` seconds."""
        self._stopping.set()

    async def run(self, *, install_signal_handlers: bool = False, burst: bool = False) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT with ``install_signal_handlers``).

        With ``burst`` the worker stops by itself once no job is due and none is running.
        """
        loop = asyncio.get_running_loop()
        if install_signal_handlers:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        wait = self.settings.startup_wait
        await while_unreachable(self._register, wait=wait, what="registering the worker")
        await while_unreachable(self.listener.start, wait=wait, what="listening for notifications")
        self.completer.start()
        self._background.append(asyncio.create_task(self._heartbeat_loop(), name="polyqueue-heartbeat"))
        watchdog = LoopWatchdog(self.settings.blocked_loop_threshold, self._on_loop_blocked)
        self._background.append(asyncio.create_task(watchdog.run(), name="polyqueue-watchdog"))
        if self.broker is not None:
            ensuring = ensure_queues(self.broker, self.queues, self._stopping)
            self._background.append(asyncio.create_task(ensuring, name="polyqueue-ensure"))
        if self.relay is not None:
            self._background.append(asyncio.create_task(self.relay.run(self._stopping), name="polyqueue-relay"))
        if self.maintenance is not None:
            self._background.append(
                asyncio.create_task(self.maintenance.run(self._stopping), name="polyqueue-maintenance")
            )
        log.info(
            "worker %s started: queues=%s concurrency=%d broker=%s",
            self.worker_id,
            ",".join(self.queues),
            self.concurrency,
            self.broker.name if self.broker else "postgres",
        )
        try:
            await self._fetch_loop(burst)
        finally:
            await self._shutdown()
            if install_signal_handlers:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _register(self) -> None:
        async with self.engine.begin() as conn:
            await worker_register(
                conn,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                queues=self.queues,
                broker=self.broker.name if self.broker else "postgres",
                concurrency=self.concurrency,
            )

    async def _heartbeat_loop(self) -> None:
        while not self._stopping.is_set():
            if await wait_any(self._stopping, seconds=self.settings.heartbeat_interval):
                return
            try:
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
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)

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
                    if not await self._due_elsewhere():
                        return
                    await wait_any(self._stopping, seconds=BURST_RECHECK)
                    continue
                if self._running:
                    # Nothing due now: wait for a running job to finish, or poll again.
                    self._slot_freed.clear()
                    await wait_any(self._slot_freed, self._stopping, seconds=self.settings.poll_interval)

    async def _due_elsewhere(self) -> bool:
        """With a broker, whether jobs of these queues are due but not delivered yet (the relay has
        still to publish them, or their deliveries are on the way): a burst worker waits for them."""
        if self.broker is None:
            return False  # direct mode: the claim that found nothing looked at the table itself
        try:
            async with self.engine.connect() as conn:
                return await job_any_due(conn, self.queues)
        except Exception as exc:
            log.warning("checking for due jobs failed: %s; retrying", exc)
            return True

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
                    self._report(job, "cancelled", time.perf_counter() - began, None)
                    await self.source.done(claim)  # Postgres already says cancelled
                    return
                self._finishing.add(job.id)
                self._report(job, _outcome_name(outcome), time.perf_counter() - began, outcome.error_type)
                if ctx is not None and ctx.session_used:
                    await self._complete_in_session(ctx, outcome, claim)
                else:
                    self.completer.add(outcome, lambda _o, _ok: self.source.done(claim))
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
        level = logging.INFO if outcome in ("succeeded", "cancelled") else logging.WARNING
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

    async def _complete_in_session(self, ctx: JobContext, outcome: Outcome, claim: Claim) -> None:
        session = ctx.session
        if outcome.status == "succeeded":
            try:
                written = await job_complete_many(session, [outcome])
                if outcome.job_id in written:
                    await session.commit()
                    await self.source.done(claim)
                    return
                await session.rollback()
                log.warning(
                    "job %s: lost ownership before commit; the handler's writes were rolled back", outcome.job_id
                )
                await self.source.done(claim)
                return
            except Exception as exc:
                hide_sql_parameters(exc)  # the app's engine may not hide them; they hold the result
                with contextlib.suppress(Exception):
                    await session.rollback()
                log.error("job %s: committing the handler's transaction failed: %s", outcome.job_id, exc)
                spec = self.app.tasks[claim.job.task]
                outcome = retry_or_fail(claim.job, spec, type(exc).__name__, str(exc), None, None)
        else:
            with contextlib.suppress(Exception):
                await session.rollback()  # the handler failed: its writes go with it
        self.completer.add(outcome, lambda _o, _ok: self.source.done(claim))

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
                await _bounded("cancelling unfinished jobs", asyncio.gather(*pending, return_exceptions=True))
                await self._hand_back(claims)
        await self.completer.close()
        for t in [*self._background, *self._checks]:
            t.cancel()
        stopping = asyncio.gather(*self._background, *self._checks, return_exceptions=True)
        await _bounded("stopping background loops", stopping)
        self._background.clear()
        try:
            async with self.engine.begin() as conn:
                await worker_stop(conn, self.worker_id)
        except Exception as exc:
            log.warning("could not mark worker %s stopped: %s", self.worker_id, exc)
        await _bounded("closing the job source", self.source.close())
        await _bounded("closing the LISTEN connection", self.listener.close())
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
        if status == "failed":
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
