"""``polyqueue db upgrade|downgrade|current``: the standalone migration path; ``db install-pgmq``."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from polyqueue import migrations
from polyqueue.cli._common import (
    DatabaseUrlOption,
    EmbeddedOption,
    cli_errors,
    head_revisions,
    load_settings,
    one_shot_engine,
    resolve_url,
)
from polyqueue.db import mask_url
from polyqueue.queries.schema import schema_installed
from polyqueue.settings import secret_value

__all__ = ["db_app"]

db_app = typer.Typer(
    name="db",
    help="Create, upgrade, downgrade or inspect polyqueue's tables (without Alembic in your project).",
    no_args_is_help=True,
)


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
    engine = one_shot_engine(url)
    try:
        async with engine.connect() as conn:
            installed = await schema_installed(conn)
            return await migrations.current(conn), installed
    finally:
        await engine.dispose()


async def _apply(url: str, revision: str, up: bool) -> tuple[list[str], bool]:
    engine = one_shot_engine(url)
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
    embedded: EmbeddedOption = False,
) -> None:
    """Create or upgrade polyqueue's tables (idempotent; safe from several processes at once)."""
    url: list[str] = []
    with cli_errors(url):
        if sql:
            typer.echo(migrations.upgrade_sql(revision), nl=False)
            return
        url.append(resolve_url(load_settings(database_url, embedded)))
        revisions, installed = asyncio.run(_apply(url[0], revision, up=True))
        typer.echo(f"upgraded {mask_url(url[0])}: polyqueue revision {_describe(revisions, installed)}")


@db_app.command()
def downgrade(
    revision: Annotated[str, typer.Option(help="Target revision; 'base' drops polyqueue's tables.")] = "base",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Downgrade polyqueue's tables; to 'base' (the default) drops them, with every job in them."""
    url: list[str] = []
    with cli_errors(url):
        url.append(resolve_url(load_settings(database_url, embedded)))
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
def current(database_url: DatabaseUrlOption = None, embedded: EmbeddedOption = False) -> None:
    """Show the polyqueue revision the database is at (as recorded by `polyqueue db upgrade`)."""
    url: list[str] = []
    with cli_errors(url):
        url.append(resolve_url(load_settings(database_url, embedded)))
        revisions, installed = asyncio.run(_state(url[0]))
        typer.echo(f"database: {mask_url(url[0])}", err=True)  # stdout stays the revision alone, for scripts
        typer.echo(_describe(revisions, installed))


async def _install_pgmq(url: str) -> str:
    from polyqueue.brokers.pgmq import split_url
    from polyqueue.pgmq_install import bundled_pgmq_version, install_pgmq

    engine = one_shot_engine(split_url(url)[0])
    try:
        how = await install_pgmq(engine)
    finally:
        await engine.dispose()
    return {
        "present": "already installed, nothing done",
        "extension": "installed the pgmq extension (CREATE EXTENSION pgmq)",
        "sql": f"installed PGMQ {bundled_pgmq_version()} from the SQL bundled in the pgmq package (no extension)",
    }[how]


@db_app.command("install-pgmq")
def install_pgmq(
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Postgres URL to install into (default: POLYQUEUE_BROKER_URL when POLYQUEUE_QUEUE_BACKEND=pgmq, "
            "else POLYQUEUE_DATABASE_URL; if unset, the command refuses unless --embedded).",
            show_default=False,
        ),
    ] = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Install PGMQ for queue_backend=pgmq: the extension if the server has it, else its SQL-only install."""
    url: list[str] = []
    with cli_errors(url):
        settings = load_settings(database_url, embedded)
        broker_url = secret_value(settings.broker_url)
        if not database_url and not embedded and settings.queue_backend == "pgmq" and broker_url:
            url.append(broker_url)
        else:
            url.append(resolve_url(settings))
        outcome = asyncio.run(_install_pgmq(url[0]))
        typer.echo(f"pgmq in {mask_url(url[0])}: {outcome}")
