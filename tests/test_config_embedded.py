"""No database configured (issue #14, D): only the demo, dev.py and the tests fall back to the
embedded Postgres; every other command, and run_worker/run_relay, refuse with one line naming
the setting, unless the embedded one is asked for (``--embedded``, ``POLYQUEUE_DATABASE_URL=embedded``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from polyqueue import ConfigurationError
from polyqueue.runner import run_relay, run_worker
from tests.helpers import ROOT, cli_env, make_app, run_cli

APP = "tests.apps.effects:app"

COMMANDS = [
    ("worker", APP),
    ("relay", APP),
    ("inspect", "stats"),
    ("inspect", "jobs"),
    ("admin", "requeue", "--all", "--yes"),
    ("admin", "prune", "--older-than", "0", "--yes"),
    ("db", "current"),
    ("db", "upgrade"),
    ("db", "downgrade", "--yes"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
async def test_commands_without_a_url_refuse_in_one_line(command: tuple[str, ...], tmp_path: Path) -> None:
    env = cli_env(PYTHONPATH=str(ROOT), POLYQUEUE_QUEUE_BACKEND="redis" if command[0] == "relay" else "direct")
    ran = await run_cli(*command, env=env, cwd=tmp_path)
    assert ran.code == 1, ran.out + ran.err
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no database configured"), ran.err
    assert "POLYQUEUE_DATABASE_URL" in lines[0] and "--embedded" in lines[0]
    assert not (tmp_path / ".polyqueue").exists()  # no private database was started


async def test_run_worker_and_run_relay_without_a_url_refuse() -> None:
    no_url = make_app()
    assert no_url.settings.database_url is None
    with pytest.raises(ConfigurationError, match="POLYQUEUE_DATABASE_URL"):
        await run_worker(no_url, burst=True)
    with pytest.raises(ConfigurationError, match="POLYQUEUE_DATABASE_URL"):
        await run_relay(make_app(queue_backend="memory"))


@pytest.mark.timeout(180)
async def test_the_embedded_postgres_when_asked_for(tmp_path: Path) -> None:
    """``--embedded`` and ``POLYQUEUE_DATABASE_URL=embedded`` both start (or reuse) the one in ./.polyqueue/."""
    ran = await run_cli("db", "upgrade", "--embedded", env=cli_env(), cwd=tmp_path, timeout=120)
    assert ran.code == 0, ran.err
    assert "(head)" in ran.out and "embedded Postgres" in ran.err
    assert (tmp_path / ".polyqueue" / "pgdata" / "PG_VERSION").exists()

    ran = await run_cli("inspect", "stats", "--json", env=cli_env(POLYQUEUE_DATABASE_URL="embedded"), cwd=tmp_path)
    assert ran.code == 0, ran.err
    assert '"counts"' in ran.out

    ran = await run_cli(
        "db", "current", "--embedded", "--database-url", "postgresql://x@127.0.0.1:1/x", env=cli_env(), cwd=tmp_path
    )
    assert ran.code == 1 and "not both" in ran.err
