"""Is polyqueue's schema there? The one check, for workers, relays, the CLI and migrations."""

from __future__ import annotations

from sqlalchemy import text

from polyqueue.models import Job, Leader, Worker
from polyqueue.queries._base import Executor

__all__ = ["JOBS_TABLE", "TABLES", "missing_tables", "schema_installed"]

#: The jobs table: its presence is what "polyqueue is installed" means to ``polyqueue db current``.
JOBS_TABLE: str = Job.__tablename__
#: polyqueue's tables, which its migrations create.
TABLES: tuple[str, ...] = (JOBS_TABLE, Worker.__tablename__, Leader.__tablename__)

_MISSING = text("SELECT t FROM unnest(CAST(:names AS text[])) AS t WHERE to_regclass(t) IS NULL ORDER BY t")


async def missing_tables(conn: Executor) -> list[str]:
    """Those of :data:`TABLES` that ``conn``'s database lacks (as its ``search_path`` resolves names)."""
    result = await conn.execute(_MISSING, {"names": list(TABLES)})
    return [row[0] for row in result]


async def schema_installed(conn: Executor) -> bool:
    """Whether the jobs table exists (installed, by whatever tool: other tables may lag behind)."""
    return JOBS_TABLE not in await missing_tables(conn)
