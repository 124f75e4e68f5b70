"""Azure Service Bus: the SDK handlers (senders, receivers) the adapter calls through.

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

:class:`ServiceBusLinks` is that machinery; :class:`~polyqueue.brokers.servicebus.ServiceBusBroker`
builds the broker contract on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import Any

from azure.servicebus import ServiceBusReceiveMode
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

from polyqueue.brokers.base import ErrorMap
from polyqueue.errors import BrokerError, ConfigurationError

__all__ = ["CLOSE_TIMEOUT", "LOCK_GONE", "SDK_ERRORS", "Link", "LinkGone", "ServiceBusLinks"]

_PERMANENT = (
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    MessagingEntityNotFoundError,
    ServiceBusQuotaExceededError,
    MessageSizeExceededError,
)
LOCK_GONE = (MessageLockLostError, MessageNotFoundError, MessageAlreadySettled)
#: Longest wait for one SDK handler to close: shutdown must not hang on a dead connection.
CLOSE_TIMEOUT = 2.0
#: The SDK's own retries reopen a handler from any coroutine (see the module docstring): off.
#: The relay, the worker's fetch loop and its lock renewals retry on their own.
SDK_RETRY_TOTAL = 0
#: What the SDK raises (and the socket under it): mapped to ``BrokerError`` by :meth:`ServiceBusLinks._mapped`.
SDK_ERRORS = (ServiceBusError, MessageAlreadySettled, OSError, TimeoutError)


class Link:
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


class LinkGone(BrokerError):
    """The handler a call needs was dropped after an error: transient for a publish, a lost lock for a delivery."""


class ServiceBusLinks:
    """The client and the open handlers of one broker, per queue and kind (see the module docstring)."""

    def __init__(self, url: str, queue_prefix: str) -> None:
        self.queue_prefix = queue_prefix
        self._url = url.strip()
        self.where = _namespace(self._url)
        self.errors = ErrorMap("azure_service_bus", self.where, SDK_ERRORS, _transient, repr_unexpected)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: ServiceBusClient | None = None
        self._credential: Any = None
        self._senders: dict[str, Link] = {}  # open ones only
        self._receivers: dict[str, Link] = {}
        self._opening: dict[tuple[str, str], asyncio.Lock] = {}  # (kind, queue) -> held while one is opened
        self._closing = asyncio.Event()

    def entity(self, queue: str) -> str:
        """The Service Bus queue of a polyqueue queue."""
        return self.queue_prefix + queue

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

    async def _sender(self, queue: str) -> Link:
        return await self._link(self._senders, "sender", queue)

    async def _receiver(self, queue: str) -> Link:
        """The queue's receiver, opened here: a short receive wait must not have to cover the link's attach."""
        return await self._link(self._receivers, "receiver", queue)

    async def _link(self, links: dict[str, Link], kind: str, queue: str) -> Link:
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
            link = links[queue] = Link(handler)
            return link

    def _is_current(self, link: Link) -> bool:
        return any(current is link for current in (*self._receivers.values(), *self._senders.values()))

    async def _drop(self, link: Link) -> None:
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
    async def _call(self, op: str, queue: str, link: Link, *, serialised: bool = True) -> AsyncIterator[Any]:
        """One SDK call on ``link``'s handler: one sender of transfers at a time, errors mapped.

        A link dropped before the call starts raises ``LinkGone``: the call never reaches a
        closed handler (which would reopen it, or fail in ways that say nothing).
        """
        async with link.sends if serialised else contextlib.nullcontext():
            if not self._is_current(link):
                raise LinkGone(f"azure service bus {op} on {self.entity(queue)!r}: its link was closed after an error")
            if not getattr(link.handler, "_running", True):
                # The SDK shut the handler down after another call's error (see _shut_under): a call
                # now would reopen it from here, racing any other caller that does the same.
                await self._drop(link)
                raise LinkGone(f"azure service bus {op} on {self.entity(queue)!r}: the SDK shut its handler down")
            link.users += 1
            try:
                async with self._mapped(op, queue, link):
                    yield link.handler
            finally:
                link.users -= 1
                if link.users == 0 and not self._is_current(link):
                    await link.close()  # dropped while this call used it

    @contextlib.asynccontextmanager
    async def _mapped(self, op: str, queue: str, link: Link | None) -> AsyncIterator[None]:
        """Map SDK errors to ``BrokerError``; after a connection-level one, drop ``link`` (made anew on next use)."""
        try:
            yield
        except BrokerError:
            raise
        except Exception as exc:  # SDK_ERRORS, and the SDK's own bugs (AttributeError mid-attach: transient)
            sdk = isinstance(exc, SDK_ERRORS)
            if link is not None and (not sdk or getattr(exc, "_shutdown_handler", False)):
                await self._drop(link)
            where = f"{op} on {self.entity(queue)!r}"
            if link is not None and _shut_under(link, exc):
                raise BrokerError(
                    f"azure_service_bus {where} at {self.where} failed: the SDK shut the handler down during "
                    "the call, after another call on it lost the connection",
                    transient=True,
                ) from exc
            raise self.errors.error(where if sdk else f"{where} (unexpectedly)", exc) from exc


def _transient(exc: BaseException) -> bool:
    """Not wrong credentials or rights, a missing queue, a full namespace, a lost lock; the
    SDK's own bugs (not its errors) are transient: the handler is replaced."""
    if not isinstance(exc, SDK_ERRORS):
        return True
    return not isinstance(exc, (*_PERMANENT, *LOCK_GONE))


def repr_unexpected(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SDK_ERRORS) else repr(exc)


def _shut_under(link: Link, exc: BaseException) -> bool:
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
