"""The docs stay true to the repository: every test that docs/guarantees.md names exists,
every relative link between docs pages resolves, and the pages' runnable examples run."""

from __future__ import annotations

import ast
import asyncio
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import services
from tests.docs_runner import runnable_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
#: Pages whose examples must run (each has at least one ``<!-- run -->`` block).
RUNNABLE_PAGES = ["quickstart.md", "enqueueing.md", "handlers.md", "retries.md"]


def _defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_named_in_guarantees_exists() -> None:
    refs = TEST_REF.findall((DOCS / "guarantees.md").read_text())
    assert len(refs) >= 20, "guarantees.md should name the tests behind each guarantee"
    missing = [
        f"{file}::{name}"
        for file, name in refs
        if not (ROOT / file).exists() or name not in _defined_tests(ROOT / file)
    ]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


def test_relative_links_between_pages_resolve() -> None:
    broken = []
    for page in DOCS.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).resolve().exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


@pytest.fixture
async def fresh_db_url() -> AsyncIterator[str]:
    url = await services.create_database(prefix="pqtest")
    yield services.url_str(url.set(drivername="postgresql+asyncpg"))
    await services.drop_database(url)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
async def test_page_examples_run(page: str, fresh_db_url: str) -> None:
    assert runnable_blocks(DOCS / page), f"{page} has no <!-- run --> blocks"
    env = {**os.environ, "POLYQUEUE_DATABASE_URL": fresh_db_url, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.docs_runner", str(DOCS / page)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, f"{page} examples failed:\n{proc.stdout}\n{proc.stderr}"
    if page == "quickstart.md":
        assert "rolled-back job exists: False" in proc.stdout
        assert "result: email='ada@example.com' attempt=1" in proc.stdout
        assert "welcomed: True" in proc.stdout
