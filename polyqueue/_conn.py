"""A connection held open for one hot loop (claims, completions): no pool checkout per
statement, no pre-ping round trip. Dropped after any error and reopened on next use.

Its statements run with sequential scans disabled. Every statement run on it is written
for an index (claims walk a partial index, completions join on the primary key), and a
queue table analysed while empty makes the planner believe a scan is cheaper: then each
100-row completion scanned every running row (DESIGN.md §6, "No triggers or foreign-key
checks": the same trap, seen on a peer). Postgres still scans when no index can serve.

The connection comes from the caller's engine, often the application's own pool, so it
goes back exactly as it came (issue #14):

- ``session`` pooling: the setting is changed for the session once, on checkout, and the
  previous value is put back before the connection returns to the pool; when that cannot
  run (the connection broke), the connection is invalidated instead of pooled.
- ``transaction`` pooling (pgbouncer in transaction mode): a session setting would stay on
  whichever server connection ran it and reach pgbouncer's other clients, so each use is one
  transaction that starts with ``SET LOCAL``. Measured through pgbouncer 1.18 (2 busy cores):
  2.1 ms per empty claim against 1.1-1.6 ms autocommit without the setting, once per claim or
  completion batch; without it a queue analysed while empty risks a scan per completion again.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["HeldConnection"]

_SWITCH_OFF = text("SELECT current_setting('enable_seqscan'), set_config('enable_seqscan', 'off', false)")
_RESTORE = text("SELECT set_config('enable_seqscan', :previous, false)")
_SET_LOCAL = text("SET LOCAL enable_seqscan = off")


class HeldConnection:
    """A connection owned by one sequential loop (never shared between tasks).

    Autocommit under ``session`` pooling; one transaction per :meth:`use` under
    ``transaction`` pooling. Either way each use commits when it ends.
    """

    def __init__(self, engine: AsyncEngine, *, transaction_pooling: bool = False) -> None:
        self._engine = engine
        self._transaction_pooling = transaction_pooling
        self._conn: AsyncConnection | None = None
        self._previous: str | None = None  # enable_seqscan before we changed it (session pooling)

    async def _open(self) -> AsyncConnection:
        conn = await self._engine.connect()
        if self._transaction_pooling:
            return conn  # no session state: SET LOCAL in each use's transaction
        try:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            previous, _ = (await conn.execute(_SWITCH_OFF)).one()
        except BaseException:
            await conn.invalidate()
            raise
        self._previous = str(previous)
        return conn

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection]:
        if self._conn is None:
            self._conn = await self._open()
        conn = self._conn
        try:
            if self._transaction_pooling:
                async with conn.begin():
                    await conn.execute(_SET_LOCAL)
                    yield conn
            else:
                yield conn
        except BaseException:
            await self.close(invalidate=True)  # its state is unknown: never reuse it
            raise

    async def close(self, *, invalidate: bool = False) -> None:
        """Give the connection back as it came, or invalidate it (``invalidate``, or when putting
        the setting back fails)."""
        conn, self._conn = self._conn, None
        previous, self._previous = self._previous, None
        if conn is None:
            return
        try:
            if not invalidate and previous is not None:
                await conn.execute(_RESTORE, {"previous": previous})
        except BaseException as exc:
            await _discard(conn, invalidate=True)
            if isinstance(exc, Exception):
                return
            raise  # cancelled while putting the setting back: the connection is gone, not pooled
        await _discard(conn, invalidate=invalidate)


async def _discard(conn: AsyncConnection, *, invalidate: bool) -> None:
    if invalidate:
        with contextlib.suppress(Exception):
            await conn.invalidate()
    with contextlib.suppress(Exception):
        await conn.close()
