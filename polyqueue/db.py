"""Database URLs and engines: the one place that turns a user's URL into an asyncpg engine."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from polyqueue._redact import mask_secrets
from polyqueue.errors import ConfigurationError
from polyqueue.retry import Backoff
from polyqueue.settings import EMBEDDED, secret_value

__all__ = [
    "NO_DATABASE",
    "TABLES",
    "UPGRADE_HINT",
    "asyncpg_url",
    "database_url",
    "is_embedded",
    "make_engine",
    "mask_url",
    "missing_tables",
    "not_migrated",
    "require_tables",
    "undefined_polyqueue_table",
    "unreachable",
    "while_unreachable",
]

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


def _unique_statement_name() -> str:
    return f"__polyqueue_{uuid.uuid4().hex}__"


def make_engine(
    url: str | URL,
    *,
    pool_size: int = 10,
    transaction_pooling: bool = False,
    command_timeout: float | None = None,
    **kwargs: Any,
) -> AsyncEngine:
    """An ``AsyncEngine`` on asyncpg for ``url``.

    Bound parameters never reach logs or error messages (``hide_parameters``): they hold
    payloads, results and error texts. With ``transaction_pooling`` (pgbouncer in transaction
    mode) no statement is prepared on a server connection: the next transaction may run on
    another one, where the name is unknown or already taken. ``command_timeout`` bounds how
    long any one statement (and the cancellation of one) waits for the server: past it the
    statement raises ``TimeoutError`` and a connection that cannot be cancelled is dropped,
    instead of waiting forever on a server that never answers.
    """
    parsed = asyncpg_url(url)
    if command_timeout:
        connect_args = dict(kwargs.pop("connect_args", None) or {})
        connect_args.setdefault("command_timeout", command_timeout)
        kwargs["connect_args"] = connect_args
    if transaction_pooling:
        parsed = parsed.update_query_dict({"prepared_statement_cache_size": "0"})
        connect_args = dict(kwargs.pop("connect_args", None) or {})
        connect_args.setdefault("statement_cache_size", 0)
        # asyncpg before 0.31 names the statements it prepares even with the cache off: unique
        # names keep two clients sharing one server connection from colliding.
        connect_args.setdefault("prepared_statement_name_func", _unique_statement_name)
        kwargs["connect_args"] = connect_args
    kwargs.setdefault("hide_parameters", True)
    if kwargs.get("poolclass") is not NullPool:  # a NullPool (one connection per use) takes no size
        kwargs["pool_size"] = pool_size
    return create_async_engine(parsed, pool_pre_ping=True, **kwargs)


def mask_url(url: str | URL) -> str:
    """The URL with its password replaced by ``***``, safe to print or log."""
    try:
        parsed = make_url(url) if isinstance(url, str) else url
    except Exception:
        return "<unparseable URL>"
    return mask_secrets(parsed.render_as_string(hide_password=True))  # ?password=... too


#: Why a program without a database URL refuses to start (one line, naming the setting).
NO_DATABASE = (
    "no database configured: set POLYQUEUE_DATABASE_URL (or Settings.database_url) to your Postgres URL; "
    "POLYQUEUE_DATABASE_URL=embedded asks for a private embedded Postgres under embedded_dir"
)


def is_embedded(configured: SecretStr | str | None) -> bool:
    """Whether ``configured`` asks for the embedded Postgres explicitly (``database_url="embedded"``)."""
    value = secret_value(configured)
    return value is not None and value.strip().lower() == EMBEDDED


def database_url(configured: SecretStr | str | None, embedded_dir: str, *, embedded_by_default: bool = False) -> str:
    """The URL to connect to: the configured one; the embedded Postgres's (started on demand)
    when ``configured`` is ``"embedded"``, or when it is unset and ``embedded_by_default`` (the
    demo, dev.py, the examples and the tests); else ``ConfigurationError`` naming the setting:
    a worker that silently serves a private empty database is a production trap."""
    value = secret_value(configured)
    if value and not is_embedded(value):
        return value
    if not value and not embedded_by_default:
        raise ConfigurationError(NO_DATABASE)
    from polyqueue.embedded import start_embedded

    return start_embedded(embedded_dir)


# -- is polyqueue's schema there? ------------------------------------------------------------------

# The one "are polyqueue's tables there?" check (polyqueue.queries.schema re-exports it). It lives
# here, not in polyqueue.queries, because the brokers import this module (engines, URL masking)
# and must not depend on polyqueue's SQL or models: so the table names are spelled here too.
#: polyqueue's tables, which its migrations create.
TABLES = ("polyqueue_jobs", "polyqueue_workers", "polyqueue_leader")
#: What to run when they are missing.
UPGRADE_HINT = (
    "run `polyqueue db upgrade` (or `alembic upgrade heads`, with polyqueue's revisions in your Alembic history)"
)
_UNDEFINED_TABLE = "42P01"


def not_migrated(where: str) -> ConfigurationError:
    """The error for a database without polyqueue's tables; ``where`` names it (a masked URL)."""
    return ConfigurationError(f"{where} has no polyqueue tables: {UPGRADE_HINT} first")


async def missing_tables(conn: AsyncConnection) -> list[str]:
    """Those of :data:`TABLES` that ``conn``'s database lacks (as its ``search_path`` resolves names)."""
    result = await conn.execute(
        text("SELECT t FROM unnest(CAST(:names AS text[])) AS t WHERE to_regclass(t) IS NULL ORDER BY t"),
        {"names": list(TABLES)},
    )
    return [row[0] for row in result]


async def require_tables(engine: AsyncEngine, *, wait: float = 0.0) -> None:
    """``ConfigurationError`` (saying how to migrate) unless polyqueue's tables exist; while the
    database is unreachable, retry for up to ``wait`` seconds first. Workers and relays call it
    once at start, so an unmigrated database is one clear line, not a ``ProgrammingError`` later."""

    async def look() -> list[str]:
        async with engine.connect() as conn:
            return await missing_tables(conn)

    where = mask_url(engine.url)
    if await while_unreachable(look, wait=wait, what=f"checking {where}"):
        raise not_migrated(where)


def undefined_polyqueue_table(exc: BaseException) -> bool:
    """Whether ``exc`` is Postgres's ``undefined_table`` (SQLSTATE 42P01) naming a polyqueue table:
    a statement of polyqueue's ran on a database that was never migrated."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    causes = [orig, getattr(orig, "__cause__", None)]
    if not any(getattr(c, "sqlstate", None) == _UNDEFINED_TABLE for c in causes if c is not None):
        return False
    return 'relation "polyqueue_' in str(orig)


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


#: Waits between tries while the database is unreachable at start: 0.2 s doubling to 2 s.
UNREACHABLE_BACKOFF = Backoff(base=0.2, factor=2.0, maximum=2.0, jitter=False)


async def while_unreachable(op: Callable[[], Awaitable[T]], *, wait: float, what: str) -> T:
    """Run ``op``, retrying for up to ``wait`` seconds while the database is :func:`unreachable`
    (a worker started during a Postgres restart rides it out); anything else, or an outage
    longer than ``wait``, raises the last error."""
    deadline = time.monotonic() + wait
    failures = 0
    while True:
        try:
            return await op()
        except Exception as exc:
            failures += 1
            remaining = deadline - time.monotonic()
            if not unreachable(exc) or remaining <= 0:
                raise
            log.warning(
                "%s: database unreachable (%s); retrying for up to %.0f s", what, mask_secrets(_first_line(exc)), wait
            )
            # the last try is at the deadline, not before it
            await asyncio.sleep(min(UNREACHABLE_BACKOFF.delay(failures), remaining))


def _first_line(exc: BaseException) -> str:
    text = str(exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
