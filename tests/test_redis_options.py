"""Redis broker configuration: passwords work and never show, URL options, make_broker."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from polyqueue import ConfigurationError, Polyqueue
from polyqueue.brokers import make_broker
from polyqueue.brokers.base import Message
from polyqueue.brokers.redis import RedisBroker
from polyqueue.errors import BrokerError
from tests.redis_service import free_port, redis_server_exe


async def test_password_protected_server_and_secrets_never_printed(tmp_path: Path) -> None:
    exe = redis_server_exe()
    if exe is None:
        pytest.skip("no redis-server on PATH to start a password-protected server")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--requirepass", "s3cret-pw", "--dir", str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        good = RedisBroker(f"redis://:s3cret-pw@127.0.0.1:{port}/0?key_prefix=pw{uuid.uuid4().hex[:6]}")
        assert "s3cret-pw" not in repr(good) and "s3cret-pw" not in good.url
        for _ in range(200):  # the server takes a moment to listen
            try:
                await good.ensure(["q"])
                break
            except BrokerError:
                await asyncio.sleep(0.02)
        job = uuid.uuid4()
        await good.publish([Message(job, "q")])
        [delivery] = await good.receive(["q"], 10, 1.0)
        assert delivery.job_id == job
        await good.ack(delivery)
        await good.close()

        wrong = RedisBroker(f"redis://:wrong-pw@127.0.0.1:{port}/0")
        with pytest.raises(BrokerError) as info:
            await wrong.publish([Message(job, "q")])
        assert "wrong-pw" not in str(info.value) and not info.value.is_transient()
        await wrong.close()
    finally:
        proc.kill()
        await proc.wait()


def test_url_options_and_make_broker() -> None:
    broker = RedisBroker("redis://127.0.0.1:6379/0?maxlen=500&dead_letter_after=3&group=g&key_prefix=p")
    assert (broker.maxlen, broker.dead_letter_after, broker.group, broker.stream("q")) == (500, 3, "g", "p:q")
    with pytest.raises(ConfigurationError, match="integer"):
        RedisBroker("redis://127.0.0.1:6379/0?maxlen=lots")
    with pytest.raises(ConfigurationError, match="redis://"):
        RedisBroker("http://127.0.0.1:6379/0")
    with pytest.raises(ConfigurationError, match="broker_url"):
        make_broker(Polyqueue(queue_backend="redis").settings)
    made = make_broker(
        Polyqueue(queue_backend="redis", broker_url="redis://127.0.0.1:6379/0", lease_seconds=7).settings
    )
    assert made is not None  # the adapter, behind its facade
    assert isinstance(made.adapter, RedisBroker) and made.adapter.lease_seconds == 7
