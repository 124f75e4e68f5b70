"""Every example in examples/ runs with one command and prints what it promises.

Each runs as a subprocess with POLYQUEUE_DATABASE_URL pointing at a fresh database.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import services
from tests.redis_service import configured_url

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
async def fresh_db() -> AsyncIterator[str]:
    url = await services.create_database(prefix="pqtest")
    yield services.url_str(url)
    await services.drop_database(url)


def run_example(path: Path, db: str, **env: str) -> str:
    full_env = {**os.environ, "POLYQUEUE_DATABASE_URL": db, **env}
    proc = subprocess.run(
        [sys.executable, str(path)], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, f"{path.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.timeout(120)
async def test_fastapi_app_enqueues_with_the_order_and_serves_the_typed_result(fresh_db: str) -> None:
    out = run_example(EXAMPLES / "fastapi_app" / "run.py", fresh_db)
    assert "POST /orders -> 201 {'id': 1, 'confirmation_job_id':" in out
    assert "GET /orders/1/confirmation -> 200 {'order_id': 1, 'sent_to': 'ada@example.com'" in out
    assert "order confirmed in the job's transaction: True" in out


@pytest.mark.timeout(120)
async def test_retries_and_limits_shows_each_outcome(fresh_db: str) -> None:
    out = run_example(EXAMPLES / "retries_and_limits.py", fresh_db)
    assert "flaky: succeeded: flaky succeeded on attempt 3" in out
    assert "rate_limited: succeeded: rate_limited succeeded after Retry, on attempt 2" in out
    assert "declined: failed at attempt 1: TerminalError" in out
    assert "slow_retry: failed at attempt 2: TimeLimitExceeded" in out
    assert "slow_fail: failed at attempt 1: TimeLimitExceeded" in out


@pytest.mark.timeout(120)
async def test_redis_deployment_runs_jobs_through_separate_relay_and_worker(fresh_db: str) -> None:
    redis_url, why = configured_url()
    if redis_url is None:
        pytest.skip(f"no Redis reachable: {why}")
    prefix = f"pqexample_{uuid.uuid4().hex[:10]}"
    separator = "&" if "?" in redis_url else "?"
    try:
        out = run_example(
            EXAMPLES / "redis_deployment" / "run.py",
            fresh_db,
            POLYQUEUE_BROKER_URL=f"{redis_url}{separator}key_prefix={prefix}",
        )
    finally:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(redis_url)
        keys = [key async for key in client.scan_iter(f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    assert "20 jobs ran through Redis" in out
    assert "worker process ran them all: True" in out
    assert "relay and worker stopped on SIGTERM, exit codes: [0, 0]" in out
