"""``polyqueue admin requeue|fail|cancel|prune``: operator actions (``polyqueue.admin``).

Each command first works out what it would change (a rolled-back dry run), asks for
confirmation when that is more than :data:`CONFIRM_ABOVE` jobs (unless ``--yes``), then
changes it in one transaction and prints what changed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue import admin
from polyqueue.cli._common import DatabaseUrlOption
from polyqueue.cli._inspect import EmbeddedOption, JsonOption, print_json, run_with_engine, shown
from polyqueue.types import JobStatus

__all__ = ["CONFIRM_ABOVE", "admin_app"]

#: Changing more jobs than this asks for confirmation (unless --yes).
CONFIRM_ABOVE = 10

admin_app = typer.Typer(
    name="admin",
    help="Change jobs: requeue failed ones, fail or cancel live ones, prune finished ones.",
    no_args_is_help=True,
)

IdsArgument = Annotated[
    list[str] | None, typer.Argument(metavar="[ID]...", help="Job ids; combined with the filters.", show_default=False)
]
StatusOption = Annotated[
    list[JobStatus] | None,
    typer.Option("--status", case_sensitive=False, help="Only jobs in this status (repeatable).", show_default=False),
]
TaskOption = Annotated[str | None, typer.Option(help="Only jobs of this task.")]
QueueOption = Annotated[str | None, typer.Option(help="Only jobs of this queue.")]
AllOption = Annotated[
    bool, typer.Option("--all", help="Allow a command with no ids and no filter: it applies to every job it can.")
]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help=f"Do not ask for confirmation above {CONFIRM_ABOVE}.")]
ReasonOption = Annotated[str | None, typer.Option(help="Recorded as the message of the job's error entry.")]

Action = Callable[[AsyncEngine, bool], Awaitable[list[admin.JobChange]]]


def _statuses(status: list[JobStatus] | None) -> list[str] | None:
    return [s.value for s in status] if status else None


def _confirm(count: int, what: str, yes: bool) -> None:
    if count > CONFIRM_ABOVE and not yes:
        typer.confirm(f"{what} {count} jobs?", abort=True)


def _run(verb: str, action: Action, *, yes: bool, as_json: bool, database_url: str | None, embedded: bool) -> None:
    async def work(engine: AsyncEngine) -> list[admin.JobChange]:
        preview = await action(engine, True)
        if not preview:
            return []
        _confirm(len(preview), verb.capitalize(), yes)
        return await action(engine, False)

    changed = run_with_engine(database_url, work, embedded=embedded)
    if as_json:
        print_json({"action": verb, "count": len(changed), "jobs": changed})
        return
    console = Console(soft_wrap=False, highlight=False)
    console.print(f"{verb}: {len(changed)} jobs changed")
    if changed:
        table = Table()
        for column in ("id", "task", "queue", "was", "now"):
            table.add_column(column)
        for c in changed:
            table.add_row(str(c.id), shown(c.task), shown(c.queue), c.old_status, c.new_status)
        console.print(table)


@admin_app.command()
def requeue(
    ids: IdsArgument = None,
    status: StatusOption = None,
    task: TaskOption = None,
    queue: QueueOption = None,
    reset_attempts: Annotated[
        bool, typer.Option("--reset-attempts", help="Start the attempt count again at 0 (a full retry budget).")
    ] = False,
    all_jobs: AllOption = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Put failed or cancelled jobs back to pending, due now (their errors are kept)."""

    async def action(engine: AsyncEngine, dry_run: bool) -> list[admin.JobChange]:
        return await admin.requeue(
            engine,
            ids,
            status=_statuses(status),
            task=task,
            queue=queue,
            reset_attempts=reset_attempts,
            all=all_jobs,
            dry_run=dry_run,
        )

    _run("requeue", action, yes=yes, as_json=as_json, database_url=database_url, embedded=embedded)


@admin_app.command("fail")
def fail_jobs(
    ids: IdsArgument = None,
    status: StatusOption = None,
    task: TaskOption = None,
    queue: QueueOption = None,
    reason: ReasonOption = None,
    all_jobs: AllOption = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Fail pending, enqueued or running jobs now, without retry; running ones are stopped by their worker."""

    async def action(engine: AsyncEngine, dry_run: bool) -> list[admin.JobChange]:
        return await admin.fail(
            engine,
            ids,
            reason=reason or "failed by an operator (polyqueue admin fail)",
            status=_statuses(status),
            task=task,
            queue=queue,
            all=all_jobs,
            dry_run=dry_run,
        )

    _run("fail", action, yes=yes, as_json=as_json, database_url=database_url, embedded=embedded)


@admin_app.command()
def cancel(
    ids: IdsArgument = None,
    status: StatusOption = None,
    task: TaskOption = None,
    queue: QueueOption = None,
    reason: ReasonOption = None,
    all_jobs: AllOption = False,
    yes: YesOption = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Cancel pending, enqueued or running jobs: waiting ones never run, running ones are stopped."""

    async def action(engine: AsyncEngine, dry_run: bool) -> list[admin.JobChange]:
        return await admin.cancel(
            engine,
            ids,
            reason=reason or "cancelled by an operator (polyqueue admin cancel)",
            status=_statuses(status),
            task=task,
            queue=queue,
            all=all_jobs,
            dry_run=dry_run,
        )

    _run("cancel", action, yes=yes, as_json=as_json, database_url=database_url, embedded=embedded)


@admin_app.command()
def prune(
    older_than: Annotated[
        float, typer.Option("--older-than", min=0, help="Seconds since the job finished.", show_default=False)
    ],
    status: StatusOption = None,
    task: TaskOption = None,
    queue: QueueOption = None,
    yes: YesOption = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    embedded: EmbeddedOption = False,
) -> None:
    """Delete finished jobs (succeeded, failed, cancelled) that finished more than --older-than seconds ago."""

    async def work(engine: AsyncEngine) -> int:
        statuses = _statuses(status)
        count = await admin.prune(engine, older_than, status=statuses, task=task, queue=queue, dry_run=True)
        if not count:
            return 0
        _confirm(count, "Delete", yes)
        return await admin.prune(engine, older_than, status=statuses, task=task, queue=queue)

    deleted = run_with_engine(database_url, work, embedded=embedded)
    if as_json:
        print_json({"action": "prune", "count": deleted})
        return
    typer.echo(f"prune: {deleted} finished jobs deleted")
