"""What-if patches for the worker subprocess: measure a proposed change before anyone writes it.

``python -m benchmarks --worker-patch NAME`` applies NAME inside the worker
subprocess only (monkeypatching, never the package on disk), and the results say
so. They are prototypes of suggestions in docs/benchmarks.md, not the fixes
themselves; delete a patch here once polyqueue ships its equivalent.

* ``pk-complete`` — the completion UPDATE compares ``j.status`` with a column of the
  unnest (all ``'running'``) instead of the literal, so the planner cannot prove the
  ``status = 'running'`` partial-index predicates and probes the primary key per
  outcome, instead of hashing every running job of the worker found through
  ``ix_polyqueue_jobs_worker`` (whose row estimate is ~1 after an ANALYZE taken
  while no job was running).
* ``bounded-backlog`` — a job's task does not end (its slot stays taken) while the
  completer holds more than ``2 * completion_batch_size`` unwritten outcomes, so
  claimed-but-unpersisted jobs cannot pile up without bound.
* ``no-pre-ping`` — the worker's engine without ``pool_pre_ping``: one round trip
  less per claim and per completion flush (the pool checks connections on checkout).
* ``claim-eq`` — with a single queue, claim with ``queue = :queue`` instead of
  ``queue = ANY(:queues)``, so ``ix_polyqueue_jobs_dispatch`` yields claim order
  without a sort even when the table has no statistics.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

__all__ = ["PATCHES", "apply"]

PATCHES = ("pk-complete", "bounded-backlog", "no-pre-ping", "claim-eq")


def _pk_complete() -> None:
    from polyqueue import queries
    from polyqueue.worker import completer, runtime

    sql = queries._COMPLETE_MANY.text
    sql = sql.replace("CAST(:workers AS uuid[])", "CAST(:workers AS uuid[]), CAST(:expected AS text[])")
    sql = sql.replace(
        "AS v(id, attempt, status, result, error, delay, worker)",
        "AS v(id, attempt, status, result, error, delay, worker, expected)",
    )
    sql = sql.replace("AND j.status = 'running'", "AND j.status = v.expected")
    if "v.expected" not in sql or "CAST(:expected" not in sql:
        raise RuntimeError("pk-complete: polyqueue's completion statement changed; update benchmarks/whatif.py")
    statement = text(sql)

    async def job_complete_many(conn: Any, outcomes: Sequence[queries.Outcome]) -> set[uuid.UUID]:
        if not outcomes:
            return set()
        params = {
            "workers": [o.worker_id for o in outcomes],
            "ids": [o.job_id for o in outcomes],
            "attempts": [o.attempt for o in outcomes],
            "statuses": [o.status for o in outcomes],
            "results": [o.result_json for o in outcomes],
            "errors": [o.error_json for o in outcomes],
            "delays": [o.delay for o in outcomes],
            "expected": ["running"] * len(outcomes),
        }
        return set((await conn.execute(statement, params)).scalar_one())

    completer.job_complete_many = job_complete_many  # type: ignore[attr-defined]
    runtime.job_complete_many = job_complete_many  # type: ignore[attr-defined]


def _bounded_backlog() -> None:
    from polyqueue.worker import runtime

    original = runtime.Worker._run_one

    async def _run_one(self: runtime.Worker, claim: Any) -> None:
        await original(self, claim)
        limit = 2 * self.settings.completion_batch_size
        while len(self.completer._buffer) > limit:
            self.completer._full.set()  # flush now rather than after the interval
            await asyncio.sleep(0.001)

    runtime.Worker._run_one = _run_one  # type: ignore[method-assign]


def _claim_eq() -> None:
    from polyqueue import queries
    from polyqueue.worker import sources

    original = queries.job_claim_pending
    single = text(queries._CLAIM_PENDING.text.replace("queue = ANY(CAST(:queues AS text[]))", "queue = :queue"))
    if "queue = :queue" not in single.text:
        raise RuntimeError("claim-eq: polyqueue's claim statement changed; update benchmarks/whatif.py")

    async def job_claim_pending(
        conn: Any, worker_id: uuid.UUID, queues: Sequence[str], limit: int
    ) -> list[queries.ClaimedJob]:
        if len(queues) != 1:
            return await original(conn, worker_id, queues, limit)
        result = await conn.execute(single, {"worker": worker_id, "queue": queues[0], "limit": limit})
        return [queries.ClaimedJob(*row) for row in result.all()]

    sources.job_claim_pending = job_claim_pending  # type: ignore[attr-defined]


def apply(names: Sequence[str]) -> None:
    """Apply the named patches in this process (``no-pre-ping`` is handled by the caller's engine)."""
    for name in names:
        if name == "pk-complete":
            _pk_complete()
        elif name == "bounded-backlog":
            _bounded_backlog()
        elif name == "claim-eq":
            _claim_eq()
        elif name != "no-pre-ping":
            raise ValueError(f"unknown worker patch {name!r}; known: {', '.join(PATCHES)}")
