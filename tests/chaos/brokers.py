"""The brokers a chaos run drives, each a real server this run owns, and the fault each suffers.

* redis: a ``redis-server`` without persistence; ``broker_restart`` kills it and starts it
  empty, so deliveries in flight are lost and the re-dispatch backstop must bring them back.
* sqs: moto's server behind a TCP proxy; ``broker_outage`` cuts the proxy (every connection
  dropped, new ones refused) for a while and restores it with the queues intact, which is
  what an SQS outage looks like (SQS itself does not lose messages).
* azure_service_bus: the AMQP 1.0 test peer (its own process) behind a TCP proxy;
  ``broker_outage`` as for SQS: the SDK's connections drop mid-link and must be rebuilt.
* pgmq: the queues live in the jobs' database, so its broker restart is the Postgres restart.
* direct / memory: no broker process.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.pgmq_install import install_pgmq
from tests.moto_service import MotoServer, TcpProxy
from tests.redis_service import RedisServer, free_port, redis_server_exe
from tests.servicebus_peer.peer import connection_string

BROKERS = ("direct", "memory", "redis", "sqs", "pgmq", "azure_service_bus")
OUTAGE_SECONDS = 1.0
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ChaosBroker:
    """What workers and relays need to reach the broker, and its fault (if it has one)."""

    env: dict[str, str] = field(default_factory=dict)
    separate_relays: bool = True  # relays as processes of their own (not for direct/memory)
    fault_name: str | None = None
    fault: Callable[[], Awaitable[None]] | None = None
    jobs_per_second: float | None = None  # what the broker can serve here: enqueue is paced below it


@contextlib.asynccontextmanager
async def open_broker(name: str, tmp: Path, engine: AsyncEngine, lease: float) -> AsyncIterator[ChaosBroker]:
    backend = {"POLYQUEUE_QUEUE_BACKEND": name}
    if name in ("direct", "memory"):
        yield ChaosBroker(backend, separate_relays=False)
    elif name == "redis":
        exe = redis_server_exe()
        if exe is None:
            raise SystemExit("chaos: the redis run needs a redis-server on PATH")
        redis = RedisServer(exe, tmp / "redis")
        await redis.start()

        async def restart() -> None:
            await redis.stop()
            await asyncio.sleep(0.3)
            await redis.start()

        try:
            env = {**backend, "POLYQUEUE_BROKER_URL": redis.url}
            yield ChaosBroker(env, fault_name="broker_restart", fault=restart)
        finally:
            await redis.stop()
    elif name == "pgmq":
        await install_pgmq(engine)
        yield ChaosBroker(backend)
    elif name == "sqs":
        moto = MotoServer()
        await moto.start()
        proxy = TcpProxy(moto.port)
        await proxy.start()
        service = moto.service
        url = f"sqs://?region={service.region}&endpoint_url=http://127.0.0.1:{proxy.port}&prefix=chaos-"
        # moto's ReceiveMessage rescans the whole queue for every message it returns (tens of
        # jobs/s, quadratically slower as the queue grows): a 2 s lease, a 3 s re-dispatch and
        # 500-job relay batches (re-published whole when a relay is killed mid-batch) would
        # measure moto drowning in copies, not polyqueue.
        slow = {"POLYQUEUE_LEASE_SECONDS": "6", "POLYQUEUE_REDISPATCH_AFTER": "60", "POLYQUEUE_RELAY_BATCH_SIZE": "50"}
        try:
            yield ChaosBroker(
                {**backend, "POLYQUEUE_BROKER_URL": url, **service.env(), **slow},
                jobs_per_second=12,
                fault_name="broker_outage",
                fault=_outage(proxy),
            )
        finally:
            await proxy.stop()
            await moto.stop()
    elif name == "azure_service_bus":
        port = free_port()
        peer = start_peer(port, lease, tmp)
        proxy = TcpProxy(port)
        await proxy.start()
        try:
            env = {**backend, "POLYQUEUE_BROKER_URL": connection_string(proxy.port)}
            yield ChaosBroker(env, fault_name="broker_outage", fault=_outage(proxy))
        finally:
            await proxy.stop()
            peer.terminate()
            peer.wait(10)
    else:
        raise SystemExit(f"chaos: unknown broker {name!r} (one of {', '.join(BROKERS)})")


def _outage(proxy: TcpProxy) -> Callable[[], Awaitable[None]]:
    async def outage() -> None:
        await proxy.stop()
        await asyncio.sleep(OUTAGE_SECONDS)
        await proxy.start()

    return outage


def start_peer(port: int, lock_seconds: float, tmp: Path) -> subprocess.Popen[bytes]:
    """The Service Bus test peer in a process of its own (its AMQP reactor then has a core to itself)."""
    log = open(tmp / "peer.log", "wb")  # closed when the process exits
    cmd = [sys.executable, "-m", "tests.chaos.peer_process", str(port), str(lock_seconds)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"the service bus peer did not start; see {tmp / 'peer.log'}")
    return proc
