"""Installing PGMQ (the Postgres queue the ``pgmq`` broker uses) into a database.

Where the server offers the ``pgmq`` extension, ``CREATE EXTENSION pgmq``. Where it does
not (most managed Postgres services), the SQL-only install bundled in the ``pgmq`` wheel
(``pgmq/sql/pgmq.sql``): the same schema and functions as plain SQL, no extension
needed, but no extension upgrade path either. Both are idempotent here: nothing is done
when the ``pgmq`` schema already holds ``pgmq.send``. ``polyqueue db install-pgmq`` calls
:func:`install_pgmq`. See docs/brokers/pgmq.md.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.errors import ConfigurationError

__all__ = ["bundled_pgmq_sql", "bundled_pgmq_version", "install_pgmq", "pgmq_installed"]

#: What :func:`install_pgmq` did.
Installed = Literal["extension", "sql", "present"]

# Two processes installing at once: the second waits, then finds it done.
_LOCK = text("SELECT pg_advisory_xact_lock(hashtext('polyqueue.install_pgmq'))")
_INSTALLED = text(
    "SELECT EXISTS (SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE n.nspname = 'pgmq' AND p.proname = 'send')"
)
_AVAILABLE = text("SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pgmq')")


def _sql_dir() -> Path:
    # find_spec locates the wheel without importing it: its __init__ imports psycopg, which we do not use.
    spec = importlib.util.find_spec("pgmq")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the pgmq extension is not available on this server and the SQL-only install needs "
            "the pgmq package: pip install 'polyqueue[pgmq]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "sql"


def bundled_pgmq_sql() -> str:
    """The SQL-only PGMQ install script shipped in the ``pgmq`` wheel."""
    path = _sql_dir() / "pgmq.sql"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(f"the pgmq package has no install script at {path}: {exc}") from exc


def bundled_pgmq_version() -> str:
    """The PGMQ version of :func:`bundled_pgmq_sql` (e.g. ``1.13.0``), or ``unknown``."""
    try:
        lines = (_sql_dir() / "VERSION").read_text(encoding="utf-8").splitlines()
    except (OSError, ConfigurationError):
        return "unknown"
    return next((v.strip() for v in lines if v.strip() and not v.startswith("#")), "unknown")


async def pgmq_installed(engine: AsyncEngine) -> bool:
    """True when the database behind ``engine`` has PGMQ (extension or SQL-only)."""
    async with engine.connect() as conn:
        return bool(await conn.scalar(_INSTALLED))


async def install_pgmq(engine: AsyncEngine) -> Installed:
    """Install PGMQ into the database behind ``engine`` unless it is there already.

    Returns ``"present"`` (nothing done), ``"extension"`` (``CREATE EXTENSION pgmq``) or
    ``"sql"`` (the script bundled in the ``pgmq`` wheel, in one transaction). Needs the
    rights to create a schema, types and functions (and, for the extension, to create it).
    """
    async with engine.begin() as conn:
        if await conn.scalar(_INSTALLED):
            return "present"
        await conn.execute(_LOCK)
        if await conn.scalar(_INSTALLED):
            return "present"
        if await conn.scalar(_AVAILABLE):
            await conn.execute(text("CREATE EXTENSION IF NOT EXISTS pgmq"))
            return "extension"
        script = bundled_pgmq_sql()
        raw = await conn.get_raw_connection()
        # Many statements (DO blocks, $$-quoted bodies): asyncpg's execute() without
        # arguments sends them as one simple query, inside this transaction.
        await raw.driver_connection.execute(script)  # type: ignore[union-attr]
        return "sql"
