"""Transactional enqueue: rows added to the caller's ``AsyncSession``; never commits,
never talks to a broker. The NOTIFY that wakes workers and relays rides in the same
statement, so it fires only if the caller commits."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json, to_jsonable_python
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from polyqueue.errors import PayloadError
from polyqueue.models import Job
from polyqueue.queries import NEW_JOB_CHANNEL
from polyqueue.registry import TaskSpec, all_tasks, resolve_task
from polyqueue.types import LIVE_STATUSES, TimeoutStrategy, new_job_id

__all__ = ["enqueue", "enqueue_many"]


#: A payload larger than this (serialised JSON, bytes) is refused at enqueue time.
MAX_PAYLOAD_BYTES = 1_000_000

_LIVE = [s.value for s in LIVE_STATUSES]
_UNIQUE_LIVE = text("unique_key IS NOT NULL AND status IN ({})".format(", ".join(f"'{s}'" for s in _LIVE)))


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: message`` for each error, on one line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']} (got {err.get('input')!r:.80})"
        for err in exc.errors()
    )


def _validated_payload(spec: TaskSpec, payload: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    try:
        model = (
            payload
            if isinstance(payload, spec.payload_model)
            else spec.payload_model.model_validate(payload.model_dump() if isinstance(payload, BaseModel) else payload)
        )
    except ValidationError as exc:
        raise PayloadError(f"payload for task {spec.name!r} is invalid: {describe_validation_error(exc)}") from exc
    data: dict[str, Any] = model.model_dump(mode="json")
    size = len(to_json(data))
    if size > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"payload for task {spec.name!r} is {size} bytes; the limit is {MAX_PAYLOAD_BYTES} "
            "(store large data elsewhere and enqueue a reference)"
        )
    return data


def _row(
    payload: BaseModel | Mapping[str, Any],
    *,
    task: str | None,
    queue: str | None,
    priority: int | None,
    run_at: dt.datetime | None,
    delay: float | dt.timedelta | None,
    max_attempts: int | None,
    max_run_seconds: float | None,
    timeout_strategy: TimeoutStrategy | str | None,
    unique_key: str | None,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    spec = resolve_task(all_tasks(), payload if isinstance(payload, BaseModel) else dict(payload), task)
    if run_at is not None and delay is not None:
        raise ValueError("pass run_at or delay, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
        run_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    if run_at is not None and run_at.tzinfo is None:
        raise ValueError("run_at must be timezone-aware")
    attempts = spec.max_attempts if max_attempts is None else max_attempts
    if attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    row: dict[str, Any] = {
        "id": new_job_id(),
        "task": spec.name,
        "queue": queue or spec.queue,
        "payload": _validated_payload(spec, payload),
        "priority": spec.priority if priority is None else priority,
        "max_attempts": attempts,
        "max_run_seconds": spec.max_run_seconds if max_run_seconds is None else max_run_seconds,
        "timeout_strategy": TimeoutStrategy(timeout_strategy or spec.timeout_strategy).value,
        "unique_key": unique_key,
        "meta": to_jsonable_python(dict(meta or {})),
        "run_at": run_at or func.now(),
    }
    return row


def _insert_statement() -> Any:
    stmt = insert(Job).on_conflict_do_nothing(
        index_elements=[Job.unique_key],
        # Literal SQL, not bind parameters: once asyncpg's prepared statement switches to a
        # generic plan, Postgres cannot match a parameterised predicate to the partial index.
        index_where=_UNIQUE_LIVE,
    )
    # pg_notify in RETURNING: one round trip, and Postgres folds the identical
    # notifications of one transaction into one, delivered only on commit.
    return stmt.returning(Job, func.pg_notify(NEW_JOB_CHANNEL, Job.queue))


async def enqueue(
    session: AsyncSession,
    payload: BaseModel | Mapping[str, Any],
    *,
    task: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    delay: float | dt.timedelta | None = None,
    max_attempts: int | None = None,
    max_run_seconds: float | None = None,
    timeout_strategy: TimeoutStrategy | str | None = None,
    unique_key: str | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Job:
    """Add a job to ``session``'s transaction and return it. Does not commit.

    The task is the one registered for the payload's model, or ``task=``. A dict
    payload is validated against the task's model (``PayloadError`` names the task and
    field). With ``unique_key``, if a live job (pending, enqueued or running) has that
    key, that job is returned and nothing is inserted; no error is raised, so the
    caller's transaction stays usable.
    """
    row = _row(
        payload,
        task=task,
        queue=queue,
        priority=priority,
        run_at=run_at,
        delay=delay,
        max_attempts=max_attempts,
        max_run_seconds=max_run_seconds,
        timeout_strategy=timeout_strategy,
        unique_key=unique_key,
        meta=meta,
    )
    statement = _insert_statement().values(**row)
    for _ in range(10):
        inserted = (await session.execute(statement)).first()
        if inserted is not None:
            job: Job = inserted[0]
            return job
        existing = await session.scalar(select(Job).where(Job.unique_key == unique_key, Job.status.in_(_LIVE)))
        if existing is not None:
            return existing
        # The conflicting job finished between our INSERT and SELECT: insert again.
    raise RuntimeError(f"unique_key {unique_key!r} kept conflicting with jobs that finished at once")


async def enqueue_many(
    session: AsyncSession,
    payloads: Sequence[BaseModel | Mapping[str, Any]],
    *,
    task: str | None = None,
    queue: str | None = None,
    priority: int | None = None,
    run_at: dt.datetime | None = None,
    delay: float | dt.timedelta | None = None,
    max_attempts: int | None = None,
    meta: Mapping[str, Any] | None = None,
) -> list[uuid.UUID]:
    """Add many jobs in one INSERT statement and return their ids, in order. Does not commit."""
    if not payloads:
        return []
    rows = [
        _row(
            p,
            task=task,
            queue=queue,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            max_run_seconds=None,
            timeout_strategy=None,
            unique_key=None,
            meta=meta,
        )
        for p in payloads
    ]
    now = dt.datetime.now(dt.UTC)
    for row in rows:
        if not isinstance(row["run_at"], dt.datetime):
            row["run_at"] = now
    queues = sorted({row["queue"] for row in rows})
    await session.execute(insert(Job), rows)
    for q in queues:
        await session.execute(select(func.pg_notify(NEW_JOB_CHANNEL, q)))
    return [row["id"] for row in rows]
