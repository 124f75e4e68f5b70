"""Transactional enqueue against a real Postgres: rollback, commit, uniqueness, validation, batches."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import PayloadError, UnknownTaskError, enqueue, enqueue_many
from polyqueue.types import new_job_id
from tests.helpers import heard_everything, make_app, scalar

app = make_app()


class Invoice(BaseModel):
    number: int
    email: str


class Shared(BaseModel):
    x: int


@app.register(queue="billing", priority=5, max_attempts=7)
async def send_invoice(payload: Invoice) -> None:
    return None


@app.register
async def shared_a(payload: Shared) -> None:
    return None


@app.register
async def shared_b(payload: Shared) -> None:
    return None


async def count(engine: AsyncEngine) -> int:
    return int(await scalar(engine, "SELECT count(*) FROM polyqueue_jobs"))


async def test_rollback_leaves_no_job_and_no_notify(engine: AsyncEngine) -> None:
    async with engine.connect() as listener:
        raw = (await listener.get_raw_connection()).driver_connection
        assert raw is not None
        heard: list[str] = []
        await raw.add_listener("polyqueue_new", lambda *a: heard.append(a[-1]))
        async with AsyncSession(engine) as session:
            async with session.begin():
                job = await enqueue(session, Invoice(number=1, email="a@example.com"))
                assert job.status == "pending"
                await session.rollback()
        await heard_everything(engine, "polyqueue_new", heard)  # a (wrong) notification came before it
        assert heard == []
    assert await count(engine) == 0


async def test_commit_persists_defaults_and_notifies(engine: AsyncEngine) -> None:
    async with engine.connect() as listener:
        raw = (await listener.get_raw_connection()).driver_connection
        assert raw is not None
        heard = asyncio.Event()
        await raw.add_listener("polyqueue_new", lambda *a: heard.set())
        async with AsyncSession(engine) as session, session.begin():
            job = await enqueue(session, Invoice(number=2, email="b@example.com"), meta={"traceparent": "00-abc"})
            job_id = job.id
        await asyncio.wait_for(heard.wait(), 5)
    row = (
        await _rows(
            engine,
            "SELECT task, queue, priority, max_attempts, payload, meta FROM polyqueue_jobs WHERE id=:i",
            i=job_id,
        )
    )[0]
    assert row == ("send_invoice", "billing", 5, 7, {"number": 2, "email": "b@example.com"}, {"traceparent": "00-abc"})


async def _rows(engine: AsyncEngine, sql: str, **params: object) -> list[tuple[object, ...]]:
    async with engine.connect() as conn:
        return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]


async def test_enqueue_joins_the_callers_unit_of_work(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE orders (id int primary key)"))
    async with AsyncSession(engine) as session:
        async with session.begin():
            await session.execute(text("INSERT INTO orders VALUES (1)"))
            await enqueue(session, Invoice(number=1, email="x@example.com"))
            await session.rollback()
    assert await scalar(engine, "SELECT count(*) FROM orders") == 0
    assert await count(engine) == 0


async def test_dict_payload_is_validated_with_task_and_field_named(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(PayloadError, match=r"send_invoice.*number"):
            await enqueue(session, {"number": "not a number", "email": "e"}, task="send_invoice")
        job = await enqueue(session, {"number": "3", "email": "e"}, task="send_invoice")
        assert job.payload == {"number": 3, "email": "e"}


async def test_task_resolution_errors_are_specific(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(UnknownTaskError, match="pass task="):
            await enqueue(session, Shared(x=1))
        with pytest.raises(UnknownTaskError, match="needs task="):
            await enqueue(session, {"x": 1})
        with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
            await enqueue(session, {"x": 1}, task="nope")
        job = await enqueue(session, Shared(x=1), task="shared_b")
        assert job.task == "shared_b"


async def test_unique_key_returns_existing_live_job_without_error(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        first = await enqueue(session, Invoice(number=1, email="e"), unique_key="invoice-1")
        second = await enqueue(session, Invoice(number=1, email="e"), unique_key="invoice-1")
        assert second.id == first.id
        first_id = first.id
        # the transaction is still usable: no IntegrityError poisoned it
        await session.execute(text("SELECT 1"))
    assert await count(engine) == 1
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET status='succeeded', finished_at=now()"))
    async with AsyncSession(engine) as session, session.begin():
        third = await enqueue(session, Invoice(number=1, email="e"), unique_key="invoice-1")
        assert third.id != first_id  # the key is free once the job is no longer live
    assert await count(engine) == 2


async def test_unique_key_under_concurrent_enqueues_inserts_one_row(engine: AsyncEngine) -> None:
    barrier = asyncio.Barrier(20)

    async def one() -> object:
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("SELECT 1"))
            await barrier.wait()
            job = await enqueue(session, Invoice(number=9, email="e"), unique_key="same")
            return job.id

    ids = await asyncio.gather(*(one() for _ in range(20)))
    assert await count(engine) == 1
    assert len(set(ids)) == 1


async def test_delay_and_run_at(engine: AsyncEngine) -> None:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    async with AsyncSession(engine) as session, session.begin():
        a = await enqueue(session, Invoice(number=1, email="e"), run_at=when)
        b = await enqueue(session, Invoice(number=2, email="e"), delay=60)
        assert a.run_at == when
        assert b.run_at > dt.datetime.now(dt.UTC) + dt.timedelta(seconds=50)
        with pytest.raises(ValueError, match="timezone"):
            await enqueue(session, Invoice(number=3, email="e"), run_at=dt.datetime(2030, 1, 1))


async def test_enqueue_many_inserts_in_one_statement(engine: AsyncEngine) -> None:
    statements: list[str] = []
    from sqlalchemy import event

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        async with AsyncSession(engine) as session, session.begin():
            ids = await enqueue_many(session, [Invoice(number=i, email="e") for i in range(500)])
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", before)
    assert len(ids) == 500 and ids == sorted(ids)  # time-ordered ids
    # one round trip for 500 jobs: the INSERT and its NOTIFY are one statement
    assert len(statements) == 1 and "INSERT INTO polyqueue_jobs" in statements[0]
    assert await count(engine) == 500


async def test_oversized_payload_is_refused(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(PayloadError, match="limit"):
            await enqueue(session, Invoice(number=1, email="x" * 2_000_000))


def test_job_ids_are_time_ordered() -> None:
    ids = [new_job_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids[:10])


async def test_many_enqueues_on_one_connection_survive_generic_plans(engine: AsyncEngine) -> None:
    """Postgres switches a prepared statement to a generic plan after five runs; ON CONFLICT must still match."""
    async with AsyncSession(engine) as session, session.begin():
        for i in range(20):
            await enqueue(session, Invoice(number=i, email="e"), unique_key=f"k{i % 4}")
            await enqueue(session, Invoice(number=i, email="e"))
    assert await count(engine) == 24
