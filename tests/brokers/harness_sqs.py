"""Amazon SQS in the conformance suite: moto's server (or ``POLYQUEUE_TEST_SQS_ENDPOINT``).

Each test uses its own queue-name prefix and deletes only the queues under it. The
restart test runs on a private moto server behind a :class:`TcpProxy`: ``stop`` cuts
the endpoint off, ``start(keep_data=True)`` reconnects it with its queues and messages
(an SQS outage: the service keeps the data), ``start(keep_data=False)`` restarts the
moto process itself, which comes back empty (queues included, so the broker must
resolve and create them again).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from polyqueue.brokers.base import Broker
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.brokers.sqs import SqsBroker
from tests.brokers.harness import Adapter, Harness
from tests.moto_service import MotoServer, SqsService, TcpProxy, configured_service, moto_available


@asynccontextmanager
async def sqs_harness(
    service: SqsService, restart: tuple[MotoServer, TcpProxy] | None = None
) -> AsyncIterator[Harness]:
    prefix = f"pqt-{uuid.uuid4().hex[:12]}-"  # this test's queues, and the only ones it deletes
    brokers: list[SqsBroker] = []
    # The restart test checks that a receive against a dead endpoint raises at once; the SDK's
    # own retries (with up to seconds of backoff) would outlast that receive's short wait.
    attempts = 1 if restart else 3

    async def make(*, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Broker:
        url = service.broker_url(prefix=prefix, dead_letter_after=dead_letter_after, max_attempts=attempts)
        broker = SqsBroker(url, lease_seconds=lease_seconds)
        brokers.append(broker)
        return BrokerFacade(broker)  # what the runtime holds: make_broker's shape

    async with service.client() as raw:

        async def url_of(name: str) -> str | None:
            try:
                reply: dict[str, Any] = await raw.get_queue_url(QueueName=name)
            except raw.exceptions.QueueDoesNotExist:
                return None
            return str(reply["QueueUrl"])

        async def inject(queue: str, body: bytes | None) -> None:
            url = await url_of(prefix + queue)
            assert url is not None, "ensure() the queue before injecting into it"
            # SQS has no message without a body: None sends the shortest non-JSON one
            await raw.send_message(QueueUrl=url, MessageBody=body.decode(errors="replace") if body else "-")

        async def dead_letters(queue: str) -> list[bytes]:
            url = await url_of(f"{prefix}{queue}-dead")
            if url is None:
                return []
            # VisibilityTimeout=0: a peek, the messages stay visible for the next look
            reply = await raw.receive_message(QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=0)
            return [m["Body"].encode() for m in reply.get("Messages", [])]

        async def stop() -> None:
            assert restart is not None
            await restart[1].stop()

        async def start(keep_data: bool) -> None:
            assert restart is not None
            server, proxy = restart
            if not keep_data:
                await server.stop()
                await server.start()
            await proxy.start()

        own = restart is not None
        try:
            yield Harness(make, inject, dead_letters, stop if own else None, start if own else None)
        finally:
            for b in brokers:
                await b.close()
            if not own:  # a private server goes away whole
                listed = await raw.list_queues(QueueNamePrefix=prefix)
                for url in listed.get("QueueUrls", []):
                    await raw.delete_queue(QueueUrl=url)


@asynccontextmanager
async def private_sqs_harness(_directory: Path) -> AsyncIterator[Harness]:
    if not moto_available():
        pytest.skip("sqs: moto[server] is not installed")
    server = MotoServer()
    await server.start()
    proxy = TcpProxy(server.port)
    await proxy.start()
    service = SqsService(f"http://127.0.0.1:{proxy.port}", server.service.key_id, server.service.secret)
    try:
        async with sqs_harness(service, (server, proxy)) as harness:
            yield harness
    finally:
        await proxy.stop()
        await server.stop()


@pytest.fixture(scope="session")
async def sqs_service() -> AsyncIterator[SqsService]:
    """An SQS endpoint: configured, or a moto server started here; the tests skip when there is none."""
    configured = configured_service()
    if configured is not None:
        yield configured
        return
    if not moto_available():
        pytest.skip("sqs: POLYQUEUE_TEST_SQS_ENDPOINT unset and moto[server] not installed")
    server = MotoServer()
    await server.start()
    yield server.service
    await server.stop()


NAME = "sqs"
ADAPTER = Adapter(open=sqs_harness, service="sqs_service", open_private=private_sqs_harness)
