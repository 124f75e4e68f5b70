"""Small asyncio helpers shared by the background loops."""

from __future__ import annotations

import asyncio
import contextlib

__all__ = ["wait_any"]


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
