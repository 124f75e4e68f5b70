"""Azure Service Bus broker: one Service Bus queue per polyqueue queue, peek-lock receive.

* publish: ``ServiceBusMessage`` batches (``create_message_batch``, a new batch when one
  is full); ``message_id`` is derived from the job so duplicate detection, where the
  queue has it on, drops a relay's re-publish.
* receive: ``PEEK_LOCK`` up to the free slots; the lock is the lease. ``extend`` is
  ``renew_message_lock`` (the worker calls it every third of ``lease_seconds``).
* ack: ``complete_message``; a malformed message is dead-lettered with the parse error
  as its reason instead. Deliveries still buffered at close are abandoned
  (``abandon_message``) rather than left locked.
* crash recovery: the lock expires and Service Bus redelivers with a higher delivery
  count; past the queue's ``MaxDeliveryCount`` it moves the message to the dead-letter
  sub-queue.

SDK objects are bound to the event loop that created them; on another loop they are
dropped and made anew. How the SDK's handlers are opened, shared, replaced and closed under
concurrent calls is :mod:`polyqueue.brokers.servicebus_links`. See
docs/brokers/azure-service-bus.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage
from azure.servicebus.aio import ServiceBusReceiver
from azure.servicebus.exceptions import MessageSizeExceededError

from polyqueue._aio import gather_all
from polyqueue.brokers.base import (
    CLOSED,
    BrokerAdapter,
    BrokerConfig,
    Capabilities,
    Closed,
    Delivery,
    Message,
    by_queue,
    decode_each,
    decode_message,
    encode_message,
    unless_closed,
)
from polyqueue.brokers.servicebus_links import LOCK_GONE, Link, LinkGone, ServiceBusLinks
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

__all__ = ["ServiceBusBroker"]

log = logging.getLogger("polyqueue.brokers.servicebus")

#: Longest single SDK receive: bounds how long a receive over several queues favours one.
MAX_RECEIVE_WAIT = 5.0
#: The SDK refuses a zero wait; this one returns what is buffered or arrives at once.
MIN_RECEIVE_WAIT = 0.01
#: Settlements in flight at once in ``ack_many``: each waits ~0.2 s for its outcome (see servicebus_links).
MAX_CONCURRENT_SETTLES = 64


class ServiceBusBroker(ServiceBusLinks, BrokerAdapter):
    """Deliveries on Azure Service Bus queues (``queue_backend="azure_service_bus"``).

    ``url`` is a connection string (``Endpoint=sb://...;SharedAccessKeyName=...``) or a
    namespace URL ``sb://NAMESPACE.servicebus.windows.net``, which authenticates with
    ``azure-identity``'s ``DefaultAzureCredential``. ``queue_prefix`` is prepended to every
    queue name. The lock duration is a property of each Service Bus queue: keep it at least
    ``lease_seconds``, as the worker renews every third of ``lease_seconds``.
    """

    name = "azure_service_bus"
    capabilities = Capabilities(lease=True, survives_restart=True, dead_letter=True)

    def __init__(self, url: str, *, lease_seconds: float = 30.0, queue_prefix: str = "") -> None:
        if lease_seconds <= 0:
            raise ConfigurationError("azure_service_bus broker: lease_seconds must be > 0")
        super().__init__(url, queue_prefix)
        self.lease_seconds = lease_seconds
        self._buffer: list[Delivery] = []  # received over several queues beyond max_messages

    def __repr__(self) -> str:
        return f"ServiceBusBroker({self.where!r}, queue_prefix={self.queue_prefix!r})"

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        """Open a sender per queue, so a missing queue fails here (queues are created outside polyqueue)."""
        for q in queues:
            await self._sender(q)

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send each queue's messages in as few ``ServiceBusMessageBatch`` transfers as fit."""
        for q, group in by_queue(messages).items():
            link = await self._sender(q)
            async with self._call("publish", q, link) as sender:
                batch = await sender.create_message_batch()
                for m in group:
                    sb_message = ServiceBusMessage(encode_message(m), message_id=_message_id(m))
                    try:
                        batch.add_message(sb_message)
                    except MessageSizeExceededError:
                        await sender.send_messages(batch)
                        batch = await sender.create_message_batch()
                        batch.add_message(sb_message)
                if len(batch):
                    await sender.send_messages(batch)

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Peek-lock up to ``max_messages`` over the queues, waiting up to ``wait`` for any."""
        if self._closing.is_set() or not queues or max_messages < 1:
            return []
        out = self._take_buffered(queues, max_messages)
        if out:
            return out
        wait = min(max(wait, MIN_RECEIVE_WAIT), MAX_RECEIVE_WAIT)
        calls = [self._receive_one(q, max_messages, wait) for q in queues]
        try:
            got = await unless_closed(asyncio.gather(*calls), self._closing)
        except Exception:
            if not self._closing.is_set():
                raise
            got = CLOSED
        if isinstance(got, Closed) or self._closing.is_set():
            # Closed meanwhile. The close may have failed the work before the cancel reached it (a
            # handler still opening, closed under the SDK: 'NoneType' ... 'create_receiver_link'):
            # that is the close, not an error. Deliveries that came anyway are left to their locks.
            return []
        for each in got:
            out += each
        self._buffer += out[max_messages:]  # several queues answered: keep the surplus, locked, for next time
        return out[:max_messages]

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """``renew_message_lock``: the lock then runs for the queue's lock duration from now."""
        link, message = _handle(delivery)
        try:
            async with self._call("extend", delivery.queue, link) as receiver:
                await receiver.renew_message_lock(message)
        except LinkGone as exc:
            raise LeaseLostError(f"lock of job {delivery.job_id} on {delivery.queue!r} is lost: {exc}") from exc
        except LeaseLostError:
            raise
        except BrokerError as exc:
            if isinstance(exc.__cause__, LOCK_GONE):
                raise LeaseLostError(f"lock of job {delivery.job_id} on {delivery.queue!r} is lost") from exc.__cause__
            raise

    async def ack(self, delivery: Delivery) -> None:
        """``complete_message``; a malformed message is dead-lettered with its parse error instead."""
        _, message = _handle(delivery)
        if delivery.job_id is None:
            reason = (delivery.error or "malformed")[:4000]
            await self._settle("dead-letter", delivery, lambda r: r.dead_letter_message(message, "malformed", reason))
        else:
            await self._settle("ack", delivery, lambda r: r.complete_message(message))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """:meth:`ack` for many, up to ``MAX_CONCURRENT_SETTLES`` at once; the first failure is raised after all ran."""
        slots = asyncio.Semaphore(MAX_CONCURRENT_SETTLES)

        async def one(delivery: Delivery) -> None:
            async with slots:
                await self.ack(delivery)

        await gather_all(*(one(d) for d in deliveries))

    async def release(self, delivery: Delivery) -> None:
        """Not part of the contract: ``abandon_message``, for deliveries still buffered at close."""
        _, message = _handle(delivery)
        await self._settle("release", delivery, lambda r: r.abandon_message(message))

    async def close(self) -> None:
        """Return any blocked receive, close receivers, senders and the client (idempotent)."""
        if self._closing.is_set():
            return
        self._closing.set()
        for d in self._buffer:  # give held surplus back rather than leave it locked
            with contextlib.suppress(BrokerError):
                await self.release(d)
        self._buffer.clear()
        await self._drop_all()

    # -- internals -------------------------------------------------------------------------------
    def _take_buffered(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        keep: list[Delivery] = []
        now = datetime.datetime.now(datetime.UTC)
        for d in self._buffer:
            link, message = _handle(d)
            if message.locked_until_utc is not None and message.locked_until_utc <= now:
                continue  # its lock ran out while held: Service Bus redelivers it
            if not self._is_current(link):
                continue  # its receiver was dropped: the lock is lost, Service Bus redelivers it
            (out if d.queue in queues and len(out) < limit else keep).append(d)
        self._buffer = keep
        return out

    async def _receive_one(self, queue: str, limit: int, wait: float) -> list[Delivery]:
        link = await self._receiver(queue)
        # Not under link.sends: a receive only grants credit (flow frames) and may wait seconds.
        async with self._call("receive", queue, link, serialised=False) as receiver:
            got = await receiver.receive_messages(max_message_count=limit, max_wait_time=wait)
        # each decoded on its own: one bad message (body, annotation) never fails the others
        return decode_each(queue, got, lambda m: _delivery(queue, link, m), handle=lambda m: (link, m))

    async def _settle(
        self, op: str, delivery: Delivery, settle: Callable[[ServiceBusReceiver], Awaitable[None]]
    ) -> None:
        """Settle on the delivery's own receiver; a lost lock is a logged no-op (Postgres ownership guards)."""
        link, _ = _handle(delivery)
        try:
            # Not under link.sends: a disposition carries no transfer id (see servicebus_links).
            async with self._call(op, delivery.queue, link, serialised=False) as receiver:
                await settle(receiver)
        except BrokerError as exc:
            if not isinstance(exc, LinkGone) and not isinstance(exc.__cause__, LOCK_GONE):
                raise
            log.info("%s of job %s on %r skipped: lock lost (%s)", op, delivery.job_id, delivery.queue, exc)


def _handle(delivery: Delivery) -> tuple[Link, ServiceBusReceivedMessage]:
    link, message = delivery.handle
    return link, message


def _delivery(queue: str, link: Link, message: ServiceBusReceivedMessage) -> Delivery:
    """A ``Delivery`` for a received message; ``handle`` is ``(receiver link, message)``."""
    handle = (link, message)
    try:  # the SDK reports prior failed deliveries (None for none); a hint only (guarantee 7)
        count = max(0, int(message.delivery_count or 0)) + 1
    except (TypeError, ValueError):
        count = 1
    try:
        body = b"".join(_chunks(message))
    except Exception as exc:  # whatever the SDK hands over as a body is this message's problem only
        return Delivery(None, queue, handle, count, error=f"body is not binary data: {exc}")
    delivery = decode_message(body, queue=queue, handle=handle, delivery_count=count)
    if delivery.job_id is None:
        delivery.extra["body"] = body
    return delivery


def _chunks(message: ServiceBusReceivedMessage) -> Iterator[bytes]:
    body: Any = message.body
    if isinstance(body, bytes | bytearray):
        yield bytes(body)
        return
    for chunk in body:
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError(f"a {type(chunk).__name__} section")
        yield bytes(chunk)


def _message_id(message: Message) -> str:
    """The relay's dispatch key, so Service Bus duplicate detection drops only a re-publish of
    one dispatch (a batch whose transaction rolled back), never a retry or a re-dispatch; a
    message without one (published by hand) gets a fresh id: never deduplicated."""
    return message.dispatch_key or str(uuid.uuid4())


def create(config: BrokerConfig) -> ServiceBusBroker:
    """The adapter for ``queue_backend="azure_service_bus"`` (``broker_url`` is required)."""
    if not config.url:
        raise ConfigurationError(
            "queue_backend 'azure_service_bus' needs broker_url: a connection string or sb://NAMESPACE.servicebus.windows.net"
        )
    return ServiceBusBroker(config.url, lease_seconds=config.lease_seconds)
