"""The broker contract: what the runtime calls on a broker, and the pieces adapters share.

A broker carries only deliveries — a job id and its queue (claim check). Postgres
holds the job. :class:`Broker` is exactly what the worker (``worker/sources.py``) and
the relay call; the runtime holds every adapter through
:class:`~polyqueue.brokers.facade.BrokerFacade`, which keeps that contract at the
boundary (errors, timing, tracing, a bounded close).

Shared by the adapters, so each piece is written once: :class:`BrokerAdapter` (the
defaults of ``ack_many`` and ``publish_in``), :class:`ErrorMap` (an SDK error becomes a
``BrokerError``), :func:`retry_if_vanished` (a queue that vanished is set up again and the
call retried once), :func:`read_options` (typed options of a broker URL's query string)
and the message codec. Adapters import only this module, ``polyqueue.types``,
``polyqueue.errors`` and their SDK.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from polyqueue.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "Broker",
    "BrokerAdapter",
    "BrokerConfig",
    "Capabilities",
    "Delivery",
    "ErrorMap",
    "Message",
    "by_queue",
    "decode_each",
    "decode_message",
    "encode_message",
    "read_options",
    "retry_if_vanished",
    "unless_closed",
    "wait_or_closed",
]

T = TypeVar("T")

#: A message body larger than this is malformed by definition (ours are ~70 bytes).
MAX_MESSAGE_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Message:
    """What the relay publishes for one job.

    ``dispatch_key`` names this dispatch of the job: the same when a relay publishes again a
    batch whose transaction did not commit, new after every committed change of the job (a
    retry, a re-dispatch, a requeue). Brokers with duplicate detection use it as the message
    id; it never travels in the body.
    """

    job_id: uuid.UUID
    queue: str
    dispatch_key: str | None = None


@dataclass(slots=True)
class Delivery:
    """One received message. ``job_id`` is None when the body was malformed (see ``error``)."""

    job_id: uuid.UUID | None
    queue: str
    handle: Any = None  # the adapter's receipt: stream entry id, receipt handle, lock token...
    delivery_count: int = 1
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter can do; tests skip by capability, never by adapter name."""

    lease: bool = True  # deliveries not acked within a lease are redelivered
    survives_restart: bool = True  # messages outlive the process
    dead_letter: bool = False  # deliveries received too often are moved aside, not redelivered forever
    # publish_in(conn, messages) joins the caller's database transaction (PGMQ in the jobs' database)
    transactional_publish: bool = False


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    """What an adapter's ``create(config)`` gets from the settings (adapters never see Settings)."""

    url: str | None = field(repr=False)  # may hold a password or a SAS key
    lease_seconds: float
    database_url: str | None = field(default=None, repr=False)  # for brokers living in Postgres (PGMQ)
    transaction_pooling: bool = False  # database_url goes through pgbouncer in transaction mode (PGMQ)


@runtime_checkable
class Broker(Protocol):
    """An async delivery transport: what the worker and the relay call, and nothing more.

    All methods raise ``BrokerError`` subclasses on failure (the facade makes sure of it).
    There is no ``release``: a job that goes back to ``pending`` is published anew by the
    relay, so the worker acks its delivery instead (docs/decisions.md, 2026-11-28).
    """

    name: str
    capabilities: Capabilities

    async def ensure(self, queues: Sequence[str]) -> None:
        """Create the queues where the broker allows it (idempotent)."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish a batch. Either every message is published or ``BrokerError`` is raised."""

    async def publish_in(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """Publish on ``conn`` inside its open transaction: visible on commit, gone on rollback.

        Only where ``capabilities.transactional_publish`` (PGMQ in the jobs' database); the
        relay asks the capability, never the type.
        """

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``wait`` seconds for the first."""

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep ``delivery`` leased for ``seconds`` more; ``LeaseLostError`` if it is no longer ours.

        ``seconds`` beyond the adapter's configured lease is not guaranteed (Redis caps it).
        """

    async def ack(self, delivery: Delivery) -> None:
        """Remove the delivery for good (a logged no-op when it is no longer ours)."""

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """:meth:`ack` for a batch, in as few round trips as the broker allows (the worker's acks)."""

    async def close(self) -> None:
        """Release connections; a receive in progress returns."""


class BrokerAdapter(abc.ABC):
    """Base of the adapters: the contract as abstract methods, and defaults for its optional parts.

    ``errors`` is how the adapter's SDK errors become ``BrokerError`` (the facade maps with it
    whatever an adapter lets escape).
    """

    name: str
    capabilities: Capabilities
    errors: ErrorMap

    @abc.abstractmethod
    async def ensure(self, queues: Sequence[str]) -> None: ...

    @abc.abstractmethod
    async def publish(self, messages: Sequence[Message]) -> None: ...

    @abc.abstractmethod
    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]: ...

    @abc.abstractmethod
    async def extend(self, delivery: Delivery, seconds: float) -> None: ...

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """One :meth:`ack` after the other; adapters with a batch call override it."""
        for d in deliveries:
            await self.ack(d)

    async def publish_in(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """Refused: this adapter cannot join a database transaction (``transactional_publish`` is off)."""
        raise BrokerError(f"the {self.name} broker cannot publish inside a database transaction", transient=False)


@dataclass(frozen=True, slots=True)
class ErrorMap:
    """How one adapter's SDK errors become ``BrokerError``: the one place that builds them.

    ``sdk`` are the SDK's exception types (what :meth:`mapped` catches); ``transient`` says
    whether waiting may fix one (``OSError``, the network and timeouts, always may);
    ``detail`` words it (never with a URL or a secret).
    """

    backend: str
    where: str
    sdk: tuple[type[BaseException], ...] = ()
    transient: Callable[[BaseException], bool] = lambda _exc: False
    detail: Callable[[BaseException], str] = lambda exc: str(exc) or type(exc).__name__

    def error(self, op: str, exc: BaseException) -> BrokerError:
        """The ``BrokerError`` for ``exc`` met during ``op`` (raise it ``from exc``)."""
        transient = isinstance(exc, OSError) or self.transient(exc)
        return BrokerError(f"{self.backend} {op} at {self.where} failed: {self.detail(exc)}", transient=transient)

    @contextlib.contextmanager
    def mapped(self, op: str) -> Iterator[None]:
        """Raise the SDK's errors met inside as ``BrokerError`` (ours pass unchanged)."""
        try:
            yield
        except BrokerError:
            raise
        except self.sdk as exc:
            raise self.error(op, exc) from exc


async def retry_if_vanished(
    op: str,
    call: Callable[[], Awaitable[T]],
    *,
    errors: ErrorMap,
    vanished: Callable[[BaseException], bool],
    forget: Callable[[], object],
    log: logging.Logger,
    what: str,
) -> T:
    """Run ``call``; when it fails because its queue vanished (deleted, or a server or emulator
    restarted empty), ``forget`` what was cached about the queue and run ``call`` once more.

    ``call`` sets up what it needs (resolving or creating the queue) on each run. Every other
    SDK error, and one on the second run, is raised as ``BrokerError``.
    """
    try:
        return await call()
    except BrokerError:
        raise
    except errors.sdk as exc:
        if not vanished(exc):
            raise errors.error(op, exc) from exc
        log.warning("%s %s vanished at %s; setting it up again", errors.backend, what, errors.where)
        forget()
    with errors.mapped(op):
        return await call()


M = TypeVar("M", Message, Delivery)


def by_queue(items: Iterable[M]) -> dict[str, list[M]]:
    """Messages or deliveries grouped by queue, in their order (brokers send and settle per queue)."""
    out: dict[str, list[M]] = {}
    for item in items:
        out.setdefault(item.queue, []).append(item)
    return out


class Closed:
    """What :func:`unless_closed` returns when the broker closed first (see ``CLOSED``)."""


CLOSED = Closed()


async def wait_or_closed(closing: asyncio.Event, tasks: Iterable[asyncio.Future[Any]], timeout: float | None) -> None:
    """Until one of ``tasks`` finishes, ``timeout`` seconds pass or ``closing`` is set; the tasks go on."""
    closed = asyncio.ensure_future(closing.wait())
    try:
        await asyncio.wait({*tasks, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        closed.cancel()
        await asyncio.gather(closed, return_exceptions=True)


async def unless_closed(call: Awaitable[T], closing: asyncio.Event) -> T | Closed:
    """``call``'s result (or exception), unless ``closing`` is set first: ``call`` is then cancelled
    and ``CLOSED`` returned. How a receive blocked in an SDK returns when ``close()`` is called."""
    work = asyncio.ensure_future(call)
    try:
        await wait_or_closed(closing, [work], None)
    finally:
        if not work.done():  # closed first, or this call was cancelled
            work.cancel()
        # Always collected: a failure that races a cancel is never left "never retrieved".
        await asyncio.gather(work, return_exceptions=True)
    return CLOSED if work.cancelled() else work.result()


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
_KINDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}


def read_options(backend: str, given: Mapping[str, str], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a broker URL's query string, each parsed to the type of its default.

    ``given`` holds the raw strings; an option not in ``defaults`` is refused, naming the
    known ones. A default of None (or a string) takes the text as it is.
    """
    if unknown := sorted(set(given) - set(defaults)):
        raise ConfigurationError(f"{backend} broker URL: unknown options {unknown}; known: {', '.join(defaults)}")
    out = dict(defaults)
    for key, raw in given.items():
        kind = type(defaults[key])
        try:
            if kind is bool:
                out[key] = _BOOLEANS[raw.lower()]
            elif kind in (int, float):
                out[key] = kind(raw)
            else:
                out[key] = raw
        except (KeyError, ValueError):
            raise ConfigurationError(f"{backend} broker URL option {key}={raw!r} is not {_KINDS[kind]}") from None
    return out


def encode_message(message: Message) -> bytes:
    """The wire form of a message: a tiny JSON object."""
    return json.dumps({"id": str(message.job_id), "queue": message.queue}, separators=(",", ":")).encode()


#: Brackets a message body may hold before it is refused unparsed: ours is one flat object.
MAX_MESSAGE_BRACKETS = 16


def decode_message(body: bytes | str, *, queue: str, handle: Any = None, delivery_count: int = 1) -> Delivery:
    """Parse a message body; a malformed one yields a ``Delivery`` with ``job_id=None`` and ``error`` set.

    Never raises (guarantee 7: one malformed delivery never touches another). A body of 2,000
    ``[`` is within the size cap yet would make ``json.loads`` raise ``RecursionError``: a body
    with more brackets than a message of ours can hold is refused before it is parsed (Python
    3.11 before 3.11.8 can leave its recursion accounting off after a ``RecursionError``, and
    a later ``compile()`` in the process then fails with ``SystemError``). Any other surprise
    of the parser is a malformed body like the rest.
    """

    def bad(reason: str) -> Delivery:
        return Delivery(None, queue, handle, delivery_count, error=reason)

    try:
        if len(body) > MAX_MESSAGE_BYTES:
            return bad(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
        brackets = body.count(b"[") + body.count(b"{") if isinstance(body, bytes) else body.count("[") + body.count("{")
        if brackets > MAX_MESSAGE_BRACKETS:
            return bad(f"not JSON of ours: {brackets} brackets (nested too deep)")
        data = json.loads(body)
    except RecursionError:
        return bad("not JSON: nested too deep")
    except Exception as exc:  # ValueError, UnicodeDecodeError, TypeError (not text at all)...
        return bad(f"not JSON: {type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return bad("JSON without a string 'id'")
    try:
        job_id = uuid.UUID(data["id"])
    except ValueError:
        return bad(f"'id' is not a UUID: {data['id'][:64]!r}")
    msg_queue = data.get("queue", queue)
    if msg_queue != queue:
        return bad(f"message for queue {str(msg_queue)[:64]!r} arrived on {queue!r}")
    return Delivery(job_id, queue, handle, delivery_count)


def decode_each(
    queue: str, entries: Iterable[T], build: Callable[[T], Delivery], *, handle: Callable[[T], Any] = lambda _: None
) -> list[Delivery]:
    """``build`` (an adapter's entry → ``Delivery``) for each entry on its own.

    An exception from one entry (a missing or odd field or attribute, not only a bad body)
    becomes that entry's ``Delivery(job_id=None, error=...)``, with ``handle(entry)`` as its
    handle where that still works, so it can be acked; the other entries are untouched.
    """
    out: list[Delivery] = []
    for entry in entries:
        try:
            out.append(build(entry))
        except Exception as exc:
            try:
                receipt = handle(entry)
            except Exception:
                receipt = None
            out.append(Delivery(None, queue, receipt, error=f"unreadable delivery: {type(exc).__name__}: {exc}"[:300]))
    return out
