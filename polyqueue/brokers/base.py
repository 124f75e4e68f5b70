"""The broker contract (DESIGN.md §4): what every delivery adapter implements.

A broker carries only deliveries — a job id and its queue (claim check). Postgres
holds the job. Adapters import only this module, ``polyqueue.types``,
``polyqueue.errors`` and their SDK.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "Broker",
    "BrokerConfig",
    "Capabilities",
    "Delivery",
    "Message",
    "TransactionalPublisher",
    "decode_each",
    "decode_message",
    "encode_message",
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
    delayed_release: bool = True  # release(delay>0) holds the message back
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
    """An async delivery transport. All methods raise ``BrokerError`` subclasses on failure."""

    name: str
    capabilities: Capabilities

    async def ensure(self, queues: Sequence[str]) -> None:
        """Create the queues where the broker allows it (idempotent)."""

    async def publish(self, messages: Sequence[Message]) -> None:
        """Publish a batch. Either every message is published or ``BrokerError`` is raised."""

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``wait`` seconds for the first."""

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """Keep ``delivery`` leased for ``seconds`` more; ``LeaseLostError`` if it is no longer ours.

        ``seconds`` beyond the adapter's configured lease is not guaranteed (Redis caps it).
        """

    async def ack(self, delivery: Delivery) -> None:
        """Remove the delivery for good."""

    # Optional: ``async def ack_many(self, deliveries: Sequence[Delivery]) -> None`` acks a
    # batch in one round trip; the worker uses it when present (see BrokerSource).

    async def release(self, delivery: Delivery, delay: float = 0.0) -> None:
        """Give the delivery back, to be redelivered after ``delay`` seconds."""

    async def close(self) -> None:
        """Release connections; a receive in progress returns."""


@runtime_checkable
class TransactionalPublisher(Protocol):
    """A broker whose ``capabilities.transactional_publish`` is True also has ``publish_in``."""

    async def publish_in(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """Publish on ``conn`` inside its open transaction: visible on commit, gone on rollback."""


def encode_message(message: Message) -> bytes:
    """The wire form of a message: a tiny JSON object."""
    return json.dumps({"id": str(message.job_id), "queue": message.queue}, separators=(",", ":")).encode()


def decode_message(body: bytes | str, *, queue: str, handle: Any = None, delivery_count: int = 1) -> Delivery:
    """Parse a message body; a malformed one yields a ``Delivery`` with ``job_id=None`` and ``error`` set.

    Never raises (guarantee 7: one malformed delivery never touches another). A body of 2,000
    ``[`` is within the size cap yet makes ``json.loads`` raise ``RecursionError``: that and any
    other surprise of the parser are a malformed body like the rest.
    """

    def bad(reason: str) -> Delivery:
        return Delivery(None, queue, handle, delivery_count, error=reason)

    try:
        if len(body) > MAX_MESSAGE_BYTES:
            return bad(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
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
