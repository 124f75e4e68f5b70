"""enqueue_many's options against a real Postgres: unique keys (against existing jobs and within
the batch), max_run_seconds and timeout_strategy stored, one id per payload in order."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import enqueue, enqueue_many
from tests.helpers import heard_everything, make_app, rows, scalar

app = make_app()


class Parcel(BaseModel):
    n: int


@app.register(queue="parcels", max_run_seconds=30.0, timeout_strategy="retry")
async def ship_parcel(payload: Parcel) -> None:
    return None


async def test_options_are_stored_on_every_job(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        ids = await enqueue_many(session, [Parcel(n=i) for i in range(3)], max_run_seconds=2.5, timeout_strategy="fail")
        defaults = await enqueue_many(session, [Parcel(n=9)])
    stored = await rows(
        engine, "SELECT id, max_run_seconds, timeout_strategy, unique_key FROM polyqueue_jobs ORDER BY id"
    )
    assert [tuple(r) for r in stored] == [(i, 2.5, "fail", None) for i in ids] + [(defaults[0], 30.0, "retry", None)]


async def test_unique_keys_skip_live_jobs_and_return_their_ids(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        existing = await enqueue(session, Parcel(n=0), unique_key="parcel-0")
        existing_id = existing.id
    async with AsyncSession(engine) as session, session.begin():
        ids = await enqueue_many(
            session, [Parcel(n=0), Parcel(n=1), Parcel(n=2)], unique_keys=["parcel-0", "parcel-1", None]
        )
    assert len(ids) == 3 and ids[0] == existing_id
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs") == 3
    keys = await rows(engine, "SELECT id, unique_key FROM polyqueue_jobs WHERE id = ANY(:ids)", ids=ids[1:])
    assert {tuple(r) for r in keys} == {(ids[1], "parcel-1"), (ids[2], None)}


async def test_a_key_repeated_in_the_batch_inserts_one_job(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        ids = await enqueue_many(
            session,
            [Parcel(n=1), Parcel(n=2), Parcel(n=3), Parcel(n=4)],
            unique_keys=["a", "b", "a", None],
        )
    assert ids[0] == ids[2] and len(set(ids)) == 3
    stored = await rows(engine, "SELECT id, unique_key, payload FROM polyqueue_jobs ORDER BY id")
    # The first payload with a key is the one stored.
    assert [tuple(r) for r in stored] == [(ids[0], "a", {"n": 1}), (ids[1], "b", {"n": 2}), (ids[3], None, {"n": 4})]


async def test_a_finished_jobs_key_is_free_again(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        (first,) = await enqueue_many(session, [Parcel(n=1)], unique_keys=["k"])
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET status = 'succeeded', finished_at = now()"))
    async with AsyncSession(engine) as session, session.begin():
        (second,) = await enqueue_many(session, [Parcel(n=1)], unique_keys=["k"])
    assert second != first
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE unique_key = 'k'") == 2


async def test_duplicate_keys_keep_the_transaction_usable_and_notify_only_on_insert(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        await enqueue_many(session, [Parcel(n=1)], unique_keys=["only"])
    async with engine.connect() as listener:
        raw = (await listener.get_raw_connection()).driver_connection
        assert raw is not None
        heard: list[str] = []
        await raw.add_listener("polyqueue_new", lambda *a: heard.append(a[-1]))
        async with AsyncSession(engine) as session, session.begin():
            again = await enqueue_many(session, [Parcel(n=1)], unique_keys=["only"])
            assert await session.scalar(text("SELECT 1")) == 1  # no error left the transaction aborted
        await heard_everything(engine, "polyqueue_new", heard)  # a (wrong) notification came before it
        assert heard == []
    assert await scalar(engine, "SELECT id FROM polyqueue_jobs") == again[0]


async def test_concurrent_bulk_enqueues_of_one_key_insert_one_row(engine: AsyncEngine) -> None:
    barrier = asyncio.Barrier(10)

    async def one() -> list[object]:
        async with AsyncSession(engine) as session, session.begin():
            await barrier.wait()
            return list(await enqueue_many(session, [Parcel(n=1), Parcel(n=2)], unique_keys=["same", None]))

    results = await asyncio.gather(*(one() for _ in range(10)))
    assert len({r[0] for r in results}) == 1
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE unique_key = 'same'") == 1
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs") == 11


async def test_unique_keys_must_match_the_payloads(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(ValueError, match="unique_keys"):
            await enqueue_many(session, [Parcel(n=1), Parcel(n=2)], unique_keys=["x"])
