"""Configuration footguns (issue #14, C): no queues, queue names no broker takes, payload and meta
limits counted in characters instead of bytes (and none at all for meta)."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import ConfigurationError, PayloadError, Settings, enqueue, enqueue_many
from polyqueue.runner import run_worker
from polyqueue.settings import QUEUE_NAME_RULE, queue_name_problem
from tests.helpers import ROOT, cli_env, make_app, run_cli, scalar

app = make_app(max_payload_bytes=200, max_meta_bytes=100)


class Text(BaseModel):
    text: str


@app.register
async def limits_text(payload: Text) -> None:
    return None


BAD_NAMES = ["x:delayed", "q" * 48, "", "with space", "ünï", "-leading", "a/b", "a.b"]
GOOD_NAMES = ["default", "emails", "q" * 47, "a-b_c", "Q1"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_queue_names_are_refused_in_one_rule(name: str) -> None:
    problem = queue_name_problem(name)
    assert problem is not None and QUEUE_NAME_RULE in problem


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_queue_names_pass(name: str) -> None:
    assert queue_name_problem(name) is None


def test_settings_refuse_no_queues_and_bad_queue_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYQUEUE_QUEUES", "")
    with pytest.raises(ValidationError, match="at least one queue"):
        Settings()
    monkeypatch.setenv("POLYQUEUE_QUEUES", " , ")
    with pytest.raises(ValidationError, match="at least one queue"):
        Settings()
    monkeypatch.setenv("POLYQUEUE_QUEUES", "default,x:delayed")
    with pytest.raises(ValidationError, match="letters, digits"):
        Settings()
    monkeypatch.delenv("POLYQUEUE_QUEUES")
    with pytest.raises(ValidationError, match="at least one queue"):
        Settings(queues=[])
    assert Settings(queues=["a", "b-c"]).queues == ["a", "b-c"]


async def test_a_worker_with_no_queues_is_refused_by_the_cli() -> None:
    ran = await run_cli(
        "worker",
        "tests.apps.effects:app",
        env=cli_env(
            PYTHONPATH=str(ROOT), POLYQUEUE_QUEUES="", POLYQUEUE_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x"
        ),
    )
    assert ran.code != 0
    assert "POLYQUEUE_QUEUES" in ran.err and "at least one queue" in ran.err
    assert "started" not in ran.err

    ran = await run_cli(
        "worker",
        "tests.apps.effects:app",
        "--queues",
        "x:delayed",
        env=cli_env(PYTHONPATH=str(ROOT), POLYQUEUE_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x"),
    )
    assert ran.code == 2 and "letters, digits" in ran.err


async def test_run_worker_refuses_no_queues_and_bad_names(engine: AsyncEngine) -> None:
    for queues in ([], ["x:delayed"]):
        with pytest.raises(ConfigurationError):
            await run_worker(app, engine=engine, queues=queues, burst=True)


def test_register_refuses_a_bad_queue_name() -> None:
    bad_app = make_app()
    for name in ("x:delayed", "q" * 48):
        with pytest.raises(ConfigurationError, match="letters, digits"):

            @bad_app.register(name=f"bad_queue_{len(name)}", queue=name)
            async def handler(payload: Text) -> None:
                return None


async def test_enqueue_refuses_a_bad_queue_name(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(PayloadError, match="letters, digits"):
            await enqueue(session, Text(text="hi"), queue="x:delayed")
        with pytest.raises(PayloadError, match="letters, digits"):
            await enqueue_many(session, [Text(text="hi")], queue="q" * 48)
        await enqueue(session, Text(text="hi"), queue="q" * 47)


async def test_payload_limit_counts_utf8_bytes(engine: AsyncEngine) -> None:
    wide = Text(text="é" * 120)  # ~135 characters of JSON, ~255 bytes: over the 200-byte limit
    async with AsyncSession(engine) as session, session.begin():
        with pytest.raises(PayloadError, match="max_payload_bytes"):
            await enqueue(session, wide)
        with pytest.raises(PayloadError, match="max_payload_bytes"):
            await enqueue_many(session, [wide])
        await enqueue_many(session, [Text(text="e" * 120)])
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs") == 1


async def test_meta_has_a_byte_limit(engine: AsyncEngine) -> None:
    assert Settings().max_meta_bytes == 64 * 1024
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        with pytest.raises(PayloadError, match="max_meta_bytes"):
            await enqueue(session, Text(text="hi"), meta={"tag": "é" * 60})  # 60 characters, 120 bytes
        with pytest.raises(PayloadError, match="max_meta_bytes"):
            await enqueue_many(session, [Text(text="hi")], meta={"tag": "x" * 200})
        job = await enqueue(session, Text(text="hi"), meta={"tag": "small"})
    assert job.meta["tag"] == "small"
