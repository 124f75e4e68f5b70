"""Runs one claimed job and turns what happened into an :class:`Outcome`.

Pure of scheduling: no slots, no brokers. The runtime decides when to call it;
the completer persists what it returns.
"""

from __future__ import annotations

import asyncio
import logging
import re
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError, to_json
from sqlalchemy.exc import StatementError
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._redact import error_record
from polyqueue.context import JobContext
from polyqueue.errors import Retry, TerminalError
from polyqueue.queries import ClaimedJob, Outcome
from polyqueue.registry import TaskSpec
from polyqueue.types import JobStatus, TimeoutStrategy

__all__ = ["TimeLimitExceeded", "error_record", "execute", "hide_sql_parameters", "retry_or_fail"]

log = logging.getLogger("polyqueue.worker")


#: A JSON-escaped NUL (``\u0000`` after an even run of backslashes): JSONB refuses it, and one
#: such outcome failed the whole completion batch it was written in.
_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def hide_sql_parameters(exc: BaseException) -> None:
    """Make a SQLAlchemy error (and its chained causes) print without its bound parameters: they
    hold payloads and results, and the handler's engine may not set ``hide_parameters``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StatementError):
            current.hide_parameters = True
        current = current.__cause__ or current.__context__


class TimeLimitExceeded(Exception):
    """The handler ran past ``max_run_seconds``."""


def _failed(job: ClaimedJob, kind: str, message: str, tb: str | None = None) -> Outcome:
    error = error_record(job.attempt, kind, message, tb)
    return Outcome(job.id, job.attempt, job.worker_id, JobStatus.FAILED, error_json=error, error_type=kind)


def retry_or_fail(
    job: ClaimedJob, spec: TaskSpec, kind: str, message: str, tb: str | None = None, delay: float | None = None
) -> Outcome:
    error = error_record(job.attempt, kind, message, tb)
    if job.attempt >= job.max_attempts:
        return Outcome(job.id, job.attempt, job.worker_id, JobStatus.FAILED, error_json=error, error_type=kind)
    wait = spec.backoff.delay(job.attempt) if delay is None else delay
    return Outcome(job.id, job.attempt, job.worker_id, JobStatus.PENDING, error_json=error, delay=wait, error_type=kind)


async def _call(spec: TaskSpec, payload: Any, ctx: JobContext, job: ClaimedJob) -> Any:
    args = (payload, ctx) if spec.takes_context else (payload,)
    limit = job.max_run_seconds
    strategy = job.timeout_strategy
    if limit is None:
        return await spec.func(*args)
    if strategy == TimeoutStrategy.IGNORE:
        handle = asyncio.get_running_loop().call_later(
            limit, lambda: ctx.logger.warning("job passed its %ss time limit; strategy 'ignore' lets it run", limit)
        )
        try:
            return await spec.func(*args)
        finally:
            handle.cancel()
    try:
        async with asyncio.timeout(limit) as scope:
            return await spec.func(*args)
    except TimeoutError as exc:
        if scope.expired():
            raise TimeLimitExceeded(f"ran longer than max_run_seconds={limit}") from exc
        raise


async def execute(
    job: ClaimedJob,
    spec: TaskSpec,
    *,
    engine: AsyncEngine,
    heartbeat: Callable[[], Awaitable[None]],
) -> tuple[Outcome, JobContext | None]:
    """Run ``job`` once. Never raises, except ``CancelledError`` (shutdown or cancellation)."""
    try:
        payload = spec.payload_model.model_validate(job.payload)
    except ValidationError as exc:
        return _failed(job, "ValidationError", f"payload does not fit {spec.payload_model.__name__}: {exc}"), None
    ctx = JobContext(
        job_id=job.id,
        task=job.task,
        queue=job.queue,
        attempt=job.attempt,
        max_attempts=job.max_attempts,
        meta=job.meta,
        engine=engine,
        heartbeat=heartbeat,
    )
    try:
        value = await _call(spec, payload, ctx, job)
    except asyncio.CancelledError:
        if ctx.session_used:  # roll back the handler's writes and return its connection to the pool
            await asyncio.shield(ctx.session.close())
        raise
    except TimeLimitExceeded as exc:
        if job.timeout_strategy == TimeoutStrategy.FAIL:
            return _failed(job, "TimeLimitExceeded", str(exc)), ctx
        return retry_or_fail(job, spec, "TimeLimitExceeded", str(exc), None, None), ctx
    except TerminalError as exc:
        return _failed(job, type(exc).__name__, str(exc), traceback.format_exc()), ctx
    except ValidationError as exc:  # raised inside the handler: a bug in data, not a transient fault
        return _failed(job, "ValidationError", str(exc), traceback.format_exc()), ctx
    except Retry as exc:
        return retry_or_fail(job, spec, "Retry", str(exc), None, exc.delay), ctx
    except Exception as exc:
        hide_sql_parameters(exc)
        return retry_or_fail(job, spec, type(exc).__name__, str(exc), traceback.format_exc(), None), ctx
    try:
        result = to_json(value)
    except (PydanticSerializationError, TypeError, ValueError) as exc:
        return _failed(
            job, "ResultNotSerializable", f"result of task {job.task!r} is not JSON-serialisable: {exc}"
        ), ctx
    if _NUL.search(result):
        return _failed(
            job,
            "ResultNotSerializable",
            f"result of task {job.task!r} contains a NUL character (U+0000), which Postgres JSONB cannot store",
        ), ctx
    if len(result) > spec.max_result_bytes:  # bytes of UTF-8, as stored
        return _failed(
            job,
            "ResultTooLarge",
            f"result of task {job.task!r} is {len(result)} bytes; the limit is {spec.max_result_bytes} "
            "(max_result_bytes): store large results elsewhere and return a reference",
        ), ctx
    return Outcome(job.id, job.attempt, job.worker_id, JobStatus.SUCCEEDED, result_json=result.decode()), ctx
