"""Finding (or starting) the Redis server the broker tests talk to.

``POLYQUEUE_TEST_REDIS_URL`` when set, else 127.0.0.1:6379 when it answers, else a
``redis-server`` from PATH started on a free port for this test run (no persistence),
else None and the Redis tests skip. Each test uses its own key prefix and deletes
only its own keys: never FLUSHALL a server this run did not start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from pathlib import Path

__all__ = ["RedisServer", "configured_url", "free_port", "redis_server_exe"]

_LOCAL = ("127.0.0.1", 6379)


def configured_url() -> tuple[str | None, str]:
    """A URL of an already running server, or None and why there is none."""
    url = os.environ.get("POLYQUEUE_TEST_REDIS_URL")
    if url:
        return url, "POLYQUEUE_TEST_REDIS_URL"
    try:
        with socket.create_connection(_LOCAL, timeout=0.5):
            return f"redis://{_LOCAL[0]}:{_LOCAL[1]}/0", "local server"
    except OSError:
        return None, "POLYQUEUE_TEST_REDIS_URL unset and nothing answers on 127.0.0.1:6379"


def redis_server_exe() -> str | None:
    """The ``redis-server`` on PATH, if any."""
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` this test run owns: start, stop (a crash: SIGKILL), start again.

    With ``persist=True`` it writes an fsync-always append-only file under ``directory``,
    so data outlives a restart unless :meth:`wipe` removes it first.
    """

    def __init__(self, exe: str, directory: Path, *, persist: bool = False) -> None:
        self.exe = exe
        self.directory = directory
        self.persist = persist
        self.port = free_port()
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--dir", str(self.directory), "--logfile", str(self.directory / "redis.log")]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.persist else ["--appendonly", "no"]
        self._proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        while not await self._answers():
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.returncode is None:
            self._proc.kill()
        await self._proc.wait()
        self._proc = None

    def wipe(self) -> None:
        """Delete the persisted data (call while stopped)."""
        shutil.rmtree(self.directory / "appendonlydir", ignore_errors=True)
        (self.directory / "dump.rdb").unlink(missing_ok=True)

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return await asyncio.wait_for(reader.readline(), 1.0) == b"+PONG\r\n"
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
