"""Maintenance's statements: rescue, re-dispatch, prune, live counts, and the leader lease.

A rescuer re-checks state in the same statement that changes it (rescue by liveness: a
time-based rescuer re-ran long jobs that were still running, and overwrote jobs that
completed meanwhile, at River).
"""

from __future__ import annotations

import uuid

from sqlalchemy import text

from polyqueue.queries._base import CHANNEL_PARAMS, Conn
from polyqueue.types import NEW_JOB_CHANNEL

__all__ = [
    "job_count_live",
    "job_prune",
    "job_redispatch_stale",
    "job_rescue",
    "leader_resign",
    "leader_take",
]


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
           CASE WHEN status = 'pending' THEN pg_notify(:new_channel, queue)
                ELSE pg_notify(:done_channel, id::text) END
    FROM upd
    """
).bindparams(**CHANNEL_PARAMS)


async def job_rescue(conn: Conn, *, dead_after: float, timeout_grace: float) -> list[tuple[uuid.UUID, str, str]]:
    """Mark workers with stale heartbeats dead and rescue running jobs that are orphaned or past timeout.

    Rescue is by liveness, never by elapsed run time alone: a long job of a live
    worker without a time limit is left alone. Returns (job id, new status, queue).
    """
    rows = await conn.execute(_RESCUE, {"dead_after": dead_after, "grace": timeout_grace})
    return [(row[0], row[1], row[2]) for row in rows]


async def job_count_live(conn: Conn) -> list[tuple[str, str, int]]:
    """(queue, status, count) of pending, enqueued and running jobs (the live ones, few by design)."""
    rows = await conn.execute(
        text(
            "SELECT queue, status, count(*) FROM polyqueue_jobs "
            "WHERE status IN ('pending', 'enqueued', 'running') GROUP BY queue, status"
        )
    )
    return [(row[0], row[1], int(row[2])) for row in rows]


async def job_prune(conn: Conn, *, older_than: float, limit: int = 10_000) -> int:
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


async def job_redispatch_stale(conn: Conn, *, older_than: float) -> int:
    """Return jobs ``enqueued`` longer than ``older_than`` seconds to ``pending`` (their delivery was lost)."""
    result = await conn.execute(
        text(
            """
            WITH upd AS (
                UPDATE polyqueue_jobs SET status = 'pending', dispatched_at = NULL
                WHERE status = 'enqueued' AND dispatched_at < now() - :age * interval '1 second'
                RETURNING id, queue
            )
            SELECT count(*), CASE WHEN count(*) > 0 THEN pg_notify(:new_channel, min(queue)) END FROM upd
            """
        ),
        {"age": older_than, "new_channel": NEW_JOB_CHANNEL},
    )
    return int(result.scalar_one())


# Take the lease when it is free or expired, renew it when it is ours; no row back: someone
# else holds it. Database time only, so hosts with skewed clocks agree on who leads.
_LEADER_TAKE = text(
    """
    INSERT INTO polyqueue_leader (name, holder, expires_at)
    VALUES (:name, :holder, now() + make_interval(secs => :ttl))
    ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
    WHERE polyqueue_leader.expires_at < now() OR polyqueue_leader.holder = excluded.holder
    RETURNING holder
    """
)
_LEADER_RESIGN = text("DELETE FROM polyqueue_leader WHERE name = :name AND holder = :holder")


async def leader_take(conn: Conn, *, name: str, holder: str, ttl: float) -> bool:
    """Take the ``name`` lease for ``ttl`` seconds if it is free or expired, or renew it if ``holder``
    has it; whether ``holder`` now leads."""
    return (await conn.execute(_LEADER_TAKE, {"name": name, "holder": holder, "ttl": ttl})).first() is not None


async def leader_resign(conn: Conn, *, name: str, holder: str) -> None:
    """Give the ``name`` lease up if ``holder`` has it."""
    await conn.execute(_LEADER_RESIGN, {"name": name, "holder": holder})
