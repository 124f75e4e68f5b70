"""In-process broker: one asyncio deque per queue. For tests, scripts and single-process apps.

Deliveries live only in this process; a crash loses them, and the maintenance
loop's re-dispatch backstop sends their jobs again (Postgres is the truth).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

from polyqueue.brokers.base import BrokerAdapter, Capabilities, Delivery, ErrorMap, Message

__all__ = ["MemoryBroker"]


class MemoryBroker(BrokerAdapter):
    """The ``queue_backend="memory"`` broker: an in-process queue (relay and worker in one process)."""

    name = "memory"
    capabilities = Capabilities(lease=False, survives_restart=False)
    errors = ErrorMap("memory", "this process")

    def __init__(self) -> None:
        self._queues: dict[str, collections.deque[Delivery]] = collections.defaultdict(collections.deque)
        self._available = asyncio.Event()
        self._closed = False

    async def ensure(self, queues: Sequence[str]) -> None:
        for q in queues:
            self._queues[q]

    async def publish(self, messages: Sequence[Message]) -> None:
        for m in messages:
            self._queues[m.queue].append(Delivery(m.job_id, m.queue))
        if messages:
            self._available.set()

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while not self._closed:
            self._available.clear()
            out: list[Delivery] = []
            for q in queues:
                dq = self._queues[q]
                while dq and len(out) < max_messages:
                    out.append(dq.popleft())
            if out:
                if any(self._queues[q] for q in queues):
                    self._available.set()
                return out
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            try:
                await asyncio.wait_for(self._available.wait(), remaining)
            except TimeoutError:
                return []
        return []

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        return None  # no lease: a delivery stays with its receiver until acked

    async def ack(self, delivery: Delivery) -> None:
        return None

    async def close(self) -> None:
        self._closed = True
        self._available.set()
