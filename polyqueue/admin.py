"""Operator actions on jobs: requeue, fail, cancel, prune.

Each function is one transaction and returns what it changed; with ``dry_run=True`` the
transaction is rolled back and the return value says what it would have changed. Jobs are chosen by ids
and/or filters (status, task, queue); a call that names none of them would touch every
job and is refused unless ``all=True`` is passed. Every value is a bound parameter; the
SQL is assembled only from constant fragments.

A running job that is failed or cancelled is changed in Postgres first, then its worker
is told on ``CANCEL_CHANNEL`` (delivered on commit) and stops the handler without
writing anything: the ownership guard (``status = 'running'``) already refuses its
late outcome.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue.queries.operator import job_delete_finished, job_requeue, job_stop, notify
from polyqueue.types import (
    CANCEL_CHANNEL,
    DONE_CHANNEL,
    LIVE_STATUSES,
    NEW_JOB_CHANNEL,
    NOTIFY_IDS_PER_PAYLOAD,
    TERMINAL_STATUSES,
    JobStatus,
)

__all__ = ["JobChange", "cancel", "fail", "prune", "requeue"]


_LIVE = tuple(s.value for s in LIVE_STATUSES)
_TERMINAL = tuple(s.value for s in TERMINAL_STATUSES)
_REQUEUEABLE = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)


@dataclass(frozen=True, slots=True)
class JobChange:
    """One job an admin action changed: its id, task, queue, and status before and after."""

    id: uuid.UUID
    task: str
    queue: str
    old_status: str
    new_status: str


def _ids(ids: Sequence[uuid.UUID | str] | None) -> list[uuid.UUID] | None:
    if ids is None:
        return None
    return [i if isinstance(i, uuid.UUID) else uuid.UUID(str(i)) for i in ids]


def _statuses(status: str | Sequence[str] | None, allowed: tuple[str, ...], action: str) -> list[str]:
    if status is None:
        return list(allowed)
    wanted = [status] if isinstance(status, str) else list(status)
    wrong = [s for s in wanted if s not in allowed]
    if wrong:
        raise ValueError(f"{action} applies to jobs that are {' or '.join(allowed)}, not {', '.join(wrong)}")
    return wanted


def _refuse_unfiltered(
    action: str,
    ids: Sequence[uuid.UUID | str] | None,
    status: str | Sequence[str] | None,
    task: str | None,
    queue: str | None,
    everything: bool,
) -> None:
    """Refuse a call that names no job and no filter unless ``all=True`` says it means every job."""
    if ids is None and status is None and task is None and queue is None and not everything:
        raise ValueError(f"{action} with no ids and no filter would touch every job; pass all=True to mean that")


async def _notify(conn: AsyncConnection, channel: str, values: Sequence[str]) -> None:
    for start in range(0, len(values), NOTIFY_IDS_PER_PAYLOAD):
        await notify(conn, channel, ",".join(values[start : start + NOTIFY_IDS_PER_PAYLOAD]))


@contextlib.asynccontextmanager
async def _transaction(engine: AsyncEngine, dry_run: bool) -> AsyncIterator[AsyncConnection]:
    """One transaction: committed, or rolled back with ``dry_run`` (nothing changes, nothing is notified)."""
    async with engine.connect() as conn:
        transaction = await conn.begin()
        try:
            yield conn
        except BaseException:
            await transaction.rollback()
            raise
        if dry_run:
            await transaction.rollback()
        else:
            await transaction.commit()


def _changes(rows: Sequence[Any]) -> list[JobChange]:
    return [JobChange(id=r[0], task=r[1], queue=r[2], old_status=r[3], new_status=r[4]) for r in rows]


async def requeue(
    engine: AsyncEngine,
    ids: Sequence[uuid.UUID | str] | None = None,
    *,
    status: str | Sequence[str] | None = None,
    task: str | None = None,
    queue: str | None = None,
    reset_attempts: bool = False,
    all: bool = False,  # the explicit "yes, every job" switch
    dry_run: bool = False,
) -> list[JobChange]:
    """Put ``failed``/``cancelled`` jobs back to ``pending``, due now; returns the jobs requeued.

    Their errors are kept. With ``reset_attempts`` the attempt count starts again at 0
    (a full ``max_attempts`` budget); otherwise the job gets one more attempt. A job
    whose ``unique_key`` is held by a live job meanwhile is skipped.
    """
    _refuse_unfiltered("requeue", ids, status, task, queue, all)
    statuses, wanted = _statuses(status, _REQUEUEABLE, "requeue"), _ids(ids)
    async with _transaction(engine, dry_run) as conn:
        rows = await job_requeue(
            conn, statuses=statuses, ids=wanted, task=task, queue=queue, reset_attempts=reset_attempts
        )
        changed = _changes(rows)
        await _notify(conn, NEW_JOB_CHANNEL, sorted({c.queue for c in changed}))
    return changed


async def _stop(
    engine: AsyncEngine,
    action: str,
    new_status: JobStatus,
    error_type: str,
    message: str,
    ids: Sequence[uuid.UUID | str] | None,
    status: str | Sequence[str] | None,
    task: str | None,
    queue: str | None,
    everything: bool,
    dry_run: bool,
) -> list[JobChange]:
    """Move live jobs to a terminal status with an error entry, telling running jobs' workers."""
    _refuse_unfiltered(action, ids, status, task, queue, everything)
    statuses, wanted = _statuses(status, _LIVE, action), _ids(ids)
    async with _transaction(engine, dry_run) as conn:
        rows = await job_stop(
            conn,
            statuses=statuses,
            ids=wanted,
            task=task,
            queue=queue,
            new_status=new_status,
            error_type=error_type,
            message=message,
        )
        changed = _changes(rows)
        running = [str(c.id) for c in changed if c.old_status == JobStatus.RUNNING]
        await _notify(conn, CANCEL_CHANNEL, running)
        await _notify(conn, DONE_CHANNEL, [str(c.id) for c in changed])
    return changed


async def fail(
    engine: AsyncEngine,
    ids: Sequence[uuid.UUID | str] | None = None,
    *,
    reason: str = "failed by an operator",
    status: str | Sequence[str] | None = None,
    task: str | None = None,
    queue: str | None = None,
    all: bool = False,  # the explicit "yes, every job" switch
    dry_run: bool = False,
) -> list[JobChange]:
    """Fail live jobs now (no retry), recording ``{"type": "FailedByOperator", "message": reason}``.

    A running job is failed in Postgres and its worker is told to stop the handler.
    """
    return await _stop(
        engine, "fail", JobStatus.FAILED, "FailedByOperator", reason, ids, status, task, queue, all, dry_run
    )


async def cancel(
    engine: AsyncEngine,
    ids: Sequence[uuid.UUID | str] | None = None,
    *,
    reason: str = "cancelled by an operator",
    status: str | Sequence[str] | None = None,
    task: str | None = None,
    queue: str | None = None,
    all: bool = False,  # the explicit "yes, every job" switch
    dry_run: bool = False,
) -> list[JobChange]:
    """Cancel live jobs, recording ``{"type": "Cancelled", "message": reason}``.

    A pending or enqueued job never runs (a stale broker delivery is dropped by the
    claim); a running one is cancelled in Postgres and its worker stops the handler,
    whose writes through ``ctx.session`` are rolled back.
    """
    return await _stop(
        engine, "cancel", JobStatus.CANCELLED, "Cancelled", reason, ids, status, task, queue, all, dry_run
    )


async def prune(
    engine: AsyncEngine,
    older_than_seconds: float,
    *,
    status: str | Sequence[str] | None = None,
    task: str | None = None,
    queue: str | None = None,
    dry_run: bool = False,
) -> int:
    """Delete finished jobs (succeeded, failed, cancelled) that finished more than
    ``older_than_seconds`` ago; returns how many were deleted. Live jobs are never pruned."""
    if older_than_seconds < 0:
        raise ValueError("older_than_seconds must be >= 0")
    statuses = _statuses(status, _TERMINAL, "prune")
    async with _transaction(engine, dry_run) as conn:
        deleted = await job_delete_finished(
            conn, statuses=statuses, older_than=older_than_seconds, task=task, queue=queue
        )
    return deleted
