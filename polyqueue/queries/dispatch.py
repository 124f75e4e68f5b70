"""The relay's statements: take due pending jobs for a broker, mark them published."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import text

from polyqueue.queries._base import Conn

__all__ = ["Dispatchable", "job_any_due", "job_count_enqueued", "job_mark_enqueued", "job_take_for_dispatch"]


class Dispatchable(NamedTuple):
    """A pending job the relay took: its id, queue, and a key for this dispatch of it."""

    id: uuid.UUID
    queue: str
    dispatch_key: str  # JOB_ID/ATTEMPT/XMIN: see Message.dispatch_key


async def job_any_due(conn: Conn, queues: Sequence[str]) -> bool:
    """Whether a job of ``queues`` is due and not yet claimed: ``pending`` past its ``run_at``, or ``enqueued``."""
    found = await conn.scalar(
        text(
            "SELECT EXISTS (SELECT 1 FROM polyqueue_jobs WHERE queue = ANY(CAST(:queues AS text[])) "
            "AND (status = 'enqueued' OR (status = 'pending' AND run_at <= now())))"
        ),
        {"queues": list(queues)},
    )
    return bool(found)


async def job_count_enqueued(conn: Conn) -> dict[str, int]:
    """Jobs ``enqueued`` (published, not yet claimed) per queue."""
    rows = await conn.execute(
        text("SELECT queue, count(*) FROM polyqueue_jobs WHERE status = 'enqueued' GROUP BY queue")
    )
    return {row[0]: int(row[1]) for row in rows}


async def job_take_for_dispatch(conn: Conn, limit: int, *, skip_queues: Sequence[str] = ()) -> list[Dispatchable]:
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


async def job_mark_enqueued(conn: Conn, ids: Sequence[uuid.UUID]) -> None:
    """Mark published jobs ``enqueued``."""
    await conn.execute(
        text(
            "UPDATE polyqueue_jobs SET status = 'enqueued', dispatched_at = now() "
            "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'pending'"
        ),
        {"ids": list(ids)},
    )
