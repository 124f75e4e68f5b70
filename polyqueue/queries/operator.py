"""The operator's statements: the views of ``polyqueue inspect`` and the actions of ``polyqueue admin``.

Filters (ids, statuses, task, queue, age) are optional, so these statements are composed in
SQLAlchemy Core: each filter is a ``where`` clause with its value bound, never SQL text put
together from strings.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Double,
    Interval,
    Text,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal,
    literal_column,
    null,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, REAL, UUID
from sqlalchemy.sql.elements import KeyedColumnElement

from polyqueue.queries._base import JOBS, Conn
from polyqueue.types import LIVE_STATUSES, TERMINAL_STATUSES, JobStatus

__all__ = [
    "error_record_sql",
    "job_delete_finished",
    "job_detail",
    "job_list",
    "job_requeue",
    "job_stop",
    "jobs_count_finished",
    "jobs_oldest_due_wait",
    "jobs_table_rows_estimate",
    "jobs_throughput",
    "notify",
    "worker_list",
]

_SECOND = literal_column("interval '1 second'", Interval)


def _seconds(value: float) -> ColumnElement[Any]:
    """``value`` seconds as an SQL interval (bound: ``:value * interval '1 second'``)."""
    return bindparam(None, value, type_=Double) * _SECOND


def _any(column: KeyedColumnElement[Any], values: Sequence[Any], item_type: Any) -> ColumnElement[bool]:
    """``column = ANY(:values)``: one array parameter, however many values."""
    return column == any_(bindparam(None, list(values), type_=ARRAY(item_type)))


def _job_filters(
    j: Any,
    *,
    statuses: Sequence[str],
    ids: Sequence[uuid.UUID] | None = None,
    task: str | None = None,
    queue: str | None = None,
) -> list[ColumnElement[bool]]:
    clauses = [_any(j.c.status, [str(s) for s in statuses], Text)]
    if ids is not None:
        clauses.append(_any(j.c.id, ids, UUID(as_uuid=True)))
    if task is not None:
        clauses.append(j.c.task == task)
    if queue is not None:
        clauses.append(j.c.queue == queue)
    return clauses


def error_record_sql(attempt: ColumnElement[Any], kind: str, message: str) -> ColumnElement[Any]:
    """An entry of a job's ``errors`` built in SQL: the keys of ``polyqueue._redact.error_record``
    (``attempt``, ``at``, ``type``, ``message``, ``traceback``), timed by the database."""
    fields: list[tuple[str, ColumnElement[Any]]] = [
        ("attempt", attempt),
        ("at", func.now()),
        ("type", cast(literal(kind), Text)),
        ("message", cast(literal(message), Text)),
        ("traceback", null()),
    ]
    return func.jsonb_build_object(*[part for key, value in fields for part in (literal(key, Text), value)])


async def notify(conn: Conn, channel: str, payload: str) -> None:
    """``pg_notify(channel, payload)``: delivered when the caller's transaction commits."""
    await conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})


async def job_requeue(
    conn: Conn,
    *,
    statuses: Sequence[str],
    ids: Sequence[uuid.UUID] | None,
    task: str | None,
    queue: str | None,
    reset_attempts: bool,
) -> list[tuple[uuid.UUID, str, str, str, str]]:
    """Put the matching jobs back to ``pending``, due now, unless a live job holds their
    ``unique_key``; (id, task, queue, old status, new status) of each."""
    j = JOBS.alias("j")
    holder = JOBS.alias("l")
    key_free = or_(
        j.c.unique_key.is_(None),
        ~exists().where(
            holder.c.unique_key == j.c.unique_key, _any(holder.c.status, [s.value for s in LIVE_STATUSES], Text)
        ),
    )
    chosen = (
        select(j.c.id, j.c.status)
        .where(and_(*_job_filters(j, statuses=statuses, ids=ids, task=task, queue=queue), key_free))
        .with_for_update(of=j)
        .cte("c")
    )
    values: dict[str, Any] = {
        "status": JobStatus.PENDING.value,
        "run_at": func.now(),
        "finished_at": None,
        "started_at": None,
        "dispatched_at": None,
        "worker_id": None,
        "timeout_at": None,
        "progress_heartbeat_at": None,
    }
    if reset_attempts:
        values["attempt"] = 0
    stmt = (
        update(JOBS)
        .where(JOBS.c.id == chosen.c.id, JOBS.c.status == chosen.c.status)
        .values(**values)
        .returning(JOBS.c.id, JOBS.c.task, JOBS.c.queue, chosen.c.status, JOBS.c.status)
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in await conn.execute(stmt)]


async def job_stop(
    conn: Conn,
    *,
    statuses: Sequence[str],
    ids: Sequence[uuid.UUID] | None,
    task: str | None,
    queue: str | None,
    new_status: JobStatus,
    error_type: str,
    message: str,
) -> list[tuple[uuid.UUID, str, str, str, str]]:
    """Move the matching jobs to the terminal ``new_status``, appending an error record;
    (id, task, queue, old status, new status) of each."""
    j = JOBS.alias("j")
    chosen = (
        select(j.c.id, j.c.status)
        .where(and_(*_job_filters(j, statuses=statuses, ids=ids, task=task, queue=queue)))
        .with_for_update(of=j)
        .cte("c")
    )
    record = error_record_sql(JOBS.c.attempt, error_type, message)
    stmt = (
        update(JOBS)
        .where(JOBS.c.id == chosen.c.id, JOBS.c.status == chosen.c.status)
        .values(
            status=str(new_status),
            finished_at=func.now(),
            timeout_at=None,
            errors=JOBS.c.errors.op("||", return_type=JSONB)(func.jsonb_build_array(record)),
        )
        .returning(JOBS.c.id, JOBS.c.task, JOBS.c.queue, chosen.c.status, JOBS.c.status)
    )
    return [(r[0], r[1], r[2], r[3], r[4]) for r in await conn.execute(stmt)]


async def job_delete_finished(
    conn: Conn, *, statuses: Sequence[str], older_than: float, task: str | None, queue: str | None
) -> int:
    """Delete the matching jobs that finished more than ``older_than`` seconds ago; how many."""
    clauses = [
        JOBS.c.finished_at.is_not(None),
        JOBS.c.finished_at < func.now() - _seconds(older_than),
        *_job_filters(JOBS, statuses=statuses, task=task, queue=queue),
    ]
    result = await conn.execute(delete(JOBS).where(and_(*clauses)))
    return int(result.rowcount)  # type: ignore[attr-defined]


# -- views ---------------------------------------------------------------------------------------


async def jobs_table_rows_estimate(conn: Conn) -> int:
    """The planner's estimate of the jobs table's rows (``pg_class.reltuples``), 0 if never analysed."""
    estimate = await conn.scalar(
        text("SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = CAST(:table AS regclass)"),
        {"table": JOBS.name},
    )
    return int(estimate or 0)


async def jobs_count_finished(conn: Conn, *, sample_percent: float | None = None) -> list[tuple[str, str, int]]:
    """(queue, status, count) of finished jobs; with ``sample_percent``, counted in a ``TABLESAMPLE
    SYSTEM`` sample of that size (scale the counts up yourself)."""
    terminal = [s.value for s in TERMINAL_STATUSES]
    source = (
        JOBS if sample_percent is None else JOBS.tablesample(func.system(bindparam(None, sample_percent, type_=REAL)))
    )
    stmt = (
        select(source.c.queue, source.c.status, func.count())
        .where(_any(source.c.status, terminal, Text))
        .group_by(source.c.queue, source.c.status)
    )
    return [(r[0], r[1], int(r[2])) for r in await conn.execute(stmt)]


async def jobs_oldest_due_wait(conn: Conn) -> float | None:
    """Seconds the longest-waiting due pending job has waited, or None."""
    oldest = await conn.scalar(
        text(
            "SELECT extract(epoch FROM now() - min(run_at)) FROM polyqueue_jobs "
            "WHERE status = 'pending' AND run_at <= now()"
        )
    )
    return float(oldest) if oldest is not None else None


# Reads finished_at ranges through ix_polyqueue_jobs_finished.
_THROUGHPUT = text(
    """
    SELECT count(*) FILTER (WHERE finished_at >= now() - interval '1 minute'),
           count(*),
           count(*) FILTER (WHERE status = 'failed'),
           count(*) FILTER (WHERE status = 'succeeded')
    FROM polyqueue_jobs
    WHERE finished_at IS NOT NULL AND finished_at >= now() - interval '1 hour'
    """
)


async def jobs_throughput(conn: Conn) -> tuple[int, int, int, int]:
    """Jobs finished in the last minute, in the last hour, and of those failed and succeeded."""
    minute, hour, failed, succeeded = (await conn.execute(_THROUGHPUT)).one()
    return int(minute), int(hour), int(failed), int(succeeded)


_WORKERS = text(
    """
    SELECT w.id, w.hostname, w.pid, w.queues, w.broker, w.concurrency, w.status, w.started_at,
           extract(epoch FROM now() - w.heartbeat_at),
           (SELECT count(*) FROM polyqueue_jobs j WHERE j.worker_id = w.id AND j.status = 'running')
    FROM polyqueue_workers w
    WHERE CAST(:all AS boolean) OR w.status = 'running'
    ORDER BY w.status <> 'running', w.started_at DESC
    """
)


async def worker_list(conn: Conn, *, include_stopped: bool) -> list[Any]:
    """Registered workers (running first, newest first): their row, heartbeat age, running jobs."""
    return list((await conn.execute(_WORKERS, {"all": include_stopped})).all())


async def job_list(
    conn: Conn,
    *,
    status: str | None,
    task: str | None,
    queue: str | None,
    since: dt.datetime | None,
    limit: int,
) -> list[Any]:
    """The newest jobs (by id, which is time-ordered) matching the filters, at most ``limit``: their
    summary columns, then the type and message of their latest error."""
    last_error = JOBS.c.errors.op("->", return_type=JSONB)(-1)
    stmt = select(
        JOBS.c.id,
        JOBS.c.task,
        JOBS.c.queue,
        JOBS.c.status,
        JOBS.c.attempt,
        JOBS.c.max_attempts,
        JOBS.c.created_at,
        JOBS.c.run_at,
        JOBS.c.finished_at,
        last_error.op("->>", return_type=Text)("type"),
        last_error.op("->>", return_type=Text)("message"),
    )
    if status is not None:
        stmt = stmt.where(JOBS.c.status == status)
    if task is not None:
        stmt = stmt.where(JOBS.c.task == task)
    if queue is not None:
        stmt = stmt.where(JOBS.c.queue == queue)
    if since is not None:
        stmt = stmt.where(JOBS.c.created_at >= since)
    return list((await conn.execute(stmt.order_by(JOBS.c.id.desc()).limit(limit))).all())


#: The columns of ``inspect.JobDetail``, in its field order.
_DETAIL = (
    "id",
    "task",
    "queue",
    "status",
    "priority",
    "payload",
    "attempt",
    "max_attempts",
    "errors",
    "result",
    "meta",
    "unique_key",
    "worker_id",
    "created_at",
    "run_at",
    "dispatched_at",
    "started_at",
    "finished_at",
    "timeout_at",
    "max_run_seconds",
    "timeout_strategy",
)


async def job_detail(conn: Conn, job_id: uuid.UUID) -> Any:
    """Every stored column of one job (in ``inspect.JobDetail``'s order), or None."""
    stmt = select(*[JOBS.c[name] for name in _DETAIL]).where(JOBS.c.id == job_id)
    return (await conn.execute(stmt)).first()
