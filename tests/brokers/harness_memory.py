"""The in-process broker in the conformance suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from polyqueue.brokers.base import Broker, Delivery, decode_message
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.brokers.memory import MemoryBroker
from tests.brokers.harness import Adapter, Harness


# -- memory ------------------------------------------------------------------------------------------
@asynccontextmanager
async def memory_harness(_service: object) -> AsyncIterator[Harness]:
    broker = MemoryBroker()

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        return BrokerFacade(broker)  # one process-local queue set: every "consumer" shares it

    async def inject(queue: str, body: bytes | None) -> None:
        bad = decode_message(body, queue=queue) if body is not None else Delivery(None, queue, error="no body")
        broker._queues[queue].append(bad)
        broker._available.set()

    try:
        yield Harness(make, inject)
    finally:
        await broker.close()


NAME = "memory"
ADAPTER = Adapter(open=memory_harness)
