"""Redis Streams broker: one stream per queue, read through one consumer group.

Keys (``P`` = ``key_prefix``, ``Q`` = queue): ``P:Q`` the stream, ``P:Q:dead`` the
dead-letter stream. Every step that must check and change state together is one Lua
script (:mod:`polyqueue.brokers.redis_scripts`), so it is atomic on the server:

* receive: ``XAUTOCLAIM`` entries idle past the lease (crash recovery; dead-letter
  those delivered too often), then a blocking ``XREADGROUP >`` over all the queues'
  streams.
* extend / ack / release (the surplus of a receive handed back) first check with
  ``XPENDING`` that this consumer still owns the entry: ``XACK`` alone would ack an
  entry another consumer reclaimed.

Trimming (``XADD MAXLEN ~``) can drop an un-acked entry; that loses one delivery,
which the maintenance loop's re-dispatch backstop replaces (Postgres is the truth).
See docs/brokers/redis.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.metadata
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from polyqueue.brokers.base import (
    CLOSED,
    BrokerAdapter,
    BrokerConfig,
    Capabilities,
    Delivery,
    ErrorMap,
    Message,
    decode_each,
    decode_message,
    encode_message,
    read_options,
    retry_if_vanished,
    unless_closed,
)
from polyqueue.brokers.redis_scripts import PRELUDE, SCRIPTS
from polyqueue.errors import BrokerError, ConfigurationError, LeaseLostError

#: The oldest redis-py this adapter runs on (``ExponentialWithJitterBackoff`` came with 6.0);
#: the ``redis`` extra in pyproject.toml requires it.
MIN_REDIS_PY = "6.0"

try:
    import redis.asyncio as aioredis
    import redis.exceptions as rex
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialWithJitterBackoff
except ImportError as _exc:
    if isinstance(_exc, ModuleNotFoundError) and (_exc.name or "").partition(".")[0] == "redis":
        raise  # not installed at all: make_broker names the extra
    try:
        _installed = importlib.metadata.version("redis")
    except importlib.metadata.PackageNotFoundError:
        _installed = "of an unknown version"
    raise ConfigurationError(
        f"queue_backend 'redis' needs redis-py >= {MIN_REDIS_PY}, but redis {_installed} is installed "
        f"({_exc}): pip install 'polyqueue[redis]' (or pip install 'redis>={MIN_REDIS_PY}')"
    ) from _exc

__all__ = ["RedisBroker"]

log = logging.getLogger("polyqueue.brokers.redis")

#: Options read from the URL's query string (removed before redis-py sees the URL).
URL_OPTIONS = ("group", "consumer", "maxlen", "dead_letter_after", "key_prefix")
#: Longest single ``XREADGROUP BLOCK``: stays under redis-py's socket timeout (5 s by
#: default) and bounds how late an expired lease is noticed.
MAX_BLOCK_SECONDS = 2.0

_TRANSIENT = (rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.TryAgainError, rex.ClusterDownError)


class RedisBroker(BrokerAdapter):
    """Deliveries on Redis Streams with a consumer group (``queue_backend="redis"``).

    ``url`` is a ``redis://``, ``rediss://`` or ``unix://`` URL; its query string may
    also carry ``group``, ``consumer``, ``maxlen``, ``dead_letter_after`` and
    ``key_prefix``, which override the keyword arguments. ``lease_seconds`` must be
    the same for every worker: a consumer reclaims entries idle past *its* lease.
    """

    name = "redis"
    capabilities = Capabilities(lease=True, survives_restart=True, dead_letter=True)

    def __init__(
        self,
        url: str,
        *,
        group: str = "polyqueue",
        consumer: str | None = None,
        lease_seconds: float = 30.0,
        maxlen: int = 100_000,
        dead_letter_after: int = 20,
        key_prefix: str = "polyqueue",
    ) -> None:
        url, given = _split_url(url)
        defaults = {"group": group, "consumer": consumer, "maxlen": maxlen, "dead_letter_after": dead_letter_after}
        options = read_options("redis", given, {**defaults, "key_prefix": key_prefix})
        self.group, self.key_prefix = options["group"], options["key_prefix"]
        self.consumer = options["consumer"] or _default_consumer()
        self.maxlen, self.dead_letter_after = options["maxlen"], options["dead_letter_after"]
        self.lease_seconds = lease_seconds
        if lease_seconds <= 0 or self.maxlen < 1 or self.dead_letter_after < 1:
            raise ConfigurationError("redis broker: lease_seconds must be > 0, maxlen and dead_letter_after >= 1")
        if not self.group or not self.key_prefix or not self.consumer:
            raise ConfigurationError("redis broker: group, consumer and key_prefix must not be empty")
        self.url = _mask(url)
        parts = urlsplit(url)
        retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)
        try:  # protocol=2: the stream replies are parsed below in their RESP2 shape
            where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"
            self._redis = aioredis.Redis.from_url(url, protocol=2, retry=retry)
        except ValueError as exc:
            raise ConfigurationError(f"not a Redis URL: {self.url} ({exc})") from None
        self.errors = ErrorMap("redis", where, (rex.RedisError,), _transient)
        timeout = self._redis.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block = min(MAX_BLOCK_SECONDS, lease_seconds / 2, float(timeout or 5.0) / 2)
        self._scripts = {name: self._redis.register_script(PRELUDE + src) for name, src in SCRIPTS.items()}
        self._groups: set[str] = set()  # queues whose group this broker created or found
        self._cursors: dict[str, bytes] = {}  # XAUTOCLAIM scan position per queue
        self._closing = asyncio.Event()

    def __repr__(self) -> str:
        return f"RedisBroker({self.url!r}, group={self.group!r}, consumer={self.consumer!r})"

    def stream(self, queue: str) -> str:
        """The stream key of ``queue``."""
        return f"{self.key_prefix}:{queue}"

    # -- the contract ----------------------------------------------------------------------------
    async def ensure(self, queues: Sequence[str]) -> None:
        """Create each queue's stream and consumer group (``XGROUP CREATE ... 0 MKSTREAM``)."""
        if not queues:
            return
        with self.errors.mapped("ensure"):
            pipe = self._redis.pipeline(transaction=False)
            for q in queues:
                pipe.xgroup_create(self.stream(q), self.group, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for q, res in zip(queues, results, strict=True):
            if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
                raise self.errors.error("ensure", res) from res
            self._groups.add(q)

    async def publish(self, messages: Sequence[Message]) -> None:
        """``XADD`` every message in one pipelined round trip, trimming each stream to ~maxlen."""
        if not messages:
            return
        with self.errors.mapped("publish"):
            pipe = self._redis.pipeline(transaction=False)
            for m in messages:
                pipe.xadd(self.stream(m.queue), {"body": encode_message(m)}, maxlen=self.maxlen, approximate=True)
            await pipe.execute()

    async def receive(self, queues: Sequence[str], max_messages: int, wait: float) -> list[Delivery]:
        """Reclaimed (lease expired) entries first, then new ones, waiting up to ``wait`` for any."""
        if self._closing.is_set() or not queues or max_messages < 1:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(wait, 0.0)
        while True:
            out = await self._with_groups(queues, deadline - loop.time(), max_messages)
            if out is None:  # closed while blocked
                return []
            if len(out) > max_messages:  # XAUTOCLAIM/XREADGROUP COUNT is per stream: hand the surplus back
                await self._release_all(out[max_messages:])
                del out[max_messages:]
            if out or deadline - loop.time() <= 0 or self._closing.is_set():
                return out

    async def extend(self, delivery: Delivery, seconds: float) -> None:
        """Reset the entry's idle time (``XCLAIM ... JUSTID`` to itself) if this consumer still owns it.

        The lease then ends ``min(seconds, lease_seconds)`` from now: a longer one cannot
        be expressed, since other consumers reclaim entries idle past ``lease_seconds``.
        """
        idle_ms = max(0, round((self.lease_seconds - seconds) * 1000))
        if not await self._owned_call("extend", delivery, idle_ms):
            raise LeaseLostError(f"redis entry {delivery.handle} of queue {delivery.queue!r} is no longer ours")

    async def ack(self, delivery: Delivery) -> None:
        """``XACK`` + ``XDEL``, only while this consumer owns the entry; otherwise a logged no-op."""
        if not await self._owned_call("ack", delivery):
            log.info("ack of redis entry %s (queue %r) skipped: not ours any more", delivery.handle, delivery.queue)

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """:meth:`ack` for many deliveries in one round trip (the scripts pipelined)."""
        owned = [d for d in deliveries if d.handle is not None]
        if not owned:
            return
        results = await self._pipelined("ack", [(d, ()) for d in owned])
        skipped = sum(1 for r in results if not r)
        if skipped:
            log.info("ack of %d redis entries skipped: not ours any more", skipped)

    async def _release_all(self, deliveries: Sequence[Delivery]) -> None:
        """Hand deliveries back (not part of the contract: a receive's surplus), each re-added
        as a fresh entry at its stream's tail and the old entry dropped, in one round trip."""
        calls = []
        for d in deliveries:
            body = encode_message(Message(d.job_id, d.queue)) if d.job_id else _raw(d)
            calls.append((d, (body, self.maxlen)))
        skipped = sum(1 for r in await self._pipelined("release", calls) if not r)
        if skipped:
            log.info("release of %d redis entries skipped: not ours any more", skipped)

    async def close(self) -> None:
        """Return any blocked receive, forget this consumer where it holds nothing, close the pool."""
        if self._closing.is_set():
            return
        self._closing.set()
        with contextlib.suppress(BrokerError, TimeoutError):
            async with asyncio.timeout(2.0):
                with self.errors.mapped("close"):
                    for q in sorted(self._groups):
                        await self._scripts["forget"](keys=[self.stream(q)], args=[self.group, self.consumer])
        await self._redis.aclose()

    # -- internals -------------------------------------------------------------------------------
    async def _take_all(self, queues: Sequence[str], limit: int) -> list[Delivery]:
        """Reclaim expired leases on every queue, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for q in queues:
            keys = [self.stream(q), f"{self.stream(q)}:dead"]
            lease_ms = round(self.lease_seconds * 1000)
            cursor = self._cursors.get(q, b"0-0")
            args: list[Any] = [self.group, self.consumer, lease_ms, cursor, limit, self.dead_letter_after, self.maxlen]
            await self._scripts["take"](keys=keys, args=args, client=pipe)
        replies: list[Any] = await pipe.execute()
        out: list[Delivery] = []
        for q, (cursor, live, dead) in zip(queues, replies, strict=True):
            self._cursors[q] = cursor
            for entry_id in dead:
                log.error("redis entry %s of queue %r dead-lettered after too many deliveries", _s(entry_id), q)
            out += decode_each(q, live, functools.partial(self._claimed_delivery, q), handle=lambda e: _s(e[0]))
        return out

    async def _pass(self, queues: Sequence[str], limit: int, left: float) -> list[Delivery] | None:
        """Reclaim, then read new entries, blocking up to ``left`` seconds if nothing came back."""
        out = await self._take_all(queues, limit)
        block = None if out else min(left, self._max_block)
        read = await self._read(queues, limit - len(out), block)
        return None if read is None else out + read

    async def _read(self, queues: Sequence[str], count: int, block: float | None) -> list[Delivery] | None:
        """One ``XREADGROUP >`` over all the queues; None when the broker closed meanwhile."""
        if count < 1:
            return []
        by_key = {self.stream(q).encode(): q for q in queues}
        ms = None if block is None or block <= 0 else max(1, round(block * 1000))
        call = self._redis.xreadgroup(self.group, self.consumer, dict.fromkeys(by_key, ">"), count=count, block=ms)
        reply: Any = await (call if ms is None else unless_closed(call, self._closing))
        if reply is CLOSED:
            return None
        out: list[Delivery] = []
        for key, entries in reply or []:
            queue = by_key[key]  # each entry decoded on its own: one bad entry never fails the batch
            live = [e for e in entries if e[1] is not None]  # None: deleted since (Redis 6.2)
            build = functools.partial(self._entry_delivery, queue)
            out += decode_each(queue, live, build, handle=lambda e: _s(e[0]))
        return out

    def _claimed_delivery(self, queue: str, entry: Any) -> Delivery:
        """A reclaimed entry of the ``take`` script: ``(id, flat fields, deliveries)``."""
        fields = entry[1]
        return self._delivery(queue, entry[0], dict(zip(fields[::2], fields[1::2], strict=True)), entry[2])

    def _entry_delivery(self, queue: str, entry: Any) -> Delivery:
        """A new entry of ``XREADGROUP``: ``(id, fields)``, first delivery."""
        return self._delivery(queue, entry[0], entry[1], 1)

    def _delivery(self, queue: str, entry_id: bytes | str, fields: dict[Any, Any], count: int) -> Delivery:
        handle = _s(entry_id)
        body = fields.get(b"body", fields.get("body"))
        if body is None:
            return Delivery(None, queue, handle, count, error="stream entry without a 'body' field")
        delivery = decode_message(body, queue=queue, handle=handle, delivery_count=count)
        if delivery.job_id is None:
            delivery.extra["body"] = body
        return delivery

    async def _owned_call(self, op: str, delivery: Delivery, *args: Any) -> bool:
        """Run the ``op`` script on the delivery's entry; False when this consumer does not own it."""
        if delivery.handle is None:
            return False
        argv: list[Any] = [self.group, self.consumer, delivery.handle, *args]
        with self.errors.mapped(op):
            return bool(await self._scripts[op](keys=[self.stream(delivery.queue)], args=argv))

    async def _pipelined(self, op: str, calls: Sequence[tuple[Delivery, tuple[Any, ...]]]) -> list[Any]:
        """The ``op`` script on each delivery's entry (with its extra arguments), in one round trip."""
        with self.errors.mapped(op):
            pipe = self._redis.pipeline(transaction=False)
            for d, args in calls:
                argv = [self.group, self.consumer, d.handle, *args]
                await self._scripts[op](keys=[self.stream(d.queue)], args=argv, client=pipe)
            return list(await pipe.execute())

    async def _with_groups(self, queues: Sequence[str], left: float, limit: int) -> list[Delivery] | None:
        """One receive pass with the queues' groups in place; re-created once on NOGROUP (data lost)."""

        async def attempt() -> list[Delivery] | None:
            missing = [q for q in queues if q not in self._groups]
            if missing:
                await self.ensure(missing)
            return await self._pass(queues, limit, left)

        def forget() -> None:
            self._groups.difference_update(queues)
            self._cursors.clear()

        return await retry_if_vanished(
            "receive", attempt, errors=self.errors, vanished=_no_group, forget=forget, log=log, what="consumer group"
        )


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, rex.AuthenticationError)


def _no_group(exc: BaseException) -> bool:
    """The consumer group is gone: the server restarted empty, or the stream was deleted."""
    return isinstance(exc, rex.ResponseError) and "NOGROUP" in str(exc)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _raw(delivery: Delivery) -> bytes | str:
    body = delivery.extra.get("body")
    return body if isinstance(body, bytes | str) else b""


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """The URL without polyqueue's query options (nor ``protocol``, ``decode_responses``), and those options."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigurationError(f"the redis broker needs a redis://, rediss:// or unix:// URL, got {parts.scheme!r}")
    keep: list[tuple[str, str]] = []
    ours: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in URL_OPTIONS:
            ours[key] = value
        elif key not in ("protocol", "decode_responses"):  # the replies are parsed as RESP2 bytes
            keep.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(keep))), ours


def _mask(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def create(config: BrokerConfig) -> RedisBroker:
    """The adapter for ``queue_backend="redis"`` (``broker_url`` is required)."""
    if not config.url:
        raise ConfigurationError("queue_backend 'redis' needs broker_url (POLYQUEUE_BROKER_URL=redis://host:6379/0)")
    return RedisBroker(config.url, lease_seconds=config.lease_seconds)
