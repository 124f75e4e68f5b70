"""Wrong or unreachable database and broker URLs, met as users meet them: the real CLI, a subprocess.

The contract (issue #7, docs/operations.md "Wrong or unreachable URLs"):

* a database URL that is wrong or unreachable stops the command with a non-zero exit and ONE
  ``error:`` line on stderr (no traceback) that names what failed, in bounded time, and never
  shows the password; a starting worker or relay first rides out an *unreachable* database for
  ``startup_wait`` seconds (logging each retry) but gives up at once on a wrong host name, user
  or database name, which waiting cannot fix;
* a database that was never migrated tells the user to run ``polyqueue db upgrade``;
* a malformed broker URL stops a worker or relay at once with one ``error:`` line naming the
  setting (``POLYQUEUE_BROKER_URL``);
* a well-formed broker URL nobody answers on stops neither a worker nor a relay: each warns,
  naming the broker and without the secret, keeps retrying, and still stops cleanly on SIGTERM.

Every URL carries the password ``s3cret``; no output may contain it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote, urlencode

import asyncpg
import pytest
from sqlalchemy.engine import URL

from tests import services
from tests.helpers import CLI, ROOT, Ran, cli_env, run_cli

SECRET = "s3cret"
APP = "tests.apps.effects:app"
#: A loose bound on every failing command: start-up, one connection attempt, the error.
BOUND = 20.0
CLOSED = 1  # nothing listens on 127.0.0.1:1
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR)")


def _env(database_url: str, **extra: str) -> dict[str, str]:
    """A CLI environment on ``database_url``: the test apps importable, a 1 s startup_wait."""
    env = cli_env(POLYQUEUE_DATABASE_URL=database_url, POLYQUEUE_STARTUP_WAIT="1", PYTHONPATH=str(ROOT))
    return {**env, **extra}


def _fill(template: str, empty: str = "") -> str:
    """``template`` with ``{user}`` and ``{server}`` (host:port) of the test Postgres, ``{empty}`` a database name."""
    server = services.admin_url()  # looked up when a test runs, not when the module is collected
    return (
        template.replace("{user}", str(server.username))
        .replace("{server}", f"{server.host}:{server.port}")
        .replace("{empty}", empty)
    )


async def _timed(*args: str, env: dict[str, str]) -> tuple[Ran, float]:
    started = time.monotonic()
    ran = await run_cli(*args, env=env, cwd=ROOT, timeout=60)
    return ran, time.monotonic() - started


def _assert_one_error_line(ran: Ran, seconds: float, *, names: str, allow: str | None = None) -> str:
    """Exit code 1, within BOUND, stderr ending in ONE ``error:`` line that contains ``names``;
    any other stderr line is a log record (matching ``allow`` when given). No secret anywhere."""
    assert ran.code == 1, ran
    assert seconds < BOUND, f"took {seconds:.1f} s: {ran.err}"
    assert "Traceback" not in ran.err, ran.err
    assert SECRET not in ran.out + ran.err, ran.err
    lines = ran.err.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], ran.err
    for line in lines[:-1]:
        assert LOG_LINE.match(line) and (allow is None or re.search(allow, line)), f"unexpected: {line!r}"
    assert names in lines[-1], ran.err
    return lines[-1]


# -- database URLs -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DbCase:
    url: str  # a template for _fill: {empty} is a fresh, never-migrated database
    names: str  # what the error line must say
    retried: bool = False  # worker/relay log "database unreachable ... retrying" first (startup_wait)


DB_CASES = {
    "not-a-url": DbCase("not a url", "not a database URL"),
    "mysql-scheme": DbCase(f"mysql://me:{SECRET}@127.0.0.1/app", "needs PostgreSQL, got 'mysql'"),
    "unknown-host": DbCase(f"postgresql://me:{SECRET}@no-such-host.invalid/app", "no-such-host.invalid"),
    "refused-port": DbCase(f"postgresql://me:{SECRET}@127.0.0.1:{CLOSED}/app", "127.0.0.1:1", retried=True),
    "unknown-database": DbCase(
        f"postgresql://{{user}}:{SECRET}@{{server}}/pq_no_such_database",
        'database "pq_no_such_database" does not exist',
    ),
    "unknown-user": DbCase(
        f"postgresql://pq_no_such_role:{SECRET}@{{server}}/postgres", 'role "pq_no_such_role" does not exist'
    ),
    "never-migrated": DbCase(
        f"postgresql://{{user}}:{SECRET}@{{server}}/{{empty}}", "has no polyqueue tables: run `polyqueue db upgrade`"
    ),
}

#: The commands that need a database, with what each needs besides.
DB_COMMANDS: dict[str, tuple[list[str], dict[str, str]]] = {
    "worker": (["worker", APP], {}),
    # A broker backend (relay refuses postgres); the database fails before the broker is built.
    "relay": (["relay", APP], {"POLYQUEUE_QUEUE_BACKEND": "redis", "POLYQUEUE_BROKER_URL": "redis://127.0.0.1:1/0"}),
    "inspect stats": (["inspect", "stats"], {}),
    "db current": (["db", "current"], {}),
}


@pytest.mark.parametrize("case", DB_CASES.values(), ids=DB_CASES.keys())
async def test_bad_database_url(case: DbCase, empty_db: URL) -> None:
    url = _fill(case.url, str(empty_db.database))
    runs = [_timed(*args, env=_env(url, **extra)) for args, extra in DB_COMMANDS.values()]
    results = dict(zip(DB_COMMANDS, await asyncio.gather(*runs), strict=True))
    for command, (ran, seconds) in results.items():
        if command == "db current" and case is DB_CASES["never-migrated"]:
            # Not an error: `db current` reports the state, and the state says what to do.
            assert ran.code == 0 and "polyqueue db upgrade" in ran.out and SECRET not in ran.out + ran.err, ran
            continue
        retries = case.retried and command in ("worker", "relay")
        allow = r"WARNING +polyqueue\.db: .*database unreachable.*retrying" if retries else "^$"
        _assert_one_error_line(ran, seconds, names=case.names, allow=allow)


async def test_wrong_password_is_one_line_when_the_server_checks_passwords() -> None:
    server = services.admin_url()
    try:
        conn = await asyncpg.connect(
            host=server.host, port=server.port, user=server.username, password=SECRET, database="postgres"
        )
    except asyncpg.InvalidPasswordError:
        pass
    else:
        await conn.close()
        pytest.skip("the test server accepts any password (trust authentication)")
    url = _fill(f"postgresql://{{user}}:{SECRET}@{{server}}/postgres")
    runs = [_timed(*args, env=_env(url, **extra)) for args, extra in DB_COMMANDS.values()]
    for ran, seconds in await asyncio.gather(*runs):
        _assert_one_error_line(ran, seconds, names="password authentication failed", allow="^$")


def _log_time(line: str) -> float:
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


async def test_a_refused_database_is_retried_for_startup_wait_then_one_line() -> None:
    ran, seconds = await _timed("worker", APP, env=_env(_fill(DB_CASES["refused-port"].url)))
    _assert_one_error_line(ran, seconds, names="127.0.0.1:1", allow="database unreachable.*retrying")
    ended = time.time()
    retries = ran.err.splitlines()[:-1]
    assert retries, f"no retry was logged: {ran.err}"
    # startup_wait=1: retried from the first failure up to the deadline, with a last try there,
    # so the whole second passes between the first warning and the exit (less a little clock slack).
    assert ended - _log_time(retries[0]) >= 0.9, ran.err


async def test_a_wrong_database_name_fails_at_once_despite_a_long_startup_wait() -> None:
    env = {**_env(_fill(DB_CASES["unknown-database"].url)), "POLYQUEUE_STARTUP_WAIT": "30"}
    ran, seconds = await _timed("worker", APP, env=env)
    _assert_one_error_line(ran, seconds, names="does not exist", allow="^$")  # no retry logged
    assert seconds < 20, "waited for a database that does not exist"


def _as_sqlalchemy_error(error: Exception) -> Exception:
    """``error`` as SQLAlchemy's asyncpg dialect raises it: adapted, chained, wrapped in a DBAPIError."""
    from sqlalchemy.dialects.postgresql.asyncpg import AsyncAdapt_asyncpg_dbapi
    from sqlalchemy.exc import DBAPIError

    adapted: Exception = AsyncAdapt_asyncpg_dbapi.InternalClientError(str(error))  # type: ignore[no-untyped-call]
    adapted.__cause__ = error
    return DBAPIError.instance("show transaction isolation level", None, adapted, AsyncAdapt_asyncpg_dbapi.Error)


def test_a_connection_broken_mid_statement_counts_as_unreachable_other_client_errors_do_not() -> None:
    """Seen in the SQS chaos run: a relay connecting while Postgres shut down got asyncpg's
    "cannot switch to state 12; another operation (2) is in progress" (the server's FATAL had
    been consumed by an earlier statement of SQLAlchemy's first connect) and exited instead of
    riding the restart out for startup_wait."""
    from polyqueue.db import unreachable

    broken = asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    assert unreachable(_as_sqlalchemy_error(broken))
    assert unreachable(_as_sqlalchemy_error(asyncpg.exceptions.InternalClientError("not connected")))
    schema = asyncpg.exceptions.OutdatedSchemaCacheError("cache lookup failed for type 1")
    assert not unreachable(_as_sqlalchemy_error(schema))
    password = asyncpg.exceptions.InvalidPasswordError("password authentication failed")
    assert not unreachable(password)


# -- broker URLs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BrokerCase:
    backend: str
    url: str | None
    names: str  # besides POLYQUEUE_BROKER_URL, what the error line must say


#: AWS settings that would supply a region to an ``sqs://`` URL without one.
NO_AWS_REGION = {"AWS_DEFAULT_REGION": "", "AWS_CONFIG_FILE": "/nonexistent", "AWS_PROFILE": ""}

MALFORMED = {
    "redis-missing": BrokerCase("redis", None, "needs broker_url"),
    "redis-scheme": BrokerCase("redis", "http://127.0.0.1:6379/0", "redis://"),
    "redis-port": BrokerCase("redis", f"redis://:{SECRET}@127.0.0.1:99999/0", "Port out of range"),
    "redis-option": BrokerCase("redis", "redis://127.0.0.1:6379/0?maxlen=lots", "maxlen"),
    "sqs-host": BrokerCase("sqs", "sqs://eu-west-1", "query string"),
    "sqs-no-region": BrokerCase("sqs", f"sqs://AKIDEXAMPLE:{SECRET}@", "AWS region"),
    "pgmq-scheme": BrokerCase("pgmq", f"mysql://me:{SECRET}@127.0.0.1/app", "needs PostgreSQL"),
    "pgmq-option": BrokerCase(
        "pgmq", f"postgresql://{{user}}:{SECRET}@{{server}}/app?poll_interval=soon", "poll_interval"
    ),
    "azure-no-endpoint": BrokerCase(
        "azure_service_bus", f"SharedAccessKeyName=root;SharedAccessKey={SECRET}", "Endpoint=sb://"
    ),
}


def _broker_env(db_url: URL, case: BrokerCase) -> dict[str, str]:
    env = _env(services.url_str(db_url), POLYQUEUE_QUEUE_BACKEND=case.backend, **NO_AWS_REGION)
    if case.url is not None:
        env["POLYQUEUE_BROKER_URL"] = _fill(case.url)
    return {k: v for k, v in env.items() if v or not k.startswith("AWS_")}  # empty: unset


@pytest.mark.parametrize("case", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_broker_url_stops_worker_and_relay_at_once(case: BrokerCase, db_url: URL) -> None:
    env = _broker_env(db_url, case)
    runs = await asyncio.gather(_timed("worker", APP, env=env), _timed("relay", APP, env=env))
    for ran, seconds in runs:
        line = _assert_one_error_line(ran, seconds, names="POLYQUEUE_BROKER_URL", allow=r"INFO +polyqueue\.cli: ")
        assert case.names in line, line


def _query(**options: str) -> str:
    return urlencode(options, quote_via=quote, safe="")


UNREACHABLE = {
    "redis": BrokerCase("redis", f"redis://:{SECRET}@127.0.0.1:{CLOSED}/0", "127.0.0.1:1"),
    "sqs": BrokerCase(
        "sqs",
        f"sqs://AKIDEXAMPLE:{SECRET}@?"
        + _query(region="us-east-1", endpoint_url=f"http://127.0.0.1:{CLOSED}", max_attempts="1"),
        "127.0.0.1:1",
    ),
    "pgmq": BrokerCase("pgmq", f"postgresql://me:{SECRET}@127.0.0.1:{CLOSED}/app", "127.0.0.1:1"),
    "azure_service_bus": BrokerCase(
        "azure_service_bus",
        f"Endpoint=sb://127.0.0.1:{CLOSED};SharedAccessKeyName=root;SharedAccessKey={SECRET};"
        "UseDevelopmentEmulator=true",
        "127.0.0.1:1",
    ),
}


@contextlib.asynccontextmanager
async def _running(*args: str, env: dict[str, str]) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """``polyqueue ARGS`` running, with its stderr lines collected as they come; killed on exit."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, env=env, cwd=ROOT, stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []

    async def collect() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            lines.append(raw.decode().rstrip("\n"))

    reader = asyncio.create_task(collect(), name="stderr-reader")
    try:
        yield proc, lines
        await asyncio.wait_for(reader, 10)  # the process ended: its stderr is closed
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


async def _first(lines: list[str], pattern: str, proc: asyncio.subprocess.Process, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = next((line for line in lines if re.search(pattern, line)), None)
        if found is not None:
            return found
        assert proc.returncode is None, "exited:\n" + "\n".join(lines)
        await asyncio.sleep(0.1)
    raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(lines))


@pytest.mark.parametrize("command", ["worker", "relay"])
@pytest.mark.parametrize("case", UNREACHABLE.values(), ids=UNREACHABLE.keys())
async def test_unreachable_broker_keeps_worker_and_relay_retrying_until_sigterm(
    case: BrokerCase, command: str, db_url: URL
) -> None:
    async with _running(command, APP, env=_broker_env(db_url, case)) as (proc, lines):
        pattern = rf"(WARNING|ERROR) +polyqueue\.(worker|relay): broker {case.backend} unreachable"
        warning = await _first(lines, pattern, proc, 20)
        assert case.names in warning, warning
        await asyncio.sleep(1)  # still retrying, not exited
        assert proc.returncode is None, "\n".join(lines)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.wait_for(proc.wait(), 20)
        stopping = time.monotonic() - started
    err = "\n".join(lines)
    assert code == 0, err
    assert stopping < 15, f"took {stopping:.1f} s to stop"
    assert SECRET not in err, err
    assert "Traceback" not in err, err
    assert not [line for line in lines if line and not LOG_LINE.match(line)], err  # no stray multi-line output


def test_every_backend_has_a_malformed_and_an_unreachable_case() -> None:
    from polyqueue.brokers import ADAPTERS

    assert {c.backend for c in MALFORMED.values()} == set(ADAPTERS) == set(UNREACHABLE)
    assert len({c.url for c in MALFORMED.values()}) == len(MALFORMED)
