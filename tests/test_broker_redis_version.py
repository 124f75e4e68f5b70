"""The redis extra's bound (issue #14): an installed redis-py older than the adapter needs fails
with a ConfigurationError that names the installed version and the fix, not an ImportError.

The old client is simulated for real: a copy of the installed redis package without
``redis.backoff.ExponentialWithJitterBackoff`` (added in redis-py 6.0), with the metadata of a
redis 5.0.8 distribution, first on ``sys.path`` of a fresh interpreter that imports the adapter.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import redis

from polyqueue.brokers.redis import MIN_REDIS_PY

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
from polyqueue.brokers import make_broker
from polyqueue.errors import ConfigurationError
from polyqueue.settings import Settings

try:
    make_broker(Settings(queue_backend="redis", broker_url="redis://127.0.0.1:1/0"))
except ConfigurationError as exc:
    print("ConfigurationError:", exc)
else:
    print("no error")
"""


def _old_redis(site: Path) -> None:
    """``site/redis``: the installed package minus what 6.0 added; ``site/redis-5.0.8.dist-info``."""
    shutil.copytree(Path(redis.__file__).parent, site / "redis", ignore=shutil.ignore_patterns("__pycache__"))
    backoff = site / "redis" / "backoff.py"
    source = backoff.read_text()
    assert "class ExponentialWithJitterBackoff" in source
    backoff.write_text(source.replace("class ExponentialWithJitterBackoff", "class _NotInRedis5"))
    init = site / "redis" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]+"', '__version__ = "5.0.8"', init.read_text()))
    info = site / "redis-5.0.8.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: redis\nVersion: 5.0.8\n")


def _probe(site: Path | None) -> str:
    path = [str(site)] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*path, str(ROOT)])}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_an_old_redis_client_is_a_configuration_error_naming_version_and_fix(tmp_path: Path) -> None:
    _old_redis(tmp_path)
    out = _probe(tmp_path)
    assert out.startswith("ConfigurationError:"), out
    assert "redis 5.0.8 is installed" in out
    assert f"redis-py >= {MIN_REDIS_PY}" in out
    assert "pip install 'polyqueue[redis]'" in out


def test_the_installed_redis_client_is_accepted() -> None:
    assert _probe(None) == "no error"


def test_the_extra_requires_what_the_adapter_needs() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'redis = ["redis>={MIN_REDIS_PY}"]' in pyproject
