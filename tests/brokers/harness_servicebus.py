"""Azure Service Bus in the conformance suite: the unmodified SDK against the AMQP 1.0 test peer.

Each test gets its own queue-name prefix; the lease a test asks for becomes the lock
duration of its queues on the peer (on Service Bus it is a property of the queue).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient

from polyqueue.brokers.base import Broker
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.brokers.servicebus import ServiceBusBroker
from tests.brokers.harness import Adapter, Harness
from tests.servicebus_peer.peer import ServiceBusPeer


@asynccontextmanager
async def servicebus_harness(peer: ServiceBusPeer, own: bool = False) -> AsyncIterator[Harness]:
    prefix = f"pqtest-{uuid.uuid4().hex[:12]}-"
    conn = peer.connection_string
    brokers: list[ServiceBusBroker] = []
    raw = ServiceBusClient.from_connection_string(conn)

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        peer.configure(prefix, lock_duration=lease_seconds, max_delivery_count=dead_letter_after)
        broker = ServiceBusBroker(conn, lease_seconds=lease_seconds, queue_prefix=prefix)
        brokers.append(broker)
        return BrokerFacade(broker)  # what the runtime holds: make_broker's shape

    async def inject(queue: str, body: bytes | None) -> None:
        async with raw.get_queue_sender(prefix + queue) as sender:
            await sender.send_messages(ServiceBusMessage(body if body is not None else b""))

    async def dead_letters(queue: str) -> list[bytes]:
        dlq = raw.get_queue_receiver(prefix + queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER)
        async with dlq:
            got = await dlq.receive_messages(max_message_count=100, max_wait_time=0.2)
            for m in got:
                await dlq.abandon_message(m)  # leave them for the next look
        return [b"".join(m.body) for m in got]

    async def stop() -> None:
        peer.stop()

    async def start(keep_data: bool) -> None:
        if not keep_data:
            peer.wipe()
        peer.start()

    try:
        yield Harness(make, inject, dead_letters, stop if own else None, start if own else None)
    finally:
        for b in brokers:
            await b.close()
        await raw.close()


@asynccontextmanager
async def private_servicebus_harness(_directory: Path) -> AsyncIterator[Harness]:
    peer = ServiceBusPeer()
    peer.start()
    try:
        async with servicebus_harness(peer, own=True) as harness:
            yield harness
    finally:
        peer.stop()


@pytest.fixture(scope="session")
def servicebus_peer() -> Iterator[ServiceBusPeer]:
    """The AMQP 1.0 test peer on a free port of 127.0.0.1, shared by the session."""
    peer = ServiceBusPeer()
    peer.start()
    yield peer
    peer.stop()


NAME = "azure_service_bus"
ADAPTER = Adapter(open=servicebus_harness, service="servicebus_peer", open_private=private_servicebus_harness)
