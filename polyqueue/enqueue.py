"""Transactional enqueue: rows added to the caller's ``AsyncSession``; never commits,
never talks to a broker. The NOTIFY that wakes workers and relays rides in the same
statement, so it fires only if the caller commits."""

from __future__ import annotations

import collections
import datetime as dt
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import to_json, to_jsonable_python
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession

from polyqueue.db import mask_url, not_migrated, undefined_polyqueue_table
from polyqueue.errors import PayloadError
from polyqueue.models import Job
from polyqueue.queries.enqueue import (
    MANY_COLUMNS,
    job_insert,
    job_insert_many,
    job_live_by_unique_key,
    job_live_ids_by_unique_key,
)
from polyqueue.registry import Polyqueue, TaskSpec, task_of
from polyqueue.settings import queue_name_problem
from polyqueue.types import TimeoutStrategy, new_job_id

__all__ = ["enqueue", "enqueue_many"]

#: How often an idempotent enqueue inserts again when the job holding its key finished between
#: the insert that skipped it and the read that looked for it.
_UNIQUE_RETRIES = 10


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


def _validated_payload(spec: TaskSpec, payload: BaseModel | Mapping[str, Any], *, as_json: bool) -> Any:
    """The payload validated and sized: a dict (for the ORM insert), or its JSON text (``as_json``,
    for the bulk insert, which would serialise the dict anyway)."""
    model = _validated_model(spec, payload)
    if as_json:
        body = model.model_dump_json()
        _check_size(spec, body)
        return body
    data: dict[str, Any] = model.model_dump(mode="json")
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
    spec: TaskSpec,
    payload: BaseModel | Mapping[str, Any],
    *,
    queue: str | None,
    priority: int | None,
    run_at: dt.datetime | None,
    delay: float | dt.timedelta | None,
    max_attempts: int | None,
    max_run_seconds: float | None,
    timeout_strategy: TimeoutStrategy | str | None,
    unique_key: str | None,
    meta: Callable[[TaskSpec], dict[str, Any]],
    json_payload: bool = False,
) -> dict[str, Any]:
    """The jobs-table row of one job of task ``spec``, for :func:`enqueue` and :func:`enqueue_many`
    alike: the payload validated and sized (as JSON text with ``json_payload``), the task's
    defaults filled in, ``meta`` from ``meta(spec)``. ``run_at`` None means "now" (the
    database's clock, at insert)."""
    run_at = _resolve_run_at(run_at, delay)
    attempts = spec.max_attempts if max_attempts is None else max_attempts
    if attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    row = {
        "id": new_job_id(),
        "task": spec.name,
        "queue": _queue(spec, queue),
        "payload": _validated_payload(spec, payload, as_json=json_payload),
        "priority": spec.priority if priority is None else priority,
        "max_attempts": attempts,
        "max_run_seconds": spec.max_run_seconds if max_run_seconds is None else max_run_seconds,
        "timeout_strategy": (
            spec.timeout_strategy if not timeout_strategy else TimeoutStrategy(timeout_strategy)
        ).value,
        "unique_key": unique_key,
        "meta": meta(spec),
        "run_at": run_at,
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
    app: Polyqueue | None = None,
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
        app: the app whose task this is; default: the app that registered the payload's model
            (or, for a dict payload, the one app with a task named ``task``). Needed only when
            several apps in the process register the model or the name.

    Raises:
        UnknownTaskError: no task, or more than one, matches the payload or ``task`` (several
            apps: pass ``app=``).
        PayloadError: the payload does not fit the task's model, it or ``meta`` is over its limit
            (``max_payload_bytes``, ``max_meta_bytes``), or ``queue`` is not a valid queue name.
        ValueError: both ``run_at`` and ``delay``, a naive ``run_at``, or ``max_attempts < 1``.
        ConfigurationError: the database has no polyqueue tables (run ``polyqueue db upgrade``).
    """
    spec = task_of(payload if isinstance(payload, BaseModel) else dict(payload), task, app)
    row = _row(
        spec,
        payload,
        queue=queue,
        priority=priority,
        run_at=run_at,
        delay=delay,
        max_attempts=max_attempts,
        max_run_seconds=max_run_seconds,
        timeout_strategy=timeout_strategy,
        unique_key=unique_key,
        meta=lambda spec: _meta(spec, meta),
    )
    for _ in range(_UNIQUE_RETRIES):
        try:
            job = await job_insert(session, row)
        except ProgrammingError as exc:
            raise _translated(session, exc) from exc
        if job is not None:
            spec.metrics.job_enqueued(spec.name, job.queue, 1)
            return job
        existing = await job_live_by_unique_key(session, str(unique_key))
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
    max_run_seconds: float | None = None,
    timeout_strategy: TimeoutStrategy | str | None = None,
    unique_keys: Sequence[str | None] | None = None,
    meta: Mapping[str, Any] | None = None,
    app: Polyqueue | None = None,
) -> list[uuid.UUID]:
    """Add many jobs with one INSERT statement and return their ids, in order. Does not commit.

    Each payload is validated like :func:`enqueue`'s, and the options mean what they mean there;
    they apply to every job, except ``unique_keys``: one key (or None) per payload.

    With ``unique_keys`` the enqueue is idempotent, as :func:`enqueue` is with ``unique_key``: a
    payload whose key a live job (pending, enqueued or running) already holds inserts nothing, and
    its place in the returned list holds that job's id; so does a payload whose key an earlier
    payload of the same call has (the first one is inserted). The result thus always has one id per
    payload, in order; the jobs actually inserted are those whose ids are not older jobs' ids. No
    error is raised on a duplicate key, so the caller's transaction stays usable.

    Args:
        session: the caller's ``AsyncSession``; the jobs join its transaction.
        payloads: instances of the tasks' models, or dicts (then ``task=`` is needed).
        task: the registered task name; default: the one task taking each payload's model.
        queue: the queue; default: each task's.
        priority: lower runs first; default: each task's.
        run_at: a timezone-aware time before which the jobs do not run.
        delay: seconds (or a ``timedelta``) from now; not together with ``run_at``.
        max_attempts: attempts allowed in all; default: each task's.
        max_run_seconds: the time limit of one attempt; default: each task's.
        timeout_strategy: ``retry``, ``fail`` or ``ignore`` at the time limit; default: each task's.
        unique_keys: one ``unique_key`` or None per payload (idempotent enqueue).
        meta: a JSON object stored with every job (tags, trace context).
        app: the app whose tasks these are; default: found from each payload, as for :func:`enqueue`.

    Raises:
        UnknownTaskError: a payload matches no task (or several; pass ``task=``, or ``app=``).
        PayloadError: a payload does not fit its task's model, it or ``meta`` is over its limit
            (``max_payload_bytes``, ``max_meta_bytes``), or ``queue`` is not a valid queue name.
        ValueError: both ``run_at`` and ``delay``, a naive ``run_at``, ``max_attempts < 1``, or
            ``unique_keys`` not of the same length as ``payloads``.
        ConfigurationError: the database has no polyqueue tables (run ``polyqueue db upgrade``).
    """
    if not payloads:
        return []
    keys: Sequence[str | None] = [None] * len(payloads) if unique_keys is None else unique_keys
    if len(keys) != len(payloads):
        raise ValueError(f"unique_keys has {len(keys)} keys for {len(payloads)} payloads; pass one (or None) each")
    when = _resolve_run_at(run_at, delay)  # one time for the whole batch
    shared: list[dict[str, Any]] = []  # one meta for the batch, with the first job's task's injection

    def batch_meta(spec: TaskSpec) -> dict[str, Any]:
        if not shared:
            shared.append(_meta(spec, meta))
        return shared[0]

    by_model: dict[type[BaseModel], TaskSpec] = {}

    def spec_of(payload: BaseModel | Mapping[str, Any]) -> TaskSpec:
        """The payload's task, looked up once per model in the batch (not per payload)."""
        if not isinstance(payload, BaseModel):
            return task_of(dict(payload), task, app)
        spec = by_model.get(type(payload))
        if spec is None:
            spec = by_model[type(payload)] = task_of(payload, task, app)
        return spec

    rows: list[dict[str, Any]] = []
    specs: dict[str, TaskSpec] = {}
    first_with_key: dict[str, int] = {}  # key -> index of its first row; later rows share its job
    for payload, key in zip(payloads, keys, strict=True):
        spec = spec_of(payload)
        row = _row(
            spec,
            payload,
            queue=queue,
            priority=priority,
            run_at=when,
            delay=None,
            max_attempts=max_attempts,
            max_run_seconds=max_run_seconds,
            timeout_strategy=timeout_strategy,
            unique_key=key,
            meta=batch_meta,
            json_payload=True,
        )
        specs[spec.name] = spec
        if key is not None:
            first_with_key.setdefault(key, len(rows))
        rows.append(row)
    ids: list[uuid.UUID] = [row["id"] for row in rows]
    # Rows to insert: each key's first row, and every row without a key.
    todo = [i for i, row in enumerate(rows) if row["unique_key"] is None or first_with_key[row["unique_key"]] == i]
    inserted: set[uuid.UUID] = set()
    for _ in range(_UNIQUE_RETRIES):
        try:
            inserted |= await job_insert_many(session, _columns([rows[i] for i in todo]), shared[0], when)
        except ProgrammingError as exc:
            raise _translated(session, exc) from exc
        skipped = {rows[i]["unique_key"]: i for i in todo if rows[i]["id"] not in inserted}
        if not skipped:
            break
        held = await job_live_ids_by_unique_key(session, list(skipped))
        for key, job_id in held.items():
            ids[skipped[key]] = job_id
        # A key's job that finished between our INSERT and SELECT: insert that row again.
        todo = [i for key, i in skipped.items() if key not in held]
        if not todo:
            break
    else:
        raise RuntimeError(f"unique_keys {sorted(skipped)!r} kept conflicting with jobs that finished at once")
    for i, row in enumerate(rows):  # a later row with a key shares its first row's job
        if row["unique_key"] is not None:
            ids[i] = ids[first_with_key[row["unique_key"]]]
    for (name, q), n in collections.Counter(
        (row["task"], row["queue"]) for row in rows if row["id"] in inserted
    ).items():
        specs[name].metrics.job_enqueued(name, q, n)
    return ids


def _columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """``rows`` column-wise, as :func:`~polyqueue.queries.enqueue.job_insert_many` takes them."""
    return dict(
        zip(
            MANY_COLUMNS,
            (
                [r["id"] for r in rows],
                [r["task"] for r in rows],
                [r["queue"] for r in rows],
                [r["payload"] for r in rows],
                [r["priority"] for r in rows],
                [r["max_attempts"] for r in rows],
                [r["max_run_seconds"] for r in rows],
                [r["timeout_strategy"] for r in rows],
                [r["unique_key"] for r in rows],
            ),
            strict=True,
        )
    )
