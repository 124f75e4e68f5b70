"""One LISTEN connection per process, fanning notifications out to callbacks.

NOTIFY only shortens waits: every loop that listens also polls, because a
connection can drop (and pgbouncer in transaction mode never delivers LISTEN).

The listener is channel-agnostic; polyqueue's channels are the constants of
``polyqueue.types`` (``NEW_JOB_CHANNEL``, ``DONE_CHANNEL``, ``CANCEL_CHANNEL``), which the
statements in ``polyqueue.queries`` notify on and the subscribers pass to :meth:`Listener.subscribe`.

Under transaction pooling (``pool_mode = "transaction"``) LISTEN through the pooler is
useless: the session that ran it goes to other clients between transactions. With a
``direct_url`` (``listen_database_url``, straight to Postgres) the listener keeps its one
connection there, from a one-connection engine of its own; without one it listens to
nothing, and every subscriber finds new work by its polling (``poll_interval``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue._service import Service, steady
from polyqueue.db import make_engine, mask_url

__all__ = ["Listener"]

log = logging.getLogger("polyqueue.listener")

Callback = Callable[[str], None]


class _Reconnector(Service[bool]):
    """Checks the LISTEN connection every ``interval`` and connects again when it was lost
    (failures retried at the same pace: a lost LISTEN only delays wake-ups, polling goes on)."""

    name = "LISTEN reconnect"
    rest_first = True  # start() has just connected

    def __init__(self, reconnect: Callable[[], Awaitable[bool]], interval: float) -> None:
        super().__init__(interval=interval, backoff=steady(interval), log=log)
        self._reconnect = reconnect

    async def run_once(self) -> bool:
        return await self._reconnect()

    def _failed(self, exc: Exception, delay: float) -> None:
        log.warning("LISTEN connection lost, retrying: %s", exc)


class Listener:
    """Subscribe callbacks to Postgres channels over one dedicated connection."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        reconnect_interval: float = 1.0,
        direct_url: str | None = None,
        transaction_pooling: bool = False,
    ) -> None:
        """``direct_url``: a Postgres URL to LISTEN on instead of ``engine``'s (which may go through a
        transaction pooler); with ``transaction_pooling`` and no ``direct_url``, nothing is listened to
        and every subscriber relies on its polling."""
        self._engine = engine
        self._direct_url = direct_url
        self._transaction_pooling = transaction_pooling
        self._listen_engine: AsyncEngine | None = None  # direct_url's, made on start
        self._callbacks: dict[str, list[Callback]] = defaultdict(list)
        self._conn: AsyncConnection | None = None
        self._raw: Any = None
        self._task: asyncio.Task[None] | None = None
        self.reconnector = _Reconnector(self._reconnect_if_lost, reconnect_interval)
        #: Set while notifications can arrive, and at once in :attr:`polling_only` mode (there is
        #: nothing to wait for there), so nothing ever waits on it forever.
        self.connected = asyncio.Event()

    @property
    def polling_only(self) -> bool:
        """Transaction pooling and no direct URL: no LISTEN at all, subscribers rely on polling."""
        return self._transaction_pooling and not self._direct_url

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback(payload)`` on every notification of ``channel`` (from the next connect on)."""
        self._callbacks[channel].append(callback)
        if self._raw is not None and not self._raw.is_closed():
            task = asyncio.get_running_loop().create_task(self._raw.add_listener(channel, self._dispatch))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def unsubscribe(self, channel: str, callback: Callback) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks[channel].remove(callback)

    def _dispatch(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        for cb in list(self._callbacks.get(channel, ())):
            try:
                cb(payload)
            except Exception:  # a broken subscriber must not break the others
                log.exception("notification callback for %s failed", channel)

    async def start(self) -> None:
        """Connect and keep the connection up in the background (nothing, when :attr:`polling_only`)."""
        if self.polling_only:
            log.info("transaction pooling and no listen_database_url: no LISTEN, every loop polls")
            self.connected.set()
            return
        if self._direct_url and self._listen_engine is None:
            self._listen_engine = make_engine(self._direct_url, pool_size=1, max_overflow=0)
            log.info("listening on %s (listen_database_url)", mask_url(self._direct_url))
        await self._connect()
        self._task = asyncio.create_task(self.reconnector.run(asyncio.Event()), name="polyqueue-listener")

    async def _connect(self) -> None:
        conn = await (self._listen_engine or self._engine).connect()
        try:
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            for channel in list(self._callbacks):
                await driver.add_listener(channel, self._dispatch)
        except BaseException:
            await conn.close()
            raise
        self._conn, self._raw = conn, driver
        self.connected.set()
        # Anything notified while we were away is found by the subscribers' polling.
        for cbs in list(self._callbacks.values()):
            for cb in cbs:
                with contextlib.suppress(Exception):
                    cb("")

    async def _reconnect_if_lost(self) -> bool:
        """Connect again if the connection was lost; whether it had to."""
        if self._raw is not None and not self._raw.is_closed():
            return False
        self.connected.clear()
        await self._drop()
        await self._connect()
        log.info("LISTEN connection re-established")
        return True

    async def _drop(self) -> None:
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()
            with contextlib.suppress(Exception):
                await conn.close()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._raw is not None and not self._raw.is_closed():
            for channel in list(self._callbacks):
                with contextlib.suppress(Exception):
                    await self._raw.remove_listener(channel, self._dispatch)
        conn, self._conn, self._raw = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
        engine, self._listen_engine = self._listen_engine, None
        if engine is not None:
            with contextlib.suppress(Exception):
                await engine.dispose()
        self.connected.clear()
