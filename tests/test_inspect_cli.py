"""``polyqueue inspect`` and ``polyqueue admin``: in-process (CliRunner) and as subprocesses, ``--json`` parsed back."""

from __future__ import annotations

import asyncio
import json
import uuid

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from typer.testing import CliRunner

from polyqueue import enqueue, enqueue_many, views
from polyqueue.cli import app as cli
from tests import services
from tests.helpers import cli_env, make_app, run_cli, running_worker, wait_all_terminal

app = make_app()


class Job(BaseModel):
    fail: bool = False


@app.register(name="insp_task", max_attempts=1)
async def insp_task(payload: Job) -> int:
    if payload.fail:
        raise RuntimeError("boom")
    return 42


async def _seed(engine: AsyncEngine) -> tuple[uuid.UUID, uuid.UUID]:
    async with AsyncSession(engine) as s, s.begin():
        ok = (await enqueue(s, Job(), task="insp_task")).id
        bad = (await enqueue(s, Job(fail=True), task="insp_task")).id
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 2)
    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Job() for _ in range(12)], task="insp_task", queue="waiting")
    return ok, bad


async def _invoke(db_url: URL, *args: str, input: str | None = None) -> tuple[int, str]:
    """CliRunner in a thread: the command runs its own event loop (asyncio.run), as from a shell."""
    env = {"POLYQUEUE_DATABASE_URL": services.url_str(db_url), "COLUMNS": "200"}
    result = await asyncio.to_thread(CliRunner().invoke, cli, list(args), env=env, input=input)
    return result.exit_code, result.output


async def test_inspect_functions(engine: AsyncEngine) -> None:
    ok, bad = await _seed(engine)
    s = await views.stats(engine)
    counts = {(c.queue, c.status): c.count for c in s.counts}
    assert counts == {("default", "succeeded"): 1, ("default", "failed"): 1, ("waiting", "pending"): 12}
    assert s.finished_last_minute == 2 and s.failure_rate_last_hour == 0.5
    assert s.oldest_pending_seconds is not None and not s.finished_counts_estimated
    [w] = await views.workers(engine)
    assert w.status == "stopped" and w.running_jobs == 0
    assert len(await views.jobs(engine, queue="waiting", limit=5)) == 5
    [failed] = await views.jobs(engine, status="failed")
    assert failed.id == bad and failed.last_error == "RuntimeError: boom"
    detail = await views.job(engine, bad)
    assert detail.errors[0]["traceback"] and "RuntimeError" in detail.errors[0]["traceback"]
    assert (await views.job(engine, ok)).result == 42


async def test_cli_in_process(engine: AsyncEngine, db_url: URL) -> None:
    _, bad = await _seed(engine)
    code, out = await _invoke(db_url, "inspect", "stats")
    assert code == 0 and "waiting" in out and "failure rate (last hour): 50.0%" in out
    code, out = await _invoke(db_url, "inspect", "job", str(bad))
    assert code == 0 and "RuntimeError: boom" in out and "Traceback" in out
    code, out = await _invoke(db_url, "inspect", "job", str(uuid.uuid4()))
    assert code == 1 and "error: no job" in out
    code, out = await _invoke(db_url, "admin", "cancel")
    assert (code == 1 and "--all" in out) or "all=True" in out
    # 12 pending jobs: above the threshold, so it asks; "n" aborts and changes nothing
    code, out = await _invoke(db_url, "admin", "cancel", "--queue", "waiting", input="n\n")
    assert code == 1 and "Cancel 12 jobs?" in out
    code, out = await _invoke(db_url, "admin", "cancel", "--queue", "waiting", "--yes", "--json")
    assert code == 0 and json.loads(out)["count"] == 12
    code, out = await _invoke(db_url, "admin", "requeue", str(bad), "--reset-attempts")
    assert code == 0 and "requeue: 1 jobs changed" in out and str(bad) in out
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT status, attempt FROM polyqueue_jobs WHERE id = :i"), {"i": bad})).one()
    assert tuple(row) == ("pending", 0)
    code, out = await _invoke(db_url, "admin", "prune", "--older-than", "0", "--yes", "--json")
    assert code == 0 and json.loads(out) == {"action": "prune", "count": 13}  # 1 succeeded + 12 cancelled


async def test_cli_as_subprocesses_with_json(engine: AsyncEngine, db_url: URL) -> None:
    ok, bad = await _seed(engine)
    env = cli_env(db_url)
    ran = await run_cli("inspect", "stats", "--json", env=env)
    assert ran.code == 0, ran.err
    stats = json.loads(ran.out)
    assert {(c["queue"], c["status"], c["count"]) for c in stats["counts"]} >= {("waiting", "pending", 12)}
    ran = await run_cli("inspect", "workers", "--json", env=env)
    assert ran.code == 0 and json.loads(ran.out)[0]["status"] == "stopped"
    ran = await run_cli("inspect", "jobs", "--status", "failed", "--since", "1h", "--json", env=env)
    assert ran.code == 0 and [j["id"] for j in json.loads(ran.out)] == [str(bad)]
    ran = await run_cli("inspect", "job", str(ok), "--json", env=env)
    assert ran.code == 0 and json.loads(ran.out)["result"] == 42
    ran = await run_cli("admin", "fail", "--all", "--json", env=env)
    assert ran.code == 1 and "Cancel" not in ran.err  # 12 > 10 and no terminal to ask: aborted
    ran = await run_cli("admin", "fail", "--queue", "waiting", "--reason", "bad batch", "--yes", "--json", env=env)
    assert ran.code == 0, ran.err
    changed = json.loads(ran.out)
    assert changed["action"] == "fail" and changed["count"] == 12
    assert {j["new_status"] for j in changed["jobs"]} == {"failed"}
    ran = await run_cli("admin", "requeue", env=env)
    assert ran.code == 1 and "error:" in ran.err and "all" in ran.err
