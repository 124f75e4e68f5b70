"""``polyqueue db upgrade|downgrade|current``: the standalone migration path."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from sqlalchemy import text

from polyqueue import migrations
from polyqueue.cli._common import (
    CONNECT_TIMEOUT,
    cli_errors,
    head_revisions,
    load_settings,
    resolve_url,
)
from polyqueue.db import make_engine, mask_url

__all__ = ["db_app"]

db_app = typer.Typer(
    name="db",
    help="Create, upgrade, downgrade or inspect polyqueue's tables (without Alembic in your project).",
    no_args_is_help=True,
)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Postgres URL (default: POLYQUEUE_DATABASE_URL; if unset, the embedded Postgres in ./.polyqueue/).",
        show_default=False,
    ),
]


def _describe(revisions: list[str], installed: bool) -> str:
    heads = head_revisions()
    if not revisions:
        if installed:
            return (
                "none recorded: polyqueue's tables exist but another tool manages them "
                "(your own Alembic history: try `alembic current`)"
            )
        return "none: polyqueue's tables are not installed (run `polyqueue db upgrade`)"
    if revisions == heads:
        return f"{', '.join(revisions)} (head)"
    return f"{', '.join(revisions)} (head is {', '.join(heads)}: run `polyqueue db upgrade`)"


async def _state(url: str) -> tuple[list[str], bool]:
    engine = make_engine(url, pool_size=1, connect_args={"timeout": CONNECT_TIMEOUT})
    try:
        async with engine.connect() as conn:
            installed = bool((await conn.execute(text("SELECT to_regclass('polyqueue_jobs') IS NOT NULL"))).scalar())
            return await migrations.current(conn), installed
    finally:
        await engine.dispose()


async def _apply(url: str, revision: str, up: bool) -> tuple[list[str], bool]:
    engine = make_engine(url, pool_size=1, connect_args={"timeout": CONNECT_TIMEOUT})
    try:
        if up:
            await migrations.upgrade(engine, revision)
        else:
            await migrations.downgrade(engine, revision)
    finally:
        await engine.dispose()
    return await _state(url)


@db_app.command()
def upgrade(
    revision: Annotated[
        str, typer.Option(help="Target revision; with --sql also a 'from:to' range, e.g. 'ef56f936f06a:heads'.")
    ] = "heads",
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the upgrade as SQL (DDL) instead of running it; touches no database.")
    ] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create or upgrade polyqueue's tables (idempotent; safe from several processes at once)."""
    url: list[str] = []
    with cli_errors(url):
        if sql:
            typer.echo(migrations.upgrade_sql(revision), nl=False)
            return
        url.append(resolve_url(load_settings(database_url)))
        revisions, installed = asyncio.run(_apply(url[0], revision, up=True))
        typer.echo(f"upgraded {mask_url(url[0])}: polyqueue revision {_describe(revisions, installed)}")


@db_app.command()
def downgrade(
    revision: Annotated[str, typer.Option(help="Target revision; 'base' drops polyqueue's tables.")] = "base",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Downgrade polyqueue's tables; to 'base' (the default) drops them, with every job in them."""
    url: list[str] = []
    with cli_errors(url):
        url.append(resolve_url(load_settings(database_url)))
        if not yes:
            typer.confirm(
                f"Downgrade polyqueue's tables in {mask_url(url[0])} to {revision!r}? "
                "Going to base deletes every job and its result.",
                abort=True,
            )
        revisions, installed = asyncio.run(_apply(url[0], revision, up=False))
        state = _describe(revisions, installed) if revisions or installed else "none (its tables are gone)"
        typer.echo(f"downgraded {mask_url(url[0])}: polyqueue revision {state}")


@db_app.command()
def current(database_url: DatabaseUrlOption = None) -> None:
    """Show the polyqueue revision the database is at (as recorded by `polyqueue db upgrade`)."""
    url: list[str] = []
    with cli_errors(url):
        url.append(resolve_url(load_settings(database_url)))
        revisions, installed = asyncio.run(_state(url[0]))
        typer.echo(f"database: {mask_url(url[0])}", err=True)  # stdout stays the revision alone, for scripts
        typer.echo(_describe(revisions, installed))
