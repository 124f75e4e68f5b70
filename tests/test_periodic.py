"""Periodic jobs: each cron slot enqueued once, by competing leaders too; downtime → only the latest slot."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue import ConfigurationError
from polyqueue.maintenance import scheduler
from polyqueue.maintenance.service import Maintenance
from tests.helpers import make_app, rows

app = make_app()


class Tick(BaseModel):
    note: str = "tick"


class Report(BaseModel):
    account: int


@app.register(name="cron_tick", cron="*/5 * * * *")
async def cron_tick(payload: Tick) -> None:
    return None


@app.register(name="cron_report")
async def cron_report(payload: Report) -> None:
    return None


app.schedule("cron_report", "0 * * * *", payload=Report(account=7))

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


async def _keys(engine: AsyncEngine) -> list[str]:
    return [r[0] for r in await rows(engine, "SELECT unique_key FROM polyqueue_jobs ORDER BY unique_key")]


def test_registration_validates_the_expression_and_the_payload() -> None:
    other = make_app()
    with pytest.raises(ConfigurationError, match="not a valid cron"):

        @other.register(name="cron_bad", cron="every five minutes")
        async def bad(payload: Tick) -> None: ...

    with pytest.raises(ConfigurationError, match=r"app\.schedule"):

        @other.register(name="cron_needs_payload", cron="* * * * *")
        async def needs(payload: Report) -> None: ...

    with pytest.raises(ConfigurationError, match="does not fit"):
        app.schedule("cron_report", "* * * * *", payload={"account": "x"}, name="other")
    with pytest.raises(ConfigurationError, match="exists already"):
        app.schedule("cron_report", "* * * * *", payload=Report(account=1))


def test_latest_slot_includes_now() -> None:
    assert scheduler.latest_slot("*/5 * * * *", T0) == T0
    assert scheduler.latest_slot("*/5 * * * *", T0 + dt.timedelta(minutes=4, seconds=59)) == T0


async def test_each_slot_once_with_competing_leaders(engine: AsyncEngine) -> None:
    for step in range(4):  # 12:00, 12:02, 12:04, 12:06: slots 12:00 and 12:05 (and 12:00 hourly)
        now = T0 + dt.timedelta(minutes=2 * step)
        await asyncio.gather(*(scheduler.Scheduler(engine, app).run_once(now) for _ in range(4)))
    assert await _keys(engine) == [
        f"cron:cron_report:{T0.isoformat()}",
        f"cron:cron_tick:{T0.isoformat()}",
        f"cron:cron_tick:{(T0 + dt.timedelta(minutes=5)).isoformat()}",
    ]
    payloads = dict(await rows(engine, "SELECT task, payload FROM polyqueue_jobs WHERE task = 'cron_report'"))
    assert payloads == {"cron_report": {"account": 7}}


async def test_a_finished_slot_is_not_enqueued_again(engine: AsyncEngine) -> None:
    await scheduler.Scheduler(engine, app).run_once(T0)
    async with engine.begin() as conn:  # the jobs ran: the partial unique index no longer covers them
        await conn.execute(text("UPDATE polyqueue_jobs SET status = 'succeeded', finished_at = now()"))
    results = await asyncio.gather(*(scheduler.Scheduler(engine, app).run_once(T0) for _ in range(3)))
    assert results == [[], [], []]
    assert len(await _keys(engine)) == 2


async def test_downtime_enqueues_only_the_latest_slot(engine: AsyncEngine) -> None:
    await scheduler.Scheduler(engine, app).run_once(T0)
    later = T0 + dt.timedelta(hours=3, minutes=7)  # down for 3 hours: 36 tick slots, 3 report slots missed
    enqueued = await scheduler.Scheduler(engine, app).run_once(later)
    assert sorted((e.schedule, e.slot) for e in enqueued) == [
        ("cron_report", T0 + dt.timedelta(hours=3)),
        ("cron_tick", T0 + dt.timedelta(hours=3, minutes=5)),
    ]
    assert len(await _keys(engine)) == 4


async def test_maintenance_runs_the_schedules_of_its_app(engine: AsyncEngine) -> None:
    m = Maintenance(engine, app.settings, app=app)
    first = await m.run_once()
    assert {name for name, _ in first.scheduled} == {"cron_tick", "cron_report"}
    assert (await m.run_once()).scheduled == []
    assert await Maintenance(engine, app.settings, app=app).run_once() is not None  # a second leader: no duplicates
    assert len(await _keys(engine)) == 2
