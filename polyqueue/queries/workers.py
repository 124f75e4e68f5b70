"""The worker registry: a worker's own row (register, heartbeat, stop).

Liveness is judged from these rows by maintenance (``job_rescue``): a worker whose heartbeat is
older than ``worker_dead_after`` is declared dead and its running jobs are rescued.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import text

from polyqueue.queries._base import Conn

__all__ = ["worker_heartbeat", "worker_register", "worker_stop"]


async def worker_register(
    conn: Conn,
    *,
    worker_id: uuid.UUID,
    hostname: str,
    pid: int,
    queues: Sequence[str],
    broker: str,
    concurrency: int,
) -> None:
    """Insert this worker's registry row (status running). Idempotent: registering is retried
    while the database is unreachable, and a retry after an INSERT whose reply was lost (the
    connection cut as it committed) finds the row there already (the chaos run's Postgres
    restarts made such a worker exit on the duplicate key)."""
    await conn.execute(
        text(
            "INSERT INTO polyqueue_workers (id, hostname, pid, queues, broker, concurrency, status) "
            "VALUES (:id, :hostname, :pid, CAST(:queues AS text[]), :broker, :concurrency, 'running') "
            "ON CONFLICT (id) DO NOTHING"
        ),
        {
            "id": worker_id,
            "hostname": hostname,
            "pid": pid,
            "queues": list(queues),
            "broker": broker,
            "concurrency": concurrency,
        },
    )


async def worker_heartbeat(conn: Conn, worker_id: uuid.UUID) -> bool:
    """Refresh the heartbeat; False when this worker was declared dead (it must stop claiming)."""
    result = await conn.execute(
        text("UPDATE polyqueue_workers SET heartbeat_at = now() WHERE id = :id AND status = 'running'"),
        {"id": worker_id},
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def worker_stop(conn: Conn, worker_id: uuid.UUID) -> None:
    """Mark this worker stopped (clean exit)."""
    await conn.execute(
        text(
            "UPDATE polyqueue_workers SET status = 'stopped', stopped_at = now(), heartbeat_at = now() "
            "WHERE id = :id AND status = 'running'"
        ),
        {"id": worker_id},
    )
