"""Closing the Service Bus adapter while one of its handlers is still opening (issue #14).

``ServiceBusClient.close`` closes every handler the client made, one half-open too: the SDK's
open loop (``ServiceBusReceiver._open``: ``client_ready_async`` until the link attaches) then
reads the session the close set to None: ``'NoneType' object has no attribute
'create_receiver_link'``. A receive caught in that used to raise it as a transient BrokerError
after ``close()`` instead of returning nothing; an ``ensure`` (a sender opening) reported it as
an unexpected failure instead of "closed". The test peer holds the link attach, so the close
lands inside the open every time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from polyqueue.brokers.servicebus import ServiceBusBroker
from polyqueue.errors import BrokerError
from tests.servicebus_peer.peer import ServiceBusPeer


@pytest.fixture
def peer() -> Iterator[ServiceBusPeer]:
    peer = ServiceBusPeer()
    peer.start()
    yield peer
    peer.stop()


async def _attach_held(peer: ServiceBusPeer, timeout: float = 20.0) -> None:
    """Until the peer holds a queue link's attach: the handler is half-open."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while peer.held_attaches() < 1:
        assert loop.time() < deadline, "the adapter never attached a queue link"
        await asyncio.sleep(0.01)


async def test_close_during_a_receivers_open_returns_the_receive_empty(peer: ServiceBusPeer) -> None:
    for _ in range(3):  # the interleaving is forced each time; three rounds show it is not luck
        broker = ServiceBusBroker(peer.connection_string, queue_prefix=f"pq-{uuid.uuid4().hex[:8]}-")
        peer.hold_attaches(True)
        receive = asyncio.create_task(broker.receive(["default"], 10, 30.0))
        try:
            await _attach_held(peer)
            await broker.close()
            try:
                got = await asyncio.wait_for(receive, 10.0)
            except asyncio.CancelledError:  # cancelled by close: a clean outcome too
                got = []
            assert got == []
        finally:
            peer.hold_attaches(False)
            receive.cancel()
            await asyncio.gather(receive, return_exceptions=True)
            await broker.close()


async def test_close_during_a_senders_open_says_closed(peer: ServiceBusPeer) -> None:
    broker = ServiceBusBroker(peer.connection_string, queue_prefix=f"pq-{uuid.uuid4().hex[:8]}-")
    peer.hold_attaches(True)
    ensure = asyncio.create_task(broker.ensure(["default"]))
    try:
        await _attach_held(peer)
        await broker.close()
        with pytest.raises(BrokerError) as raised:
            await asyncio.wait_for(ensure, 10.0)
        assert "is closed" in str(raised.value), raised.value
        assert not raised.value.is_transient()
    finally:
        peer.hold_attaches(False)
        ensure.cancel()
        await asyncio.gather(ensure, return_exceptions=True)
        await broker.close()
