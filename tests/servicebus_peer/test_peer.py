"""The test peer's own tests, through the unmodified azure-servicebus aio SDK."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import MessageLockLostError

from tests.servicebus_peer.peer import ServiceBusPeer

LOCK = 1.0


@pytest.fixture(scope="module")
def peer() -> Iterator[ServiceBusPeer]:
    p = ServiceBusPeer(lock_duration=LOCK, max_delivery_count=3)
    p.start()
    yield p
    p.stop()


@pytest.fixture
async def client(peer: ServiceBusPeer) -> AsyncIterator[ServiceBusClient]:
    async with ServiceBusClient.from_connection_string(peer.connection_string) as c:
        yield c


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


async def _send(client: ServiceBusClient, queue: str, *bodies: bytes) -> None:
    async with client.get_queue_sender(queue) as sender:
        await sender.send_messages([ServiceBusMessage(b) for b in bodies])


async def _receive(receiver: ServiceBusReceiver, count: int, wait: float = 3.0) -> list[ServiceBusReceivedMessage]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    got: list[ServiceBusReceivedMessage] = []
    while len(got) < count and (left := deadline - loop.time()) > 0:
        got += await receiver.receive_messages(max_message_count=count - len(got), max_wait_time=min(left, 1.0))
    return got


def _body(m: ServiceBusReceivedMessage) -> bytes:
    return b"".join(m.body)


async def test_batch_send_receive_complete(client: ServiceBusClient, queue: str) -> None:
    async with client.get_queue_sender(queue) as sender:
        batch = await sender.create_message_batch()
        for i in range(5):
            batch.add_message(ServiceBusMessage(f"m{i}".encode(), message_id=f"id{i}"))
        await sender.send_messages(batch)
        await sender.send_messages(ServiceBusMessage(b"single"))
    async with client.get_queue_receiver(queue) as receiver:
        got = await _receive(receiver, 6)
        assert [_body(m) for m in got] == [b"m0", b"m1", b"m2", b"m3", b"m4", b"single"]
        assert [m.message_id for m in got[:5]] == [f"id{i}" for i in range(5)]
        assert [m.sequence_number for m in got] == sorted(m.sequence_number or 0 for m in got)
        assert all(m.delivery_count in (None, 0) and m.locked_until_utc for m in got)
        for m in got:
            await receiver.complete_message(m)
        assert await receiver.receive_messages(max_wait_time=LOCK + 0.5) == []


async def test_abandon_redelivers_with_a_higher_count(client: ServiceBusClient, queue: str) -> None:
    await _send(client, queue, b"x")
    async with client.get_queue_receiver(queue) as receiver:
        [m] = await _receive(receiver, 1)
        await receiver.abandon_message(m)
        [again] = await _receive(receiver, 1)
        assert (_body(again), again.delivery_count) == (b"x", 1)
        await receiver.complete_message(again)


async def test_lock_expiry_redelivers_and_the_old_lock_is_lost(client: ServiceBusClient, queue: str) -> None:
    await _send(client, queue, b"x")
    async with client.get_queue_receiver(queue) as first, client.get_queue_receiver(queue) as second:
        [m] = await _receive(first, 1)
        [again] = await _receive(second, 1, wait=LOCK + 3)
        assert again.delivery_count == 1
        with pytest.raises(MessageLockLostError):
            await first.complete_message(m)
        with pytest.raises(MessageLockLostError):
            await first.renew_message_lock(m)
        await second.complete_message(again)


async def test_renewal_keeps_the_lock(client: ServiceBusClient, queue: str) -> None:
    await _send(client, queue, b"x")
    async with client.get_queue_receiver(queue) as owner, client.get_queue_receiver(queue) as other:
        [m] = await _receive(owner, 1)
        for _ in range(4):
            assert await other.receive_messages(max_wait_time=LOCK / 2) == []
            before = m.locked_until_utc
            await owner.renew_message_lock(m)
            assert m.locked_until_utc and before and m.locked_until_utc > before
        await owner.complete_message(m)


async def test_dead_letter_with_reason_and_after_max_delivery_count(client: ServiceBusClient, queue: str) -> None:
    await _send(client, queue, b"bad", b"poison")
    async with client.get_queue_receiver(queue) as receiver:
        [bad, poison] = await _receive(receiver, 2)
        await receiver.dead_letter_message(bad, reason="unparseable", error_description="not JSON")
        await receiver.abandon_message(poison)
        for _ in range(2):  # max_delivery_count=3: abandoned on the 1st and 2nd, dropped on the 3rd
            [poison] = await _receive(receiver, 1)
            await receiver.abandon_message(poison)
        assert await receiver.receive_messages(max_wait_time=0.5) == []
    async with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
        dead = await _receive(dlq, 2)
        assert [(_body(m), m.dead_letter_reason) for m in dead] == [
            (b"bad", "unparseable"),
            (b"poison", "MaxDeliveryCountExceeded"),
        ]
        assert dead[0].dead_letter_error_description == "not JSON"
        for m in dead:
            await dlq.complete_message(m)


async def test_scheduled_message_waits_and_can_be_cancelled(client: ServiceBusClient, queue: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=4)
    async with client.get_queue_sender(queue) as sender:
        [keep] = await sender.schedule_messages(ServiceBusMessage(b"later"), when)
        [drop] = await sender.schedule_messages(ServiceBusMessage(b"never"), when)
        assert keep != drop
        await sender.cancel_scheduled_messages(drop)
    async with client.get_queue_receiver(queue) as receiver:
        assert await receiver.receive_messages(max_wait_time=0.5) == []
        [m] = await _receive(receiver, 1, wait=8.0)
        assert _body(m) == b"later" and loop.time() - started >= 3.9
        await receiver.complete_message(m)
        assert await receiver.receive_messages(max_wait_time=0.5) == []


async def test_competing_receivers_share_the_messages_once(client: ServiceBusClient, queue: str) -> None:
    await _send(client, queue, *[str(i).encode() for i in range(20)])
    async with client.get_queue_receiver(queue) as a, client.get_queue_receiver(queue) as b:
        got_a, got_b = await asyncio.gather(_receive(a, 10), _receive(b, 10))
        assert sorted(int(_body(m)) for m in got_a + got_b) == list(range(20))
        assert got_a and got_b
        for r, ms in ((a, got_a), (b, got_b)):
            for m in ms:
                await r.complete_message(m)
