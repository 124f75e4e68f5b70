"""One conformance suite, run against every broker adapter on its real service.

Each harness hands out its adapter behind ``BrokerFacade``, as ``make_broker`` does: the
suite checks the contract the runtime relies on (``polyqueue.brokers.base.Broker``), errors
as the facade maps them.

Timing: leases are short (0.5-1 s) and time passes inside ``receive(wait=...)``;
bounds are generous so a loaded machine does not flake.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Sequence

import pytest

from polyqueue.brokers.base import Broker, Delivery, Message
from polyqueue.errors import BrokerError, LeaseLostError
from tests.brokers.harness import Harness

Q = "default"


def messages(n: int, queue: str = Q) -> list[Message]:
    return [Message(uuid.uuid4(), queue) for _ in range(n)]


async def receive_until(broker: Broker, count: int, timeout: float, queues: Sequence[str] = (Q,)) -> list[Delivery]:
    """Receive until ``count`` deliveries arrived or ``timeout`` passed (nothing is acked)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[Delivery] = []
    while len(got) < count and (left := deadline - loop.time()) > 0:
        got += await broker.receive(list(queues), count - len(got), min(left, 1.0))
    return got


def need_lease(broker: Broker) -> None:
    if not broker.capabilities.lease:
        pytest.skip("broker has no lease (capabilities.lease=False)")


async def test_publish_receive_ack(harness: Harness) -> None:
    lease = 1.0
    broker = await harness.make(lease_seconds=lease)
    await broker.ensure([Q])
    await broker.ensure([Q])  # idempotent
    [msg] = messages(1)
    await broker.publish([msg])
    [d] = await receive_until(broker, 1, 5.0)
    assert (d.job_id, d.queue, d.delivery_count, d.error) == (msg.job_id, Q, 1, None)
    await broker.ack(d)
    wait = lease + 0.5 if broker.capabilities.lease else 0.2  # acked: not redelivered even past the lease
    assert await broker.receive([Q], 10, wait) == []


async def test_batch_publish_delivers_each_once(harness: Harness) -> None:
    broker = await harness.make()
    batch = messages(250)
    await broker.publish(batch)
    await broker.publish([])
    got: list[Delivery] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while len(got) < len(batch) and loop.time() < deadline:
        received = await broker.receive([Q], 100, 1.0)
        assert len(received) <= 100
        for d in received:
            await broker.ack(d)
        got += received
    assert sorted(str(d.job_id) for d in got) == sorted(str(m.job_id) for m in batch)
    assert await broker.receive([Q], 100, 0.2) == []


async def test_receive_over_several_queues_respects_max(harness: Harness) -> None:
    broker = await harness.make()
    sent = messages(5, "q1") + messages(5, "q2")
    await broker.publish(sent)
    first = await broker.receive(["q1", "q2"], 3, 2.0)
    assert 1 <= len(first) <= 3
    rest = await receive_until(broker, 10 - len(first), 5.0, ("q1", "q2"))
    got = first + rest
    assert sorted((str(d.job_id), d.queue) for d in got) == sorted((str(m.job_id), m.queue) for m in sent)
    for d in got:
        await broker.ack(d)


async def test_lease_extension_keeps_delivery(harness: Harness) -> None:
    lease = 1.0
    owner = await harness.make(lease_seconds=lease)
    need_lease(owner)
    other = await harness.make(lease_seconds=lease)
    # other's first receive opens its link (an AMQP attach, slow on a loaded box): before the
    # lease clock starts, so each round below costs 0.4 s plus one renewal, never a connect.
    assert await other.receive([Q], 10, 0.01) == []
    await owner.publish(messages(1))
    [d] = await receive_until(owner, 1, 5.0)
    for _ in range(4):  # 4 x 0.4 s: well past one lease
        assert await other.receive([Q], 10, 0.4) == []
        await owner.extend(d, lease)
    await owner.ack(d)
    assert await other.receive([Q], 10, 0.2) == []


async def test_unacked_delivery_is_redelivered_after_lease(harness: Harness) -> None:
    lease = 1.0
    crashed = await harness.make(lease_seconds=lease)
    need_lease(crashed)
    survivor = await harness.make(lease_seconds=lease)
    [msg] = messages(1)
    await crashed.publish([msg])
    [first] = await receive_until(crashed, 1, 5.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    [again] = await receive_until(survivor, 1, lease + 5.0)
    assert again.job_id == msg.job_id
    assert again.delivery_count > first.delivery_count
    assert loop.time() - started >= lease * 0.8  # not before the lease ran out
    await survivor.ack(again)


async def test_empty_receive_returns_within_wait(harness: Harness) -> None:
    """An empty receive returns once ``wait`` is over, give or take a round trip.

    What a first call sets up is not part of the wait, and is done before the clock starts: an
    SDK client (aiobotocore loads its service model), queue URLs resolved and queues created
    (three SQS round trips), an AMQP link attached. Timed with it, SQS's first ``receive(wait=0)``
    took 1.43 s on a loaded machine. The slack then scales with the round trip measured here.
    """
    broker = await harness.make()
    await broker.ensure([Q])
    loop = asyncio.get_running_loop()
    assert await broker.receive([Q], 10, 0.0) == []  # set-up, untimed
    started = loop.time()
    assert await broker.receive([Q], 10, 0.0) == []
    round_trip = loop.time() - started
    for wait in (0.0, 0.5):
        started = loop.time()
        assert await broker.receive([Q], 10, wait) == []
        assert loop.time() - started < wait + 1.0 + 3 * round_trip


async def test_close_returns_blocked_receive(harness: Harness) -> None:
    broker = await harness.make()
    task = asyncio.create_task(broker.receive([Q], 10, 30.0), name="blocked-receive")
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done, "receive returned before anything was published or closed"
    loop = asyncio.get_running_loop()
    started = loop.time()
    await broker.close()
    try:
        result = await asyncio.wait_for(task, 3.0)
    except asyncio.CancelledError:  # cancelling the receive is a clean outcome too
        result = []
    assert result == []
    assert loop.time() - started < 1.5  # returned by close(), not by its own wait running out


@pytest.mark.parametrize("body", [b"not json", b'{"id": "not-a-uuid"}', b'["a list"]', b"[" * 2000, None])
async def test_malformed_message_is_acked_for_good(harness: Harness, body: bytes | None) -> None:
    lease = 1.0
    broker = await harness.make(lease_seconds=lease)
    await broker.ensure([Q])
    await harness.inject_malformed(Q, body)
    [d] = await receive_until(broker, 1, 5.0)
    assert d.job_id is None and d.queue == Q and d.error
    await broker.ack(d)
    wait = lease + 0.5 if broker.capabilities.lease else 0.2
    assert await broker.receive([Q], 10, wait) == []


#: Forged bodies that must each come back as one ``Delivery(job_id=None, error=...)`` (issue #14).
#: 2,000 brackets fit the size cap but nest past ``json.loads``'s recursion limit; the second is
#: valid JSON (a jsonb column, PGMQ, accepts it), the first is not; then bytes that are not
#: UTF-8, ids of the wrong type, a deep object, a body past the size cap, and no body at all.
FORGED_BODIES: list[bytes | None] = [
    b"[" * 2000,
    b"[" * 2000 + b"]" * 2000,
    b"\xff\xfejunk",
    b'{"id": 7, "queue": "default"}',
    b'{"id": ' * 500 + b"1" + b"}" * 500,
    b"x" * 5000,
    None,
]


async def test_forged_deliveries_never_touch_the_good_ones_beside_them(harness: Harness) -> None:
    """Guarantee 7: each delivery is decoded on its own. Forged bodies published raw between real
    messages come back as malformed deliveries that can be acked, and every real message comes
    back on its first read: with a lease longer than the test, nothing read by a receive that
    failed could come back in time (before the fix one such body failed the whole read)."""
    broker = await harness.make(lease_seconds=60.0)
    await broker.ensure([Q])
    good = messages(3)
    await broker.publish(good[:2])
    for body in FORGED_BODIES:
        await harness.inject_malformed(Q, body)
    await broker.publish(good[2:])
    total = len(good) + len(FORGED_BODIES)
    got = await receive_until(broker, total, 15.0)
    real = [d for d in got if d.job_id is not None]
    forged = [d for d in got if d.job_id is None]
    assert sorted(str(d.job_id) for d in real) == sorted(str(m.job_id) for m in good)
    assert all(d.delivery_count == 1 and d.error is None for d in real)
    assert len(forged) == len(FORGED_BODIES)
    assert all(d.queue == Q and d.error for d in forged), [d.error for d in forged]
    for d in got:
        await broker.ack(d)
    assert await broker.receive([Q], 10, 0.2) == []


async def test_ack_many_acks_a_batch_and_respects_ownership(harness: Harness) -> None:
    """The batch ack the worker sends its acks with: same meaning as ack, one call."""
    lease = 0.5
    stale = await harness.make(lease_seconds=lease)
    need_lease(stale)
    owner = await harness.make(lease_seconds=lease)
    await stale.publish(messages(5))
    got = await receive_until(stale, 5, 5.0)
    await stale.ack_many(got[:4])  # four acked for good; the fifth is left to lapse
    wait = lease + 0.5
    [late] = await receive_until(owner, 1, wait + 5.0)
    assert late.job_id == got[4].job_id
    await stale.ack_many([got[4]])  # stale: must not remove the new owner's delivery
    await owner.extend(late, lease)
    await owner.ack_many([late])
    assert await owner.receive([Q], 10, wait) == []


async def test_ack_many_acks_every_delivery_of_a_batch(harness: Harness) -> None:
    """Without leases too: a batch over several queues is acked for good."""
    lease = 1.0
    broker = await harness.make(lease_seconds=lease)
    await broker.publish(messages(3, "q1") + messages(3, "q2"))
    got = await receive_until(broker, 6, 5.0, ("q1", "q2"))
    assert len(got) == 6
    await broker.ack_many(got)
    await broker.ack_many([])
    wait = lease + 0.5 if broker.capabilities.lease else 0.2
    assert await broker.receive(["q1", "q2"], 10, wait) == []


async def test_stale_ack_keeps_the_new_owners_delivery(harness: Harness) -> None:
    """After a takeover, the old owner's ack/extend must not touch the new owner's delivery."""
    lease = 0.5
    stale = await harness.make(lease_seconds=lease)
    need_lease(stale)
    owner = await harness.make(lease_seconds=lease)
    [msg] = messages(1)
    await stale.publish([msg])
    [old] = await receive_until(stale, 1, 5.0)
    [new] = await receive_until(owner, 1, lease + 5.0)  # taken over once the lease ran out
    assert new.job_id == msg.job_id
    with contextlib.suppress(LeaseLostError):  # a no-op or LeaseLostError; never an ack of `new`
        await stale.ack(old)
    with pytest.raises(LeaseLostError):
        await stale.extend(old, lease)
    await owner.extend(new, lease)  # still owned: the stale ack removed nothing
    [again] = await receive_until(stale, 1, lease + 5.0)  # and it is still there once owner's lease lapses
    assert again.job_id == msg.job_id
    await stale.ack(again)


async def test_dead_letter_after_n_deliveries(harness: Harness) -> None:
    # A lease long enough that a loaded machine does not miss a delivery between two receives
    # (with 0.5 s, Service Bus dead-lettered a message whose second delivery lapsed unseen).
    lease, limit = 1.5, 2
    broker = await harness.make(lease_seconds=lease, dead_letter_after=limit)
    need_lease(broker)
    if not broker.capabilities.dead_letter:
        pytest.skip("broker does not dead-letter (capabilities.dead_letter=False)")
    assert harness.dead_letters is not None, "an adapter that dead-letters needs a harness hook to read them"
    [msg] = messages(1)
    await broker.publish([msg])
    counts: list[int] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (limit + 2) * lease + 5.0
    while loop.time() < deadline and not await harness.dead_letters(Q):
        counts += [d.delivery_count for d in await broker.receive([Q], 10, lease)]  # never acked
    assert counts == list(range(1, limit + 1))
    [body] = await harness.dead_letters(Q)
    assert json.loads(body)["id"] == str(msg.job_id)
    assert await broker.receive([Q], 10, lease * 2) == []  # gone from the queue for good


async def test_reconnects_after_service_restart(private_harness: Harness) -> None:
    h = private_harness
    assert h.stop is not None and h.start is not None
    broker = await h.make()
    [before, during, after] = messages(3)
    await broker.publish([before])
    await h.stop()
    await h.start(True)
    if broker.capabilities.survives_restart:
        [d] = await receive_until(broker, 1, 5.0)
        assert d.job_id == before.job_id
        await broker.ack(d)
    await h.stop()
    with pytest.raises(BrokerError) as raised:
        await broker.publish([during])
    assert raised.value.is_transient()
    with pytest.raises(BrokerError):
        await broker.receive([Q], 10, 0.2)
    await h.start(False)  # back, but empty: streams and groups are gone
    await broker.publish([after])
    [d] = await receive_until(broker, 1, 5.0)
    assert d.job_id == after.job_id
    await broker.ack(d)
