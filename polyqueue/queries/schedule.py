"""Periodic enqueue's statements: the per-slot lock and "was this slot ever enqueued?".

The check looks at live jobs through the partial unique index and at finished ones (which
that index does not cover) through the primary key, from ``floor`` on: ids are time-ordered
(UUIDv7), so only the range of the table since the slot is read.
"""

from __future__ import annotations

import uuid

from sqlalchemy import text

from polyqueue.queries._base import Conn

__all__ = ["schedule_lock_slot", "schedule_slot_taken"]

# The status list is a literal, like the unique index's predicate, so the planner can match them.
_LIVE_WITH_KEY = text(
    "SELECT 1 FROM polyqueue_jobs WHERE unique_key = :k AND status IN ('pending', 'enqueued', 'running') LIMIT 1"
)
_ANY_WITH_KEY_SINCE = text("SELECT 1 FROM polyqueue_jobs WHERE id >= :floor AND unique_key = :k LIMIT 1")
_LOCK = text("SELECT pg_advisory_xact_lock(:c, hashtext(:k))")


async def schedule_lock_slot(conn: Conn, lock_class: int, key: str) -> None:
    """Take the transaction-scoped advisory lock ``(lock_class, hashtext(key))``: competing
    schedulers of one slot run their check and insert one after the other."""
    await conn.execute(_LOCK, {"c": lock_class, "k": key})


async def schedule_slot_taken(conn: Conn, key: str, floor: uuid.UUID) -> bool:
    """Whether a live job has ``unique_key = key``, or any job with an id at or after ``floor`` had it."""
    if await conn.scalar(_LIVE_WITH_KEY, {"k": key}) is not None:
        return True
    return await conn.scalar(_ANY_WITH_KEY_SINCE, {"k": key, "floor": floor}) is not None
