"""Is polyqueue's schema there? The one check, for workers, relays, the CLI and migrations.

The check itself (:data:`TABLES`, :func:`missing_tables`) is defined in ``polyqueue.db``, which
the brokers import and which therefore may not depend on this package; it is re-exported here
so that callers of ``polyqueue.queries`` find every statement in one place.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from polyqueue.db import TABLES, missing_tables

__all__ = ["JOBS_TABLE", "TABLES", "missing_tables", "schema_installed"]

#: The jobs table: its presence is what "polyqueue is installed" means to ``polyqueue db current``.
JOBS_TABLE: str = TABLES[0]


async def schema_installed(conn: AsyncConnection) -> bool:
    """Whether the jobs table exists (installed, by whatever tool: other tables may lag behind)."""
    return JOBS_TABLE not in await missing_tables(conn)
