"""The broker contract (DESIGN.md §4): what every delivery adapter implements.

A broker carries only deliveries — a job id and its queue (claim check). Postgres
holds the job. Adapters import only this module, ``polyqueue.types``,
``polyqueue.errors`` and their SDK.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "Broker",
    "BrokerConfig",
    "Capabilities",
    "Delivery",
    "Message",
    "TransactionalPublisher",
    "decode_message",
    "encode_message",
]

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

    url: str | None
    lease_seconds: float
    database_url: str | None = None  # for brokers living in Postgres (PGMQ)


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
    """Parse a message body; a malformed one yields a ``Delivery`` with ``job_id=None`` and ``error`` set."""

    def bad(reason: str) -> Delivery:
        return Delivery(None, queue, handle, delivery_count, error=reason)

    if len(body) > MAX_MESSAGE_BYTES:
        return bad(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        return bad(f"not JSON: {exc}")
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return bad("JSON without a string 'id'")
    try:
        job_id = uuid.UUID(data["id"])
    except ValueError:
        return bad(f"'id' is not a UUID: {data['id'][:64]!r}")
    msg_queue = data.get("queue", queue)
    if msg_queue != queue:
        return bad(f"message for queue {msg_queue!r} arrived on {queue!r}")
    return Delivery(job_id, queue, handle, delivery_count)
