"""The benchmark app, imported by both the benchmark process and the worker subprocess.

It is built from the environment, which :mod:`benchmarks.cli` sets before importing
this module and which the worker subprocess inherits:

* ``PQBENCH_DATABASE_URL`` — the benchmark's own, freshly created database;
* ``PQBENCH_QUEUE_BACKEND`` — the broker (``direct``, ``memory``, and whatever later
  adapters add), passed as ``queue_backend`` to :class:`~polyqueue.Polyqueue`;
* ``PQBENCH_BROKER_URL`` — the broker's URL, for brokers that take one.
"""

from __future__ import annotations

import os
import time

from pydantic import BaseModel

from polyqueue import Polyqueue

__all__ = ["Noop", "Stamp", "app", "noop", "stamp"]


def _app_from_env() -> Polyqueue:
    options: dict[str, str] = {"queue_backend": os.environ.get("PQBENCH_QUEUE_BACKEND", "direct")}
    if url := os.environ.get("PQBENCH_DATABASE_URL"):
        options["database_url"] = url
    if broker_url := os.environ.get("PQBENCH_BROKER_URL"):
        options["broker_url"] = broker_url
    return Polyqueue(**options)


app = _app_from_env()


class Noop(BaseModel):
    """Payload of the no-op task (a sequence number, so payloads differ)."""

    n: int = 0


class Stamp(BaseModel):
    """Payload of the latency task."""

    n: int = 0


@app.register
async def noop(payload: Noop) -> None:
    """Does nothing: what is left is the queue's own cost per job."""
    return None


@app.register
async def stamp(payload: Stamp) -> dict[str, float]:
    """Records when the handler started (wall clock), for pickup latency."""
    return {"started": time.time()}
