"""The ``polyqueue`` command line (typer): the composition root. Nothing imports it.

    polyqueue worker myapp.jobs:queue      run a worker
    polyqueue relay myapp.jobs:queue       run a relay alone (broker modes)
    polyqueue db upgrade|downgrade|current polyqueue's tables
    polyqueue inspect stats|workers|jobs|job look at the queue (read-only)
    polyqueue admin requeue|fail|cancel|prune change jobs
    polyqueue demo                         see it work, on an embedded Postgres

Settings come from ``POLYQUEUE_*`` environment variables; options override them.
With no database configured, only ``demo`` uses the embedded Postgres in ``./.polyqueue/``;
every other command refuses unless asked for it (``--embedded`` or
``POLYQUEUE_DATABASE_URL=embedded``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Annotated

import typer
from pydantic import SecretStr
from rich.console import Console

from polyqueue import migrations
from polyqueue.cli._admin import admin_app
from polyqueue.cli._common import (
    DatabaseUrlOption,
    EmbeddedOption,
    LogFormat,
    LogLevel,
    check_schema,
    cli_errors,
    configure_logging,
    fail,
    load_app,
    load_settings,
    resolve_url,
    with_database_url,
)
from polyqueue.cli._db import db_app
from polyqueue.cli._inspect import inspect_app
from polyqueue.db import is_embedded, mask_url
from polyqueue.registry import Polyqueue
from polyqueue.settings import queue_name_problem, secret_value

__all__ = ["app", "main"]

log = logging.getLogger("polyqueue.cli")

app = typer.Typer(
    name="polyqueue",
    help="polyqueue: an async job queue in your SQLAlchemy transactions, with Postgres as the truth.",
    no_args_is_help=True,
    add_completion=False,
    # Plain tracebacks for real bugs, and never with local variables (they may hold a password).
    pretty_exceptions_enable=False,
)
app.add_typer(db_app, name="db")
app.add_typer(inspect_app, name="inspect")
app.add_typer(admin_app, name="admin")

AppArgument = Annotated[
    str, typer.Argument(metavar="APP", help="Your Polyqueue instance as 'module:attribute', e.g. myapp.jobs:queue.")
]
LogLevelOption = Annotated[LogLevel, typer.Option(case_sensitive=False, help="Log level (stderr).")]
LogFormatOption = Annotated[LogFormat, typer.Option(case_sensitive=False, help="Log lines as text or JSON.")]


def _prepare(pq: Polyqueue, database_url: str | None, embedded: bool, url: list[str]) -> None:
    """Settle the app's database URL (option, settings, or the embedded one when asked for) and
    check the schema."""
    settings = with_database_url(pq.settings, database_url, embedded)
    url.append(resolve_url(settings))
    pq.settings = settings.model_copy(update={"database_url": SecretStr(url[0])})
    if is_embedded(settings.database_url):
        # The embedded database is polyqueue's own: bring its schema up to date, so a first run just works.
        asyncio.run(migrations.upgrade(url[0]))
    # A worker or relay started while Postgres restarts waits for it (startup_wait), then checks.
    asyncio.run(check_schema(url[0], wait=settings.startup_wait))


def _queues(value: str | None) -> list[str] | None:
    if value is None:
        return None
    queues = [q.strip() for q in value.split(",") if q.strip()]
    if not queues:
        raise typer.BadParameter("name at least one queue, e.g. --queues default,emails")
    for name in queues:
        problem = queue_name_problem(name)
        if problem:
            raise typer.BadParameter(problem)
    return queues


@app.command()
def worker(
    app_path: AppArgument,
    queues: Annotated[
        str | None,
        typer.Option(
            help="Queues to serve, comma-separated. (default: the app's queues, POLYQUEUE_QUEUES)", show_default=False
        ),
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Jobs run at once. (default: the app's, POLYQUEUE_CONCURRENCY)", show_default=False),
    ] = None,
    relay: Annotated[
        bool,
        typer.Option("--relay/--no-relay", help="Broker backends: also relay committed jobs to the broker here."),
    ] = True,
    maintenance: Annotated[
        bool,
        typer.Option("--maintenance/--no-maintenance", help="Also run maintenance: rescue, re-dispatch, pruning."),
    ] = True,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="Serve Prometheus metrics on this port (/metrics); needs polyqueue[prometheus].",
            show_default=False,
        ),
    ] = None,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
    log_level: LogLevelOption = LogLevel.INFO,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Run a worker for APP until SIGTERM or SIGINT (running jobs get shutdown_grace seconds, then go back).

    Settings come from POLYQUEUE_* variables through the app's Settings; these options override them.
    """
    from polyqueue.runner import main as run_main

    queue_list = _queues(queues)
    url: list[str] = []
    with cli_errors(url):
        pq = load_app(app_path)
        configure_logging(log_level, log_format)
        _prepare(pq, database_url, embedded, url)
        log.info(
            "polyqueue worker: app %s, %d tasks, database %s, backend %s",
            app_path,
            len(pq.tasks),
            mask_url(url[0]),
            pq.settings.queue_backend,
        )
        metrics = None
        if metrics_port is not None:
            from polyqueue.metrics.prometheus import PrometheusMetrics, start_http_server

            metrics = PrometheusMetrics()
            start_http_server(metrics_port, registry=metrics.registry)
            log.info("Prometheus metrics on http://0.0.0.0:%d/metrics", metrics_port)
        run_main(
            pq,
            queues=queue_list,
            concurrency=concurrency,
            run_relay=relay,
            run_maintenance=maintenance,
            metrics=metrics,
        )


@app.command()
def relay(
    app_path: AppArgument,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
    log_level: LogLevelOption = LogLevel.INFO,
    log_format: LogFormatOption = LogFormat.TEXT,
) -> None:
    """Forward committed jobs of APP to its broker until SIGTERM or SIGINT (only for broker backends)."""
    from polyqueue.runner import run_relay

    url: list[str] = []
    with cli_errors(url):
        pq = load_app(app_path)
        configure_logging(log_level, log_format)
        backend = pq.settings.queue_backend
        if backend == "direct":
            fail("queue_backend 'direct' needs no relay: workers claim jobs from the table directly")
        if backend == "memory":
            fail("queue_backend 'memory' is in-process: each worker relays its own jobs; run only workers")
        _prepare(pq, database_url, embedded, url)
        log.info("polyqueue relay: app %s, database %s, backend %s", app_path, mask_url(url[0]), backend)
        asyncio.run(run_relay(pq, install_signal_handlers=True))


class DemoBackend(enum.StrEnum):
    DIRECT = "direct"
    MEMORY = "memory"


@app.command()
def demo(
    backend: Annotated[
        DemoBackend | None,
        typer.Option(
            case_sensitive=False,
            help="How deliveries travel (default: POLYQUEUE_QUEUE_BACKEND, else direct).",
            show_default=False,
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Postgres URL (default: POLYQUEUE_DATABASE_URL; if unset, the embedded Postgres in ./.polyqueue/).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """See polyqueue work: transactional enqueue, rollback, validation, retries, time limits, typed results.

    Migrates, adds its own table polyqueue_demo_orders, runs a worker here on queue polyqueue_demo.
    """
    from polyqueue.demo import run_demo

    console = Console()
    url: list[str] = []
    with cli_errors(url):
        settings = load_settings(database_url)
        if backend is not None:
            settings = settings.model_copy(update={"queue_backend": backend.value})
        if settings.queue_backend not in ("direct", "memory"):
            fail(f"the demo runs with --backend direct or memory, not {settings.queue_backend!r}")
        url.append(resolve_url(settings, embedded_by_default=True))
        configured = secret_value(settings.database_url)
        where = mask_url(url[0]) if configured and not is_embedded(configured) else "the embedded Postgres"
        console.print(f"polyqueue demo on {where}", soft_wrap=True, highlight=False)
        ok = asyncio.run(run_demo(settings.model_copy(update={"database_url": SecretStr(url[0])}), console))
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    """The ``polyqueue`` console script."""
    app(prog_name="polyqueue")
