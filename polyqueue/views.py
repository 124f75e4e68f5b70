"""Read-only views of the queue for operators: stats, workers, jobs, one job.

Cost on huge tables: counts of live jobs (pending, enqueued, running) are always exact,
over the partial indexes that serve the hot path (few rows by design). Counts of finished
jobs are exact while the table holds at most :data:`EXACT_LIMIT` rows (by the planner's
``pg_class.reltuples``); above that they are estimated from a ``TABLESAMPLE SYSTEM``
sample of about :data:`SAMPLE_ROWS` rows and flagged ``estimated``. Throughput and the
failure rate read ``finished_at`` ranges through the index on finished jobs' ``finished_at``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.errors import JobNotFoundError
from polyqueue.queries import job_count_live
from polyqueue.queries.operator import (
    job_detail,
    job_list,
    jobs_count_finished,
    jobs_oldest_due_wait,
    jobs_table_rows_estimate,
    jobs_throughput,
    worker_list,
)

__all__ = [
    "EXACT_LIMIT",
    "SAMPLE_ROWS",
    "JobDetail",
    "JobRow",
    "QueueCount",
    "Stats",
    "WorkerRow",
    "job",
    "jobs",
    "stats",
    "workers",
]

#: Above this many rows (estimated), finished-job counts are sampled, not counted.
EXACT_LIMIT = 1_000_000
#: Rows the sample aims at when finished-job counts are estimated.
SAMPLE_ROWS = 100_000


@dataclass(frozen=True, slots=True)
class QueueCount:
    """Jobs of one queue in one status; ``estimated`` when sampled rather than counted."""

    queue: str
    status: str
    count: int
    estimated: bool = False


@dataclass(frozen=True, slots=True)
class Stats:
    """The queue at a glance."""

    counts: list[QueueCount]
    oldest_pending_seconds: float | None  # the longest a due pending job has waited
    finished_last_minute: int
    finished_last_hour: int
    failed_last_hour: int
    failure_rate_last_hour: float | None  # failed / (succeeded + failed), None when nothing finished
    table_rows_estimate: int
    finished_counts_estimated: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One row of ``polyqueue_workers`` with its heartbeat age and the jobs it runs now."""

    id: uuid.UUID
    hostname: str
    pid: int
    queues: list[str]
    broker: str
    concurrency: int
    status: str
    started_at: dt.datetime
    heartbeat_age_seconds: float
    running_jobs: int


@dataclass(frozen=True, slots=True)
class JobRow:
    """A job in a listing."""

    id: uuid.UUID
    task: str
    queue: str
    status: str
    attempt: int
    max_attempts: int
    created_at: dt.datetime
    run_at: dt.datetime
    finished_at: dt.datetime | None
    last_error: str | None  # "Type: message" of the latest error


@dataclass(frozen=True, slots=True)
class JobDetail:
    """Everything stored about one job."""

    id: uuid.UUID
    task: str
    queue: str
    status: str
    priority: int
    payload: Any
    attempt: int
    max_attempts: int
    errors: list[dict[str, Any]]
    result: Any
    meta: dict[str, Any]
    unique_key: str | None
    worker_id: uuid.UUID | None
    created_at: dt.datetime
    run_at: dt.datetime
    dispatched_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    timeout_at: dt.datetime | None
    max_run_seconds: float | None
    timeout_strategy: str


async def stats(engine: AsyncEngine) -> Stats:
    """Counts by queue and status, the oldest due pending job's wait, throughput and failure rate."""
    async with engine.connect() as conn:
        estimate = await jobs_table_rows_estimate(conn)
        counts = [QueueCount(q, s, n) for q, s, n in await job_count_live(conn)]
        sampled = estimate > EXACT_LIMIT
        if sampled:
            percent = max(0.01, min(100.0, 100.0 * SAMPLE_ROWS / estimate))
            rows = await jobs_count_finished(conn, sample_percent=percent)
            counts += [QueueCount(q, s, round(n * 100.0 / percent), True) for q, s, n in rows]
        else:
            counts += [QueueCount(q, s, n) for q, s, n in await jobs_count_finished(conn)]
        oldest = await jobs_oldest_due_wait(conn)
        minute, hour, failed, succeeded = await jobs_throughput(conn)
    counts.sort(key=lambda c: (c.queue, c.status))
    done = failed + succeeded
    return Stats(
        counts=counts,
        oldest_pending_seconds=oldest,
        finished_last_minute=minute,
        finished_last_hour=hour,
        failed_last_hour=failed,
        failure_rate_last_hour=failed / done if done else None,
        table_rows_estimate=estimate,
        finished_counts_estimated=sampled,
    )


async def workers(engine: AsyncEngine, *, include_stopped: bool = True) -> list[WorkerRow]:
    """Registered workers (running first, newest first), with heartbeat age and running job count."""
    async with engine.connect() as conn:
        rows = await worker_list(conn, include_stopped=include_stopped)
    return [WorkerRow(r[0], r[1], r[2], list(r[3]), r[4], r[5], r[6], r[7], float(r[8]), int(r[9])) for r in rows]


async def jobs(
    engine: AsyncEngine,
    *,
    status: str | None = None,
    task: str | None = None,
    queue: str | None = None,
    since: dt.datetime | None = None,
    limit: int = 50,
) -> list[JobRow]:
    """The newest jobs (by id, which is time-ordered) matching the filters, at most ``limit``."""
    if since is not None and since.tzinfo is None:
        raise ValueError("since must be timezone-aware")
    async with engine.connect() as conn:
        rows = await job_list(conn, status=status, task=task, queue=queue, since=since, limit=limit)
    return [
        JobRow(*r[:9], last_error=f"{r[9]}: {r[10]}" if r[9] is not None else None)  # type: ignore[misc]
        for r in rows
    ]


async def job(engine: AsyncEngine, job_id: uuid.UUID | str) -> JobDetail:
    """Everything about one job: payload, attempts, every error with its traceback, result."""
    key = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
    async with engine.connect() as conn:
        row = await job_detail(conn, key)
    if row is None:
        raise JobNotFoundError(f"no job {key}")
    return JobDetail(*row)
