"""Credentials never leave the process in plain text (issue #14, B): not in repr(Settings), not
in what the CLI prints of stored jobs, not in logs of a failing connection. Stored text printed
by the CLI is also stripped of terminal control sequences."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from pydantic import BaseModel, SecretStr
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import Polyqueue, Settings, enqueue
from polyqueue.db import make_engine
from polyqueue.runner import run_worker
from polyqueue.settings import secret_value
from tests import services
from tests.helpers import cli_env, make_app, run_cli

SECRET = "s3cretpw"
DSN = f"postgresql://pq_app:{SECRET}@db.internal:5432/app"
BROKER = f"redis://:{SECRET}@cache.internal:6379/0"
SAS = f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={SECRET}="
ESC = "\x1b"

app = make_app()


class Note(BaseModel):
    text: str


@app.register
async def secrets_note(payload: Note) -> None:
    return None


def test_settings_never_show_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(database_url=DSN, broker_url=SAS, listen_database_url=DSN)
    for shown in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert SECRET not in shown, shown
    assert secret_value(s.database_url) == DSN and secret_value(s.broker_url) == SAS
    assert isinstance(s.database_url, SecretStr)

    monkeypatch.setenv("POLYQUEUE_DATABASE_URL", DSN)
    monkeypatch.setenv("POLYQUEUE_BROKER_URL", BROKER)
    app_settings = Polyqueue(concurrency=3).settings  # overrides re-validate: still secrets
    assert SECRET not in repr(app_settings)
    assert secret_value(app_settings.database_url) == DSN
    assert secret_value(app_settings.broker_url) == BROKER


async def _stored_job_with_secrets(engine: AsyncEngine) -> uuid.UUID:
    """A failed job whose payload, meta, result and error (written directly, as a worker or an
    attacker's handler might) quote credentials and carry terminal escape sequences."""
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        job = await enqueue(session, Note(text=f"connect with password={SECRET} {ESC}[2J"))
    error = {
        "attempt": 1,
        "at": "2026-12-04T17:00:00+00:00",
        "type": "ConnectionError",
        "message": f"cannot reach {DSN} {ESC}[31mred{ESC}[0m {ESC}]0;pwned{ESC}\\",
        "traceback": f"Traceback (most recent call last):\n  ...\nConnectionError: {SAS}\n{ESC}[1A{ESC}[2K",
    }
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE polyqueue_jobs SET status = 'failed', attempt = 1, finished_at = now(), "
                "errors = CAST(:errors AS jsonb), meta = CAST(:meta AS jsonb), result = CAST(:result AS jsonb) "
                "WHERE id = :id"
            ),
            {
                "id": job.id,
                "errors": json.dumps([error]),
                "meta": json.dumps({"source": BROKER}),
                "result": json.dumps(f"token={SECRET} {ESC}[5m"),
            },
        )
    return job.id


def _clean(out: str) -> None:
    assert SECRET not in out, out
    assert ESC not in out and "\\u001b" not in out, repr(out)
    assert "***" in out, out


async def test_cli_prints_stored_text_masked_and_without_control_sequences(engine: AsyncEngine, db_url: URL) -> None:
    job_id = await _stored_job_with_secrets(engine)
    env = cli_env(db_url, COLUMNS="400")
    for args in (
        ("inspect", "job", str(job_id)),
        ("inspect", "job", str(job_id), "--json"),
        ("inspect", "jobs"),
        ("inspect", "jobs", "--json"),
    ):
        ran = await run_cli(*args, env=env)
        assert ran.code == 0, ran.err
        _clean(ran.out)
    ran = await run_cli("inspect", "job", str(job_id), env=env)
    assert "cannot reach postgresql://pq_app:***@db.internal" in ran.out and "red" in ran.out


async def test_a_failing_connection_logs_no_password(caplog: pytest.LogCaptureFixture) -> None:
    """A worker started on an unreachable server with a password in its URL: the retries it logs and
    the error it raises name the server, never the password."""
    server = services.admin_url()
    url = f"postgresql://pq_app:{SECRET}@{server.host}:1/app"
    worker_app = make_app(database_url=url, startup_wait=0.5)
    assert SECRET not in repr(worker_app.settings)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as raised:
        await asyncio.wait_for(run_worker(worker_app, burst=True), 30)
    assert "database unreachable" in caplog.text
    assert SECRET not in caplog.text
    assert SECRET not in str(raised.value)


async def test_a_password_role_on_a_missing_database_logs_no_password(
    db_url: URL, caplog: pytest.LogCaptureFixture
) -> None:
    """A real role with a password (trust auth admits it either way) asking for a database that does
    not exist, and a failing statement with a secret parameter: neither the URL's password nor the
    parameter reaches the logs or the error."""
    role = f"pq_secret_{uuid.uuid4().hex[:8]}"
    admin = services.admin_url()
    root = make_engine(db_url, pool_size=1)
    try:
        async with root.begin() as conn:
            await conn.execute(text(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'"))
        caplog.set_level(logging.DEBUG)
        good = db_url.set(username=role, password=SECRET, host=admin.host, port=admin.port)
        for url, statement in (
            (good.set(database="pq_no_such_database"), "SELECT 1"),
            (good, "SELECT 1/0 WHERE :p <> ''"),
        ):
            engine = make_engine(url, pool_size=1)
            try:
                with pytest.raises(Exception) as raised:
                    async with engine.connect() as conn:
                        await conn.execute(text(statement), {"p": SECRET} if ":p" in statement else {})
                assert SECRET not in str(raised.value)
            finally:
                await engine.dispose()
        assert SECRET not in caplog.text
    finally:
        async with root.begin() as conn:
            await conn.execute(text(f"DROP ROLE {role}"))
        await root.dispose()


def test_every_engine_hides_bound_parameters_pooled_or_not() -> None:
    """make_engine is the one way polyqueue builds engines; a NullPool engine (Alembic's) goes through it too."""
    from sqlalchemy.pool import NullPool

    for engine in (make_engine(DSN, pool_size=2), make_engine(DSN, poolclass=NullPool)):
        assert engine.sync_engine.hide_parameters
        assert SECRET not in repr(engine)
