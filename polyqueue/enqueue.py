"""Transactional enqueue: rows added to the caller's ``AsyncSession``; never commits,
never talks to a broker. The NOTIFY that wakes workers and relays rides in the same
statement, so it fires only if the caller commits."""

from __future__ import annotations

import collections
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json, to_jsonable_python
from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession

from polyqueue.db import mask_url, not_migrated, undefined_polyqueue_table
from polyqueue.errors import PayloadError
from polyqueue.models import Job
from polyqueue.queries import NEW_JOB_CHANNEL
from polyqueue.registry import TaskSpec, all_tasks, resolve_task
from polyqueue.settings import queue_name_problem
from polyqueue.types import LIVE_STATUSES, TimeoutStrategy, new_job_id

__all__ = ["enqueue", "enqueue_many"]


_LIVE = [s.value for s in LIVE_STATUSES]
_UNIQUE_LIVE = text("unique_key IS NOT NULL AND status IN ({})".format(", ".join(f"'{s}'" for s in _LIVE)))


def describe_validation_error(exc: ValidationError) -> str:
    """``field.path: message`` for each error, on one line."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '(payload)'}: {err['msg']} (got {err.get('input')!r:.80})"
        for err in exc.errors()
    )


def _validated_model(spec: TaskSpec, payload: BaseModel | Mapping[str, Any]) -> BaseModel:
    if isinstance(payload, spec.payload_model):
        return payload
    try:
        data = payload.model_dump() if isinstance(payload, BaseModel) else payload
        return spec.payload_model.model_validate(data)
    except ValidationError as exc:
        raise PayloadError(f"payload for task {spec.name!r} is invalid: {describe_validation_error(exc)}") from exc


def _check_size(spec: TaskSpec, body: bytes | str, *, meta: bool = False) -> None:
    """Refuse a payload (or ``meta``) whose JSON is over its limit, counted in UTF-8 bytes as
    Postgres stores it, not in characters."""
    size = len(body.encode() if isinstance(body, str) else body)
    what, limit, setting = (
        ("meta", spec.max_meta_bytes, "max_meta_bytes")
        if meta
        else ("payload", spec.max_payload_bytes, "max_payload_bytes")
    )
    if size > limit:
        raise PayloadError(
            f"{what} for task {spec.name!r} is {size} bytes (UTF-8 JSON); the limit is {limit} ({setting}): "
            "store large data elsewhere and enqueue a reference"
        )


def _queue(spec: TaskSpec, queue: str | None) -> str:
    """``queue`` (checked against the queue-name rule), or the task's."""
    if queue is None:
        return spec.queue
    problem = queue_name_problem(queue)
    if problem:
        raise PayloadError(f"enqueue of task {spec.name!r}: {problem}")
    return queue


def _validated_payload(spec: TaskSpec, payload: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = _validated_model(spec, payload).model_dump(mode="json")
    _check_size(spec, to_json(data))
    return data


def _translated(session: AsyncSession, exc: ProgrammingError) -> Exception:
    """The insert's error as the user can act on it: an unmigrated database is a ConfigurationError
    naming it (masked). Only on this error path: the hot path makes no extra round trip."""
    if not undefined_polyqueue_table(exc):
        return exc
    try:
        where = mask_url(session.get_bind().engine.url)
    except Exception:  # an unusual bind: say "the database"
        where = "the database"
    return not_migrated(where)


def _resolve_run_at(run_at: dt.datetime | None, delay: float | dt.timedelta | None) -> dt.datetime | None:
    if run_at is not None and delay is not None:
        raise ValueError("pass run_at or delay, not both")
    if delay is not None:
        seconds = delay.total_seconds() if isinstance(delay, dt.timedelta) else float(delay)
        return dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    if run_at is not None and run_at.tzinfo is None:
        raise ValueError("run_at must be timezone-aware")
    return run_at


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
    run_at = _resolve_run_at(run_at, delay)
    attempts = spec.max_attempts if max_attempts is None else max_attempts
    if attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    row: dict[str, Any] = {
        "id": new_job_id(),
        "task": spec.name,
        "queue": _queue(spec, queue),
        "payload": _validated_payload(spec, payload),
        "priority": spec.priority if priority is None else priority,
        "max_attempts": attempts,
        "max_run_seconds": spec.max_run_seconds if max_run_seconds is None else max_run_seconds,
        "timeout_strategy": TimeoutStrategy(timeout_strategy or spec.timeout_strategy).value,
        "unique_key": unique_key,
        "meta": _meta(spec, meta),
        "run_at": run_at or func.now(),
    }
    return row


def _meta(spec: TaskSpec, meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """The job's ``meta``: the caller's (at most ``max_meta_bytes`` of JSON), plus what the app's
    metrics hook injects (trace context)."""
    data = dict(meta or {})
    if data:
        _check_size(spec, to_json(data), meta=True)
    spec.metrics.inject_meta(data)
    return dict(to_jsonable_python(data))


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

    Args:
        session: the caller's ``AsyncSession``; the job joins its transaction.
        payload: an instance of the task's model, or a dict (then ``task=`` is needed).
        task: the registered task name; default: the one task taking the payload's model.
        queue: the queue; default: the task's.
        priority: lower runs first; default: the task's.
        max_attempts: attempts allowed in all; default: the task's.
        max_run_seconds: the time limit of one attempt; default: the task's.
        timeout_strategy: ``retry``, ``fail`` or ``ignore`` at the time limit; default: the task's.
        run_at: a timezone-aware time before which the job does not run.
        delay: seconds (or a ``timedelta``) from now; not together with ``run_at``.
        unique_key: at most one live job per key (idempotent enqueue).
        meta: a JSON object stored with the job (tags, trace context).

    Raises:
        UnknownTaskError: no task, or more than one, matches the payload or ``task``.
        PayloadError: the payload does not fit the task's model, it or ``meta`` is over its limit
            (``max_payload_bytes``, ``max_meta_bytes``), or ``queue`` is not a valid queue name.
        ValueError: both ``run_at`` and ``delay``, a naive ``run_at``, or ``max_attempts < 1``.
        ConfigurationError: the database has no polyqueue tables (run ``polyqueue db upgrade``).
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
    spec = all_tasks()[row["task"]]
    statement = _insert_statement().values(**row)
    for _ in range(10):
        try:
            inserted = (await session.execute(statement)).first()
        except ProgrammingError as exc:
            raise _translated(session, exc) from exc
        if inserted is not None:
            job: Job = inserted[0]
            spec.metrics.job_enqueued(spec.name, job.queue, 1)
            return job
        existing = await session.scalar(select(Job).where(Job.unique_key == unique_key, Job.status.in_(_LIVE)))
        if existing is not None:
            return existing
        # The conflicting job finished between our INSERT and SELECT: insert again.
    raise RuntimeError(f"unique_key {unique_key!r} kept conflicting with jobs that finished at once")


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
    SELECT pg_notify('polyqueue_new', queue) FROM (SELECT DISTINCT queue FROM ins) AS q
    """
)


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
    """Add many jobs with one INSERT statement and return their ids, in order. Does not commit.

    Each payload is validated like :func:`enqueue`'s; the options apply to every job.
    For idempotent enqueue with ``unique_key``, use :func:`enqueue`.

    Raises:
        UnknownTaskError: a payload matches no task (or several; pass ``task=``).
        PayloadError: a payload does not fit its task's model, it or ``meta`` is over its limit
            (``max_payload_bytes``, ``max_meta_bytes``), or ``queue`` is not a valid queue name.
        ValueError: both ``run_at`` and ``delay``, a naive ``run_at``, or ``max_attempts < 1``.
        ConfigurationError: the database has no polyqueue tables (run ``polyqueue db upgrade``).
    """
    if not payloads:
        return []
    when = _resolve_run_at(run_at, delay)
    if max_attempts is not None and max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    tasks = all_tasks()
    columns: dict[str, list[Any]] = {
        k: [] for k in ("ids", "tasks", "queues", "payloads", "priorities", "max_attempts", "max_run_seconds")
    }
    columns["timeout_strategies"] = []
    for payload in payloads:
        spec = resolve_task(tasks, payload if isinstance(payload, BaseModel) else dict(payload), task)
        body = _validated_model(spec, payload).model_dump_json()
        _check_size(spec, body)
        columns["ids"].append(new_job_id())
        columns["tasks"].append(spec.name)
        columns["queues"].append(_queue(spec, queue))
        columns["payloads"].append(body)
        columns["priorities"].append(spec.priority if priority is None else priority)
        columns["max_attempts"].append(spec.max_attempts if max_attempts is None else max_attempts)
        columns["max_run_seconds"].append(spec.max_run_seconds)
        columns["timeout_strategies"].append(spec.timeout_strategy.value)
    first = tasks[columns["tasks"][0]]
    params = {**columns, "meta": to_json(_meta(first, meta)).decode(), "run_at": when}
    try:
        await session.execute(_INSERT_MANY, params)
    except ProgrammingError as exc:
        raise _translated(session, exc) from exc
    for (name, q), n in collections.Counter(zip(columns["tasks"], columns["queues"], strict=True)).items():
        tasks[name].metrics.job_enqueued(name, q, n)
    ids: list[uuid.UUID] = columns["ids"]
    return ids
