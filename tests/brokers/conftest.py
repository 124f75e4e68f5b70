"""The broker conformance suite's adapters, collected from the ``harness_*.py`` modules."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _pytest.fixtures import FixtureFunctionDefinition

from tests.brokers.harness import Adapter, Harness

# -- the registry --------------------------------------------------------------------------------------
# Every ``harness_<name>.py`` beside this file defines NAME and ADAPTER (and any session
# fixtures its service needs, which are re-exported here so pytest finds them). Adding a
# broker to the suite is adding one such module.
ADAPTERS: dict[str, Adapter] = {}
for _info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
    if _info.name.startswith("harness_"):
        _module = importlib.import_module(f"tests.brokers.{_info.name}")
        ADAPTERS[_module.NAME] = _module.ADAPTER
        for _name, _value in vars(_module).items():
            if isinstance(_value, FixtureFunctionDefinition):
                globals()[_name] = _value


@pytest.fixture(params=list(ADAPTERS))
def adapter(request: pytest.FixtureRequest) -> tuple[Adapter, object]:
    """The adapter under test and its service handle (resolved here, outside the event loop)."""
    spec = ADAPTERS[request.param]
    return spec, request.getfixturevalue(spec.service) if spec.service else None


@pytest.fixture
async def harness(adapter: tuple[Adapter, object]) -> AsyncIterator[Harness]:
    spec, service = adapter
    async with spec.open(service) as h:
        yield h


@pytest.fixture(params=list(ADAPTERS))
async def private_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """The adapter on a service of this test's own, which it may stop and start."""
    spec = ADAPTERS[request.param]
    if spec.open_private is None:
        pytest.skip("this adapter's harness has no service the test can restart")
    async with spec.open_private(tmp_path) as h:
        yield h
