"""Reading job results: by id, typed by a model, typed by the registry, or waited for."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, TypeVar

from pydantic import TypeAdapter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from polyqueue.errors import JobFailedError, JobNotFinishedError, JobNotFoundError, ResultTimeoutError
from polyqueue.models import Job
from polyqueue.registry import Polyqueue, find_task
from polyqueue.types import DONE_CHANNEL, TERMINAL_STATUSES, JobStatus

__all__ = ["get_job_result", "get_job_result_typed", "get_job_result_typed_via_registry", "wait_for_result"]

T = TypeVar("T")

_COLUMNS = (Job.status, Job.result, Job.errors, Job.task)


def _as_uuid(job_id: uuid.UUID | str) -> uuid.UUID:
    return job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))


def _interpret(job_id: uuid.UUID, row: Any) -> Any:
    if row is None:
        raise JobNotFoundError(f"no job {job_id}")
    status, result, errors, task = row
    if status == JobStatus.SUCCEEDED:
        return result
    if status in (JobStatus.FAILED, JobStatus.CANCELLED):
        last = errors[-1] if errors else None
        detail = f": {last.get('type')}: {last.get('message')}" if last else ""
        raise JobFailedError(f"job {job_id} ({task}) {status}{detail}", status=status, last_error=last)
    raise JobNotFinishedError(f"job {job_id} ({task}) is {status}, not finished")


async def _fetch(conn: AsyncSession | AsyncConnection, job_id: uuid.UUID) -> Any:
    return (await conn.execute(select(*_COLUMNS).where(Job.id == job_id))).first()


async def get_job_result(session: AsyncSession | AsyncConnection, job_id: uuid.UUID | str) -> Any:
    """The stored result (JSON value) of a succeeded job.

    Raises ``JobNotFoundError``, ``JobNotFinishedError``, or ``JobFailedError`` (with the last error).
    """
    jid = _as_uuid(job_id)
    return _interpret(jid, await _fetch(session, jid))


async def get_job_result_typed(
    session: AsyncSession | AsyncConnection, job_id: uuid.UUID | str, model: type[T] | Any
) -> T:
    """The result validated into ``model`` (a BaseModel, or any type pydantic can validate).

    Raises:
        JobNotFoundError, JobNotFinishedError, JobFailedError: as :func:`get_job_result`.
        pydantic.ValidationError: the stored result does not fit ``model``.
    """
    value = await get_job_result(session, job_id)
    result: T = TypeAdapter(model).validate_python(value)
    return result


async def get_job_result_typed_via_registry(
    session: AsyncSession | AsyncConnection, job_id: uuid.UUID | str, *, app: Polyqueue | None = None
) -> Any:
    """The result validated into the return annotation of the handler that ran it: ``app``'s
    task of the job's name, or (without ``app``) that of the one app in this process with it.

    Raises:
        JobNotFoundError, JobNotFinishedError, JobFailedError: as :func:`get_job_result`.
        UnknownTaskError: no app in this process registers the job's task, or several do and
            ``app`` is not given.
    """
    jid = _as_uuid(job_id)
    row = await _fetch(session, jid)
    value = _interpret(jid, row)
    return find_task(row[3], app).result_adapter.validate_python(value)


async def wait_for_result(
    job_id: uuid.UUID | str,
    *,
    engine: AsyncEngine,
    timeout: float = 30.0,
    model: Any = None,
    poll_interval: float = 5.0,
) -> Any:
    """Wait until the job finishes and return its result (validated into ``model`` if given).

    Wakes on the completion NOTIFY; polls every ``poll_interval`` only as a fallback.
    Raises ``ResultTimeoutError`` after ``timeout`` seconds, ``JobFailedError`` if the job failed.
    """
    jid = _as_uuid(job_id)
    wanted = str(jid)
    done = asyncio.Event()

    def on_notify(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
        if wanted in payload.split(","):
            done.set()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with engine.connect() as conn:
        raw = (await conn.get_raw_connection()).driver_connection
        assert raw is not None
        await raw.add_listener(DONE_CHANNEL, on_notify)
        try:
            while True:
                # After LISTEN, so a completion between the check and the wait still wakes us.
                row = await _fetch(conn, jid)
                await conn.rollback()
                if row is None or row[0] in TERMINAL_STATUSES:
                    value = _interpret(jid, row)
                    return value if model is None else TypeAdapter(model).validate_python(value)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ResultTimeoutError(f"job {jid} did not finish within {timeout}s (it is {row[0]})")
                done.clear()
                try:
                    await asyncio.wait_for(done.wait(), min(remaining, poll_interval))
                except TimeoutError:
                    pass
        finally:
            await raw.remove_listener(DONE_CHANNEL, on_notify)
