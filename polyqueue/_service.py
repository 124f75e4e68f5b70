"""One shape for polyqueue's background loops (the relay, maintenance and its passes, the
worker's heartbeat, the listener's reconnect), after River's maintenance services.

A :class:`Service` does one pass in :meth:`Service.run_once` (tests and ``polyqueue admin``
call it directly) and repeats it in :meth:`Service.run` until ``stop`` is set: a failed pass
is logged and retried after the service's :class:`~polyqueue.retry.Backoff` (the shared
policy, not a hand-rolled doubling), a good one is followed by :meth:`Service._rest`. Each
pass fires :attr:`Service.passes` or :attr:`Service.failures`, signals that tests await
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, TypeVar

from polyqueue._aio import wait_any
from polyqueue.retry import Backoff

__all__ = ["Service", "Signal", "steady"]

T = TypeVar("T")


def steady(seconds: float) -> Backoff:
    """Failed passes retried at the service's own pace, every ``seconds``: for loops whose pass
    costs a down dependency nothing and must not fall behind (a heartbeat, a lease renewal)."""
    return Backoff(base=seconds, factor=1.0, maximum=seconds, jitter=False)


class Signal:
    """A counter of events that tests await: ``await signal.reach(signal.count + 1)``."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def fire(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def reach(self, count: int, *, timeout: float = 30.0) -> None:
        """Return once the signal fired ``count`` times in all; ``TimeoutError`` after ``timeout``."""
        async with asyncio.timeout(timeout):
            while self.count < count:
                await self._changed.wait()

    async def next(self, *, timeout: float = 30.0) -> None:
        """Return once the signal fires again."""
        await self.reach(self.count + 1, timeout=timeout)


class Service(Generic[T]):
    """A background loop: ``run_once`` is one pass, ``run`` repeats it every ``interval``.

    ``backoff`` spaces the retries of failed passes (the n-th failure in a row waits
    ``backoff.delay(n)``); ``log`` names the service in its failure messages.
    """

    name = "service"
    #: Wait ``interval`` before the first pass too (the pass just happened another way).
    rest_first = False

    def __init__(self, *, interval: float, backoff: Backoff, log: logging.Logger) -> None:
        self.interval = interval
        self.backoff = backoff
        self.log = log
        #: Fired after each pass that succeeded / failed.
        self.passes = Signal()
        self.failures = Signal()

    async def run_once(self) -> T:
        """One pass; raises what went wrong."""
        raise NotImplementedError

    async def run(self, stop: asyncio.Event) -> None:
        """Run passes until ``stop`` is set: failures are logged and backed off, never raised."""
        if self.rest_first and await wait_any(stop, seconds=self.interval):
            return
        failures = 0  # in a row
        while not stop.is_set():
            try:
                result = await self._attempt(stop)
            except Exception as exc:
                failures += 1
                delay = self.backoff.delay(failures)
                self._failed(exc, delay)
                self.failures.fire()
                await wait_any(stop, seconds=delay)
                continue
            recovered, failures = failures > 0, 0
            self.passes.fire()
            await self._rest(stop, result, recovered)

    async def _attempt(self, stop: asyncio.Event) -> T:
        """The pass ``run`` makes (``run_once`` unless a service needs more, such as giving up on
        a stop request)."""
        return await self.run_once()

    async def _rest(self, stop: asyncio.Event, result: T, recovered: bool) -> None:
        """Wait after a good pass (``recovered``: the passes before it failed)."""
        await wait_any(stop, seconds=self.interval)

    def _failed(self, exc: Exception, delay: float) -> None:
        self.log.warning("%s failed (%s); retrying in %.1fs", self.name, exc, delay)
