"""The broker conformance suite's adapters: one :class:`Adapter` entry per broker.

Adding a broker means writing one harness factory (an async context manager that
yields a :class:`Harness` on the real service) and one ``ADAPTERS`` entry. Tests
skip by ``broker.capabilities`` or by a hook the harness cannot offer, never by name.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis.asyncio as aioredis

from polyqueue.brokers.base import Broker, Delivery, decode_message
from polyqueue.brokers.memory import MemoryBroker
from polyqueue.brokers.redis import RedisBroker
from tests.redis_service import RedisServer, configured_url, redis_server_exe


class MakeBroker(Protocol):
    """A new consumer of the harness's queues (a separate connection where the adapter has one)."""

    def __call__(self, *, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Awaitable[Broker]: ...


@dataclass
class Harness:
    """One adapter on its service, with the raw hooks the suite needs.

    ``inject_malformed(queue, body)`` puts a message with that body (None: no body at
    all) straight into the queue. ``dead_letters(queue)`` reads the dead-letter bodies.
    ``stop``/``start(keep_data)`` exist only on a service the test owns.
    """

    make: MakeBroker
    inject_malformed: Callable[[str, bytes | None], Awaitable[None]]
    dead_letters: Callable[[str], Awaitable[list[bytes]]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    start: Callable[[bool], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Adapter:
    """How the suite reaches one adapter.

    ``service`` names a session fixture whose value is passed to ``open`` (None: no
    service); ``open_private`` starts a service of the test's own, under a directory.
    """

    open: Callable[[Any], AbstractAsyncContextManager[Harness]]
    service: str | None = None
    open_private: Callable[[Path], AbstractAsyncContextManager[Harness]] | None = None


# -- memory ------------------------------------------------------------------------------------------
@asynccontextmanager
async def memory_harness(_service: object) -> AsyncIterator[Harness]:
    broker = MemoryBroker()

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        return broker  # one process-local queue set: every "consumer" shares it

    async def inject(queue: str, body: bytes | None) -> None:
        bad = decode_message(body, queue=queue) if body is not None else Delivery(None, queue, error="no body")
        broker._queues[queue].append(bad)
        broker._available.set()

    try:
        yield Harness(make, inject)
    finally:
        await broker.close()


# -- redis -------------------------------------------------------------------------------------------
@asynccontextmanager
async def redis_harness(url: str, server: RedisServer | None = None) -> AsyncIterator[Harness]:
    prefix = f"pqtest-{uuid.uuid4().hex[:12]}"  # this test's keys, and the only ones it deletes
    raw = aioredis.Redis.from_url(url)
    brokers: list[RedisBroker] = []

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        broker = RedisBroker(url, key_prefix=prefix, lease_seconds=lease_seconds, dead_letter_after=dead_letter_after)
        brokers.append(broker)
        return broker

    async def inject(queue: str, body: bytes | None) -> None:
        await raw.xadd(f"{prefix}:{queue}", {"body": body} if body is not None else {"junk": b"\xff\x00"})

    async def dead_letters(queue: str) -> list[bytes]:
        entries = await raw.xrange(f"{prefix}:{queue}:dead") or []
        return [b for _, fields in entries if fields and isinstance(b := fields[b"body"], bytes)]

    async def stop() -> None:
        assert server is not None
        await server.stop()

    async def start(keep_data: bool) -> None:
        assert server is not None
        if not keep_data:
            server.wipe()
        await server.start()

    own = server is not None
    try:
        yield Harness(make, inject, dead_letters, stop if own else None, start if own else None)
    finally:
        for b in brokers:
            await b.close()
        if server is not None:
            await server.stop()
        else:
            keys = [k async for k in raw.scan_iter(match=f"{prefix}:*")]
            if keys:
                await raw.delete(*keys)
        await raw.aclose()


@asynccontextmanager
async def private_redis_harness(directory: Path) -> AsyncIterator[Harness]:
    exe = redis_server_exe()
    if exe is None:
        pytest.skip("redis: no redis-server on PATH to start and restart")
    server = RedisServer(exe, directory, persist=True)
    await server.start()
    async with redis_harness(server.url, server) as harness:
        yield harness


@pytest.fixture(scope="session")
async def redis_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A Redis server: configured, local, or started here; the tests skip when there is none."""
    url, why = configured_url()
    if url is not None:
        yield url
        return
    exe = redis_server_exe()
    if exe is None:
        pytest.skip(f"redis: {why}, and no redis-server on PATH")
    server = RedisServer(exe, tmp_path_factory.mktemp("redis"))
    await server.start()
    yield server.url
    await server.stop()


# -- the registry --------------------------------------------------------------------------------------
ADAPTERS: dict[str, Adapter] = {
    "memory": Adapter(open=memory_harness),
    "redis": Adapter(open=redis_harness, service="redis_url", open_private=private_redis_harness),
}


@pytest.fixture(params=list(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> tuple[Adapter, object]:
    """The adapter under test and its service handle (resolved here, outside the event loop)."""
    spec = ADAPTERS[request.param]
    return spec, request.getfixturevalue(spec.service) if spec.service else None


@pytest.fixture
async def harness(adapter: tuple[Adapter, object]) -> AsyncIterator[Harness]:
    spec, service = adapter
    async with spec.open(service) as h:
        yield h


@pytest.fixture(params=list(ADAPTERS))
async def private_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The adapter on a service of this test's own, which it may stop and start."""
    spec = ADAPTERS[request.param]
    if spec.open_private is None:
        pytest.skip("this adapter's harness has no service the test can restart")
    async with spec.open_private(tmp_path) as h:
        yield h
