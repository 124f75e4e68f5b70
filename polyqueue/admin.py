"""Operator actions on jobs: requeue, fail, cancel, prune.

Each function is one transaction and returns what it changed; with ``dry_run=True`` the
transaction is rolled back and the return value says what it would have changed. Jobs are chosen by ids
and/or filters (status, task, queue); a call that names none of them would touch every
job and is refused unless ``all=True`` is passed. Every value is a bound parameter; the
SQL is assembled only from constant fragments.

A running job that is failed or cancelled is changed in Postgres first, then its worker
is told on ``polyqueue_cancel`` (delivered on commit) and stops the handler without
writing anything: the ownership guard (``status = 'running'``) already refuses its
late outcome.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue.queries import CANCEL_CHANNEL, DONE_CHANNEL, NEW_JOB_CHANNEL, NOTIFY_IDS_PER_PAYLOAD
from polyqueue.types import LIVE_STATUSES, JobStatus

__all__ = ["JobChange", "cancel", "fail", "prune", "requeue"]


_LIVE = tuple(s.value for s in LIVE_STATUSES)
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


def _where(
    action: str,
    ids: Sequence[uuid.UUID | str] | None,
    status: str | Sequence[str] | None,
    task: str | None,
    queue: str | None,
    allowed: tuple[str, ...],
    everything: bool,
) -> tuple[str, dict[str, Any]]:
    """A WHERE clause from constant fragments, and its bound values."""
    if ids is None and status is None and task is None and queue is None and not everything:
        raise ValueError(f"{action} with no ids and no filter would touch every job; pass all=True to mean that")
    params: dict[str, Any] = {"statuses": _statuses(status, allowed, action)}
    clauses = ["j.status = ANY(CAST(:statuses AS text[]))"]
    if ids is not None:
        clauses.append("j.id = ANY(CAST(:ids AS uuid[]))")
        params["ids"] = _ids(ids)
    if task is not None:
        clauses.append("j.task = :task")
        params["task"] = task
    if queue is not None:
        clauses.append("j.queue = :queue")
        params["queue"] = queue
    return " AND ".join(clauses), params


async def _notify(conn: AsyncConnection, channel: str, values: Sequence[str]) -> None:
    for start in range(0, len(values), NOTIFY_IDS_PER_PAYLOAD):
        chunk = ",".join(values[start : start + NOTIFY_IDS_PER_PAYLOAD])
        await conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": chunk})


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
    where, params = _where("requeue", ids, status, task, queue, _REQUEUEABLE, all)
    params["reset"] = reset_attempts
    params["live"] = list(_LIVE)
    sql = text(  # constant fragments joined, values bound
        f"""
        WITH c AS (
            SELECT j.id, j.status FROM polyqueue_jobs j
            WHERE {where} AND (j.unique_key IS NULL OR NOT EXISTS (
                SELECT 1 FROM polyqueue_jobs l
                WHERE l.unique_key = j.unique_key AND l.status = ANY(CAST(:live AS text[]))))
            FOR UPDATE OF j
        )
        UPDATE polyqueue_jobs j SET
            status = 'pending', run_at = now(), finished_at = NULL, started_at = NULL, dispatched_at = NULL,
            worker_id = NULL, timeout_at = NULL, progress_heartbeat_at = NULL,
            attempt = CASE WHEN CAST(:reset AS boolean) THEN 0 ELSE j.attempt END
        FROM c WHERE j.id = c.id AND j.status = c.status
        RETURNING j.id, j.task, j.queue, c.status, j.status
        """  # noqa: S608
    )
    async with _transaction(engine, dry_run) as conn:
        changed = _changes((await conn.execute(sql, params)).all())
        await _notify(conn, NEW_JOB_CHANNEL, sorted({c.queue for c in changed}))
    return changed


async def _stop(
    engine: AsyncEngine,
    action: str,
    new_status: str,
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
    where, params = _where(action, ids, status, task, queue, _LIVE, everything)
    params.update({"new_status": new_status, "error_type": error_type, "message": message})
    sql = text(  # constant fragments joined, values bound
        f"""
        WITH c AS (
            SELECT j.id, j.status FROM polyqueue_jobs j WHERE {where} FOR UPDATE OF j
        )
        UPDATE polyqueue_jobs j SET
            status = CAST(:new_status AS text), finished_at = now(), timeout_at = NULL,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', now(), 'type', CAST(:error_type AS text),
                'message', CAST(:message AS text), 'traceback', NULL))
        FROM c WHERE j.id = c.id AND j.status = c.status
        RETURNING j.id, j.task, j.queue, c.status, j.status
        """  # noqa: S608
    )
    async with _transaction(engine, dry_run) as conn:
        changed = _changes((await conn.execute(sql, params)).all())
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
    terminal = (JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value)
    params: dict[str, Any] = {"statuses": _statuses(status, terminal, "prune"), "age": older_than_seconds}
    clauses = [
        "finished_at IS NOT NULL",
        "finished_at < now() - :age * interval '1 second'",
        "status = ANY(CAST(:statuses AS text[]))",
    ]
    if task is not None:
        clauses.append("task = :task")
        params["task"] = task
    if queue is not None:
        clauses.append("queue = :queue")
        params["queue"] = queue
    sql = text(f"DELETE FROM polyqueue_jobs WHERE {' AND '.join(clauses)}")  # noqa: S608  # constants joined
    async with _transaction(engine, dry_run) as conn:
        result = await conn.execute(sql, params)
    return int(result.rowcount)
