"""PGMQ broker: deliveries in PGMQ queues (Postgres tables) through the PGMQ SQL API.

One PGMQ queue per polyqueue queue (``queue_prefix`` + name, see :meth:`PgmqBroker.pgmq_name`),
created by ``ensure``. publish = ``pgmq.send_batch`` per queue in one transaction; receive =
``pgmq.read`` with the lease as visibility timeout, polled with a short sleep (no
connection is held while waiting, and ``close()`` ends the wait); extend = ``pgmq.set_vt``;
ack = ``pgmq.delete`` (or ``pgmq.archive``).

A lease is fenced by the message's ``read_ct``: every read raises it, so extend and ack
lock the row and act only while ``read_ct`` is still the one this delivery read.
``pgmq.delete`` alone would delete a message another consumer took over.

When PGMQ lives in the jobs' database (no ``broker_url``), :meth:`PgmqBroker.publish_in`
sends on the caller's connection, inside its transaction: the relay's publish and its
``enqueued`` mark then commit or roll back together. See docs/brokers/pgmq.md.

Besides ``brokers.base``, ``errors`` and its SDK (SQLAlchemy on asyncpg) this adapter
imports ``polyqueue.db``, the one place that turns a user's URL into an asyncpg engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

from sqlalchemy import TextClause, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, InterfaceError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from polyqueue.brokers.base import (
    BrokerAdapter,
    BrokerConfig,
    Capabilities,
    Delivery,
    ErrorMap,
    Message,
    by_queue,
    decode_each,
    decode_message,
    encode_message,
    read_options,
    retry_if_vanished,
)
from polyqueue.db import asyncpg_url, make_engine
from polyqueue.errors import ConfigurationError, LeaseLostError

__all__ = ["PgmqBroker"]

log = logging.getLogger("polyqueue.brokers.pgmq")

T = TypeVar("T")

#: Options read from the URL's query string (removed before asyncpg sees the URL).
URL_OPTIONS = ("queue_prefix", "archive", "poll_interval")
#: PGMQ's limit (``pgmq.validate_queue_name``): its table names must fit in 63 bytes.
MAX_NAME = 47
#: Seconds ``close()`` waits for calls in flight before closing the pool.
CLOSE_GRACE = 2.0

_SAFE = re.compile(r"[a-z0-9_]+")
_UNDEFINED_TABLE = "42P01"
# Connection (08), resources (53), operator intervention (57: shutdown, "starting up"),
# object state (55: a database not accepting connections, lock not available), rollback (40).
_TRANSIENT_CLASSES = ("08", "53", "57", "55", "40")
_NOT_INSTALLED = ("3F000", "42883")  # schema pgmq / function pgmq.* missing

_CREATE = text(
    "SELECT pgmq.create(CAST(:q AS text)) WHERE to_regclass(CAST(:qt AS text)) IS NULL "
    "OR to_regclass(CAST(:at AS text)) IS NULL"
)
_SEND = text("SELECT FROM pgmq.send_batch(CAST(:q AS text), CAST(CAST(:msgs AS text[]) AS jsonb[]))")
_READ = text(
    "SELECT msg_id, read_ct, message::text FROM pgmq.read(CAST(:q AS text), CAST(:vt AS integer), CAST(:n AS integer))"
)
# Fenced operations: lock the row while its read_ct is the one we read, then call PGMQ.
# The table name is built from a validated [a-z0-9_] name, never from input as such.
_FENCE = (
    'WITH mine AS MATERIALIZED (SELECT msg_id FROM pgmq."q_{name}" WHERE msg_id = :id AND read_ct = :ct FOR UPDATE) '
)
_SET_VT = (
    "SELECT s.msg_id FROM mine, LATERAL pgmq.set_vt(CAST(:q AS text), mine.msg_id, "
    "clock_timestamp() + make_interval(secs => CAST(:secs AS double precision))) AS s"
)
# ack: the same fence for a batch of (msg_id, read_ct) pairs of one queue, in one statement.
_FENCE_MANY = (
    'WITH mine AS MATERIALIZED (SELECT m.msg_id FROM pgmq."q_{name}" m '
    "JOIN unnest(CAST(:ids AS bigint[]), CAST(:cts AS integer[])) AS f(id, ct) ON m.msg_id = f.id AND m.read_ct = f.ct "
    "FOR UPDATE OF m) SELECT count(*) FROM pgmq.{action}(CAST(:q AS text), ARRAY(SELECT msg_id FROM mine))"
)


class PgmqBroker(BrokerAdapter):
    """Deliveries in PGMQ (``queue_backend="pgmq"``), on an asyncpg engine of its own.

    ``url`` is a Postgres URL whose query string may also carry ``queue_prefix``,
    ``archive`` (``true``: ack archives instead of deleting) and ``poll_interval``
    (seconds between empty reads while a receive waits); they override the keyword
    arguments. ``same_database`` says PGMQ lives in the jobs' database, which enables
    :meth:`publish_in`. The lease (``lease_seconds``) is rounded up to whole seconds on
    receive (``pgmq.read`` takes an integer); extend and release take fractions.
    """

    name = "pgmq"

    def __init__(
        self,
        url: str | URL,
        *,
        lease_seconds: float = 30.0,
        archive: bool = False,
        queue_prefix: str = "polyqueue_",
        poll_interval: float = 0.1,
        same_database: bool = False,
        pool_size: int = 5,
        transaction_pooling: bool = False,
    ) -> None:
        parsed, given = split_url(url)
        defaults = {"queue_prefix": queue_prefix, "archive": archive, "poll_interval": float(poll_interval)}
        options = read_options("pgmq", given, defaults)
        self.queue_prefix, self.archive, self.poll_interval = (options[k] for k in defaults)
        self.lease_seconds = lease_seconds
        self.same_database = same_database
        if lease_seconds <= 0 or not 0 < self.poll_interval <= 10:
            raise ConfigurationError("pgmq broker: lease_seconds must be > 0 and poll_interval in (0, 10]")
        if not re.fullmatch(r"[a-z0-9_]{0,20}", self.queue_prefix):
            raise ConfigurationError(f"pgmq broker: queue_prefix {self.queue_prefix!r} must match [a-z0-9_]{{0,20}}")
        self.capabilities = Capabilities(lease=True, survives_restart=True, transactional_publish=same_database)
        self._where = (
            f"{parsed.host or parsed.query.get('host') or 'localhost'}:{parsed.port or 5432}/{parsed.database}"
        )
        self.errors = ErrorMap("pgmq", self._where, (SQLAlchemyError, OSError), _transient, _detail)
        # pre-ping: a pooled connection a server restart killed is replaced on checkout, not reported
        self._engine = make_engine(
            parsed, pool_size=pool_size, transaction_pooling=transaction_pooling, connect_args={"timeout": 10}
        )
        self._vt = max(1, math.ceil(lease_seconds))
        self._names: dict[str, str] = {}
        self._ensured: set[str] = set()
        self._turn = 0  # rotates the order queues are read in
        self._closing = asyncio.Event()
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def __repr__(self) -> str:
        return f"PgmqBroker({self._where!r}, queue_prefix={self.queue_prefix!r})"

    def pgmq_name(self, queue: str) -> str:
        """The PGMQ queue of ``queue``: ``prefix + queue`` when that is ``[a-z0-9_]`` and short
        enough, else a sanitised stem plus a hash of the name (PGMQ names become table names)."""
        name = self._names.get(queue)
        if name is None:
            name = self.queue_prefix + queue
            if not _SAFE.fullmatch(queue) or len(name) > MAX_NAME:
                digest = hashlib.sha256(queue.encode()).hexdigest()[:10]
                stem = re.sub(r"[^a-z0-9_]+", "_", queue.lower())[: MAX_NAME - len(self.queue_prefix) - 11]
                name = f"{self.queue_prefix}{stem}_{digest}"
            self._names[queue] = name
        return name

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        """``pgmq.create`` each queue whose tables are missing (idempotent, safe concurrently)."""
        if not queues:
            return
        with self._tracked(), self.errors.mapped("ensure"):
            async with self._engine.begin() as conn:
                for q in sorted(set(queues)):  # one order everywhere: PGMQ takes an advisory lock per queue
                    name = self.pgmq_name(q)
                    await conn.execute(_CREATE, {"q": name, "qt": f"pgmq.q_{name}", "at": f"pgmq.a_{name}"})
        self._ensured.update(queues)

    async def publish(self, messages: Sequence[Message]) -> None:
        """``pgmq.send_batch`` per queue, all in one transaction: every message or none."""
        if not messages:
            return

        async def send() -> None:
            async with self._engine.begin() as conn:
                await self._send(conn, messages)

        with self._tracked():
            await self._with_queues("publish", {m.queue for m in messages}, send)

    async def publish_in(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """Publish on ``conn``, inside the caller's transaction (PGMQ in the jobs' database only).

        The messages become visible when the caller commits and vanish if it rolls back.
        On a database error the caller's transaction is aborted: let it roll back.
        """
        if not messages:
            return
        queues = {m.queue for m in messages}
        with self._tracked():
            missing = [q for q in queues if q not in self._ensured]
            if missing:
                await self.ensure(missing)  # on our own connection: the caller's must not fail on DDL
            try:
                await self._send(conn, messages)
            except (SQLAlchemyError, OSError) as exc:
                if _sqlstate(exc) == _UNDEFINED_TABLE:
                    self._ensured.difference_update(queues)  # dropped behind our back: re-create next time
                raise self.errors.error("publish", exc) from exc

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """``pgmq.read`` over the queues (rotating which goes first), polling every
        ``poll_interval`` until something comes, ``wait`` runs out or the broker closes."""
        if self._closing.is_set() or not queues or max_messages < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        with self._tracked():
            while True:
                order = [*queues[self._turn % len(queues) :], *queues[: self._turn % len(queues)]]
                self._turn += 1
                read = functools.partial(self._read, order, max_messages)
                out = await self._with_queues("receive", set(queues), read)
                left = deadline - loop.time()
                if out or left <= 0 or self._closing.is_set():
                    return out
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), min(self.poll_interval, left))

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """``pgmq.set_vt`` to ``seconds`` from now, unless another read took the message over."""
        if not await self._set_vt("extend", delivery, max(seconds, 0.0)):
            raise LeaseLostError(f"pgmq message {delivery.handle} of queue {delivery.queue!r} is no longer ours")

    async def ack(self, delivery: Delivery) -> None:
        """``pgmq.delete`` (``pgmq.archive`` with ``archive``) while still ours; else a logged no-op."""
        await self.ack_many([delivery])

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """``ack`` for a batch: one fenced ``pgmq.delete`` (or ``archive``) per queue, in one transaction."""
        ours = by_queue(d for d in deliveries if d.handle is not None and d.extra.get("read_ct") is not None)
        action, acked = ("archive" if self.archive else "delete"), 0
        with self._tracked():
            try:
                async with self._engine.begin() as conn:
                    for q, batch in sorted(ours.items()):
                        name = self.pgmq_name(q)
                        sql = _statement(_FENCE_MANY.format(name=name, action=action))
                        params = {
                            "q": name,
                            "ids": [d.handle for d in batch],
                            "cts": [d.extra["read_ct"] for d in batch],
                        }
                        acked += int(await conn.scalar(sql, params) or 0)
            except (SQLAlchemyError, OSError) as exc:
                if _sqlstate(exc) != _UNDEFINED_TABLE:  # a dropped queue took its messages with it
                    raise self.errors.error("ack", exc) from exc
        if acked < len(deliveries):
            log.info(
                "ack of %d of %d pgmq message(s) skipped: not ours any more", len(deliveries) - acked, len(deliveries)
            )

    async def close(self) -> None:
        """End any waiting receive, let calls in flight finish (up to 2 s), close the pool."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                await self._drained.wait()
        await self._engine.dispose()

    # -- internals -------------------------------------------------------------------------------
    async def _send(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        for q, batch in sorted(by_queue(messages).items()):
            bodies = [encode_message(m).decode() for m in batch]
            await conn.execute(_SEND, {"q": self.pgmq_name(q), "msgs": bodies})  # inserts all or raises

    async def _read(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        out: list[Delivery] = []
        async with self._engine.begin() as conn:  # one transaction: a failed read leases nothing
            for q in queues:
                if len(out) >= limit:
                    break
                rows = await conn.execute(_READ, {"q": self.pgmq_name(q), "vt": self._vt, "n": limit - len(out)})
                got = list(rows)  # each decoded on its own: one bad message never fails the read
                decoded = decode_each(q, got, functools.partial(_row_delivery, q), handle=lambda r: r[0])
                for d, row in zip(decoded, got, strict=True):
                    d.extra.setdefault("read_ct", row[1])  # even an unreadable one can be acked
                    out.append(d)
        return out

    async def _set_vt(self, op: str, delivery: Delivery, seconds: float) -> bool:
        """``pgmq.set_vt`` on the delivery's message if its read_ct is still ours; False otherwise."""
        read_ct = delivery.extra.get("read_ct")
        if delivery.handle is None or read_ct is None:
            return False
        name = self.pgmq_name(delivery.queue)
        sql = _statement(_FENCE.format(name=name) + _SET_VT)
        params = {"q": name, "id": delivery.handle, "ct": read_ct, "secs": seconds}
        with self._tracked():
            try:
                async with self._engine.begin() as conn:
                    return bool((await conn.execute(sql, params)).first())
            except (SQLAlchemyError, OSError) as exc:
                if _sqlstate(exc) == _UNDEFINED_TABLE:
                    return False  # the queue was dropped: its messages with it
                raise self.errors.error(op, exc) from exc

    async def _with_queues(self, op: str, queues: set[str], call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` with the queues created; re-create them once if they vanished (dropped)."""

        async def attempt() -> T:
            missing = [q for q in queues if q not in self._ensured]
            if missing:
                await self.ensure(missing)
            return await call()

        forget = functools.partial(self._ensured.difference_update, queues)
        what = f"queue tables of {sorted(queues)}"
        return await retry_if_vanished(
            op, attempt, errors=self.errors, vanished=_vanished, forget=forget, log=log, what=what
        )

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        """Count a call in flight, so ``close()`` can wait for it before closing the pool."""
        self._inflight += 1
        self._drained.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if not self._inflight:
                self._drained.set()


def _transient(exc: BaseException) -> bool:
    code = _sqlstate(exc)
    return (
        isinstance(exc, OSError | InterfaceError)
        or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        or (code is not None and code.startswith(_TRANSIENT_CLASSES))
        or (code is None and isinstance(exc, SQLAlchemyError) and not isinstance(exc, DBAPIError))  # pool timeouts
    )


def _detail(exc: BaseException) -> str:
    detail = str(exc.orig) if isinstance(exc, DBAPIError) else str(exc)
    detail = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
    if _sqlstate(exc) in _NOT_INSTALLED:
        detail += " (is PGMQ installed in that database? run `polyqueue db install-pgmq`)"
    return detail


def _vanished(exc: BaseException) -> bool:
    """A queue's table is missing: dropped behind our back."""
    return _sqlstate(exc) == _UNDEFINED_TABLE


def _row_delivery(queue: str, row: Any) -> Delivery:
    msg_id, read_ct, body = row
    return _delivery(queue, msg_id, read_ct, body)


def _delivery(queue: str, msg_id: int, read_ct: int, body: str | None) -> Delivery:
    if body is None:
        delivery = Delivery(None, queue, msg_id, read_ct, error="pgmq message without a body")
    else:
        delivery = decode_message(body, queue=queue, handle=msg_id, delivery_count=read_ct)
    delivery.extra["read_ct"] = read_ct  # the fence of extend / ack / release
    return delivery


@functools.cache
def _statement(source: str) -> TextClause:
    """A fenced statement for one queue, compiled once."""
    return text(source)


def _sqlstate(exc: BaseException) -> str | None:
    code = getattr(getattr(exc, "orig", None), "sqlstate", None)
    return code if isinstance(code, str) else None


def split_url(url: str | URL) -> tuple[URL, dict[str, str]]:
    """The asyncpg URL without polyqueue's query options, and those options."""
    parsed = asyncpg_url(url)
    options: dict[str, str] = {}
    for key in URL_OPTIONS:
        value = parsed.query.get(key)
        if value is not None:
            options[key] = value if isinstance(value, str) else value[-1]
    return parsed.difference_update_query(URL_OPTIONS), options


def create(config: BrokerConfig) -> PgmqBroker:
    """The adapter for ``queue_backend="pgmq"``: ``broker_url`` when set, else the jobs' database.

    Without ``broker_url`` (or with one naming the jobs' database exactly) PGMQ is in the
    jobs' database and the relay may publish inside its own transaction.
    """
    url = config.url or config.database_url
    if not url:
        raise ConfigurationError(
            "queue_backend 'pgmq' needs a database: set POLYQUEUE_DATABASE_URL (PGMQ beside the jobs) "
            "or POLYQUEUE_BROKER_URL (PGMQ in a database of its own)"
        )
    same = config.url is None or (
        config.database_url is not None and split_url(config.url)[0] == asyncpg_url(config.database_url)
    )
    return PgmqBroker(
        url, lease_seconds=config.lease_seconds, same_database=same, transaction_pooling=config.transaction_pooling
    )
