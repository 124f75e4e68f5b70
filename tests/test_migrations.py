"""polyqueue's migrations on a real Postgres.

Every test makes its own empty database (prefix ``pqmig``) and drops it after.
Alembic's command line runs in a subprocess where the user's experience is the
subject (a user's project, the repository's development environment).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine

import polyqueue.migrations
from polyqueue.db import make_engine
from polyqueue.errors import ConfigurationError
from polyqueue.migrations import VERSION_LOCATION, VERSION_TABLE, current, downgrade, upgrade, upgrade_sql
from polyqueue.models import metadata
from polyqueue.types import LIVE_STATUSES, JobStatus, TimeoutStrategy, WorkerStatus
from tests import services

REPO = Path(polyqueue.migrations.__file__).resolve().parents[2]
POLYQUEUE_TABLES = {"polyqueue_jobs", "polyqueue_workers", "polyqueue_leader"}
HEADS = sorted(ScriptDirectory(str(Path(VERSION_LOCATION).parent)).get_heads())


@pytest.fixture
async def db() -> AsyncIterator[URL]:
    """An empty database of this test's own."""
    url = await services.create_database(prefix="pqmig")
    try:
        yield url
    finally:
        await services.drop_database(url)


@pytest.fixture
async def db_engine(db: URL) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(db, pool_size=2)
    try:
        yield engine
    finally:
        await engine.dispose()


async def _rows(engine: AsyncEngine, sql: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.execute(text(sql))]


async def _tables(engine: AsyncEngine) -> set[str]:
    return {r[0] for r in await _rows(engine, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}


async def _alembic(cwd: Path, ini: Path, *args: str, url: URL, check: bool = True, **env: str) -> str:
    """Run Alembic's command line as a user would; return its combined output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-W",
        "error",
        "-m",
        "alembic",
        "-c",
        str(ini),
        *args,
        cwd=cwd,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            "POLYQUEUE_DATABASE_URL": services.url_str(url),
            **env,
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    output = out.decode()
    if check:
        assert proc.returncode == 0, f"alembic {' '.join(args)} failed:\n{output}"
    else:
        assert proc.returncode != 0, f"alembic {' '.join(args)} should have failed:\n{output}"
    return output


# --------------------------------------------------------------------------- (a) a user's project

_USER_MODELS = """
import sqlalchemy as sa

user_metadata = sa.MetaData()
user_orders = sa.Table(
    "user_orders",
    user_metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("customer", sa.Text, nullable=False),
)
"""

_USER_ENV = """
import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import create_async_engine

import polyqueue.models
from myapp_models import user_metadata

# polyqueue's metadata beside ours: autogenerate then leaves its tables alone.
if os.environ.get("WITHOUT_POLYQUEUE_METADATA"):
    target_metadata = [user_metadata]
else:
    target_metadata = [user_metadata, polyqueue.models.metadata]


def do_run(connection):
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def main():
    url = os.environ["POLYQUEUE_DATABASE_URL"]
    engine = create_async_engine(url, poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(do_run)
    await engine.dispose()


asyncio.run(main())
"""

_USER_REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "a1a1a1a1a1a1"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        "user_orders",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("customer", sa.Text, nullable=False),
    )


def downgrade():
    op.drop_table("user_orders")
"""


# What `alembic init` would give the user, trimmed.
_USER_TEMPLATE = '''"""${message}"""
import sqlalchemy as sa
from alembic import op
${imports if imports else ""}
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''

USER_BASE = "a1a1a1a1a1a1"


def _user_project(root: Path, polyqueue_location: str) -> Path:
    """A user's Alembic project with its own history, plus polyqueue's versions."""
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "myapp_models.py").write_text(_USER_MODELS)
    (root / "migrations" / "env.py").write_text(_USER_ENV)
    (root / "migrations" / "script.py.mako").write_text(_USER_TEMPLATE)
    (root / "migrations" / "versions" / f"{USER_BASE}_user_orders.py").write_text(_USER_REVISION)
    ini = root / "alembic.ini"
    ini.write_text(
        "[alembic]\n"
        "script_location = %(here)s/migrations\n"
        # newline-separated: the package:resource form contains a colon
        "path_separator = newline\n"
        "version_locations =\n"
        "    %(here)s/migrations/versions\n"
        f"    {polyqueue_location.replace('%', '%%')}\n"
        "prepend_sys_path = %(here)s\n"
    )
    return ini


def _user_revision_text(root: Path, rev: str) -> str:
    """The new revision's source, after checking it was not written into polyqueue's folder."""
    assert not list(Path(VERSION_LOCATION).glob(f"{rev}*"))
    [path] = (root / "migrations" / "versions").glob(f"{rev}_*.py")
    return path.read_text()


async def test_user_project_upgrade_heads_and_autogenerate(tmp_path: Path, db: URL, db_engine: AsyncEngine) -> None:
    # polyqueue's versions named as a package resource, wherever it is installed.
    ini = _user_project(tmp_path, "polyqueue.migrations:versions")

    await _alembic(tmp_path, ini, "upgrade", "heads", url=db)
    assert await _tables(db_engine) == {"user_orders", "alembic_version"} | POLYQUEUE_TABLES
    versions = {r[0] for r in await _rows(db_engine, "SELECT version_num FROM alembic_version")}
    assert versions == {USER_BASE, *HEADS}

    # Autogenerate proposes nothing: polyqueue's tables are neither dropped nor altered.
    out = await _alembic(tmp_path, ini, "check", url=db)
    assert "No new upgrade operations detected" in out
    # ... and the check is not vacuous: without polyqueue's metadata it would drop them.
    out = await _alembic(tmp_path, ini, "check", url=db, check=False, WITHOUT_POLYQUEUE_METADATA="1")
    assert "polyqueue_jobs" in out

    # The user's next revision, as docs/migrations.md says to make it: on the user's
    # own head, written into the user's folder (never into the installed package).
    revision = ["revision", "--autogenerate", "-m", "next", "--head", USER_BASE, "--rev-id", "b2b2b2b2b2b2"]
    await _alembic(tmp_path, ini, *revision, url=db)
    script = _user_revision_text(tmp_path, "b2b2b2b2b2b2")
    assert f"down_revision = {USER_BASE!r}" in script
    assert "op." not in script and "polyqueue" not in script


async def test_user_project_downgrade_polyqueue_branch_only(tmp_path: Path, db: URL, db_engine: AsyncEngine) -> None:
    ini = _user_project(tmp_path, VERSION_LOCATION)  # the absolute path this time
    await _alembic(tmp_path, ini, "upgrade", "heads", url=db)

    await _alembic(tmp_path, ini, "downgrade", "polyqueue@base", url=db)
    assert await _tables(db_engine) == {"user_orders", "alembic_version"}
    assert await _rows(db_engine, "SELECT version_num FROM alembic_version") == [(USER_BASE,)]

    # Adding the branch back later is an ordinary upgrade.
    await _alembic(tmp_path, ini, "upgrade", "heads", url=db)
    assert POLYQUEUE_TABLES <= await _tables(db_engine)
    # The standalone path recognises tables it does not own and refuses to touch them.
    with pytest.raises(ConfigurationError, match="managed elsewhere"):
        await upgrade(db_engine)
    with pytest.raises(ConfigurationError, match="managed elsewhere"):
        await downgrade(db_engine)


# --------------------------------------------------------------------------- (b) standalone


async def test_standalone_upgrade_current_downgrade(db: URL, db_engine: AsyncEngine) -> None:
    # A user's own Alembic bookkeeping must survive untouched.
    async with db_engine.begin() as conn:
        await conn.execute(text("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO alembic_version VALUES ('usersrev0001')"))

    assert await current(db) == []
    await upgrade(db)  # by URL
    await upgrade(db_engine)  # by engine: idempotent
    assert await current(db_engine) == HEADS
    assert await _tables(db_engine) == {"alembic_version", VERSION_TABLE} | POLYQUEUE_TABLES

    await downgrade(db)
    assert await current(db) == []
    assert await _tables(db_engine) == {"alembic_version"}
    assert await _rows(db_engine, "SELECT version_num FROM alembic_version") == [("usersrev0001",)]
    await downgrade(db)  # already at base: a no-op
    assert await _tables(db_engine) == {"alembic_version"}


async def _upgrade_in_subprocess(url: URL) -> None:
    code = "import asyncio, sys; from polyqueue.migrations import upgrade; asyncio.run(upgrade(sys.argv[1]))"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, services.url_str(url),
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()


async def test_standalone_concurrent_upgrades(db: URL) -> None:
    """Several processes starting at once (workers, relays) all succeed; one migrates."""
    await asyncio.gather(*(_upgrade_in_subprocess(db) for _ in range(3)))
    assert await current(db) == HEADS


async def test_standalone_several_databases_in_one_loop(db: URL) -> None:
    """Interleaved in one event loop, each upgrade keeps to its own connection."""
    other = await services.create_database(prefix="pqmig")
    try:
        await asyncio.gather(upgrade(db), upgrade(other), upgrade(db))
        assert await current(db) == await current(other) == HEADS
        await asyncio.gather(downgrade(db), downgrade(other))
        assert await current(db) == await current(other) == []
    finally:
        await services.drop_database(other)


async def test_standalone_on_caller_connection(db_engine: AsyncEngine) -> None:
    """With an AsyncConnection the work joins the caller's transaction."""
    async with db_engine.connect() as conn:
        await upgrade(conn)
        assert await current(conn) == HEADS
        await conn.rollback()
    assert await current(db_engine) == []
    assert await _tables(db_engine) == set()


async def test_standalone_refuses_tables_made_by_create_all(db_engine: AsyncEngine) -> None:
    async with db_engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    with pytest.raises(ConfigurationError, match="managed elsewhere"):
        await upgrade(db_engine)


# --------------------------------------------------------------------------- (c) models ⇔ migrations


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection,
        opts={"version_table": VERSION_TABLE, "compare_type": True, "compare_server_default": True},
    )
    return list(compare_metadata(context, metadata))


_CATALOGUE = {
    "columns": """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
               pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relname IN ('polyqueue_jobs', 'polyqueue_workers', 'polyqueue_leader')
          AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2""",
    "constraints": """
        SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)
        FROM pg_constraint WHERE conrelid::regclass::text IN ('polyqueue_jobs', 'polyqueue_workers', 'polyqueue_leader')
        ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE tablename IN ('polyqueue_jobs', 'polyqueue_workers', 'polyqueue_leader') ORDER BY 1, 2""",
    "triggers": """
        SELECT tgrelid::regclass::text, tgname FROM pg_trigger
        WHERE tgrelid::regclass::text LIKE 'polyqueue%' ORDER BY 1, 2""",
}


async def _catalogue(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    return {name: await _rows(engine, sql) for name, sql in _CATALOGUE.items()}


async def test_migrations_match_models(db_engine: AsyncEngine) -> None:
    await upgrade(db_engine)
    async with db_engine.connect() as conn:
        assert await conn.run_sync(_diff) == []

    # Alembic does not compare partial-index predicates, check constraints or column
    # order: compare the catalogue with a database built from the models themselves.
    migrated = await _catalogue(db_engine)
    reference = await services.create_database(prefix="pqmig")
    engine = make_engine(reference, pool_size=1)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        assert migrated == await _catalogue(engine)
    finally:
        await engine.dispose()
        await services.drop_database(reference)
    assert migrated["triggers"] == []  # DESIGN.md §6: nothing on the enqueue path
    assert not any(row[2] == "f" for row in migrated["constraints"])  # no foreign keys


def _quoted(definition: str) -> list[str]:
    return re.findall(r"'([^']*)'::text", definition)


async def test_status_checks_match_python_enums(db_engine: AsyncEngine) -> None:
    await upgrade(db_engine)
    checks = dict(
        await _rows(
            db_engine,
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contype = 'c'",
        )
    )
    assert _quoted(checks["ck_polyqueue_jobs_status"]) == [s.value for s in JobStatus]
    assert _quoted(checks["ck_polyqueue_jobs_timeout_strategy"]) == [s.value for s in TimeoutStrategy]
    assert _quoted(checks["ck_polyqueue_workers_status"]) == [s.value for s in WorkerStatus]
    [(unique,)] = await _rows(
        db_engine, "SELECT indexdef FROM pg_indexes WHERE indexname = 'uq_polyqueue_jobs_unique_key'"
    )
    assert _quoted(unique) == [s.value for s in LIVE_STATUSES]


# --------------------------------------------------------------------------- (d) offline SQL


async def test_upgrade_sql_is_a_complete_script(db: URL, db_engine: AsyncEngine) -> None:
    sql = upgrade_sql()
    assert "CREATE TABLE polyqueue_jobs" in sql
    assert "CREATE TABLE polyqueue_workers" in sql
    assert "CREATE TABLE polyqueue_leader" in sql
    assert "fillfactor = 80" in sql
    assert f"CREATE TABLE {VERSION_TABLE}" in sql
    assert "CREATE TABLE alembic_version" not in sql

    # Applied by an outside tool, it leaves the same state as upgrade().
    raw = await services._connect(db)
    try:
        await raw.execute(sql)
    finally:
        await raw.close()
    assert await current(db_engine) == HEADS
    async with db_engine.connect() as conn:
        assert await conn.run_sync(_diff) == []


# --------------------------------------------------------------------------- (e) table hygiene


async def test_jobs_table_storage_options(db_engine: AsyncEngine) -> None:
    await upgrade(db_engine)
    [(options,)] = await _rows(db_engine, "SELECT reloptions FROM pg_class WHERE relname = 'polyqueue_jobs'")
    assert set(options) == {
        "fillfactor=80",
        "autovacuum_vacuum_scale_factor=0.02",
        "autovacuum_analyze_scale_factor=0.02",
    }


# --------------------------------------------------------------------------- the development environment


async def test_dev_environment_shares_the_standalone_version_table(db: URL) -> None:
    """The repository's alembic.ini sees a database migrated by upgrade() as up to date."""
    await upgrade(db)
    ini = REPO / "alembic.ini"
    out = await _alembic(REPO, ini, "current", url=db)
    assert f"{HEADS[0]} (head)" in out
    out = await _alembic(REPO, ini, "check", url=db)
    assert "No new upgrade operations detected" in out
