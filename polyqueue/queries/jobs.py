"""The job statements of a worker's hot path: claim, complete, hand back, progress.

Each takes an ``AsyncConnection`` (or session) and runs one statement;
the caller owns the transaction. Guards live in the WHERE clauses: a worker only
finishes an attempt it still owns (docs/guarantees.md §3), and a rescuer re-checks state
in the same statement that changes it (rescue by liveness: a time-based rescuer re-ran
long jobs that were still running, and overwrote jobs that completed meanwhile, at River).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text

from polyqueue.queries._base import CHANNEL_PARAMS, Conn
from polyqueue.types import NEW_JOB_CHANNEL, NOTIFY_IDS_PER_PAYLOAD, JobStatus

__all__ = [
    "ClaimedJob",
    "Outcome",
    "job_claim_by_ids",
    "job_claim_pending",
    "job_complete_many",
    "job_hand_back",
    "job_hand_back_unknown",
    "job_held",
    "job_progress",
    "job_stopped_by_operator",
]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """A job this worker now owns for one attempt."""

    id: uuid.UUID
    task: str
    queue: str
    payload: Any
    attempt: int
    max_attempts: int
    max_run_seconds: float | None
    timeout_strategy: str
    meta: dict[str, Any]
    created_at: dt.datetime
    run_at: dt.datetime
    started_at: dt.datetime
    worker_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Outcome:
    """How an attempt ended: ``succeeded``, ``failed``, or ``pending`` (retry after ``delay``)."""

    job_id: uuid.UUID
    attempt: int
    worker_id: uuid.UUID
    status: JobStatus
    result_json: str | None = None
    error_json: str | None = None
    delay: float = 0.0
    error_type: str | None = None  # for logs and metrics; the full record is in error_json


# The three claims set the same columns and return the same ones (ClaimedJob's fields, in
# order); each is written out whole so that the statement Postgres runs is the one you read.
#
# One queue: equality walks ix_polyqueue_jobs_dispatch in claim order and stops at LIMIT.
# With ANY() the planner cannot use that order and sorts the whole backlog (measured:
# 12.4 ms against 0.56 ms for a 32-job claim beside 20,000 pending jobs).
_CLAIM_ONE_QUEUE = text(
    """
    WITH c AS (
        SELECT id FROM polyqueue_jobs
        WHERE status = 'pending' AND queue = :queue AND run_at <= now()
        ORDER BY priority, run_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE polyqueue_jobs j SET
        status = 'running', attempt = j.attempt + 1, worker_id = :worker,
        started_at = now(), progress_heartbeat_at = now(), finished_at = NULL,
        timeout_at = CASE WHEN j.max_run_seconds IS NULL OR j.timeout_strategy = 'ignore' THEN NULL
                          ELSE now() + j.max_run_seconds * interval '1 second' END
    FROM c WHERE j.id = c.id
    RETURNING j.id, j.task, j.queue, j.payload, j.attempt, j.max_attempts, j.max_run_seconds,
              j.timeout_strategy, j.meta, j.created_at, j.run_at, j.started_at, j.worker_id
    """
)
# Several queues: ix_polyqueue_jobs_due gives the cross-queue claim order.
_CLAIM_QUEUES = text(
    """
    WITH c AS (
        SELECT id FROM polyqueue_jobs
        WHERE status = 'pending' AND queue = ANY(CAST(:queues AS text[])) AND run_at <= now()
        ORDER BY priority, run_at
        LIMIT :limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE polyqueue_jobs j SET
        status = 'running', attempt = j.attempt + 1, worker_id = :worker,
        started_at = now(), progress_heartbeat_at = now(), finished_at = NULL,
        timeout_at = CASE WHEN j.max_run_seconds IS NULL OR j.timeout_strategy = 'ignore' THEN NULL
                          ELSE now() + j.max_run_seconds * interval '1 second' END
    FROM c WHERE j.id = c.id
    RETURNING j.id, j.task, j.queue, j.payload, j.attempt, j.max_attempts, j.max_run_seconds,
              j.timeout_strategy, j.meta, j.created_at, j.run_at, j.started_at, j.worker_id
    """
)

# A broker delivery names a job; it becomes an attempt only if the job is still
# dispatchable and belongs to a queue this worker serves (a delivery is a hint: a forged or
# misrouted message must not hand a job to a worker of another queue). 'pending' is accepted
# too (the relay may have crashed between publish and mark) but only once its run_at has come.
_CLAIM_BY_IDS = text(
    """
    UPDATE polyqueue_jobs j SET
        status = 'running', attempt = j.attempt + 1, worker_id = :worker,
        started_at = now(), progress_heartbeat_at = now(), finished_at = NULL,
        timeout_at = CASE WHEN j.max_run_seconds IS NULL OR j.timeout_strategy = 'ignore' THEN NULL
                          ELSE now() + j.max_run_seconds * interval '1 second' END
    WHERE j.id = ANY(CAST(:ids AS uuid[]))
      AND j.queue = ANY(CAST(:queues AS text[]))
      AND (j.status = 'enqueued' OR (j.status = 'pending' AND j.run_at <= now()))
    RETURNING j.id, j.task, j.queue, j.payload, j.attempt, j.max_attempts, j.max_run_seconds,
              j.timeout_strategy, j.meta, j.created_at, j.run_at, j.started_at, j.worker_id
    """
)


def _claimed(rows: Sequence[Any]) -> list[ClaimedJob]:
    return [ClaimedJob(*row) for row in rows]


async def job_claim_pending(conn: Conn, worker_id: uuid.UUID, queues: Sequence[str], limit: int) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``queues`` (priority, then run_at)."""
    if len(queues) == 1:
        params: dict[str, Any] = {"worker": worker_id, "queue": queues[0], "limit": limit}
        result = await conn.execute(_CLAIM_ONE_QUEUE, params)
    else:
        params = {"worker": worker_id, "queues": list(queues), "limit": limit}
        result = await conn.execute(_CLAIM_QUEUES, params)
    return _claimed(result.all())


async def job_claim_by_ids(
    conn: Conn, worker_id: uuid.UUID, ids: Sequence[uuid.UUID], queues: Sequence[str]
) -> list[ClaimedJob]:
    """Claim the delivered jobs of ``queues`` that are still dispatchable; the rest are stale,
    duplicate or misrouted deliveries."""
    params = {"worker": worker_id, "ids": list(ids), "queues": list(queues)}
    result = await conn.execute(_CLAIM_BY_IDS, params)
    return _claimed(result.all())


_COMPLETE_MANY = text(
    """
    WITH v AS (
        SELECT * FROM unnest(
            CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:statuses AS text[]),
            CAST(:results AS text[]), CAST(:errors AS text[]), CAST(:delays AS float8[]),
            CAST(:workers AS uuid[])
        ) AS v(id, attempt, status, result, error, delay, worker)
    ), upd AS (
        UPDATE polyqueue_jobs j SET
            status = v.status,
            result = CASE WHEN v.status = 'succeeded' THEN v.result::jsonb ELSE j.result END,
            errors = CASE WHEN v.error IS NULL THEN j.errors ELSE j.errors || jsonb_build_array(v.error::jsonb) END,
            finished_at = CASE WHEN v.status = 'pending' THEN NULL ELSE now() END,
            run_at = CASE WHEN v.status = 'pending' THEN now() + v.delay * interval '1 second' ELSE j.run_at END,
            worker_id = CASE WHEN v.status = 'pending' THEN NULL ELSE j.worker_id END,
            timeout_at = NULL
        FROM v
        -- (SELECT 'running') is an InitPlan parameter, so the planner cannot pick the
        -- status = 'running' partial indexes here and joins on the primary key instead.
        -- With a literal it chose ix_polyqueue_jobs_worker once statistics said "few running
        -- rows", and a 100-row completion took 200-500 ms beside 5,000 running jobs.
        WHERE j.id = v.id AND j.attempt = v.attempt AND j.worker_id = v.worker
          AND j.status = (SELECT 'running'::text)
        RETURNING j.id, j.status, j.queue
    ), finished AS (
        SELECT id, row_number() OVER () AS n FROM upd WHERE status <> 'pending'
    ), told AS (
        -- A NOTIFY payload must stay under 8,000 bytes: ids go out in chunks (see NOTIFY_IDS_PER_PAYLOAD).
        SELECT pg_notify(:done_channel, string_agg(id::text, ',')) FROM finished
        GROUP BY (n - 1) / CAST(:per_notify AS int)
    )
    SELECT coalesce((SELECT array_agg(id) FROM upd), '{}'),
           (SELECT count(*) FROM told),
           (SELECT pg_notify(:new_channel, min(queue)) FROM upd WHERE status = 'pending' HAVING count(*) > 0)
    """
).bindparams(**CHANNEL_PARAMS)


async def job_complete_many(conn: Conn, outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """Persist outcomes of attempts their workers still own; returns the ids actually written.

    An outcome whose job was reaped, re-claimed or cancelled meanwhile changes nothing.
    """
    if not outcomes:
        return set()
    params = {
        "workers": [o.worker_id for o in outcomes],
        "ids": [o.job_id for o in outcomes],
        "attempts": [o.attempt for o in outcomes],
        "statuses": [str(o.status) for o in outcomes],
        "results": [o.result_json for o in outcomes],
        "errors": [o.error_json for o in outcomes],
        "delays": [o.delay for o in outcomes],
        "per_notify": NOTIFY_IDS_PER_PAYLOAD,
    }
    written = (await conn.execute(_COMPLETE_MANY, params)).first()[0]  # type: ignore[index]
    return set(written)


_HAND_BACK = text(
    """
    WITH upd AS (
        UPDATE polyqueue_jobs SET status = 'pending', attempt = attempt - 1, worker_id = NULL,
            started_at = NULL, timeout_at = NULL, run_at = now()
        WHERE id = ANY(CAST(:ids AS uuid[])) AND worker_id = :worker AND status = 'running'
        RETURNING id, queue
    )
    SELECT array_agg(id), pg_notify(:new_channel, min(queue)) FROM upd
    """
).bindparams(new_channel=NEW_JOB_CHANNEL)


async def job_hand_back(conn: Conn, worker_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> int:
    """Return running jobs to ``pending`` at once, without counting the attempt (shutdown)."""
    if not ids:
        return 0
    written = (await conn.execute(_HAND_BACK, {"worker": worker_id, "ids": list(ids)})).scalar_one()
    return len(written or [])


_HAND_BACK_UNKNOWN = text(
    """
    WITH j0 AS (
        SELECT id, errors FROM polyqueue_jobs
        WHERE id = :id AND worker_id = :worker AND attempt = :attempt AND status = 'running'
        FOR UPDATE
    ), recs AS (
        -- this job's hand-backs since it last gave up (an operator may have requeued it since)
        SELECT e.rec FROM j0, jsonb_array_elements(j0.errors) WITH ORDINALITY AS e(rec, n)
        WHERE e.rec->>'type' = 'UnknownTaskError' AND e.rec ? 'worker'
          AND e.n > coalesce((SELECT max(g.n) FROM jsonb_array_elements(j0.errors) WITH ORDINALITY AS g(rec, n)
                              WHERE g.rec->>'gave_up' = 'true'), 0)
    ), j1 AS (
        SELECT j0.id,
               (SELECT min((rec->>'at')::timestamptz) FROM recs) AS since,
               (SELECT count(*) FROM recs) AS times,
               (SELECT string_agg(DISTINCT rec->>'worker', ', ') FROM recs
                 WHERE rec->>'worker' <> CAST(:label AS text)) AS lacking
        FROM j0
    ), d AS (
        SELECT id, coalesce(since, now()) <= now() - :grace * interval '1 second' AS give_up,
               times, concat_ws(', ', lacking, CAST(:label AS text)) AS lacking
        FROM j1
    ), upd AS (
        UPDATE polyqueue_jobs j SET
            status = CASE WHEN d.give_up THEN 'failed' ELSE 'pending' END,
            attempt = CASE WHEN d.give_up THEN j.attempt ELSE j.attempt - 1 END,
            worker_id = CASE WHEN d.give_up THEN j.worker_id END,
            started_at = CASE WHEN d.give_up THEN j.started_at END,
            finished_at = CASE WHEN d.give_up THEN now() END,
            timeout_at = NULL,
            run_at = CASE WHEN d.give_up THEN j.run_at
                          ELSE now() + least(CAST(:max_delay AS float8), 0.5 * power(2, least(d.times, 16)))
                                       * interval '1 second' END,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', now(), 'worker', CAST(:label AS text), 'type', 'UnknownTaskError',
                'gave_up', d.give_up,
                'message', CASE WHEN d.give_up
                    THEN 'no worker that claimed it has a handler for task ' || quote_literal(j.task)
                         || ' within unknown_task_grace (' || CAST(:grace AS float8)
                         || ' s); workers that lacked it: ' || d.lacking
                    ELSE 'worker ' || CAST(:label AS text) || ' has no handler for task ' || quote_literal(j.task)
                         || '; handed back for a worker that has it (attempt not counted)' END,
                'traceback', NULL))
        FROM d WHERE j.id = d.id
        RETURNING j.status, j.queue
    )
    SELECT status, CASE WHEN status = 'failed' THEN pg_notify(:done_channel, CAST(:id AS text))
                        ELSE pg_notify(:new_channel, queue) END
    FROM upd
    """
).bindparams(**CHANNEL_PARAMS)


async def job_hand_back_unknown(
    conn: Conn,
    *,
    job_id: uuid.UUID,
    worker_id: uuid.UUID,
    attempt: int,
    worker_label: str,
    grace: float,
    max_delay: float,
) -> str | None:
    """Hand back a job whose task this worker has no handler for (a rolling deploy): ``pending``
    again after a backoff, the attempt not counted, a record naming the worker kept in ``errors``.
    Once the first such record is ``grace`` seconds old, fail it instead, naming every worker that
    lacked the task. Returns the new status, or None when the attempt is no longer owned.
    """
    params = {
        "id": job_id,
        "worker": worker_id,
        "attempt": attempt,
        "label": worker_label,
        "grace": grace,
        "max_delay": max_delay,
    }
    row = (await conn.execute(_HAND_BACK_UNKNOWN, params)).first()
    return None if row is None else str(row[0])


async def job_stopped_by_operator(conn: Conn, attempts: Sequence[tuple[uuid.UUID, int, uuid.UUID]]) -> set[uuid.UUID]:
    """Of ``(job id, attempt, worker id)`` attempts a worker runs, those Postgres says were cancelled
    or failed under that worker meanwhile (``admin cancel``/``fail``): the confirmation a cancel
    NOTIFY needs."""
    if not attempts:
        return set()
    rows = await conn.execute(
        text(
            "SELECT j.id FROM polyqueue_jobs j "
            "JOIN unnest(CAST(:ids AS uuid[]), CAST(:attempts AS int[]), CAST(:workers AS uuid[])) "
            "AS a(id, attempt, worker) ON j.id = a.id AND j.attempt = a.attempt AND j.worker_id = a.worker "
            "WHERE j.status IN ('cancelled', 'failed')"
        ),
        {
            "ids": [a[0] for a in attempts],
            "attempts": [a[1] for a in attempts],
            "workers": [a[2] for a in attempts],
        },
    )
    return {row[0] for row in rows}


async def job_held(conn: Conn, worker_id: uuid.UUID, *, older_than: float) -> list[uuid.UUID]:
    """Jobs Postgres says ``worker_id`` is running, claimed more than ``older_than`` seconds ago."""
    rows = await conn.execute(
        text(
            "SELECT id FROM polyqueue_jobs WHERE worker_id = :worker AND status = 'running' "
            "AND started_at < now() - :age * interval '1 second'"
        ),
        {"worker": worker_id, "age": older_than},
    )
    return [row[0] for row in rows]


async def job_progress(conn: Conn, worker_id: uuid.UUID, job_id: uuid.UUID, attempt: int) -> bool:
    """Record progress of an attempt; False when the worker no longer owns it."""
    result = await conn.execute(
        text(
            "UPDATE polyqueue_jobs SET progress_heartbeat_at = now() "
            "WHERE id = :id AND attempt = :attempt AND worker_id = :worker AND status = 'running'"
        ),
        {"id": job_id, "attempt": attempt, "worker": worker_id},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]
