"""PGMQ in the conformance suite: a throwaway database with PGMQ installed (SQL-only where
the server has no extension), one queue prefix per test.

The "restart" of the private harness is of the broker's *database*, not of a Postgres
server: ``stop`` refuses new connections (``ALLOW_CONNECTIONS false``) and terminates
the existing ones, so every call fails as against a server that is down; ``start``
allows connections again, and with ``keep_data=False`` first drops the queues (a
server back empty). That exercises what the adapter must handle (dead pooled
connections, refused connects, vanished queues) without a server of our own: there is
none we can stop here without root-only tricks, and Postgres's own crash recovery is
not what this suite tests.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.brokers.base import Broker
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.brokers.pgmq import PgmqBroker
from polyqueue.db import make_engine
from polyqueue.pgmq_install import install_pgmq
from tests import services
from tests.brokers.harness import Adapter, Harness


async def pgmq_database() -> URL:
    """A new database with PGMQ installed (drop it with ``services.drop_database``)."""
    url = await services.create_database(prefix="pqtest")
    engine = make_engine(url, pool_size=1)
    try:
        await install_pgmq(engine)
    finally:
        await engine.dispose()
    return url


async def set_connectable(url: URL, allowed: bool) -> None:
    """Let clients into ``url``'s database or not; refusing also drops everyone connected."""
    assert url.database and url.database.startswith("pqtest_")
    admin = await services._connect(services.admin_url())
    try:
        await admin.execute(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS {str(allowed).lower()}')
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                url.database,
            )
    finally:
        await admin.close()


@asynccontextmanager
async def pgmq_harness(url: URL, *, private: bool = False) -> AsyncIterator[Harness]:
    prefix = f"t{uuid.uuid4().hex[:8]}_"  # this test's queues, and the only ones it drops
    raw: AsyncEngine = make_engine(url, pool_size=1)
    brokers: list[PgmqBroker] = []

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        broker = PgmqBroker(url, lease_seconds=lease_seconds, queue_prefix=prefix, poll_interval=0.05)
        brokers.append(broker)
        return BrokerFacade(broker)  # what the runtime holds: make_broker's shape

    async def inject(queue: str, body: bytes | None) -> None:
        name = prefix + queue
        async with raw.begin() as conn:
            await conn.execute(text("SELECT pgmq.create(CAST(:q AS text))"), {"q": name})
            if body is None:
                msg = "SELECT pgmq.send(CAST(:q AS text), CAST(NULL AS jsonb))"
                await conn.execute(text(msg), {"q": name})
                return
            # A jsonb column holds only JSON, as Postgres parses it (2,000 nested brackets included,
            # which Python's json cannot): junk it refuses goes in as a JSON string.
            send = text("SELECT pgmq.send(CAST(:q AS text), CAST(:m AS jsonb))")
            try:
                async with conn.begin_nested():
                    await conn.execute(send, {"q": name, "m": body.decode()})
            except (UnicodeDecodeError, DBAPIError):
                await conn.execute(send, {"q": name, "m": json.dumps(body.decode(errors="replace"))})

    async def drop_queues() -> None:
        async with raw.begin() as conn:
            await conn.execute(
                text("SELECT pgmq.drop_queue(queue_name) FROM pgmq.list_queues() WHERE queue_name LIKE :p"),
                {"p": prefix + "%"},
            )

    async def stop() -> None:
        await set_connectable(url, False)
        await raw.dispose()  # its connection was terminated too

    async def start(keep_data: bool) -> None:
        await set_connectable(url, True)
        if not keep_data:
            await drop_queues()

    try:
        yield Harness(make, inject, None, stop if private else None, start if private else None)
    finally:
        for b in brokers:
            await b.close()
        if not private:
            await drop_queues()
        await raw.dispose()


@asynccontextmanager
async def private_pgmq_harness(_directory: Path) -> AsyncIterator[Harness]:
    url = await pgmq_database()
    try:
        async with pgmq_harness(url, private=True) as harness:
            yield harness
    finally:
        await set_connectable(url, True)
        await services.drop_database(url)


@pytest.fixture(scope="session")
async def pgmq_url() -> AsyncIterator[URL]:
    """A throwaway database with PGMQ installed, shared by this run's PGMQ conformance tests."""
    url = await pgmq_database()
    yield url
    await services.drop_database(url)


NAME = "pgmq"
ADAPTER = Adapter(open=pgmq_harness, service="pgmq_url", open_private=private_pgmq_harness)
