"""Database URLs and engines: the one place that turns a user's URL into an asyncpg engine."""

from __future__ import annotations

from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from polyqueue.errors import ConfigurationError

__all__ = ["asyncpg_url", "database_url", "make_engine", "mask_url"]


def asyncpg_url(url: str | URL) -> URL:
    """Return ``url`` with the ``postgresql+asyncpg`` driver.

    Accepts ``postgres://``, ``postgresql://``, ``postgresql+asyncpg://`` and the
    Unix-socket form ``postgresql://user:@/db?host=/dir`` that embedded Postgres gives.
    """
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception as exc:  # sqlalchemy raises ArgumentError with the raw URL inside
        raise ConfigurationError(f"not a database URL: {mask_url(str(url))}") from exc
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(f"polyqueue needs PostgreSQL, got {parsed.get_backend_name()!r} in {mask_url(parsed)}")
    return parsed.set(drivername="postgresql+asyncpg")


def make_engine(url: str | URL, *, pool_size: int = 10, **kwargs: object) -> AsyncEngine:
    """An ``AsyncEngine`` on asyncpg for ``url``."""
    return create_async_engine(asyncpg_url(url), pool_size=pool_size, pool_pre_ping=True, **kwargs)


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe to print or log."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def database_url(configured: str | None, embedded_dir: str) -> str:
    """The configured URL, or the embedded default's (started on demand) when none is set."""
    if configured:
        return configured
    from polyqueue.embedded import start_embedded

    return start_embedded(embedded_dir)
