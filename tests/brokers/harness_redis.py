"""Redis Streams in the conformance suite: a configured, local or private server."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from polyqueue.brokers.base import Broker
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.brokers.redis import RedisBroker
from tests.brokers.harness import Adapter, Harness
from tests.redis_service import RedisServer, configured_url, redis_server_exe


# -- redis -------------------------------------------------------------------------------------------
@asynccontextmanager
async def redis_harness(url: str, server: RedisServer | None = None) -> AsyncIterator[Harness]:
    prefix = f"pqtest-{uuid.uuid4().hex[:12]}"  # this test's keys, and the only ones it deletes
    raw = aioredis.Redis.from_url(url)
    brokers: list[RedisBroker] = []

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        broker = RedisBroker(url, key_prefix=prefix, lease_seconds=lease_seconds, dead_letter_after=dead_letter_after)
        brokers.append(broker)
        return BrokerFacade(broker)  # what the runtime holds: make_broker's shape

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


NAME = "redis"
ADAPTER = Adapter(open=redis_harness, service="redis_url", open_private=private_redis_harness)
