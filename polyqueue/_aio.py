"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from typing import Any

__all__ = ["bounded", "gather_all", "stop_tasks", "wait_any", "wait_any_future"]


#: Tasks :func:`bounded` gave up on, kept referenced until they end (asyncio holds tasks weakly).
_ABANDONED: set[asyncio.Future[object]] = set()


async def bounded(what: str, awaitable: Awaitable[object], log: logging.Logger, seconds: float = 10.0) -> None:
    """Await a step (of a shutdown, of a job's end) for at most ``seconds``, then cancel it and
    go on; its failure is logged, not raised. A broker SDK stuck on a dead link (or a handler
    that swallows cancellation) must not hold a process or a job, and nothing is lost by moving
    on: Postgres holds every job."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=seconds)
    if not done:
        task.cancel()
        _ABANDONED.add(task)
        task.add_done_callback(_ABANDONED.discard)
        log.error("%s did not finish within %.0f s; going on without it", what, seconds)
    elif not task.cancelled() and task.exception() is not None:
        log.warning("shutdown: %s failed: %s", what, task.exception())


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]], log: logging.Logger, seconds: float = 5.0) -> None:
    """Give ``tasks`` (loops already told to stop) ``seconds`` to end, cancel those that did not,
    and wait for them; their failures are logged."""
    tasks = list(tasks)
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=seconds)
    for task in late:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, Exception):
            log.error("%s failed: %s", task.get_name(), result, exc_info=result)


async def gather_all(*aws: Awaitable[Any]) -> None:
    """Run every awaitable to its end, then raise the first failure (none is cut short by another's)."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    if errors := [r for r in results if isinstance(r, BaseException)]:
        raise errors[0]


async def wait_any(*events: asyncio.Event, seconds: float | None) -> bool:
    """Wait until any of ``events`` is set or ``seconds`` pass; True if an event was set."""
    if any(e.is_set() for e in events):
        return True
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*waiters, return_exceptions=True)
    return bool(done)


async def wait_any_future(future: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait for ``future`` or for ``stop``; True when the future finished first (or both)."""
    if future.done():
        return True
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([future, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
    return future.done()
