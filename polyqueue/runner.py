"""Where a polyqueue process is wired together, and its entry points.

:class:`WorkerProcess` is the one composition root: from the app's settings it builds the
broker (behind its facade), the LISTEN connection, the job source, the worker, the relay and
the maintenance service, runs them side by side, and stops them in order. ``run_worker`` and
``main`` (what ``polyqueue worker`` calls) run one; ``run_relay`` (``polyqueue relay``) runs a
relay alone. Nothing below this module builds another component.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncIterator, Callable, Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._aio import bounded, stop_tasks
from polyqueue.brokers import Broker, make_broker
from polyqueue.brokers.base import BrokerAdapter
from polyqueue.brokers.facade import BrokerFacade
from polyqueue.db import database_url, make_engine, require_tables, while_unreachable
from polyqueue.errors import ConfigurationError
from polyqueue.listener import Listener
from polyqueue.maintenance.service import Maintenance
from polyqueue.metrics import GuardedMetrics
from polyqueue.registry import Polyqueue
from polyqueue.relay import Relay, ensure_queues
from polyqueue.settings import Settings, queue_name_problem, secret_value
from polyqueue.worker.runtime import Worker
from polyqueue.worker.sources import BrokerSource, DirectSource, JobSource

__all__ = ["WorkerProcess", "main", "run_relay", "run_worker"]

log = logging.getLogger("polyqueue.runner")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class WorkerProcess:
    """A worker with everything it needs, built from ``app.settings`` on ``engine``.

    ``broker``: None reads ``queue_backend`` (``"direct"``: no broker, claims from the table); a broker
    or adapter given here is used instead (an adapter is put behind the facade) and is left open
    unless ``close_broker``. A broker made here is always closed. ``run_relay`` (broker modes
    only) and ``run_maintenance`` run those services in this process too.
    """

    def __init__(
        self,
        app: Polyqueue,
        engine: AsyncEngine,
        *,
        broker: Broker | BrokerAdapter | None = None,
        queues: Sequence[str] | None = None,
        concurrency: int | None = None,
        run_relay: bool = True,
        run_maintenance: bool = True,
        metrics: object | None = None,
        close_broker: bool = False,
    ) -> None:
        s = app.settings
        self.metrics = GuardedMetrics(metrics) if metrics is not None else app.metrics
        self._close_broker = close_broker or broker is None
        if broker is None:
            broker = make_broker(s, database_url=_url_of(engine), metrics=self.metrics)
        elif isinstance(broker, BrokerAdapter):
            broker = BrokerFacade(broker, metrics=self.metrics)
        self.broker: Broker | None = broker
        pooled = s.pool_mode == "transaction"
        self.listener = _listener(engine, s)
        served = list(queues or s.queues)
        source: JobSource = (
            DirectSource(engine, self.listener, served, s.poll_interval, transaction_pooling=pooled)
            if broker is None
            else BrokerSource(engine, broker, served, s.lease_seconds, transaction_pooling=pooled)
        )
        self.worker = Worker(
            app,
            engine,
            source,
            self.listener,
            queues=served,
            concurrency=concurrency or s.concurrency,
            backend=broker.name if broker is not None else "direct",
            metrics=self.metrics,
        )
        self.relay = Relay(engine, broker, self.listener, s, self.metrics) if broker is not None and run_relay else None
        self.maintenance = Maintenance(engine, s, self.metrics, app) if run_maintenance else None
        self._settings = s
        self._stopping = asyncio.Event()

    @property
    def worker_id(self) -> uuid.UUID:
        """The worker's id in ``polyqueue_workers`` (a new one if maintenance declared it dead)."""
        return self.worker.worker_id

    @property
    def processed(self) -> int:
        """Jobs this process's worker finished."""
        return self.worker.processed

    def stop(self) -> None:
        """Ask everything to stop: no new claims or publishes; running jobs get ``shutdown_grace``."""
        self._stopping.set()
        self.worker.stop()

    async def run(self, *, install_signal_handlers: bool = False, burst: bool = False) -> None:
        """Run until :meth:`stop` (or SIGTERM/SIGINT with ``install_signal_handlers``); with
        ``burst``, until no job of the worker's queues is due and none is running."""
        background: list[asyncio.Task[None]] = []
        try:
            async with _listening(self.listener, self._settings, stop=self.stop, on_signals=install_signal_handlers):
                if self.broker is not None:
                    background.append(_ensuring(self.broker, self.worker.queues, self._stopping))
                if self.relay is not None:
                    background.append(asyncio.create_task(self.relay.run(self._stopping), name="polyqueue-relay"))
                if self.maintenance is not None:
                    running = self.maintenance.run(self._stopping)
                    background.append(asyncio.create_task(running, name="polyqueue-maintenance"))
                try:
                    await self.worker.run(burst=burst)
                finally:
                    self.stop()
                    await stop_tasks(background, log)
        finally:
            if self._close_broker and self.broker is not None:
                await self.broker.close()  # bounded by the facade


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
) -> WorkerProcess:
    """Run a worker for ``app`` until ``stopping`` is set (or SIGTERM/SIGINT with
    ``install_signal_handlers``, or the queue is drained with ``burst``).

    Without ``engine``, connects to ``app.settings.database_url`` (``"embedded"``: the embedded
    Postgres; unset: ``ConfigurationError``). Without ``broker``, makes the one
    ``queue_backend`` names (none in direct mode); a given broker is closed at the end too.
    Raises ``ConfigurationError`` at once when the database lacks polyqueue's tables (after up
    to ``startup_wait`` seconds of an unreachable database) or a queue name is not valid.

    Returns the stopped :class:`WorkerProcess`, for its counters.
    """
    s = app.settings
    if queues is not None:
        _check_queues(queues)
    own_engine = engine is None
    engine = await _connect(s, engine, pool_size=8)
    try:
        process = WorkerProcess(
            app,
            engine,
            broker=broker,
            queues=queues,
            concurrency=concurrency,
            run_relay=run_relay,
            run_maintenance=run_maintenance,
            metrics=metrics,
            close_broker=True,
        )
        watcher = asyncio.create_task(_stop_when(stopping, process)) if stopping is not None else None
        try:
            await process.run(install_signal_handlers=install_signal_handlers, burst=burst)
        finally:
            if watcher is not None:
                watcher.cancel()
    finally:
        if own_engine:
            await _bounded_dispose(engine)
    return process


def _listener(engine: AsyncEngine, s: Settings) -> Listener:
    """The process's LISTEN connection: on ``listen_database_url`` when set (pgbouncer)."""
    return Listener(
        engine, direct_url=secret_value(s.listen_database_url), transaction_pooling=s.pool_mode == "transaction"
    )


@contextlib.asynccontextmanager
async def _listening(
    listener: Listener, s: Settings, *, stop: Callable[[], None], on_signals: bool
) -> AsyncIterator[None]:
    """Within the block, ``listener`` is started (retried while the database is unreachable) and,
    with ``on_signals``, SIGTERM/SIGINT call ``stop``; on the way out both are undone, bounded."""
    loop = asyncio.get_running_loop()
    signals = _SIGNALS if on_signals else ()
    for sig in signals:
        loop.add_signal_handler(sig, stop)
    try:
        await while_unreachable(listener.start, wait=s.startup_wait, what="listening for notifications")
        yield
    finally:
        await bounded("shutdown: closing the LISTEN connection", listener.close(), log)
        for sig in signals:
            loop.remove_signal_handler(sig)


def _ensuring(broker: Broker, queues: Sequence[str], stopping: asyncio.Event) -> asyncio.Task[None]:
    """The broker's queues created in the background, retried while the broker is down."""
    return asyncio.create_task(ensure_queues(broker, queues, stopping), name="polyqueue-ensure")


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


async def _connect(s: Settings, engine: AsyncEngine | None, *, pool_size: int) -> AsyncEngine:
    """The engine (made from settings unless given) once its database holds polyqueue's tables.
    An engine made here is disposed of when this fails."""
    own = engine is None
    engine = engine or _engine(s, pool_size=pool_size)
    try:
        await require_tables(engine, wait=s.startup_wait)
        return engine
    except BaseException:
        if own:
            await _bounded_dispose(engine)
        raise


async def _bounded_dispose(engine: AsyncEngine) -> None:
    try:
        await asyncio.wait_for(engine.dispose(), 10)
    except TimeoutError:
        log.warning("closing the database pool took over 10 s; leaving it")


def _url_of(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


async def _stop_when(stopping: asyncio.Event, process: WorkerProcess) -> None:
    await stopping.wait()
    process.stop()


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

    The database and its check are as for :func:`run_worker`; so is the broker (closed at the end).
    """
    s = app.settings
    own_engine = engine is None
    engine = await _connect(s, engine, pool_size=4)
    guarded = GuardedMetrics(metrics) if metrics is not None else app.metrics
    try:
        if broker is None:
            broker = make_broker(s, database_url=_url_of(engine), metrics=guarded)
        if broker is None:
            raise ConfigurationError("queue_backend 'direct' needs no relay: workers claim from the table directly")
        stopping = stopping or asyncio.Event()
        listener = _listener(engine, s)
        relay = Relay(engine, broker, listener, s, guarded)
        ensuring = _ensuring(broker, s.queues, stopping)
        try:
            async with _listening(listener, s, stop=stopping.set, on_signals=install_signal_handlers):
                await relay.run(stopping)
        finally:
            stopping.set()
            await stop_tasks([ensuring], log)
    finally:
        if broker is not None:
            await broker.close()
        if own_engine:
            await _bounded_dispose(engine)
    return relay
