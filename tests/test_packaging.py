"""The wheel is complete and works on its own: build it, check it with twine, install it into
a fresh venv (with the ``embedded`` extra, from the package index) and run ``polyqueue demo``."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import venv
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import services

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def fresh_db() -> AsyncIterator[str]:
    url = await services.create_database(prefix="pqtest")
    yield services.url_str(url)
    await services.drop_database(url)


def _run(*cmd: str | Path, timeout: float, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.mark.timeout(300)
async def test_wheel_builds_passes_twine_installs_and_runs_the_demo(tmp_path: Path, fresh_db: str) -> None:
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, ROOT, timeout=120)
    (wheel,) = dist.glob("polyqueue-*.whl")
    _run(sys.executable, "-m", "twine", "check", "--strict", wheel, timeout=60)

    names = zipfile.ZipFile(wheel).namelist()
    assert "polyqueue/py.typed" in names
    assert any(n.startswith("polyqueue/migrations/versions/") and n.endswith(".py") for n in names), names
    assert "polyqueue/migrations/env.py" in names
    assert not any(n.startswith("tests/") for n in names)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    _run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{wheel}[embedded]", timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POLYQUEUE_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env["POLYQUEUE_DATABASE_URL"] = fresh_db
    # From a directory without the source tree, so the installed wheel is what runs.
    out = await asyncio.to_thread(
        subprocess.run,
        [str(env_dir / "bin" / "polyqueue"), "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, f"polyqueue demo failed in the fresh venv:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
