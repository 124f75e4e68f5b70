"""Enqueue's statements: insert one job or many, idempotently under ``unique_key``.

Every insert notifies ``NEW_JOB_CHANNEL`` in the same statement, so the notification rides in
the caller's transaction and is delivered only if it commits (Postgres folds the identical
notifications of one transaction into one).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic_core import to_json
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert

from polyqueue.models import Job
from polyqueue.queries._base import Conn
from polyqueue.types import LIVE_STATUSES, NEW_JOB_CHANNEL

__all__ = [
    "MANY_COLUMNS",
    "job_insert",
    "job_insert_many",
    "job_live_by_unique_key",
    "job_live_ids_by_unique_key",
]

_LIVE = [s.value for s in LIVE_STATUSES]
# Literal SQL, not bind parameters: once asyncpg's prepared statement switches to a generic
# plan, Postgres cannot match a parameterised predicate to the partial unique index.
_UNIQUE_LIVE = text("unique_key IS NOT NULL AND status IN ({})".format(", ".join(f"'{s}'" for s in _LIVE)))


async def job_insert(session: Conn, row: Mapping[str, Any]) -> Job | None:
    """Insert one job row (``run_at`` None: now); the new ``Job``, or None when a live job already
    holds its ``unique_key`` (nothing inserted, no error: the caller's transaction stays usable)."""
    values = {**row, "run_at": row.get("run_at") or func.now()}
    stmt = (
        insert(Job)
        .on_conflict_do_nothing(index_elements=[Job.unique_key], index_where=_UNIQUE_LIVE)
        # pg_notify in RETURNING: one round trip.
        .returning(Job, func.pg_notify(NEW_JOB_CHANNEL, Job.queue))
        .values(**values)
    )
    inserted = (await session.execute(stmt)).first()
    return None if inserted is None else inserted[0]


async def job_live_by_unique_key(session: Conn, unique_key: str) -> Job | None:
    """The live job (pending, enqueued or running) holding ``unique_key``, if any."""
    found = await session.scalar(select(Job).where(Job.unique_key == unique_key, Job.status.in_(_LIVE)))
    return found


# Two statements, not one with optional parts: without unique keys, a plain INSERT skips
# ON CONFLICT's speculative insertion for every row of a large batch.
_INSERT_MANY = text(
    """
    WITH ins AS (
        INSERT INTO polyqueue_jobs
            (id, task, queue, payload, priority, max_attempts, max_run_seconds, timeout_strategy, meta, run_at)
        SELECT v.id, v.task, v.queue, v.payload::jsonb, v.priority, v.max_attempts, v.max_run_seconds,
               v.timeout_strategy, CAST(:meta AS jsonb), coalesce(CAST(:run_at AS timestamptz), now())
        FROM unnest(
            CAST(:ids AS uuid[]), CAST(:tasks AS text[]), CAST(:queues AS text[]), CAST(:payloads AS text[]),
            CAST(:priorities AS int[]), CAST(:max_attempts AS int[]), CAST(:max_run_seconds AS float8[]),
            CAST(:timeout_strategies AS text[])
        ) AS v(id, task, queue, payload, priority, max_attempts, max_run_seconds, timeout_strategy)
        RETURNING queue
    )
    SELECT pg_notify(:new_channel, queue) FROM (SELECT DISTINCT queue FROM ins) AS q
    """
).bindparams(new_channel=NEW_JOB_CHANNEL)
_INSERT_MANY_UNIQUE = text(
    """
    WITH ins AS (
        INSERT INTO polyqueue_jobs
            (id, task, queue, payload, priority, max_attempts, max_run_seconds, timeout_strategy, meta, run_at,
             unique_key)
        SELECT v.id, v.task, v.queue, v.payload::jsonb, v.priority, v.max_attempts, v.max_run_seconds,
               v.timeout_strategy, CAST(:meta AS jsonb), coalesce(CAST(:run_at AS timestamptz), now()),
               v.unique_key
        FROM unnest(
            CAST(:ids AS uuid[]), CAST(:tasks AS text[]), CAST(:queues AS text[]), CAST(:payloads AS text[]),
            CAST(:priorities AS int[]), CAST(:max_attempts AS int[]), CAST(:max_run_seconds AS float8[]),
            CAST(:timeout_strategies AS text[]), CAST(:unique_keys AS text[])
        ) AS v(id, task, queue, payload, priority, max_attempts, max_run_seconds, timeout_strategy, unique_key)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND status IN ('pending', 'enqueued', 'running')
        DO NOTHING
        RETURNING id, queue
    ), told AS (
        SELECT pg_notify(:new_channel, queue) FROM (SELECT DISTINCT queue FROM ins) AS q
    )
    SELECT coalesce((SELECT array_agg(id) FROM ins), '{}'), (SELECT count(*) FROM told)
    """
).bindparams(new_channel=NEW_JOB_CHANNEL)

#: The columns of a bulk insert, one list each, in the order of the rows.
MANY_COLUMNS = (
    "ids",
    "tasks",
    "queues",
    "payloads",
    "priorities",
    "max_attempts",
    "max_run_seconds",
    "timeout_strategies",
    "unique_keys",
)


async def job_insert_many(
    session: Conn, columns: Mapping[str, Sequence[Any]], meta: Mapping[str, Any], run_at: Any = None
) -> set[uuid.UUID]:
    """Insert rows given column-wise (:data:`MANY_COLUMNS`; payloads as JSON text), all with ``meta``
    and due at ``run_at`` (None: now). Rows whose ``unique_key`` a live job holds are skipped;
    returns the ids inserted. The keys must be distinct within one call."""
    params: dict[str, Any] = {name: list(columns[name]) for name in MANY_COLUMNS if name != "unique_keys"}
    params["meta"] = to_json(meta).decode()
    params["run_at"] = run_at
    if all(k is None for k in columns["unique_keys"]):
        await session.execute(_INSERT_MANY, params)  # nothing can conflict: every row is inserted
        return set(params["ids"])
    params["unique_keys"] = list(columns["unique_keys"])
    inserted = (await session.execute(_INSERT_MANY_UNIQUE, params)).first()
    return set(inserted[0]) if inserted is not None else set()


async def job_live_ids_by_unique_key(session: Conn, unique_keys: Sequence[str]) -> dict[str, uuid.UUID]:
    """The live jobs holding any of ``unique_keys``: key → id."""
    rows = await session.execute(
        select(Job.unique_key, Job.id).where(Job.unique_key.in_(list(unique_keys)), Job.status.in_(_LIVE))
    )
    return {str(row[0]): row[1] for row in rows}
