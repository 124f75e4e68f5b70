"""``polyqueue demo``: polyqueue's guarantees, shown in a few seconds on a real Postgres.

1. An order row and its job commit in one transaction; the handler marks the order
   shipped in the job's own transaction.
2. A rolled-back transaction leaves no job behind.
3. A bad payload is refused at enqueue (``PayloadError``); a stored payload that no
   longer fits its model fails on dispatch, terminally, at attempt 1.
4. A flaky handler fails twice, then succeeds (retries with backoff).
5. A slow handler hits its time limit: strategy ``fail``, and ``retry`` until its attempts run out.

Then an in-process worker runs them and the typed results are read back. The demo's
tasks use their own queue (``polyqueue_demo``) and its orders their own table
(``polyqueue_demo_orders``), so it is harmless beside a real application.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy import DateTime, Identity, Integer, MetaData, Text, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polyqueue.context import JobContext
from polyqueue.db import make_engine, missing_tables
from polyqueue.enqueue import enqueue
from polyqueue.errors import ConfigurationError, JobFailedError, PayloadError
from polyqueue.migrations import upgrade
from polyqueue.models import Job
from polyqueue.registry import Polyqueue
from polyqueue.results import get_job_result_typed, get_job_result_typed_via_registry, wait_for_result
from polyqueue.retry import Backoff
from polyqueue.runner import WorkerProcess
from polyqueue.settings import Settings, secret_value

__all__ = ["DEMO_QUEUE", "build_app", "run_demo"]

#: The queue of the demo's tasks: a worker of your own app (queue ``default``) never takes them.
DEMO_QUEUE = "polyqueue_demo"


class _DemoBase(DeclarativeBase):
    metadata = MetaData()  # the demo's own: never mixed with polyqueue's or yours


class Order(_DemoBase):
    """An application table of the demo's, written in the same transaction as a job."""

    __tablename__ = "polyqueue_demo_orders"

    id: Mapped[int] = mapped_column(Integer, Identity(), primary_key=True)
    item: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text, server_default=text("'new'"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ShipOrder(BaseModel):
    order_id: int


class Shipment(BaseModel):
    order_id: int
    tracking: str


class Charge(BaseModel):
    order_id: int
    amount_cents: int = Field(gt=0)


class Flaky(BaseModel):
    succeed_on_attempt: int


class Slow(BaseModel):
    seconds: float


def build_app(settings: Settings) -> Polyqueue:
    """A fresh app with the demo's tasks (all named ``demo_*``, all on :data:`DEMO_QUEUE`)."""
    app = Polyqueue(settings)
    quick = Backoff(base=0.05, jitter=False)

    @app.register(name="demo_ship_order", queue=DEMO_QUEUE)
    async def ship_order(payload: ShipOrder, ctx: JobContext) -> Shipment:
        # ctx.session: this write and "job succeeded" commit together, or neither does.
        await ctx.session.execute(update(Order).where(Order.id == payload.order_id).values(status="shipped"))
        return Shipment(order_id=payload.order_id, tracking=f"PQ-{payload.order_id:06d}")

    @app.register(name="demo_charge", queue=DEMO_QUEUE)
    async def charge(payload: Charge) -> int:
        return payload.amount_cents

    @app.register(name="demo_flaky", queue=DEMO_QUEUE, max_attempts=5, backoff=quick)
    async def flaky(payload: Flaky, ctx: JobContext) -> str:
        if ctx.attempt < payload.succeed_on_attempt:
            raise ConnectionError(f"upstream unavailable (attempt {ctx.attempt})")
        return f"ok on attempt {ctx.attempt}"

    @app.register(
        name="demo_slow", queue=DEMO_QUEUE, max_run_seconds=0.3, timeout_strategy="fail", max_attempts=1, backoff=quick
    )
    async def slow(payload: Slow) -> None:
        await asyncio.sleep(payload.seconds)

    return app


@dataclass
class _Case:
    shows: str
    job_id: uuid.UUID | None  # None: no job was ever written
    expected: str  # status, or "absent" / "rejected"
    attempts: int = 0
    note: str = ""  # the outcome when there is no job row
    actual: str = ""  # set when an outcome without a job row was not the expected one


def _short(message: str) -> str:
    """A pydantic/handler message on one line, without the docs link and the error codes."""
    message = re.split(r"\s+For further information visit", message)[0]
    message = re.sub(r"\s*\[type=[^\]]*\]|\d+ validation errors? for \w+\s*", "", message)
    return " ".join(message.split())


async def _prepare(engine: AsyncEngine) -> None:
    try:
        await upgrade(engine)
    except ConfigurationError:
        # polyqueue's tables are managed by the user's own Alembic history: use them as they are.
        async with engine.connect() as conn:
            if await missing_tables(conn):
                raise
    async with engine.begin() as conn:
        await conn.run_sync(_DemoBase.metadata.create_all)


async def _enqueue_all(sessions: async_sessionmaker[AsyncSession], say: Any) -> tuple[list[_Case], int]:
    cases: list[_Case] = []

    async with sessions() as session, session.begin():
        order = Order(item="1 rubber duck")
        session.add(order)
        await session.flush()
        job = await enqueue(session, ShipOrder(order_id=order.id))
    say(f"1. order #{order.id} and its shipping job written in [bold]one transaction[/], committed")
    cases.append(_Case("1 commit: order + job", job.id, "succeeded", attempts=1))

    async with sessions() as session:
        ghost_order = Order(item="2 rubber ducks")
        session.add(ghost_order)
        await session.flush()
        ghost_id = (await enqueue(session, ShipOrder(order_id=ghost_order.id))).id
        await session.rollback()  # expires the objects; hence the id taken above
        found = await session.scalar(select(func.count()).select_from(Job).where(Job.id == ghost_id))
    say(f"2. another order and its job written, then [bold]rolled back[/]: {found} such job exists")
    cases.append(
        _Case(
            "2 rollback",
            None,
            "absent",
            note=f"{found} rows: never existed, never runs",
            actual="" if not found else "exists",
        )
    )

    refused = _Case("3 bad payload", None, "rejected")
    try:
        async with sessions() as session, session.begin():
            await enqueue(session, {"order_id": order.id, "amount_cents": -5}, task="demo_charge")
        refused.note, refused.actual = "accepted: no PayloadError", "accepted"
    except PayloadError as exc:
        refused.note = "PayloadError: " + _short(str(exc)).split(" is invalid: ", 1)[-1]
    say(f"3. enqueue(task='demo_charge', amount_cents=-5): {escape(refused.note)}")
    cases.append(refused)

    async with sessions() as session, session.begin():
        stale = await enqueue(session, Charge(order_id=order.id, amount_cents=1999))
        # As if an older deploy had written it, before Charge.amount_cents became an int.
        corrupt = {"order_id": order.id, "amount_cents": "19.99 EUR"}
        await session.execute(
            update(Job).where(Job.id == stale.id).values(payload=corrupt).execution_options(synchronize_session=False)
        )
    say("   a valid charge enqueued, then its stored payload changed to amount_cents='19.99 EUR'")
    cases.append(_Case("3 stored payload bad", stale.id, "failed", attempts=1))

    async with sessions() as session, session.begin():
        flaky = await enqueue(session, Flaky(succeed_on_attempt=3))
        slow_fail = await enqueue(session, Slow(seconds=5))
        slow_retry = await enqueue(session, Slow(seconds=5), timeout_strategy="retry", max_attempts=2)
    say("4. a handler that fails twice, then succeeds (backoff 0.05s, then 0.1s)")
    say("5. two 5-second handlers under a 0.3s time limit: strategy 'fail', and 'retry' with 2 attempts")
    cases.append(_Case("4 flaky handler", flaky.id, "succeeded", attempts=3))
    cases.append(_Case("5 time limit: fail", slow_fail.id, "failed", attempts=1))
    cases.append(_Case("5 time limit: retry", slow_retry.id, "failed", attempts=2))
    return cases, order.id


async def _wait_all(engine: AsyncEngine, ids: list[uuid.UUID], timeout: float) -> None:
    async def one(job_id: uuid.UUID) -> None:
        try:
            await wait_for_result(job_id, engine=engine, timeout=timeout, poll_interval=0.2)
        except JobFailedError:
            pass

    await asyncio.gather(*(one(i) for i in ids))


async def _run_worker(app: Polyqueue, engine: AsyncEngine, ids: list[uuid.UUID], timeout: float) -> None:
    worker = WorkerProcess(app, engine, queues=[DEMO_QUEUE], concurrency=8, run_maintenance=False)
    running = asyncio.create_task(worker.run(), name="polyqueue-demo-worker")
    waiting = asyncio.create_task(_wait_all(engine, ids, timeout), name="polyqueue-demo-wait")
    try:
        await asyncio.wait([running, waiting], return_when=asyncio.FIRST_COMPLETED)
        if running.done():  # the worker died before the jobs finished: say why
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            running.result()
            raise RuntimeError("the demo worker stopped before its jobs finished")
        waiting.result()
    finally:
        worker.stop()
        await running  # closes the broker it made


async def _outcomes(
    sessions: async_sessionmaker[AsyncSession], cases: list[_Case], order_id: int
) -> list[tuple[_Case, str, int, str]]:
    rows = []
    async with sessions() as session:
        for case in cases:
            if case.job_id is None:
                rows.append((case, case.actual or case.expected, 0, case.note))
                continue
            job = await session.get(Job, case.job_id)
            if job is None:
                rows.append((case, "absent", 0, "job not found"))
                continue
            if job.status == "succeeded":
                value: Any = (
                    await get_job_result_typed(session, job.id, Shipment)  # typed by a model you name ...
                    if job.task == "demo_ship_order"
                    else await get_job_result_typed_via_registry(session, job.id)  # ... or by the handler's annotation
                )
                shown = repr(value)
            else:
                last = job.errors[-1] if job.errors else {}
                shown = _short(f"{last.get('type')}: {last.get('message')}") if last else ""
            rows.append((case, job.status, job.attempt, shown))
        order_status = await session.scalar(select(Order.status).where(Order.id == order_id))
    check = _Case("1 handler's write", None, "shipped")
    rows.append((check, str(order_status), 0, f"order #{order_id} is {order_status}, in the job's transaction"))
    return rows


def _table(rows: list[tuple[_Case, str, int, str]], backend: str) -> Table:
    table = Table(title=f"polyqueue demo: jobs after one worker run (backend {backend})", title_justify="left")
    table.add_column("step", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("tries", justify="right")
    table.add_column("result / last error", overflow="fold", ratio=1)
    colours = {"succeeded": "green", "shipped": "green", "failed": "red", "absent": "yellow", "rejected": "yellow"}
    for case, status, attempts, shown in rows:
        colour = colours.get(status, "white")
        table.add_row(
            escape(case.shows),
            f"[{colour}]{status}[/]",
            str(attempts) if case.job_id else "-",
            escape(shown),
        )
    return table


async def run_demo(settings: Settings, console: Console, *, timeout: float = 60.0) -> bool:
    """Run the demo against ``settings.database_url``; True when every outcome is the expected one."""
    url = secret_value(settings.database_url)
    assert url, "the CLI resolves the URL (configured or embedded) first"
    began = time.monotonic()
    app = build_app(settings.model_copy(update={"poll_interval": 0.1}))
    backend = app.settings.queue_backend
    engine = make_engine(
        url,
        pool_size=10,
        transaction_pooling=settings.pool_mode == "transaction",
        command_timeout=settings.command_timeout or None,
    )
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    try:
        await _prepare(engine)
        console.print(f"schema ready (polyqueue migrations, table {Order.__tablename__})\n")
        cases, order_id = await _enqueue_all(sessions, console.print)
        ids = [c.job_id for c in cases if c.job_id is not None]
        console.print(
            f"\nrunning an in-process worker (backend {backend}) until the {len(ids)} jobs are finished ...\n"
        )
        await _run_worker(app, engine, ids, timeout)
        rows = await _outcomes(sessions, cases, order_id)
    finally:
        await engine.dispose()
    console.print(_table(rows, backend))
    wrong = [
        (case, status, attempts)
        for case, status, attempts, _ in rows
        if status != case.expected or (case.attempts and attempts != case.attempts)
    ]
    for case, status, attempts in wrong:
        console.print(
            f"[red]unexpected:[/] {escape(case.shows)}: {status} after {attempts} attempts, "
            f"expected {case.expected}" + (f" after {case.attempts}" if case.attempts else "")
        )
    if not wrong:
        console.print(f"\n[green]all outcomes as expected[/] in {time.monotonic() - began:.1f}s")
    return not wrong
