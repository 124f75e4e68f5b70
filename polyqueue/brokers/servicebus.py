"""Azure Service Bus broker: one Service Bus queue per polyqueue queue, peek-lock receive.

* publish: ``ServiceBusMessage`` batches (``create_message_batch``, a new batch when one
  is full); ``message_id`` is derived from the job so duplicate detection, where the
  queue has it on, drops a relay's re-publish.
* receive: ``PEEK_LOCK`` up to the free slots; the lock is the lease. ``extend`` is
  ``renew_message_lock`` (the worker calls it every third of ``lease_seconds``).
* ack: ``complete_message``; a malformed message is dead-lettered with the parse error
  as its reason instead. release: ``abandon_message``, or with a delay a scheduled
  copy (``schedule_messages``) and ``complete_message`` of the original.
* crash recovery: the lock expires and Service Bus redelivers with a higher delivery
  count; past the queue's ``MaxDeliveryCount`` it moves the message to the dead-letter
  sub-queue.

SDK objects are bound to the event loop that created them; on another loop they are
dropped and made anew. See docs/brokers/azure-service-bus.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from typing import Any, TypeVar

from azure.servicebus import ServiceBusMessage, ServiceBusReceivedMessage, ServiceBusReceiveMode
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver, ServiceBusSender
from azure.servicebus.exceptions import (
    MessageAlreadySettled,
    MessageLockLostError,
    MessageNotFoundError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusError,
    ServiceBusQuotaExceededError,
)

from polyqueue.brokers.base import BrokerConfig, Capabilities, Delivery, Message, decode_message, encode_message
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

__all__ = ["ServiceBusBroker"]

log = logging.getLogger("polyqueue.brokers.servicebus")

T = TypeVar("T")

#: Errors retrying will not fix: wrong credentials, rights, a missing queue, a full namespace.
_PERMANENT = (
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    MessagingEntityNotFoundError,
    ServiceBusQuotaExceededError,
    MessageSizeExceededError,
)
_LOCK_GONE = (MessageLockLostError, MessageNotFoundError, MessageAlreadySettled)
#: Longest single SDK receive: bounds how long a receive over several queues favours one.
MAX_RECEIVE_WAIT = 5.0
#: The SDK refuses a zero wait; this one returns what is buffered or arrives at once.
MIN_RECEIVE_WAIT = 0.01
#: Longest wait for one SDK handler to close: shutdown must not hang on a dead connection.
CLOSE_TIMEOUT = 2.0


class ServiceBusBroker:
    """Deliveries on Azure Service Bus queues (``queue_backend="azure_service_bus"``).

    ``url`` is a connection string (``Endpoint=sb://...;SharedAccessKeyName=...``) or a
    namespace URL ``sb://NAMESPACE.servicebus.windows.net``, which authenticates with
    ``azure-identity``'s ``DefaultAzureCredential``. ``queue_prefix`` is prepended to every
    queue name. The lock duration is a property of each Service Bus queue: keep it at least
    ``lease_seconds``, as the worker renews every third of ``lease_seconds``.
    """

    name = "azure_service_bus"
    capabilities = Capabilities(lease=True, delayed_release=True, survives_restart=True, dead_letter=True)

    def __init__(self, url: str, *, lease_seconds: float = 30.0, queue_prefix: str = "", retry_total: int = 2) -> None:
        if lease_seconds <= 0:
            raise ConfigurationError("azure_service_bus broker: lease_seconds must be > 0")
        self.lease_seconds = lease_seconds
        self.queue_prefix = queue_prefix
        self._url = url.strip()
        self._retry_total = retry_total  # short SDK retries: the relay and the worker retry on their own
        self.where = _namespace(self._url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: ServiceBusClient | None = None
        self._credential: Any = None
        self._senders: dict[str, ServiceBusSender] = {}
        self._receivers: dict[str, ServiceBusReceiver] = {}
        self._buffer: list[Delivery] = []  # received over several queues beyond max_messages
        self._closing = asyncio.Event()

    def __repr__(self) -> str:
        return f"ServiceBusBroker({self.where!r}, queue_prefix={self.queue_prefix!r})"

    def entity(self, queue: str) -> str:
        """The Service Bus queue of a polyqueue queue."""
        return self.queue_prefix + queue

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        """Open a sender per queue, so a missing queue fails here (queues are created outside polyqueue)."""
        for q in queues:
            await self._sender(q)

    async def publish(self, messages: Sequence[Message]) -> None:
        """Send each queue's messages in as few ``ServiceBusMessageBatch`` transfers as fit."""
        by_queue: dict[str, list[Message]] = {}
        for m in messages:
            by_queue.setdefault(m.queue, []).append(m)
        for q, group in by_queue.items():
            sender = await self._sender(q)
            async with self._mapped("publish", q):
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
        work = asyncio.ensure_future(asyncio.gather(*calls))
        closed = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((work, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not work.done():  # close() came first (or this call was cancelled)
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            return []
        for got in work.result():
            out += got
        self._buffer += out[max_messages:]  # several queues answered: keep the surplus, locked, for next time
        return out[:max_messages]

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """``renew_message_lock``: the lock then runs for the queue's lock duration from now."""
        receiver, message = _handle(delivery)
        try:
            async with self._mapped("extend", delivery.queue):
                await receiver.renew_message_lock(message)
        except LeaseLostError:
            raise
        except BrokerError as exc:
            if isinstance(exc.__cause__, _LOCK_GONE):
                raise LeaseLostError(f"lock of job {delivery.job_id} on {delivery.queue!r} is lost") from exc.__cause__
            raise

    async def ack(self, delivery: Delivery) -> None:
        """``complete_message``; a malformed message is dead-lettered with its parse error instead."""
        receiver, message = _handle(delivery)
        if delivery.job_id is None:
            reason = (delivery.error or "malformed")[:4000]
            await self._settle("dead-letter", delivery, receiver.dead_letter_message(message, "malformed", reason))
        else:
            await self._settle("ack", delivery, receiver.complete_message(message))

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        """``abandon_message`` now; with a delay, schedule a copy and complete the original."""
        receiver, message = _handle(delivery)
        if delay <= 0 or delivery.job_id is None:
            await self._settle("release", delivery, receiver.abandon_message(message))
            return
        sender = await self._sender(delivery.queue)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        copy = ServiceBusMessage(encode_message(Message(delivery.job_id, delivery.queue)))
        async with self._mapped("release", delivery.queue):
            await sender.schedule_messages(copy, when)
        await self._settle("release", delivery, receiver.complete_message(message))

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
            _, message = _handle(d)
            if message.locked_until_utc is not None and message.locked_until_utc <= now:
                continue  # its lock ran out while held: Service Bus redelivers it
            (out if d.queue in queues and len(out) < limit else keep).append(d)
        self._buffer = keep
        return out

    async def _receive_one(self, queue: str, limit: int, wait: float) -> list[Delivery]:
        receiver = await self._receiver(queue)
        async with self._mapped("receive", queue):
            got = await receiver.receive_messages(max_message_count=limit, max_wait_time=wait)
        return [_delivery(queue, receiver, m) for m in got]

    async def _settle(self, op: str, delivery: Delivery, call: Awaitable[None]) -> None:
        """Run a settlement; a lost lock makes it a logged no-op (Postgres ownership is the guard)."""
        try:
            async with self._mapped(op, delivery.queue):
                await call
        except BrokerError as exc:
            if not isinstance(exc.__cause__, _LOCK_GONE):
                raise
            log.info("%s of job %s on %r skipped: lock lost (%s)", op, delivery.job_id, delivery.queue, exc.__cause__)

    def _ready_client(self) -> ServiceBusClient:
        """The client of the running loop (made here; SDK objects never cross event loops)."""
        loop = asyncio.get_running_loop()
        if self._closing.is_set():
            raise BrokerError(f"azure_service_bus broker for {self.where} is closed", transient=False)
        if self._client is not None and self._loop is loop:
            return self._client
        self._senders.clear()  # made on another loop: unusable here, dropped without awaiting
        self._receivers.clear()
        self._loop = loop
        if "=" in self._url and ";" in self._url:
            self._client = ServiceBusClient.from_connection_string(
                self._url, retry_total=self._retry_total, retry_backoff_factor=0.2, retry_backoff_max=2.0
            )
        else:
            self._credential = _default_credential()
            self._client = ServiceBusClient(
                self.where,
                self._credential,
                retry_total=self._retry_total,
                retry_backoff_factor=0.2,
                retry_backoff_max=2.0,
            )
        return self._client

    async def _sender(self, queue: str) -> ServiceBusSender:
        client = self._ready_client()
        if queue not in self._senders:
            await self._open(self._senders, queue, client.get_queue_sender(self.entity(queue)))
        return self._senders[queue]

    async def _receiver(self, queue: str) -> ServiceBusReceiver:
        """The queue's receiver, opened here: a short receive wait must not have to cover the link's attach."""
        client = self._ready_client()
        if queue not in self._receivers:
            mode = ServiceBusReceiveMode.PEEK_LOCK
            receiver = client.get_queue_receiver(self.entity(queue), receive_mode=mode, prefetch_count=0)
            await self._open(self._receivers, queue, receiver)
        return self._receivers[queue]

    async def _open(self, handlers: dict[str, Any], queue: str, handler: ServiceBusSender | ServiceBusReceiver) -> None:
        handlers[queue] = handler
        try:
            async with self._mapped("open", queue):
                await handler.__aenter__()
        except BrokerError:
            await self._drop(handlers, queue)
            raise

    async def _drop(self, handlers: dict[str, Any], queue: str) -> None:
        handler = handlers.pop(queue, None)
        if handler is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await handler.close()

    async def _drop_all(self) -> None:
        for handlers in (self._receivers, self._senders):
            for q in list(handlers):
                await self._drop(handlers, q)
        client, credential, self._client, self._credential = self._client, self._credential, None, None
        with contextlib.suppress(Exception):
            if client is not None:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await client.close()
            if credential is not None:
                await credential.close()

    @contextlib.asynccontextmanager
    async def _mapped(self, op: str, queue: str) -> Any:
        """Map SDK errors to ``BrokerError``; after a connection-level one, drop the queue's handlers."""
        try:
            yield
        except (ServiceBusError, MessageAlreadySettled, OSError, TimeoutError) as exc:
            if isinstance(exc, ServiceBusError) and getattr(exc, "_shutdown_handler", False):
                await self._drop(self._receivers, queue)  # made anew, and reconnected, on next use
                await self._drop(self._senders, queue)
            transient = not isinstance(exc, (*_PERMANENT, *_LOCK_GONE, MessageAlreadySettled))
            raise BrokerError(
                f"azure service bus {op} on {self.entity(queue)!r} at {self.where} failed: {exc}", transient=transient
            ) from exc
        except Exception as exc:  # the SDK's own bugs while (re)connecting, e.g. AttributeError mid-attach
            await self._drop(self._receivers, queue)
            await self._drop(self._senders, queue)
            raise BrokerError(
                f"azure service bus {op} on {self.entity(queue)!r} at {self.where} failed unexpectedly: {exc!r}",
                transient=True,
            ) from exc


def _handle(delivery: Delivery) -> tuple[ServiceBusReceiver, ServiceBusReceivedMessage]:
    receiver, message = delivery.handle
    return receiver, message


def _delivery(queue: str, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage) -> Delivery:
    """A ``Delivery`` for a received message; ``handle`` is ``(receiver, message)``."""
    handle = (receiver, message)
    count = (message.delivery_count or 0) + 1  # the SDK reports prior failed deliveries (None for none)
    try:
        body = b"".join(_chunks(message))
    except (TypeError, ValueError) as exc:
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
    """``JOB_ID/ATTEMPT`` when the message carries its attempt, so Service Bus duplicate detection
    drops only a re-publish of the same attempt; without an attempt a fresh id (no deduplication:
    a retry's new attempt must never be dropped as a duplicate)."""
    attempt = getattr(message, "attempt", None)
    return f"{message.job_id}/{attempt}" if attempt is not None else str(uuid.uuid4())


def _namespace(url: str) -> str:
    """The namespace host, for messages (never the key)."""
    for part in url.split(";"):
        key, _, value = part.partition("=")
        if key.strip().lower() == "endpoint":
            return value.strip().removeprefix("sb://").rstrip("/")
    if url.startswith("sb://"):
        return url.removeprefix("sb://").rstrip("/")
    raise ConfigurationError(
        "the azure_service_bus broker needs a connection string (Endpoint=sb://...;SharedAccessKeyName=...) "
        "or a namespace URL sb://NAMESPACE.servicebus.windows.net"
    )


def _default_credential() -> Any:
    try:  # optional, and imported only for a namespace URL
        identity = importlib.import_module("azure.identity.aio")
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            "broker_url sb://NAMESPACE authenticates with azure-identity: pip install azure-identity "
            "(or use a connection string)"
        ) from exc
    return identity.DefaultAzureCredential()


def create(config: BrokerConfig) -> ServiceBusBroker:
    """The adapter for ``queue_backend="azure_service_bus"`` (``broker_url`` is required)."""
    if not config.url:
        raise ConfigurationError(
            "queue_backend 'azure_service_bus' needs broker_url: a connection string or sb://NAMESPACE.servicebus.windows.net"
        )
    return ServiceBusBroker(config.url, lease_seconds=config.lease_seconds)
