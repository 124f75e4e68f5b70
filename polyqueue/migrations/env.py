"""Alembic environment of the standalone path (``polyqueue.migrations.upgrade`` and friends).

Not used when polyqueue's revisions run inside a user's own Alembic history:
there the user's ``env.py`` runs them. The version table is
``polyqueue_alembic_version`` so that a user's ``alembic_version`` is never touched.

Online, the connection comes from ``config.attributes["connection"]`` (set by
``polyqueue.migrations``, already inside a transaction that the caller commits);
without one, an asyncpg engine is made from ``sqlalchemy.url``. Offline
(``--sql``), the DDL is rendered for PostgreSQL without any connection.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection

from polyqueue.db import make_engine
from polyqueue.migrations import VERSION_TABLE
from polyqueue.models import metadata

config = context.config


def run_migrations_offline() -> None:
    """Emit the migrations as SQL text for PostgreSQL."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
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
    """Run the migrations on a synchronous facade of an async connection."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        compare_server_default=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(url: str) -> None:
    """Fallback when Alembic is driven without a shared connection."""
    engine = make_engine(url, poolclass=pool.NullPool, transaction_pooling=True)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    """Run on the caller's connection, or on a fresh engine from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        do_run_migrations(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("polyqueue migrations need a connection: use polyqueue.migrations.upgrade()")
    asyncio.run(run_async_migrations(url))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
