"""The ``polyqueue`` command line, run as users run it: real subprocesses on a real Postgres.

``--help`` and ``db upgrade --sql`` run in-process (typer's CliRunner); everything that
touches a database, signals or the embedded Postgres runs ``python -m polyqueue.cli``
with ``POLYQUEUE_*`` set (or deliberately unset) in its environment.
"""

from __future__ import annotations

import asyncio
import importlib.util
import signal
import uuid
from pathlib import Path
from types import ModuleType

import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession
from typer.testing import CliRunner

from polyqueue import enqueue, wait_for_result
from polyqueue.cli import app
from polyqueue.cli._common import head_revisions
from polyqueue.db import make_engine
from tests.helpers import CLI, cli_env, run_cli

APP_SOURCE = """
from pydantic import BaseModel
from polyqueue import Polyqueue

class Add(BaseModel):
    a: int
    b: int

app = Polyqueue()

@app.register
async def cli_test_add(payload: Add) -> int:
    return payload.a + payload.b

not_an_app = 42
"""
HEAD = ", ".join(head_revisions())


@pytest.fixture
def app_module(tmp_path: Path) -> tuple[str, Path]:
    """A tiny user app in ``tmp_path``: (module name, its directory)."""
    name = f"pq_cli_app_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(APP_SOURCE)
    return name, tmp_path


def _import(name: str, directory: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- in-process: help and offline SQL ----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ([], ["worker", "relay", "demo", "db"]),
        (
            ["worker"],
            [
                "--queues",
                "--concurrency",
                "--no-relay",
                "--no-maintenance",
                "--log-level",
                "--log-format",
                "--embedded",
            ],
        ),
        (["relay"], ["--database-url", "--embedded", "--log-level", "--log-format"]),
        (["demo"], ["--backend", "--database-url"]),
        (["db"], ["upgrade", "downgrade", "current"]),
        (["db", "upgrade"], ["--revision", "--sql", "--database-url", "--embedded"]),
        (["db", "downgrade"], ["--revision", "--yes", "--database-url", "--embedded"]),
        (["db", "current"], ["--database-url", "--embedded"]),
        (["inspect", "job"], ["--database-url", "--embedded", "--json"]),
        (["admin", "requeue"], ["--database-url", "--embedded", "--all"]),
    ],
)
def test_help(command: list[str], flags: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    for flag in flags:
        assert flag in result.output


def test_db_upgrade_sql_prints_ddl_without_a_database() -> None:
    # An unreachable URL in the environment proves no connection is attempted.
    result = CliRunner().invoke(
        app, ["db", "upgrade", "--sql"], env={"POLYQUEUE_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nothing"}
    )
    assert result.exit_code == 0, result.output
    assert "CREATE TABLE polyqueue_jobs" in result.output
    assert "CREATE TABLE polyqueue_workers" in result.output
    assert "INSERT INTO polyqueue_alembic_version" in result.output
    assert result.output.rstrip().endswith("COMMIT;")


# -- db ------------------------------------------------------------------------------------------


async def _tables(url: URL) -> set[str]:
    engine = make_engine(url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return {r[0] for r in rows}
    finally:
        await engine.dispose()


async def test_db_current_upgrade_downgrade(empty_db: URL) -> None:
    env = cli_env(empty_db)
    ran = await run_cli("db", "current", env=env)
    assert ran.code == 0, ran.err
    assert ran.out.startswith("none:") and "polyqueue db upgrade" in ran.out
    assert "database: postgresql" in ran.err

    for _ in range(2):  # idempotent
        ran = await run_cli("db", "upgrade", env=env)
        assert ran.code == 0, ran.err
        assert f"{HEAD} (head)" in ran.out
    assert {"polyqueue_jobs", "polyqueue_workers", "polyqueue_alembic_version"} <= await _tables(empty_db)

    ran = await run_cli("db", "current", env=env)
    assert ran.code == 0, ran.err
    assert ran.out == f"{HEAD} (head)\n"

    ran = await run_cli("db", "downgrade", env=env)  # no --yes, no terminal: refuses
    assert ran.code != 0
    assert "polyqueue_jobs" in await _tables(empty_db)

    ran = await run_cli("db", "downgrade", "--yes", env=env)
    assert ran.code == 0, ran.err
    assert not {t for t in await _tables(empty_db) if t.startswith("polyqueue")}
    ran = await run_cli("db", "current", env=env)
    assert ran.out.startswith("none:")


async def test_db_errors_are_one_masked_line() -> None:
    ran = await run_cli("db", "current", "--database-url", "postgresql://me:s3cret@127.0.0.1:1/nothing", env=cli_env())
    assert ran.code == 1
    assert "s3cret" not in ran.err and "***" in ran.err
    assert "Traceback" not in ran.err
    assert len(ran.err.strip().splitlines()) == 1

    ran = await run_cli("db", "upgrade", "--sql", "--revision", "nonsense", env=cli_env())
    assert ran.code == 1 and "nonsense" in ran.err and "Traceback" not in ran.err

    ran = await run_cli("db", "current", env=cli_env(POLYQUEUE_CONCURRENCY="many"))
    assert ran.code == 1 and "POLYQUEUE_CONCURRENCY" in ran.err and "Traceback" not in ran.err


# -- demo ----------------------------------------------------------------------------------------

EXPECTED_ROWS = {
    "1 commit: order + job": ("succeeded", "Shipment("),
    "2 rollback": ("absent", "never existed"),
    "3 bad payload": ("rejected", "PayloadError"),
    "3 stored payload bad": ("failed", "ValidationError"),
    "4 flaky handler": ("succeeded", "ok on attempt 3"),
    "5 time limit: fail": ("failed", "TimeLimitExceeded"),
    "5 time limit: retry": ("failed", "TimeLimitExceeded"),
    "1 handler's write": ("shipped", "shipped"),
}


def _check_demo_table(out: str) -> None:
    lines = out.splitlines()
    for step, (status, detail) in EXPECTED_ROWS.items():
        row = next((line for line in lines if f" {step} " in line), None)
        assert row is not None, f"no row {step!r} in:\n{out}"
        assert f" {status} " in row and detail in row, row
    assert "all outcomes as expected" in out


@pytest.mark.parametrize("backend", ["direct", "memory"])
async def test_demo_on_configured_database(db_url: URL, backend: str) -> None:
    ran = await run_cli("demo", "--backend", backend, env=cli_env(db_url, COLUMNS="160"))
    assert ran.code == 0, ran.out + ran.err
    _check_demo_table(ran.out)
    assert f"backend {backend}" in ran.out
    assert "embedded" not in ran.err


async def test_demo_without_a_url_uses_the_embedded_postgres(tmp_path: Path) -> None:
    ran = await run_cli("demo", env=cli_env(COLUMNS="160"), cwd=tmp_path, timeout=110)
    assert ran.code == 0, ran.out + ran.err
    notice = [line for line in ran.err.splitlines() if "embedded Postgres" in line]
    assert len(notice) == 1 and "POLYQUEUE_DATABASE_URL" in notice[0], ran.err
    assert str(tmp_path / ".polyqueue") in notice[0]
    assert (tmp_path / ".polyqueue" / "pgdata" / "PG_VERSION").exists()
    _check_demo_table(ran.out)


# -- worker and relay ----------------------------------------------------------------------------


async def test_worker_runs_jobs_and_stops_on_sigterm(db_url: URL, app_module: tuple[str, Path]) -> None:
    name, directory = app_module
    env = cli_env(db_url, PYTHONPATH=str(directory))
    proc = await asyncio.create_subprocess_exec(
        *CLI, "worker", f"{name}:app", "--concurrency", "2", env=env, stderr=asyncio.subprocess.PIPE
    )
    engine = make_engine(db_url, pool_size=2)
    try:
        user_app = _import(name, directory)  # registers the task in this process too, for enqueue
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            job = await enqueue(session, user_app.Add(a=2, b=3))
        assert await wait_for_result(job.id, engine=engine, timeout=30, poll_interval=0.2) == 5

        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        async with engine.connect() as conn:
            rows = (
                await conn.execute(text("SELECT status FROM polyqueue_workers WHERE pid = :p"), {"p": proc.pid})
            ).all()
        assert [r[0] for r in rows] == ["stopped"]
        assert "stopped after 1 jobs" in err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await engine.dispose()


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("{name}", "module:attribute"),
        ("no_such_module_pq:app", "cannot import 'no_such_module_pq'"),
        ("{name}:missing", "has no attribute 'missing'"),
        ("{name}:not_an_app", "not a polyqueue.Polyqueue instance"),
    ],
)
async def test_worker_bad_app_path(app_module: tuple[str, Path], target: str, message: str) -> None:
    name, directory = app_module
    ran = await run_cli(
        "worker",
        target.format(name=name),
        env=cli_env(PYTHONPATH=str(directory), POLYQUEUE_DATABASE_URL="postgresql://nobody@127.0.0.1:1/x"),
    )
    assert ran.code == 2, ran.err
    assert message in ran.err
    assert "Traceback" not in ran.err


async def test_relay_refuses_the_postgres_backend(db_url: URL, app_module: tuple[str, Path]) -> None:
    name, directory = app_module
    ran = await run_cli("relay", f"{name}:app", env=cli_env(db_url, PYTHONPATH=str(directory)))
    assert ran.code == 1
    assert "needs no relay" in ran.err
