"""Programmatic entry points: ``run_worker`` (async) and ``main`` (blocking, with signals)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.brokers import Broker, make_broker
from polyqueue.db import database_url, make_engine, require_tables, while_unreachable
from polyqueue.errors import ConfigurationError
from polyqueue.listener import Listener
from polyqueue.metrics import GuardedMetrics
from polyqueue.registry import Polyqueue
from polyqueue.relay import Relay, ensure_queues
from polyqueue.settings import Settings, queue_name_problem, secret_value
from polyqueue.worker.runtime import Worker

__all__ = ["main", "run_relay", "run_worker"]

log = logging.getLogger("polyqueue.runner")


async def run_worker(
    app: Polyqueue,
    *,
    engine: AsyncEngine | None = None,
    broker: Broker | None = None,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    run_relay: bool = True,
    run_maintenance: bool = True,
    install_signal_handlers: bool = False,
    burst: bool = False,
    stopping: asyncio.Event | None = None,
    metrics: object | None = None,
) -> Worker:
    """Run a worker for ``app`` until ``stopping`` is set (or SIGTERM/SIGINT with
    ``install_signal_handlers``, or the queue is drained with ``burst``).

    Without ``engine``, connects to ``app.settings.database_url`` (``"embedded"``: the embedded
    Postgres; unset: ``ConfigurationError``). Raises ``ConfigurationError`` at once when the
    database lacks polyqueue's tables (after up to ``startup_wait`` seconds of an unreachable
    database) or a queue name is not valid.

    Returns the stopped worker, for its counters.
    """
    s = app.settings
    if queues is not None:
        _check_queues(queues)
    own_engine = engine is None
    engine, broker = await _connect(s, engine, broker, pool_size=8)
    worker = Worker(
        app,
        engine,
        broker=broker,
        queues=queues,
        concurrency=concurrency,
        run_relay=run_relay,
        run_maintenance=run_maintenance,
        metrics=metrics,
    )
    watcher = asyncio.create_task(_stop_when(stopping, worker)) if stopping is not None else None
    try:
        await worker.run(install_signal_handlers=install_signal_handlers, burst=burst)
    finally:
        if watcher is not None:
            watcher.cancel()
        if broker is not None:
            await _close_broker(broker)
        if own_engine:
            await _bounded_dispose(engine)
    return worker


def _check_queues(queues: Sequence[str]) -> None:
    if not queues:
        raise ConfigurationError("name at least one queue: a worker with none serves nothing")
    for name in queues:
        problem = queue_name_problem(name)
        if problem:
            raise ConfigurationError(problem)


def _engine(s: Settings, *, pool_size: int) -> AsyncEngine:
    """An engine on the configured database (``ConfigurationError`` when none is configured)."""
    return make_engine(
        database_url(s.database_url, s.embedded_dir),
        pool_size=pool_size,
        transaction_pooling=s.pool_mode == "transaction",
        command_timeout=s.command_timeout or None,
    )


async def _connect(
    s: Settings, engine: AsyncEngine | None, broker: Broker | None, *, pool_size: int
) -> tuple[AsyncEngine, Broker | None]:
    """The engine (made from settings unless given) once its database holds polyqueue's tables, and
    the broker (made from settings unless given; None in direct mode). An engine made here is
    disposed of when this fails."""
    own = engine is None
    engine = engine or _engine(s, pool_size=pool_size)
    try:
        await require_tables(engine, wait=s.startup_wait)
        return engine, broker if broker is not None else make_broker(s, database_url=_url_of(engine))
    except BaseException:
        if own:
            await _bounded_dispose(engine)
        raise


async def _bounded_dispose(engine: AsyncEngine) -> None:
    try:
        await asyncio.wait_for(engine.dispose(), 10)
    except TimeoutError:
        log.warning("closing the database pool took over 10 s; leaving it")


async def _close_broker(broker: Broker) -> None:
    """Close the broker, bounded: an SDK stuck on a dead connection must not keep the process alive."""
    try:
        await asyncio.wait_for(broker.close(), 10)
    except TimeoutError:
        log.warning("closing broker %s took over 10 s; leaving it", broker.name)


def _url_of(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


async def _stop_when(stopping: asyncio.Event, worker: Worker) -> None:
    await stopping.wait()
    worker.stop()


def main(
    app: Polyqueue,
    *,
    queues: Sequence[str] | None = None,
    concurrency: int | None = None,
    run_relay: bool = True,
    run_maintenance: bool = True,
    metrics: object | None = None,
) -> None:
    """Run a worker in the foreground until SIGTERM or SIGINT (what ``polyqueue worker`` calls).

    ``metrics`` is a :class:`~polyqueue.metrics.MetricsHook` (default: the app's own).
    """
    asyncio.run(
        run_worker(
            app,
            queues=queues,
            concurrency=concurrency,
            run_relay=run_relay,
            run_maintenance=run_maintenance,
            install_signal_handlers=True,
            metrics=metrics,
        )
    )


async def run_relay(
    app: Polyqueue,
    *,
    engine: AsyncEngine | None = None,
    broker: Broker | None = None,
    stopping: asyncio.Event | None = None,
    install_signal_handlers: bool = False,
    metrics: object | None = None,
) -> Relay:
    """Run a relay alone (``polyqueue relay``) until ``stopping`` is set or SIGTERM/SIGINT.

    The database and its check are as for :func:`run_worker`.
    """
    s = app.settings
    own_engine = engine is None
    engine, broker = await _connect(s, engine, broker, pool_size=4)
    if broker is None:
        if own_engine:
            await engine.dispose()
        raise ConfigurationError("queue_backend 'postgres' needs no relay: workers claim from the table directly")
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    if install_signal_handlers:
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
    listener = Listener(
        engine, direct_url=secret_value(s.listen_database_url), transaction_pooling=s.pool_mode == "transaction"
    )
    relay = Relay(engine, broker, listener, s, GuardedMetrics(metrics) if metrics is not None else app.metrics)
    ensuring = asyncio.create_task(ensure_queues(broker, s.queues, stopping), name="polyqueue-ensure")
    try:
        await while_unreachable(listener.start, wait=s.startup_wait, what="listening for notifications")
        await relay.run(stopping)
    finally:
        ensuring.cancel()
        await asyncio.gather(ensuring, return_exceptions=True)
        await listener.close()
        await _close_broker(broker)
        if own_engine:
            await engine.dispose()
    return relay
