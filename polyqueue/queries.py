"""Every SQL statement of the hot paths, noun-first names.

Runtime code (worker, relay, maintenance) talks to Postgres only through these
functions. Each takes an ``AsyncConnection`` (or session) and runs one statement;
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
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

__all__ = [
    "CANCEL_CHANNEL",
    "DONE_CHANNEL",
    "NEW_JOB_CHANNEL",
    "NOTIFY_IDS_PER_PAYLOAD",
    "ClaimedJob",
    "Dispatchable",
    "Outcome",
    "job_any_due",
    "job_claim_by_ids",
    "job_claim_pending",
    "job_complete_many",
    "job_count_enqueued",
    "job_count_live",
    "job_hand_back",
    "job_hand_back_unknown",
    "job_held",
    "job_mark_enqueued",
    "job_progress",
    "job_prune",
    "job_redispatch_stale",
    "job_rescue",
    "job_stopped_by_operator",
    "job_take_for_dispatch",
    "worker_heartbeat",
    "worker_register",
    "worker_stop",
]

NEW_JOB_CHANNEL = "polyqueue_new"  # payload: queue name
DONE_CHANNEL = "polyqueue_done"  # payload: comma-separated ids of jobs that reached a terminal state
CANCEL_CHANNEL = "polyqueue_cancel"  # payload: comma-separated ids of running jobs cancelled by an operator
#: Ids per NOTIFY payload: 200 x 37 characters stays below Postgres's 8,000-byte payload limit.
NOTIFY_IDS_PER_PAYLOAD = 200

Executor = AsyncConnection | AsyncSession


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
    status: str
    result_json: str | None = None
    error_json: str | None = None
    delay: float = 0.0
    error_type: str | None = None  # for logs and metrics; the full record is in error_json


_CLAIM_SET = """
    status = 'running', attempt = j.attempt + 1, worker_id = :worker,
    started_at = now(), progress_heartbeat_at = now(), finished_at = NULL,
    timeout_at = CASE WHEN j.max_run_seconds IS NULL OR j.timeout_strategy = 'ignore' THEN NULL
                      ELSE now() + j.max_run_seconds * interval '1 second' END
"""
_CLAIM_RETURNING = """
    RETURNING j.id, j.task, j.queue, j.payload, j.attempt, j.max_attempts, j.max_run_seconds,
              j.timeout_strategy, j.meta, j.created_at, j.run_at, j.started_at, j.worker_id
"""


def _claim_pending(queue_filter: str) -> Any:
    return text(  # constants joined, values bound
        f"""
        WITH c AS (
            SELECT id FROM polyqueue_jobs
            WHERE status = 'pending' AND {queue_filter} AND run_at <= now()
            ORDER BY priority, run_at
            LIMIT :limit
            FOR UPDATE SKIP LOCKED
        )
        UPDATE polyqueue_jobs j SET {_CLAIM_SET}
        FROM c WHERE j.id = c.id
        {_CLAIM_RETURNING}
        """  # noqa: S608
    )


# One queue: equality walks ix_polyqueue_jobs_dispatch in claim order and stops at LIMIT.
# With ANY() the planner cannot use that order and sorts the whole backlog (measured:
# 12.4 ms against 0.56 ms for a 32-job claim beside 20,000 pending jobs).
_CLAIM_ONE_QUEUE = _claim_pending("queue = :queue")
# Several queues: ix_polyqueue_jobs_due gives the cross-queue claim order.
_CLAIM_QUEUES = _claim_pending("queue = ANY(CAST(:queues AS text[]))")

# A broker delivery names a job; it becomes an attempt only if the job is still
# dispatchable and belongs to a queue this worker serves (a delivery is a hint: a forged or
# misrouted message must not hand a job to a worker of another queue). 'pending' is accepted
# too (the relay may have crashed between publish and mark) but only once its run_at has come.
_CLAIM_BY_IDS = text(  # constants joined, values bound
    f"""
    UPDATE polyqueue_jobs j SET {_CLAIM_SET}
    WHERE j.id = ANY(CAST(:ids AS uuid[]))
      AND j.queue = ANY(CAST(:queues AS text[]))
      AND (j.status = 'enqueued' OR (j.status = 'pending' AND j.run_at <= now()))
    {_CLAIM_RETURNING}
    """  # noqa: S608
)


def _claimed(rows: Sequence[Any]) -> list[ClaimedJob]:
    return [ClaimedJob(*row) for row in rows]


async def job_claim_pending(
    conn: Executor, worker_id: uuid.UUID, queues: Sequence[str], limit: int
) -> list[ClaimedJob]:
    """Claim up to ``limit`` due pending jobs of ``queues`` (priority, then run_at)."""
    if len(queues) == 1:
        params: dict[str, Any] = {"worker": worker_id, "queue": queues[0], "limit": limit}
        result = await conn.execute(_CLAIM_ONE_QUEUE, params)
    else:
        params = {"worker": worker_id, "queues": list(queues), "limit": limit}
        result = await conn.execute(_CLAIM_QUEUES, params)
    return _claimed(result.all())


async def job_claim_by_ids(
    conn: Executor, worker_id: uuid.UUID, ids: Sequence[uuid.UUID], queues: Sequence[str]
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
        SELECT pg_notify('polyqueue_done', string_agg(id::text, ',')) FROM finished
        GROUP BY (n - 1) / CAST(:per_notify AS int)
    )
    SELECT coalesce((SELECT array_agg(id) FROM upd), '{}'),
           (SELECT count(*) FROM told),
           (SELECT pg_notify('polyqueue_new', min(queue)) FROM upd WHERE status = 'pending' HAVING count(*) > 0)
    """
)


async def job_complete_many(conn: Executor, outcomes: Sequence[Outcome]) -> set[uuid.UUID]:
    """Persist outcomes of attempts their workers still own; returns the ids actually written.

    An outcome whose job was reaped, re-claimed or cancelled meanwhile changes nothing.
    """
    if not outcomes:
        return set()
    params = {
        "workers": [o.worker_id for o in outcomes],
        "ids": [o.job_id for o in outcomes],
        "attempts": [o.attempt for o in outcomes],
        "statuses": [o.status for o in outcomes],
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
    SELECT array_agg(id), pg_notify('polyqueue_new', min(queue)) FROM upd
    """
)


async def job_hand_back(conn: Executor, worker_id: uuid.UUID, ids: Sequence[uuid.UUID]) -> int:
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
    SELECT status, CASE WHEN status = 'failed' THEN pg_notify('polyqueue_done', CAST(:id AS text))
                        ELSE pg_notify('polyqueue_new', queue) END
    FROM upd
    """
)


async def job_hand_back_unknown(
    conn: Executor,
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


async def job_stopped_by_operator(
    conn: Executor, attempts: Sequence[tuple[uuid.UUID, int, uuid.UUID]]
) -> set[uuid.UUID]:
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


async def job_held(conn: Executor, worker_id: uuid.UUID, *, older_than: float) -> list[uuid.UUID]:
    """Jobs Postgres says ``worker_id`` is running, claimed more than ``older_than`` seconds ago."""
    rows = await conn.execute(
        text(
            "SELECT id FROM polyqueue_jobs WHERE worker_id = :worker AND status = 'running' "
            "AND started_at < now() - :age * interval '1 second'"
        ),
        {"worker": worker_id, "age": older_than},
    )
    return [row[0] for row in rows]


async def job_progress(conn: Executor, worker_id: uuid.UUID, job_id: uuid.UUID, attempt: int) -> bool:
    """Record progress of an attempt; False when the worker no longer owns it."""
    result = await conn.execute(
        text(
            "UPDATE polyqueue_jobs SET progress_heartbeat_at = now() "
            "WHERE id = :id AND attempt = :attempt AND worker_id = :worker AND status = 'running'"
        ),
        {"id": job_id, "attempt": attempt, "worker": worker_id},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


_RESCUE = text(
    """
    WITH dead AS (
        UPDATE polyqueue_workers SET status = 'dead'
        WHERE status = 'running' AND heartbeat_at < now() - :dead_after * interval '1 second'
        RETURNING id
    ), victims AS (
        SELECT j.id, j.attempt, j.worker_id,
               (j.timeout_at IS NOT NULL AND j.timeout_at < now() - :grace * interval '1 second') AS timed_out
        FROM polyqueue_jobs j
        WHERE j.status = 'running' AND (
            (j.timeout_at IS NOT NULL AND j.timeout_at < now() - :grace * interval '1 second')
            OR j.worker_id IN (SELECT id FROM dead)
            OR NOT EXISTS (SELECT 1 FROM polyqueue_workers w WHERE w.id = j.worker_id AND w.status = 'running')
        )
        FOR UPDATE OF j SKIP LOCKED
    ), upd AS (
        UPDATE polyqueue_jobs j SET
            status = CASE WHEN j.attempt < j.max_attempts
                           AND NOT (v.timed_out AND j.timeout_strategy = 'fail') THEN 'pending'
                          ELSE 'failed' END,
            worker_id = NULL, timeout_at = NULL, run_at = now(),
            finished_at = CASE WHEN j.attempt < j.max_attempts
                                AND NOT (v.timed_out AND j.timeout_strategy = 'fail') THEN NULL
                               ELSE now() END,
            errors = j.errors || jsonb_build_array(jsonb_build_object(
                'attempt', j.attempt, 'at', now(),
                'type', CASE WHEN v.timed_out THEN 'TimeLimitExceeded' ELSE 'WorkerLost' END,
                'message', CASE WHEN v.timed_out
                                THEN 'time limit passed and the worker did not stop the job; rescued by maintenance'
                                ELSE 'worker ' || v.worker_id::text || ' stopped heartbeating; rescued by maintenance'
                           END))
        FROM victims v
        WHERE j.id = v.id AND j.attempt = v.attempt AND j.worker_id IS NOT DISTINCT FROM v.worker_id
          AND j.status = 'running'
        RETURNING j.id, j.status, j.queue
    )
    SELECT id, status, queue,
           CASE WHEN status = 'pending' THEN pg_notify('polyqueue_new', queue)
                ELSE pg_notify('polyqueue_done', id::text) END
    FROM upd
    """
)


async def job_rescue(conn: Executor, *, dead_after: float, timeout_grace: float) -> list[tuple[uuid.UUID, str, str]]:
    """Mark workers with stale heartbeats dead and rescue running jobs that are orphaned or past timeout.

    Rescue is by liveness, never by elapsed run time alone: a long job of a live
    worker without a time limit is left alone. Returns (job id, new status, queue).
    """
    rows = await conn.execute(_RESCUE, {"dead_after": dead_after, "grace": timeout_grace})
    return [(row[0], row[1], row[2]) for row in rows]


async def job_count_live(conn: Executor) -> list[tuple[str, str, int]]:
    """(queue, status, count) of pending, enqueued and running jobs (the live ones, few by design)."""
    rows = await conn.execute(
        text(
            "SELECT queue, status, count(*) FROM polyqueue_jobs "
            "WHERE status IN ('pending', 'enqueued', 'running') GROUP BY queue, status"
        )
    )
    return [(row[0], row[1], int(row[2])) for row in rows]


async def job_prune(conn: Executor, *, older_than: float, limit: int = 10_000) -> int:
    """Delete up to ``limit`` finished jobs older than ``older_than`` seconds, and old worker rows."""
    result = await conn.execute(
        text(
            "DELETE FROM polyqueue_jobs WHERE id IN (SELECT id FROM polyqueue_jobs "
            "WHERE finished_at < now() - :age * interval '1 second' LIMIT :limit)"
        ),
        {"age": older_than, "limit": limit},
    )
    await conn.execute(
        text(
            "DELETE FROM polyqueue_workers WHERE status <> 'running' "
            "AND heartbeat_at < now() - :age * interval '1 second'"
        ),
        {"age": older_than},
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


async def job_redispatch_stale(conn: Executor, *, older_than: float) -> int:
    """Return jobs ``enqueued`` longer than ``older_than`` seconds to ``pending`` (their delivery was lost)."""
    result = await conn.execute(
        text(
            """
            WITH upd AS (
                UPDATE polyqueue_jobs SET status = 'pending', dispatched_at = NULL
                WHERE status = 'enqueued' AND dispatched_at < now() - :age * interval '1 second'
                RETURNING id, queue
            )
            SELECT count(*), CASE WHEN count(*) > 0 THEN pg_notify('polyqueue_new', min(queue)) END FROM upd
            """
        ),
        {"age": older_than},
    )
    return int(result.scalar_one())


class Dispatchable(NamedTuple):
    """A pending job the relay took: its id, queue, and a key for this dispatch of it."""

    id: uuid.UUID
    queue: str
    dispatch_key: str  # JOB_ID/ATTEMPT/XMIN: see Message.dispatch_key


async def job_any_due(conn: Executor, queues: Sequence[str]) -> bool:
    """Whether a job of ``queues`` is due and not yet claimed: ``pending`` past its ``run_at``, or ``enqueued``."""
    found = await conn.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM polyqueue_jobs WHERE queue = ANY(CAST(:queues AS text[])) "
            "AND (status = 'enqueued' OR (status = 'pending' AND run_at <= now())))"
        ),
        {"queues": list(queues)},
    )
    return bool(found)


async def job_count_enqueued(conn: Executor) -> dict[str, int]:
    """Jobs ``enqueued`` (published, not yet claimed) per queue."""
    rows = await conn.execute(
        text("SELECT queue, count(*) FROM polyqueue_jobs WHERE status = 'enqueued' GROUP BY queue")
    )
    return {row[0]: int(row[1]) for row in rows}


async def job_take_for_dispatch(conn: Executor, limit: int, *, skip_queues: Sequence[str] = ()) -> list[Dispatchable]:
    """Lock up to ``limit`` due pending jobs for the relay (call inside a transaction), none of ``skip_queues``.

    The dispatch key ends with the row version's ``xmin``, the transaction that last changed
    the job: a relay whose batch rolled back takes the same version again (same key), while a
    retry, a re-dispatch or a requeue commits a new one.
    """
    rows = await conn.execute(
        text(
            "SELECT id, queue, id::text || '/' || attempt || '/' || xmin::text FROM polyqueue_jobs "
            "WHERE status = 'pending' AND run_at <= now() AND queue <> ALL(CAST(:skip AS text[])) "
            "ORDER BY priority, run_at LIMIT :limit FOR UPDATE SKIP LOCKED"
        ),
        {"limit": limit, "skip": list(skip_queues)},
    )
    return [Dispatchable(row[0], row[1], row[2]) for row in rows]


async def job_mark_enqueued(conn: Executor, ids: Sequence[uuid.UUID]) -> None:
    """Mark published jobs ``enqueued``."""
    await conn.execute(
        text(
            "UPDATE polyqueue_jobs SET status = 'enqueued', dispatched_at = now() "
            "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'pending'"
        ),
        {"ids": list(ids)},
    )


async def worker_register(
    conn: Executor,
    *,
    worker_id: uuid.UUID,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    broker: str,
    concurrency: int,
) -> None:
    """Insert this worker's registry row (status running)."""
    await conn.execute(
        text(
            "INSERT INTO polyqueue_workers (id, hostname, pid, queues, broker, concurrency, status) "
            "VALUES (:id, :hostname, :pid, CAST(:queues AS text[]), :broker, :concurrency, 'running')"
        ),
        {
            "id": worker_id,
            "hostname": hostname,
            "pid": pid,
            "queues": list(queues),
            "broker": broker,
            "concurrency": concurrency,
        },
    )


async def worker_heartbeat(conn: Executor, worker_id: uuid.UUID) -> bool:
    """Refresh the heartbeat; False when this worker was declared dead (it must stop claiming)."""
    result = await conn.execute(
        text("UPDATE polyqueue_workers SET heartbeat_at = now() WHERE id = :id AND status = 'running'"),
        {"id": worker_id},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def worker_stop(conn: Executor, worker_id: uuid.UUID) -> None:
    """Mark this worker stopped (clean exit)."""
    await conn.execute(
        text(
            "UPDATE polyqueue_workers SET status = 'stopped', stopped_at = now(), heartbeat_at = now() "
            "WHERE id = :id AND status = 'running'"
        ),
        {"id": worker_id},
    )
