"""The broker a benchmark talks to when ``--backend`` names one and ``--broker-url`` does not.

Each is a stand-in that runs on this machine, named in the output so that its figures are
not read as the cloud service's:

* redis: ``POLYQUEUE_TEST_REDIS_URL`` or 127.0.0.1:6379 when it answers, else a
  ``redis-server`` from PATH started for this run;
* sqs: moto's server (``tests/moto_server.py``), fake credentials in the broker URL;
* azure_service_bus: the AMQP 1.0 test peer (``tests/servicebus_peer``) in a process of its
  own, the unmodified SDK talking to it;
* postgres, memory, pgmq: no broker process (PGMQ lives in the benchmark's database).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from tests.redis_service import RedisServer, configured_url, free_port, redis_server_exe

__all__ = ["PEER_LOCK_SECONDS", "local_broker"]

#: The test peer's lock duration: the default ``lease_seconds`` (the worker renews every third).
PEER_LOCK_SECONDS = 30.0


@contextlib.asynccontextmanager
async def local_broker(backend: str, tmp: Path) -> AsyncIterator[tuple[str | None, str]]:
    """``(broker_url, what answers it)`` for ``backend``, the server stopped on exit."""
    if backend == "redis":
        url, origin = configured_url()
        if url is not None:
            yield url, f"redis at {url} ({origin})"
            return
        exe = redis_server_exe()
        if exe is None:
            raise SystemExit(f"benchmarks: no Redis ({origin}) and no redis-server on PATH; pass --broker-url")
        redis = RedisServer(exe, tmp / "redis")
        await redis.start()
        try:
            yield redis.url, f"a redis-server started for this run ({redis.url})"
        finally:
            await redis.stop()
    elif backend == "sqs":
        from tests.moto_service import MotoServer  # imported here: moto is a dev extra

        moto = MotoServer()
        await moto.start()
        try:
            yield moto.service.broker_url(), "moto's SQS server on 127.0.0.1 (its speed, not AWS's)"
        finally:
            await moto.stop()
    elif backend == "azure_service_bus":
        from tests.chaos.brokers import start_peer  # imported here: the peer needs qpid-proton
        from tests.servicebus_peer.peer import connection_string

        port = free_port()
        peer = start_peer(port, PEER_LOCK_SECONDS, tmp)
        try:
            what = f"the AMQP 1.0 test peer on 127.0.0.1:{port}, lock {PEER_LOCK_SECONDS:g} s (its speed, not Azure's)"
            yield connection_string(port), what
        finally:
            peer.terminate()
            peer.wait(10)
    else:
        yield None, "no broker process"
