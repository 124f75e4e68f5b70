"""The SQS endpoint the broker tests talk to: moto's standalone server, or a configured one.

``POLYQUEUE_TEST_SQS_ENDPOINT`` when set (credentials and region then come from the
standard AWS chain), else a ``python -m moto.server`` subprocess on a free 127.0.0.1
port with fake credentials. The fake credentials travel in the broker URL or in a
subprocess's environment, never in this process's ``os.environ``.

moto keeps everything in memory: a restarted server is empty (no queues, no messages).
:class:`TcpProxy` stands in front of a server so a test can cut the endpoint off and
bring it back with its data, which is what an SQS outage looks like.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from tests.redis_service import free_port

__all__ = ["FAKE_CREDENTIALS", "MotoServer", "SqsService", "TcpProxy", "configured_service", "moto_available"]

#: What moto accepts; passed explicitly (broker URL, subprocess env), never set globally.
FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
REGION = "us-east-1"
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class SqsService:
    """An SQS endpoint and how to sign in to it (None: the standard AWS chain)."""

    endpoint: str
    key_id: str | None = None
    secret: str | None = None
    region: str = REGION

    def broker_url(self, **options: Any) -> str:
        """An ``sqs://`` URL for this endpoint, with ``options`` in its query string."""
        auth = f"{quote(self.key_id, safe='')}:{quote(self.secret or '', safe='')}@" if self.key_id else ""
        query = {"region": self.region, "endpoint_url": self.endpoint, **{k: str(v) for k, v in options.items()}}
        return f"sqs://{auth}?{urlencode(query)}"

    def env(self) -> dict[str, str]:
        """Environment variables for a subprocess that uses this service through the AWS chain."""
        creds = {"AWS_ACCESS_KEY_ID": self.key_id, "AWS_SECRET_ACCESS_KEY": self.secret or ""} if self.key_id else {}
        return {**creds, "AWS_DEFAULT_REGION": self.region}

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        """A raw aiobotocore SQS client on this endpoint (for tests poking at the queues)."""
        from aiobotocore.session import AioSession  # type: ignore[import-untyped]

        kwargs = {"aws_access_key_id": self.key_id, "aws_secret_access_key": self.secret} if self.key_id else {}
        async with AioSession().create_client(
            "sqs", region_name=self.region, endpoint_url=self.endpoint, **kwargs
        ) as sqs:
            yield sqs


def configured_service() -> SqsService | None:
    endpoint = os.environ.get("POLYQUEUE_TEST_SQS_ENDPOINT")
    if not endpoint:
        return None
    return SqsService(endpoint, region=os.environ.get("AWS_DEFAULT_REGION", REGION))


def moto_available() -> bool:
    return importlib.util.find_spec("moto.server") is not None


class MotoServer:
    """moto's server on 127.0.0.1 (``tests/moto_server.py``: one quadratic scan fixed):
    start (~0.5 s), stop (SIGKILL), start again empty."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def service(self) -> SqsService:
        return SqsService(f"http://127.0.0.1:{self.port}", FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"], "testing")

    async def start(self) -> None:
        args = [sys.executable, "-m", "tests.moto_server", "-H", "127.0.0.1", "-p", str(self.port)]
        self._proc = await asyncio.create_subprocess_exec(
            *args, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20.0
        while not await _answers(self.port):
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                raise RuntimeError(f"moto server on port {self.port} did not start")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
        self._proc = None


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``stop`` drops every connection and refuses new ones."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)
            return
        self._writers.add(up_writer)
        pipes = [asyncio.create_task(_pipe(reader, up_writer)), asyncio.create_task(_pipe(up_reader, writer))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pipes:
                p.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            self._tasks.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _answers(port: int) -> bool:
    """Whether an HTTP server answers on the port (moto answers any path)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"GET /moto-api/ HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 2.0)).startswith(b"HTTP/")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
