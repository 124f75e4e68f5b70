"""A connection held open for one hot loop (claims, completions): no pool checkout per
statement, no pre-ping round trip. Dropped after any error and reopened on next use.

Its session disables sequential scans. Every statement run on it is written for an
index (claims walk a partial index, completions join on the primary key), and a queue
table analysed while empty makes the planner believe a scan is cheaper: then each
100-row completion scanned every running row (DESIGN.md §6, "No triggers or foreign-key
checks": the same trap, seen on a peer). Postgres still scans when no index can serve.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

__all__ = ["HeldConnection"]


class HeldConnection:
    """An autocommit connection owned by one sequential loop (never shared between tasks)."""

    def __init__(self, engine: AsyncEngine, *, transaction_pooling: bool = False) -> None:
        self._engine = engine
        self._transaction_pooling = transaction_pooling
        self._conn: AsyncConnection | None = None

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[AsyncConnection]:
        if self._conn is None:
            conn = await self._engine.connect()
            try:
                conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("SET enable_seqscan = off"))
            except BaseException:
                await conn.close()
                raise
            self._conn = conn
        try:
            yield self._conn
        except BaseException:
            await self.close(invalidate=True)  # its state is unknown: never reuse it
            raise

    async def close(self, *, invalidate: bool = False) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if invalidate:
            with contextlib.suppress(Exception):
                await conn.invalidate()
        with contextlib.suppress(Exception):
            await conn.close()
