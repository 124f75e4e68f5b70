"""polyqueue's schema migrations: Alembic revisions shipped inside the package.

Two ways to apply them (docs/migrations.md):

* **Inside your own Alembic history.** Add :data:`VERSION_LOCATION` to your
  ``version_locations``, pass ``polyqueue.models.metadata`` in your
  ``target_metadata`` list, and run ``alembic upgrade heads``. The revisions are
  their own branch (label ``polyqueue``, a separate base), so
  ``alembic downgrade polyqueue@base`` removes only polyqueue's tables.
* **Standalone** (``polyqueue db upgrade|downgrade|current``): the functions
  below. They run Alembic with this package's own ``env.py`` and record the
  revision in ``polyqueue_alembic_version``, never in your ``alembic_version``.

Everything here works on an async (asyncpg) engine: Alembic's synchronous API
runs inside ``AsyncConnection.run_sync``.
"""

from __future__ import annotations

import asyncio
import io
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from polyqueue.db import make_engine
from polyqueue.errors import ConfigurationError
from polyqueue.queries.schema import TABLES, missing_tables

__all__ = [
    "BRANCH_LABEL",
    "VERSION_LOCATION",
    "VERSION_TABLE",
    "current",
    "downgrade",
    "upgrade",
    "upgrade_sql",
]

_HERE = Path(__file__).resolve().parent

#: Absolute path of the folder holding polyqueue's revision files; add it to your
#: Alembic ``version_locations``.
VERSION_LOCATION: str = str(_HERE / "versions")
#: The version table of the standalone path (your own ``alembic_version`` is never touched).
VERSION_TABLE = "polyqueue_alembic_version"
#: The branch label of polyqueue's revisions: ``alembic downgrade polyqueue@base``.
BRANCH_LABEL = "polyqueue"

# Serialises concurrent upgrades (several workers starting at once): the second
# waits, then finds the schema at head and does nothing.
_LOCK_SQL = text("SELECT pg_advisory_xact_lock(hashtext('polyqueue.migrations'))")

_Target = AsyncEngine | AsyncConnection | str | URL

# Alembic installs ``alembic.context`` and ``alembic.op`` as process-global proxies
# for the duration of a command. run_sync yields to the event loop at every query,
# so two commands interleaved in one loop (upgrades of two databases under
# asyncio.gather) would run each other's operations on the wrong connection.
# One lock per event loop serialises them.
_command_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _command_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _command_locks.get(loop)
    if lock is None:
        lock = _command_locks[loop] = asyncio.Lock()
    return lock


def _config(connection: Connection | None = None, output: io.StringIO | None = None) -> Config:
    """An in-memory Alembic config pointing at this package's environment."""
    cfg = Config(output_buffer=output)
    # configparser interpolation: a literal '%' in the install path must be doubled.
    cfg.set_main_option("script_location", str(_HERE).replace("%", "%%"))
    # No version_locations: Alembic's default, <script_location>/versions, is ours.
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@asynccontextmanager
async def _connection(target: _Target) -> AsyncIterator[AsyncConnection]:
    """A connection in a transaction that commits on success.

    An ``AsyncConnection`` given by the caller is used as is: the work joins the
    caller's transaction and the caller commits.
    """
    if isinstance(target, AsyncConnection):
        yield target
        return
    engine = target if isinstance(target, AsyncEngine) else make_engine(target, pool_size=1, transaction_pooling=True)
    try:
        async with engine.begin() as conn:
            yield conn
    finally:
        if engine is not target:
            await engine.dispose()


def _standalone_heads(connection: Connection) -> list[str]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return sorted(context.get_current_heads())


def _check_owner(connection: Connection, existing: list[str]) -> None:
    """Refuse to manage tables that the standalone path did not create: polyqueue's tables
    (``existing``) without a standalone version row mean another tool (the user's Alembic
    history, or ``metadata.create_all``) manages the schema.

    Without this, ``polyqueue db upgrade`` on a database migrated through the
    user's Alembic history would fail half-way with "relation already exists".
    """
    if _standalone_heads(connection):
        return
    if existing:
        raise ConfigurationError(
            f"{', '.join(existing)} exist but {VERSION_TABLE} records no polyqueue revision: the schema "
            "is managed elsewhere (your own Alembic history: use `alembic upgrade heads` and "
            "`alembic downgrade polyqueue@base`; or metadata.create_all)"
        )


async def _existing_tables(conn: AsyncConnection) -> list[str]:
    """Take the migration lock, then list polyqueue's tables that exist."""
    await conn.execute(_LOCK_SQL)
    missing = await missing_tables(conn)
    return [t for t in TABLES if t not in missing]


def _upgrade_sync(connection: Connection, revision: str, existing: list[str]) -> None:
    _check_owner(connection, existing)
    command.upgrade(_config(connection), revision)


def _downgrade_sync(connection: Connection, revision: str, existing: list[str]) -> None:
    _check_owner(connection, existing)
    command.downgrade(_config(connection), revision)
    if not _standalone_heads(connection):
        # At base nothing of polyqueue's should remain, its bookkeeping included.
        connection.execute(text(f'DROP TABLE IF EXISTS "{VERSION_TABLE}"'))


async def upgrade(target: _Target, revision: str = "heads") -> None:
    """Upgrade polyqueue's tables to ``revision`` (default: the newest), standalone.

    ``target`` is an ``AsyncEngine``, a database URL (any ``postgresql`` driver;
    asyncpg is used), or an ``AsyncConnection`` whose transaction the caller
    commits. Idempotent, and safe to run from several processes at once, or on
    several databases at once in one event loop (not from several threads).

    Raises ``ConfigurationError`` when polyqueue's tables exist but were not
    created by this path (for instance by your own Alembic history).
    """
    async with _command_lock(), _connection(target) as conn:
        await conn.run_sync(_upgrade_sync, revision, await _existing_tables(conn))


async def downgrade(target: _Target, revision: str = "base") -> None:
    """Downgrade polyqueue's tables to ``revision``, standalone.

    The default, ``"base"``, drops polyqueue's tables and its version table and
    touches nothing else in the database.
    """
    async with _command_lock(), _connection(target) as conn:
        await conn.run_sync(_downgrade_sync, revision, await _existing_tables(conn))


async def current(target: _Target) -> list[str]:
    """The polyqueue revision(s) the standalone path has applied; ``[]`` if none.

    Reads ``polyqueue_alembic_version`` only: when polyqueue's revisions run inside
    your own Alembic history, ask ``alembic current`` instead.
    """
    async with _connection(target) as conn:
        return await conn.run_sync(_standalone_heads)


def upgrade_sql(revision: str = "heads") -> str:
    """The upgrade as SQL text (Alembic offline mode), for teams that review DDL.

    ``revision`` is a target (from an empty database) or a ``"start:end"`` range,
    e.g. ``"<current>:heads"``. The script also creates and fills
    ``polyqueue_alembic_version``, so the standalone commands keep working after it.
    """
    output = io.StringIO()
    command.upgrade(_config(output=output), revision, sql=True)
    return output.getvalue()
