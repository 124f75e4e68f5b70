"""A CI-sized chaos run per broker (tests/chaos/runner.py; bigger runs: nox -s chaos)."""

from __future__ import annotations

import pytest

from tests.chaos.runner import run, summary
from tests.redis_service import redis_server_exe


@pytest.mark.timeout(400)
@pytest.mark.parametrize("broker", ["postgres", "redis"])
async def test_chaos_loses_nothing_and_runs_exact_jobs_once(broker: str) -> None:
    if broker == "redis" and redis_server_exe() is None:
        pytest.skip("no redis-server on PATH for a broker the run may restart")
    books = await run(broker, jobs=2000, seed=1, workers=3, rollback=0.2, settle=3.0, duration=10.0)
    line = summary(broker, 1, 2000, books)
    print(line)
    assert books.violations == [], line
    assert books.committed > 0 and books.rolled_back, line
    assert sum(books.faults.values()) >= 5, f"too few faults to mean anything: {line}"
