"""Every SQL statement polyqueue runs against its tables, one module per noun.

* :mod:`~polyqueue.queries.jobs`: a worker's hot path (claim, complete, hand back, progress);
* :mod:`~polyqueue.queries.dispatch`: the relay's (take due jobs, mark them published);
* :mod:`~polyqueue.queries.maintenance`: rescue, re-dispatch, prune, live counts, the leader lease;
* :mod:`~polyqueue.queries.workers`: a worker's registry row (register, heartbeat, stop);
* :mod:`~polyqueue.queries.enqueue`: inserting jobs, one or many, idempotently under ``unique_key``;
* :mod:`~polyqueue.queries.operator`: the operator's views and actions (``polyqueue inspect``/``admin``);
* :mod:`~polyqueue.queries.schedule`: periodic enqueue's per-slot lock and check;
* :mod:`~polyqueue.queries.schema`: the one "are polyqueue's tables there?" check.

Each function takes an ``AsyncConnection`` (or session) and runs its statement; the caller owns
the transaction. Guards live in the WHERE clauses: a worker only finishes an attempt it still
owns (docs/guarantees.md §3), and a rescuer re-checks state in the same statement that changes it.
Values are always bound parameters; statements with optional filters are composed in SQLAlchemy
Core, never from strings. Status literals stay literal in the SQL text where a partial index's
predicate names them: Postgres matches a predicate only against literals, not parameters.
"""

from __future__ import annotations

from polyqueue.queries.dispatch import (
    Dispatchable,
    job_any_due,
    job_count_enqueued,
    job_mark_enqueued,
    job_take_for_dispatch,
)
from polyqueue.queries.jobs import (
    ClaimedJob,
    Outcome,
    job_claim_by_ids,
    job_claim_pending,
    job_complete_many,
    job_hand_back,
    job_hand_back_unknown,
    job_held,
    job_progress,
    job_stopped_by_operator,
)
from polyqueue.queries.maintenance import (
    job_count_live,
    job_prune,
    job_redispatch_stale,
    job_rescue,
    leader_resign,
    leader_take,
)
from polyqueue.queries.schema import TABLES, missing_tables
from polyqueue.queries.workers import worker_heartbeat, worker_register, worker_stop
from polyqueue.types import CANCEL_CHANNEL, DONE_CHANNEL, NEW_JOB_CHANNEL, NOTIFY_IDS_PER_PAYLOAD

__all__ = [
    "CANCEL_CHANNEL",
    "DONE_CHANNEL",
    "NEW_JOB_CHANNEL",
    "NOTIFY_IDS_PER_PAYLOAD",
    "TABLES",
    "ClaimedJob",
    "Dispatchable",
    "Outcome",
    "job_any_due",
    "job_claim_by_ids",
    "job_claim_pending",
    "job_complete_many",
    "job_count_enqueued",
    "job_count_live",
    "job_hand_back",
    "job_hand_back_unknown",
    "job_held",
    "job_mark_enqueued",
    "job_progress",
    "job_prune",
    "job_redispatch_stale",
    "job_rescue",
    "job_stopped_by_operator",
    "job_take_for_dispatch",
    "leader_resign",
    "leader_take",
    "missing_tables",
    "worker_heartbeat",
    "worker_register",
    "worker_stop",
]
