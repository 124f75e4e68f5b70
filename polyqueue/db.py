"""Database URLs and engines: the one place that turns a user's URL into an asyncpg engine."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from polyqueue.errors import ConfigurationError

__all__ = ["asyncpg_url", "database_url", "make_engine", "mask_url", "unreachable", "while_unreachable"]

log = logging.getLogger("polyqueue.db")

T = TypeVar("T")

#: SQLSTATEs of a server that cannot take a client right now (shutting down, starting up,
#: full, connection lost), as opposed to one that refuses this client (wrong password,
#: no such database), which no amount of waiting fixes.
_NOT_NOW = frozenset({"57P01", "57P02", "57P03", "53300", "08000", "08001", "08003", "08006"})


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


def make_engine(
    url: str | URL, *, pool_size: int = 10, transaction_pooling: bool = False, **kwargs: Any
) -> AsyncEngine:
    """An ``AsyncEngine`` on asyncpg for ``url``.

    Bound parameters never reach logs or error messages (``hide_parameters``): they hold
    payloads, results and error texts. With ``transaction_pooling`` (pgbouncer in transaction
    mode) no statement is prepared on a server connection: the next transaction may run on
    another one, where the name is unknown or already taken.
    """
    parsed = asyncpg_url(url)
    if transaction_pooling:
        parsed = parsed.update_query_dict({"prepared_statement_cache_size": "0"})
        connect_args = dict(kwargs.pop("connect_args", None) or {})
        connect_args.setdefault("statement_cache_size", 0)
        kwargs["connect_args"] = connect_args
    kwargs.setdefault("hide_parameters", True)
    return create_async_engine(parsed, pool_size=pool_size, pool_pre_ping=True, **kwargs)


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


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot be reached *right now*: refused or dropped
    connections, a server starting up, shutting down or full. A wrong host name, password or
    database name is not (waiting would not fix it)."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        return (
            getattr(orig, "sqlstate", None) in _NOT_NOW
            or isinstance(orig, OSError | TimeoutError)
            or _broken_mid_operation(orig)
        )
    if isinstance(exc, socket.gaierror):
        return False
    return isinstance(exc, OSError | TimeoutError) or getattr(exc, "sqlstate", None) in _NOT_NOW


def _broken_mid_operation(orig: BaseException | None) -> bool:
    """asyncpg's own connection-state errors (``not connected``, ``cannot switch to state 12;
    another operation (2) is in progress``): the connection broke under a statement. Seen in the
    chaos run when Postgres shut down during a new connection's first statements: the server's
    FATAL was consumed by one, and the next found the protocol still waiting for the end of it.
    Only the base class: its subclasses (schema cache, target attributes) are not outages."""
    cause = orig.__cause__ if orig is not None and orig.__cause__ is not None else orig
    return type(cause) is asyncpg.exceptions.InternalClientError


async def while_unreachable(op: Callable[[], Awaitable[T]], *, wait: float, what: str) -> T:
    """Run ``op``, retrying for up to ``wait`` seconds while the database is :func:`unreachable`
    (a worker started during a Postgres restart rides it out); anything else, or an outage
    longer than ``wait``, raises the last error."""
    deadline = time.monotonic() + wait
    delay = 0.2
    while True:
        try:
            return await op()
        except Exception as exc:
            remaining = deadline - time.monotonic()
            if not unreachable(exc) or remaining <= 0:
                raise
            log.warning("%s: database unreachable (%s); retrying for up to %.0f s", what, _first_line(exc), wait)
            await asyncio.sleep(min(delay, remaining))  # the last try is at the deadline, not before it
            delay = min(delay * 2, 2.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
