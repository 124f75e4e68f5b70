"""The project's own Alembic environment, for writing new polyqueue revisions.

Revisions land in ``polyqueue/migrations/versions`` (``alembic.ini``). The
database comes from ``POLYQUEUE_DATABASE_URL`` and is driven through an async
(asyncpg) engine, as in production. The version table is the standalone one,
``polyqueue_alembic_version``, so a development database can be migrated by
``alembic upgrade heads`` here or by ``polyqueue db upgrade`` interchangeably.

Autogenerate compares ``polyqueue.models.metadata`` with the database, looking
only at tables named ``polyqueue_*``: against an up-to-date database it proposes
nothing, whatever else lives there.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from polyqueue.db import asyncpg_url
from polyqueue.migrations import VERSION_TABLE
from polyqueue.models import metadata

config = context.config

if config.config_file_name is not None:
    from logging.config import fileConfig

    fileConfig(config.config_file_name)


def include_name(name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames) -> bool:
    """Autogenerate looks at polyqueue's tables only, never at a neighbour's."""
    if type_ == "table":
        return name is not None and name.startswith("polyqueue_") and name != VERSION_TABLE
    return True


def _url() -> str | None:
    return os.environ.get("POLYQUEUE_DATABASE_URL") or config.get_main_option("sqlalchemy.url")


def run_migrations_offline() -> None:
    """``alembic upgrade heads --sql``: the DDL as text, no connection."""
    context.configure(
        url=_url(),
        dialect_name="postgresql",
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    engine = create_async_engine(asyncpg_url(url), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # a caller (a test) shares its connection
        do_run_migrations(connection)
        return
    url = _url()
    if not url:
        raise SystemExit("set POLYQUEUE_DATABASE_URL to the development database")
    asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
