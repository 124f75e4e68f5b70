"""initial: polyqueue_jobs and polyqueue_workers

The base of polyqueue's own branch (label ``polyqueue``), independent of any
revision of the user's. A frozen snapshot: it spells out every name, type and
status value instead of importing ``polyqueue.models`` or ``polyqueue.types``, so
that later changes to the code never change what this revision did.
tests/test_migrations.py checks that the result equals the models' schema.

No triggers and no foreign keys (DESIGN.md §6: nothing on the enqueue and claim path).

Revision ID: ef56f936f06a
Revises:
Create Date: 2026-11-28
"""

import datetime as dt
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "ef56f936f06a"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = ("polyqueue",)
depends_on: str | Sequence[str] | None = None

_JOB_STATUSES = "'pending', 'enqueued', 'running', 'succeeded', 'failed', 'cancelled'"
_LIVE_STATUSES = "'pending', 'enqueued', 'running'"
_TIMEOUT_STRATEGIES = "'retry', 'fail', 'ignore'"
_WORKER_STATUSES = "'running', 'stopped', 'dead'"


def _ts(name: str, *, nullable: bool = True, now: bool = False) -> sa.Column[dt.datetime]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        server_default=sa.func.now() if now else None,
        nullable=nullable,
    )


def upgrade() -> None:
    # Every name goes through op.f(): it is final, whatever naming convention the
    # running environment's MetaData has.
    op.create_table(
        "polyqueue_jobs",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("task", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), server_default=sa.text("'default'"), nullable=False),
        sa.Column("payload", postgresql.JSONB(), nullable=False),
        sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        _ts("run_at", nullable=False, now=True),
        _ts("created_at", nullable=False, now=True),
        _ts("dispatched_at"),
        _ts("started_at"),
        _ts("finished_at"),
        sa.Column("attempt", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False),
        sa.Column("errors", postgresql.JSONB(), server_default=sa.text("'[]'::jsonb"), nullable=False),
        sa.Column("result", postgresql.JSONB(), nullable=True),
        sa.Column("worker_id", postgresql.UUID(as_uuid=True), nullable=True),
        _ts("progress_heartbeat_at"),
        _ts("timeout_at"),
        sa.Column("max_run_seconds", sa.Double(), nullable=True),
        sa.Column("timeout_strategy", sa.Text(), server_default=sa.text("'retry'"), nullable=False),
        sa.Column("unique_key", sa.Text(), nullable=True),
        sa.Column("meta", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.CheckConstraint(f"status IN ({_JOB_STATUSES})", name=op.f("ck_polyqueue_jobs_status")),
        sa.CheckConstraint(
            f"timeout_strategy IN ({_TIMEOUT_STRATEGIES})", name=op.f("ck_polyqueue_jobs_timeout_strategy")
        ),
        sa.CheckConstraint("attempt >= 0 AND max_attempts >= 1", name=op.f("ck_polyqueue_jobs_attempts")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_polyqueue_jobs")),
    )
    # The claim path: dispatchable rows only, in claim order.
    op.create_index(
        op.f("ix_polyqueue_jobs_dispatch"),
        "polyqueue_jobs",
        ["queue", "priority", "run_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    # The relay and multi-queue claims: all queues' dispatchable rows in claim order.
    op.create_index(
        op.f("ix_polyqueue_jobs_due"),
        "polyqueue_jobs",
        ["priority", "run_at"],
        postgresql_where=sa.text("status = 'pending'"),
    )
    # Maintenance: running jobs past their time limit, and the jobs a worker holds.
    op.create_index(
        op.f("ix_polyqueue_jobs_timeout"),
        "polyqueue_jobs",
        ["timeout_at"],
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_index(
        op.f("ix_polyqueue_jobs_worker"),
        "polyqueue_jobs",
        ["worker_id"],
        postgresql_where=sa.text("status = 'running'"),
    )
    # Re-dispatch backstop: enqueued jobs whose delivery may be lost.
    op.create_index(
        op.f("ix_polyqueue_jobs_enqueued"),
        "polyqueue_jobs",
        ["dispatched_at"],
        postgresql_where=sa.text("status = 'enqueued'"),
    )
    # Pruning finished jobs.
    op.create_index(
        op.f("ix_polyqueue_jobs_finished"),
        "polyqueue_jobs",
        ["finished_at"],
        postgresql_where=sa.text("finished_at IS NOT NULL"),
    )
    # Idempotent enqueue: one live job per key (the ON CONFLICT target).
    op.create_index(
        op.f("uq_polyqueue_jobs_unique_key"),
        "polyqueue_jobs",
        ["unique_key"],
        unique=True,
        postgresql_where=sa.text(f"unique_key IS NOT NULL AND status IN ({_LIVE_STATUSES})"),
    )
    # A high-churn table (DESIGN.md §6 "Table hygiene"): leave room on each page for
    # HOT updates of a job's state, and vacuum/analyse after 2% of rows change rather
    # than the default 20%, so the planner never keeps an empty-table plan for long.
    op.execute(
        "ALTER TABLE polyqueue_jobs SET (fillfactor = 80, "
        "autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02)"
    )

    op.create_table(
        "polyqueue_workers",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("queues", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("broker", sa.Text(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        _ts("started_at", nullable=False, now=True),
        _ts("heartbeat_at", nullable=False, now=True),
        _ts("stopped_at"),
        sa.Column("status", sa.Text(), server_default=sa.text("'running'"), nullable=False),
        sa.CheckConstraint(f"status IN ({_WORKER_STATUSES})", name=op.f("ck_polyqueue_workers_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_polyqueue_workers")),
    )
    op.create_index(
        op.f("ix_polyqueue_workers_heartbeat"),
        "polyqueue_workers",
        ["heartbeat_at"],
        postgresql_where=sa.text("status = 'running'"),
    )


def downgrade() -> None:
    # Dropping a table drops its indexes and constraints; nothing else is touched.
    op.drop_table("polyqueue_workers")
    op.drop_table("polyqueue_jobs")
