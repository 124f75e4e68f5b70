"""``polyqueue inspect stats|workers|jobs|job``: read-only views (rich tables, or ``--json``)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue import views
from polyqueue.cli._common import (
    DatabaseUrlOption,
    EmbeddedOption,
    check_schema,
    clean,
    cli_errors,
    fail,
    load_settings,
    one_shot_engine,
    resolve_url,
)
from polyqueue.types import JobStatus

__all__ = [
    "EmbeddedOption",
    "JsonOption",
    "inspect_app",
    "print_json",
    "run_with_engine",
    "shown",
]

T = TypeVar("T")

inspect_app = typer.Typer(
    name="inspect",
    help="Look at the queue: counts and throughput, workers, jobs, one job in full. Read-only.",
    no_args_is_help=True,
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]


def run_with_engine(
    database_url: str | None, work: Callable[[AsyncEngine], Awaitable[T]], *, embedded: bool = False
) -> T:
    """Resolve the URL, check the schema, run ``work`` with an engine, dispose of it; CLI errors mapped."""
    url: list[str] = []
    with cli_errors(url):
        url.append(resolve_url(load_settings(database_url, embedded)))

        async def go() -> T:
            await check_schema(url[0])
            engine = one_shot_engine(url[0])
            try:
                return await work(engine)
            finally:
                await engine.dispose()

        try:
            return asyncio.run(go())
        except ValueError as exc:  # a refused filter or a malformed id
            fail(str(exc))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {clean(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, str):
        return clean(value)
    return value


def print_json(value: Any) -> None:
    """``value`` (dataclasses, lists, dicts) as JSON on stdout; ids and times as strings; stored
    text with credentials masked and terminal control sequences removed."""
    typer.echo(json.dumps(_plain(value), default=str, indent=2))


def shown(value: object) -> Text:
    """Stored text for a rich table or console: cleaned (:func:`clean`), and never read as markup."""
    return Text(clean(value if isinstance(value, str) else str(value)))


def _shown_json(value: object) -> Text:
    return shown(json.dumps(_plain(value), default=str))


def _console() -> Console:
    return Console(soft_wrap=False, highlight=False)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _time(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str | None) -> dt.datetime | None:
    """``30s``, ``10m``, ``2h``, ``7d`` ago, or an ISO 8601 time (UTC when it names no zone)."""
    if value is None:
        return None
    match = _DURATION.match(value.strip())
    if match:
        return dt.datetime.now(dt.UTC) - dt.timedelta(seconds=float(match[1]) * _UNIT[match[2]])
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use a duration (30s, 10m, 2h, 7d) or an ISO time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@inspect_app.command()
def stats(
    as_json: JsonOption = False, database_url: DatabaseUrlOption = None, embedded: EmbeddedOption = False
) -> None:
    """Jobs by queue and status, the oldest due pending job's wait, throughput and failure rate."""
    s = run_with_engine(database_url, views.stats, embedded=embedded)
    if as_json:
        print_json(s)
        return
    table = Table(title="jobs by queue and status")
    for column in ("queue", "status", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for c in s.counts:
        table.add_row(shown(c.queue), c.status, f"~{c.count}" if c.estimated else str(c.count))
    console = _console()
    console.print(table)
    rate = f"{100 * s.failure_rate_last_hour:.1f}%" if s.failure_rate_last_hour is not None else "-"
    console.print(f"oldest due pending job waiting: {_age(s.oldest_pending_seconds)}")
    console.print(f"finished: {s.finished_last_minute} in the last minute, {s.finished_last_hour} in the last hour")
    console.print(f"failure rate (last hour): {rate} ({s.failed_last_hour} failed)")
    if s.finished_counts_estimated:
        console.print(f"(finished counts are estimates: the table holds ~{s.table_rows_estimate} rows)")


@inspect_app.command()
def workers(
    running_only: Annotated[bool, typer.Option("--running", help="Only workers whose status is running.")] = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Registered workers: id, host, pid, queues, status, heartbeat age, jobs running now."""

    async def work(engine: AsyncEngine) -> list[views.WorkerRow]:
        return await views.workers(engine, include_stopped=not running_only)

    rows = run_with_engine(database_url, work, embedded=embedded)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} workers")
    for column in ("id", "host", "pid", "queues", "broker", "status", "heartbeat", "running"):
        table.add_column(column)
    for w in rows:
        table.add_row(
            str(w.id),
            shown(w.hostname),
            str(w.pid),
            shown(",".join(w.queues)),
            shown(w.broker),
            w.status,
            f"{_age(w.heartbeat_age_seconds)} ago",
            f"{w.running_jobs}/{w.concurrency}",
        )
    _console().print(table)


@inspect_app.command()
def jobs(
    status: Annotated[JobStatus | None, typer.Option(case_sensitive=False, help="Only jobs in this status.")] = None,
    task: Annotated[str | None, typer.Option(help="Only jobs of this task.")] = None,
    queue: Annotated[str | None, typer.Option(help="Only jobs of this queue.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only jobs created since: a duration ago (30s, 10m, 2h, 7d) or an ISO time.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many jobs, newest first.")] = 50,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """The newest jobs matching the filters, with each one's latest error."""
    when = parse_since(since)

    async def work(engine: AsyncEngine) -> list[views.JobRow]:
        return await views.jobs(
            engine, status=status.value if status else None, task=task, queue=queue, since=when, limit=limit
        )

    rows = run_with_engine(database_url, work, embedded=embedded)
    if as_json:
        print_json(rows)
        return
    table = Table(title=f"{len(rows)} jobs (newest first)")
    for column in ("id", "task", "queue", "status", "attempt", "created", "finished", "last error"):
        table.add_column(column, overflow="fold")
    for j in rows:
        table.add_row(
            str(j.id),
            shown(j.task),
            shown(j.queue),
            j.status,
            f"{j.attempt}/{j.max_attempts}",
            _time(j.created_at),
            _time(j.finished_at),
            shown(clean(j.last_error or "")[:80]),
        )
    _console().print(table)


@inspect_app.command()
def job(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id.")],
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """One job in full: payload, attempts, every error with its traceback, result."""

    async def work(engine: AsyncEngine) -> views.JobDetail:
        return await views.job(engine, job_id)

    detail = run_with_engine(database_url, work, embedded=embedded)
    if as_json:
        print_json(detail)
        return
    console = _console()
    table = Table(title=f"job {detail.id}", show_header=False)
    table.add_column("field")
    table.add_column("value", overflow="fold")
    for name in (
        "task",
        "queue",
        "status",
        "priority",
        "unique_key",
        "worker_id",
        "timeout_strategy",
        "max_run_seconds",
    ):
        table.add_row(name, shown(getattr(detail, name)))
    table.add_row("attempts", f"{detail.attempt}/{detail.max_attempts}")
    for name in ("created_at", "run_at", "dispatched_at", "started_at", "finished_at", "timeout_at"):
        table.add_row(name, _time(getattr(detail, name)))
    table.add_row("payload", _shown_json(detail.payload))
    table.add_row("meta", _shown_json(detail.meta))
    table.add_row("result", _shown_json(detail.result))
    console.print(table)
    for error in detail.errors:
        record = error if isinstance(error, dict) else {"message": error}
        console.print(
            shown(
                f"attempt {record.get('attempt')} at {record.get('at')}: {record.get('type')}: {record.get('message')}"
            )
        )
        if record.get("traceback"):
            console.print(shown(record["traceback"]))
