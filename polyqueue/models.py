"""Declarative SQLAlchemy models of polyqueue's tables. No logic lives here.

They use their own ``MetaData`` (``polyqueue.models.metadata``) so that a user's
project can pass it to Alembic beside its own (``target_metadata=[mine,
polyqueue_metadata]``) and autogenerate then proposes nothing for polyqueue's tables.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Double,
    Index,
    Integer,
    MetaData,
    Text,
    TypeDecorator,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polyqueue.types import LIVE_STATUSES, JobStatus, TimeoutStrategy, WorkerStatus, new_job_id

__all__ = ["Base", "Job", "Leader", "WorkerRecord", "metadata"]

#: The ``MetaData`` of polyqueue's tables (exported as ``polyqueue.polyqueue_metadata``):
#: add it to your Alembic ``target_metadata`` list beside your own.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


_LIVE = _in(tuple(s.value for s in LIVE_STATUSES))


class _JobStatusText(TypeDecorator[JobStatus]):
    """A ``text`` column whose values read back as :class:`JobStatus` (a ``str``, so comparisons
    with plain strings and the stored values are unchanged). No check on write: the table's CHECK
    constraint is the one judge of what a status may be."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        return None if value is None else str(value)

    def process_result_value(self, value: Any, dialect: Any) -> JobStatus | None:
        return None if value is None else JobStatus(value)


class Base(DeclarativeBase):
    """Declarative base of polyqueue's models (separate from the user's own)."""

    metadata = metadata


class Job(Base):
    """One row per job: its payload, state, attempts, errors and result."""

    __tablename__ = "polyqueue_jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=new_job_id)
    task: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text, server_default=text("'default'"))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONB)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    status: Mapped[JobStatus] = mapped_column(_JobStatusText, server_default=text("'pending'"))

    run_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    dispatched_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    attempt: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, server_default=text("3"))
    errors: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    result: Mapped[Any | None] = mapped_column(JSONB(none_as_null=True))

    # Deliberately no foreign key to polyqueue_workers: no foreign-key checks on the claim path.
    worker_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    progress_heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    timeout_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    max_run_seconds: Mapped[float | None] = mapped_column(
        # double precision: sub-second limits are legitimate (tests, latency-bound jobs)
        Double()
    )
    timeout_strategy: Mapped[str] = mapped_column(Text, server_default=text("'retry'"))

    unique_key: Mapped[str | None] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))

    __table_args__ = (
        CheckConstraint(f"status IN ({_in(tuple(s.value for s in JobStatus))})", name="status"),
        CheckConstraint(
            f"timeout_strategy IN ({_in(tuple(s.value for s in TimeoutStrategy))})", name="timeout_strategy"
        ),
        CheckConstraint("attempt >= 0 AND max_attempts >= 1", name="attempts"),
        # The claim path: dispatchable rows only, in claim order.
        Index(
            "ix_polyqueue_jobs_dispatch",
            "queue",
            "priority",
            "run_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # The relay and multi-queue claims: all queues' dispatchable rows in claim order.
        Index("ix_polyqueue_jobs_due", "priority", "run_at", postgresql_where=text("status = 'pending'")),
        # Maintenance: running jobs past their time limit, and the jobs a worker holds.
        Index("ix_polyqueue_jobs_timeout", "timeout_at", postgresql_where=text("status = 'running'")),
        Index("ix_polyqueue_jobs_worker", "worker_id", postgresql_where=text("status = 'running'")),
        # Re-dispatch backstop: enqueued jobs whose delivery may be lost.
        Index("ix_polyqueue_jobs_enqueued", "dispatched_at", postgresql_where=text("status = 'enqueued'")),
        # Pruning finished jobs.
        Index(
            "ix_polyqueue_jobs_finished",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # Idempotent enqueue: one live job per key (ON CONFLICT target).
        Index(
            "uq_polyqueue_jobs_unique_key",
            "unique_key",
            unique=True,
            postgresql_where=text(f"unique_key IS NOT NULL AND status IN ({_LIVE})"),
        ),
    )

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.task} {self.status} attempt={self.attempt}>"


class WorkerRecord(Base):
    """A worker process's row in ``polyqueue_workers``: its identity, liveness and state (the
    process itself is :class:`polyqueue.WorkerProcess`)."""

    __tablename__ = "polyqueue_workers"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(ARRAY(Text))
    broker: Mapped[str] = mapped_column(Text)
    concurrency: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text, server_default=text("'running'"))

    __table_args__ = (
        CheckConstraint(f"status IN ({_in(tuple(s.value for s in WorkerStatus))})", name="status"),
        Index("ix_polyqueue_workers_heartbeat", "heartbeat_at", postgresql_where=text("status = 'running'")),
    )

    def __repr__(self) -> str:
        return f"<Worker {self.id} {self.hostname}:{self.pid} {self.status}>"


class Leader(Base):
    """One lease row per elected role (``maintenance``): who holds it, until when (database time).

    Taken and renewed by one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE`` the lease expired or
    is already the caller's (polyqueue/maintenance/service.py); no session state, so it works
    through pgbouncer in transaction mode, unlike a session advisory lock.
    """

    __tablename__ = "polyqueue_leader"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    holder: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    def __repr__(self) -> str:
        return f"<Leader {self.name} {self.holder} until {self.expires_at}>"
