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

Concurrency (issue #5). The aio SDK's handlers are not safe for concurrent use across a
(re)connect, nor for concurrent transfers on one AMQP session:

* ``ServiceBusSender._open`` / ``ServiceBusReceiver._open`` (``aio/_servicebus_*_async.py``)
  close the handler's current AMQP client when ``_running`` is False, so two calls opening
  at once close each other's client mid-attach; the loser's ``client_ready_async`` then
  reads the ``_session`` that ``close_async`` set to None (``_pyamqp/aio/_client_async.py``):
  ``'NoneType' object has no attribute 'create_sender_link'``. The SDK's retry loop
  (``_do_retryable_operation``) reopens from whichever coroutine is retrying.
* ``Session._outgoing_transfer`` (``_pyamqp/aio/_session_async.py``) reads
  ``next_outgoing_id``, awaits the socket write and only then increments it, so two
  management requests at once (two lock renewals) send transfer ids out of order; the
  peer ends the connection for the sequencing error.

* A settlement (``complete_message`` and the rest) is a disposition frame, which carries no
  transfer id, and then waits for the peer's outcome. The SDK reads that outcome under a
  socket lock shared with the receive, with a 0.2 s read timeout, so a settlement takes about
  0.2 s while a receive runs: one at a time that was 5 acks/s (measured against the test
  peer), and a worker's unacked locks ran out and came back as redeliveries. Only when the
  receive link cannot confirm a settlement (connection lost, link detached) does the SDK
  settle again through the management link, a transfer: concurrent ones may then race, the
  service ends the connection, and the handler is replaced like after any connection error.

So here: a handler is opened once, by one coroutine (``_link`` holds a lock per queue and
kind), and published only when open; the SDK's own retries are off (``retry_total=0``: the
SDK never reopens a handler, the adapter replaces it); calls that send transfers on a
handler's session (publish, schedule, renew) go one at a time per handler; settlements do
not send transfers and run concurrently (``ack_many``, up to ``MAX_CONCURRENT_SETTLES``); a
failed handler is dropped only if it is still the current one, never a fresh replacement,
and closed only once no call is using it. The SDK itself still closes a handler from
whichever call met a connection error, under the others (its retry wrapper,
``_do_retryable_operation``): such a call is reported as that (``_shut_under``), and no call
starts on a handler the SDK has shut down, since it would reopen it from there. A
delivery is settled on the receiver that received it (its lock token is bound to that
link): once that receiver is dropped its deliveries count as lock lost, and Service Bus
redelivers them when the lock expires (Postgres ownership guards the job meanwhile).

``close()`` closes the client, and ``ServiceBusClient.close`` closes every handler it made, a
half-open one too: that handler's open then fails on the session the close set to None
(``'NoneType' object has no attribute 'create_receiver_link'``). A receive usually sees the
close first and cancels its work, but the cancel can be lost (Python 3.11's ``wait_for``
swallows one that meets a finished read), so a receive returns nothing once the broker is
closing, whatever its work did, and an open cut short by the close says "closed".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

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

from polyqueue._aio import gather_all
from polyqueue.brokers.base import (
    BrokerConfig,
    Capabilities,
    Delivery,
    Message,
    decode_each,
    decode_message,
    encode_message,
)
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

__all__ = ["ServiceBusBroker"]

log = logging.getLogger("polyqueue.brokers.servicebus")

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
#: The SDK's own retries reopen a handler from any coroutine (see the module docstring): off.
#: The relay, the worker's fetch loop and its lock renewals retry on their own.
SDK_RETRY_TOTAL = 0
#: Settlements in flight at once in ``ack_many``: each waits ~0.2 s for its outcome (see above).
MAX_CONCURRENT_SETTLES = 64


class _Link:
    """One open SDK sender or receiver, the lock its session's transfers go through, and its users.

    A dropped link is closed only once no call is using it: closing a handler under a running
    receive makes the SDK read links it has already set to None.
    """

    __slots__ = ("closed", "handler", "sends", "users")

    def __init__(self, handler: ServiceBusSender | ServiceBusReceiver) -> None:
        self.handler = handler
        self.sends = asyncio.Lock()  # publish, schedule, renew: one at a time (transfer ids)
        self.users = 0  # SDK calls under way on the handler
        self.closed = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await _close(self.handler)


class _LinkGone(BrokerError):
    """The handler a call needs was dropped after an error: transient for a publish, a lost lock for a delivery."""


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

    def __init__(self, url: str, *, lease_seconds: float = 30.0, queue_prefix: str = "") -> None:
        if lease_seconds <= 0:
            raise ConfigurationError("azure_service_bus broker: lease_seconds must be > 0")
        self.lease_seconds = lease_seconds
        self.queue_prefix = queue_prefix
        self._url = url.strip()
        self.where = _namespace(self._url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: ServiceBusClient | None = None
        self._credential: Any = None
        self._senders: dict[str, _Link] = {}  # open ones only
        self._receivers: dict[str, _Link] = {}
        self._opening: dict[tuple[str, str], asyncio.Lock] = {}  # (kind, queue) -> held while one is opened
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
        work = asyncio.ensure_future(asyncio.gather(*calls))
        closed = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait((work, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            if not work.done():  # close() came first (or this call was cancelled)
                work.cancel()
            # Always collected: a failure that races a cancel is never left "never retrieved".
            await asyncio.gather(work, return_exceptions=True)
        if work.cancelled() or self._closing.is_set():
            # Closed meanwhile. The close may have failed the work before the cancel reached it (a
            # handler still opening, closed under the SDK: 'NoneType' ... 'create_receiver_link'):
            # that is the close, not an error. Deliveries that came anyway are left to their locks.
            return []
        for got in work.result():
            out += got
        self._buffer += out[max_messages:]  # several queues answered: keep the surplus, locked, for next time
        return out[:max_messages]

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """``renew_message_lock``: the lock then runs for the queue's lock duration from now."""
        link, message = _handle(delivery)
        try:
            async with self._call("extend", delivery.queue, link) as receiver:
                await receiver.renew_message_lock(message)
        except _LinkGone as exc:
            raise LeaseLostError(f"lock of job {delivery.job_id} on {delivery.queue!r} is lost: {exc}") from exc
        except LeaseLostError:
            raise
        except BrokerError as exc:
            if isinstance(exc.__cause__, _LOCK_GONE):
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

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        """``abandon_message`` now; with a delay, schedule a copy and complete the original."""
        _, message = _handle(delivery)
        if delay <= 0 or delivery.job_id is None:
            await self._settle("release", delivery, lambda r: r.abandon_message(message))
            return
        link = await self._sender(delivery.queue)
        when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delay)
        copy = ServiceBusMessage(encode_message(Message(delivery.job_id, delivery.queue)))
        async with self._call("release", delivery.queue, link) as sender:
            await sender.schedule_messages(copy, when)
        await self._settle("release", delivery, lambda r: r.complete_message(message))

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
            # Not under link.sends: a disposition carries no transfer id (see the module docstring).
            async with self._call(op, delivery.queue, link, serialised=False) as receiver:
                await settle(receiver)
        except BrokerError as exc:
            if not isinstance(exc, _LinkGone) and not isinstance(exc.__cause__, _LOCK_GONE):
                raise
            log.info("%s of job %s on %r skipped: lock lost (%s)", op, delivery.job_id, delivery.queue, exc)

    def _ready_client(self) -> ServiceBusClient:
        """The client of the running loop (made here; SDK objects never cross event loops)."""
        loop = asyncio.get_running_loop()
        if self._closing.is_set():
            raise BrokerError(f"azure_service_bus broker for {self.where} is closed", transient=False)
        if self._client is not None and self._loop is loop:
            return self._client
        self._senders.clear()  # made on another loop: unusable here, dropped without awaiting
        self._receivers.clear()
        self._opening.clear()
        self._loop = loop
        retries: dict[str, Any] = {"retry_total": SDK_RETRY_TOTAL}
        if "=" in self._url and ";" in self._url:
            self._client = ServiceBusClient.from_connection_string(self._url, **retries)
        else:
            self._credential = _default_credential()
            self._client = ServiceBusClient(self.where, self._credential, **retries)
        return self._client

    async def _sender(self, queue: str) -> _Link:
        return await self._link(self._senders, "sender", queue)

    async def _receiver(self, queue: str) -> _Link:
        """The queue's receiver, opened here: a short receive wait must not have to cover the link's attach."""
        return await self._link(self._receivers, "receiver", queue)

    async def _link(self, links: dict[str, _Link], kind: str, queue: str) -> _Link:
        """The queue's open handler of this kind; opened by one coroutine while the others wait."""
        self._ready_client()
        link = links.get(queue)
        if link is not None:
            return link
        async with self._opening.setdefault((kind, queue), asyncio.Lock()):
            client = self._ready_client()
            link = links.get(queue)
            if link is not None:
                return link  # another caller opened it meanwhile
            if kind == "sender":
                handler: ServiceBusSender | ServiceBusReceiver = client.get_queue_sender(self.entity(queue))
            else:
                mode = ServiceBusReceiveMode.PEEK_LOCK
                handler = client.get_queue_receiver(self.entity(queue), receive_mode=mode, prefetch_count=0)
            try:
                async with self._mapped("open", queue, None):
                    await handler.__aenter__()
                if self._closing.is_set():
                    raise BrokerError(f"azure_service_bus broker for {self.where} is closed", transient=False)
            except BaseException as exc:  # cancelled too: never leave a half-open handler behind
                await _close(handler)
                if self._closing.is_set() and isinstance(exc, Exception):
                    # close() closed the client, and with it this half-open handler: the SDK's open
                    # then reads the session it set to None ('create_receiver_link'). Say what happened.
                    raise BrokerError(f"azure_service_bus broker for {self.where} is closed", transient=False) from exc
                raise
            link = links[queue] = _Link(handler)
            return link

    def _is_current(self, link: _Link) -> bool:
        return any(current is link for current in (*self._receivers.values(), *self._senders.values()))

    async def _drop(self, link: _Link) -> None:
        """Forget ``link`` if it is still current (a replacement opened since is left alone).

        Its handler is closed now if no call is using it, else by the last call to leave it.
        """
        for links in (self._receivers, self._senders):
            for q, current in list(links.items()):
                if current is link:
                    del links[q]  # before any await: no new call can pick it up
                    if link.users == 0:
                        await link.close()

    async def _drop_all(self) -> None:
        """Shutdown: close every handler, in use or not (a blocked call then fails, and is over)."""
        for links in (self._receivers, self._senders):
            for q, link in list(links.items()):
                del links[q]
                await link.close()
        client, credential, self._client, self._credential = self._client, self._credential, None, None
        with contextlib.suppress(Exception):
            if client is not None:
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await client.close()
            if credential is not None:
                await credential.close()

    @contextlib.asynccontextmanager
    async def _call(self, op: str, queue: str, link: _Link, *, serialised: bool = True) -> AsyncIterator[Any]:
        """One SDK call on ``link``'s handler: one sender of transfers at a time, errors mapped.

        A link dropped before the call starts raises ``_LinkGone``: the call never reaches a
        closed handler (which would reopen it, or fail in ways that say nothing).
        """
        async with link.sends if serialised else contextlib.nullcontext():
            if not self._is_current(link):
                raise _LinkGone(f"azure service bus {op} on {self.entity(queue)!r}: its link was closed after an error")
            if not getattr(link.handler, "_running", True):
                # The SDK shut the handler down after another call's error (see _shut_under): a call
                # now would reopen it from here, racing any other caller that does the same.
                await self._drop(link)
                raise _LinkGone(f"azure service bus {op} on {self.entity(queue)!r}: the SDK shut its handler down")
            link.users += 1
            try:
                async with self._mapped(op, queue, link):
                    yield link.handler
            finally:
                link.users -= 1
                if link.users == 0 and not self._is_current(link):
                    await link.close()  # dropped while this call used it

    @contextlib.asynccontextmanager
    async def _mapped(self, op: str, queue: str, link: _Link | None) -> AsyncIterator[None]:
        """Map SDK errors to ``BrokerError``; after a connection-level one, drop ``link`` (made anew on next use)."""
        try:
            yield
        except (ServiceBusError, MessageAlreadySettled, OSError, TimeoutError) as exc:
            if link is not None and isinstance(exc, ServiceBusError) and getattr(exc, "_shutdown_handler", False):
                await self._drop(link)
            if link is not None and _shut_under(link, exc):
                raise BrokerError(
                    f"azure service bus {op} on {self.entity(queue)!r} at {self.where} failed: the SDK shut the "
                    "handler down during the call, after another call on it lost the connection",
                    transient=True,
                ) from exc
            transient = not isinstance(exc, (*_PERMANENT, *_LOCK_GONE, MessageAlreadySettled))
            raise BrokerError(
                f"azure service bus {op} on {self.entity(queue)!r} at {self.where} failed: {exc}", transient=transient
            ) from exc
        except Exception as exc:  # the SDK's own bugs, e.g. AttributeError mid-attach
            if link is not None:
                await self._drop(link)
            raise BrokerError(
                f"azure service bus {op} on {self.entity(queue)!r} at {self.where} failed unexpectedly: {exc!r}",
                transient=True,
            ) from exc


def _shut_under(link: _Link, exc: BaseException) -> bool:
    """Whether ``exc`` is the SDK failing a call because it closed the call's handler meanwhile.

    The SDK's retry wrapper closes a handler on any connection-level error, from whichever call
    met it; a receive running at the same time on that handler then reads the links the close
    set to None (``'NoneType' object has no attribute 'flow'``), which the SDK reports as
    "Handler failed". Not so when this adapter closed the handler: it never closes one in use.
    """
    inner = getattr(exc, "inner_exception", None)
    return (
        isinstance(inner, AttributeError)
        and "'NoneType'" in str(inner)
        and "create_" not in str(inner)  # two opens racing (create_*_link): _link and _call prevent those
        and not link.closed
        and not getattr(link.handler, "_running", True)
    )


async def _close(handler: ServiceBusSender | ServiceBusReceiver) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await handler.close()


def _handle(delivery: Delivery) -> tuple[_Link, ServiceBusReceivedMessage]:
    link, message = delivery.handle
    return link, message


def _delivery(queue: str, link: _Link, message: ServiceBusReceivedMessage) -> Delivery:
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
