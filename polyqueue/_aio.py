"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any

__all__ = ["gather_all", "wait_any", "wait_any_future"]


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
