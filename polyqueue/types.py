"""Leaf types shared by every layer: job states, timeout strategies, NOTIFY channels, ids.

This module imports nothing of polyqueue's own.
"""

from __future__ import annotations

import enum
import os
import time
import uuid

__all__ = [
    "CANCEL_CHANNEL",
    "DONE_CHANNEL",
    "LIVE_STATUSES",
    "NEW_JOB_CHANNEL",
    "NOTIFY_IDS_PER_PAYLOAD",
    "TERMINAL_STATUSES",
    "JobStatus",
    "TimeoutStrategy",
    "WorkerStatus",
    "new_job_id",
]


class JobStatus(enum.StrEnum):
    """The states of a job (docs/concepts.md).

    ``pending`` → ``enqueued`` (broker modes only) → ``running`` →
    ``succeeded`` | ``failed`` | ``cancelled``. A retry sets ``pending`` again.
    """

    PENDING = "pending"
    ENQUEUED = "enqueued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: States in which a job may still run; ``unique_key`` is unique among them.
LIVE_STATUSES: tuple[JobStatus, ...] = (JobStatus.PENDING, JobStatus.ENQUEUED, JobStatus.RUNNING)
#: States a job never leaves on its own.
TERMINAL_STATUSES: tuple[JobStatus, ...] = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


# The Postgres NOTIFY channels. The statements in polyqueue.queries notify on them and the
# listeners (worker, relay, wait_for_result) subscribe to them: one spelling for both sides.
#: Payload: a queue name. Wakes workers (postgres mode) and relays: a job became due there.
NEW_JOB_CHANNEL = "polyqueue_new"
#: Payload: comma-separated ids of jobs that reached a terminal state (wait_for_result).
DONE_CHANNEL = "polyqueue_done"
#: Payload: comma-separated ids of running jobs an operator cancelled or failed (their workers stop them).
CANCEL_CHANNEL = "polyqueue_cancel"
#: Ids per NOTIFY payload: 200 x 37 characters stays below Postgres's 8,000-byte payload limit.
NOTIFY_IDS_PER_PAYLOAD = 200


class TimeoutStrategy(enum.StrEnum):
    """What happens when a job runs past ``max_run_seconds``."""

    RETRY = "retry"  # cancel the handler, count the attempt, back off and retry
    FAIL = "fail"  # cancel the handler, fail the job terminally
    IGNORE = "ignore"  # log a warning and let the handler finish


class WorkerStatus(enum.StrEnum):
    """The states of a row in ``polyqueue_workers``."""

    RUNNING = "running"
    STOPPED = "stopped"
    DEAD = "dead"


_last_ms = 0
_seq = 0


def new_job_id() -> uuid.UUID:
    """A time-ordered UUID (version 7, RFC 9562), generated without a database round trip.

    Ids made in one process are strictly increasing: within one millisecond a
    12-bit counter orders them, so ids sort by creation.
    """
    global _last_ms, _seq
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        _seq += 1
        if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
            _last_ms += 1
            _seq = 0
        ms = _last_ms
    else:
        _last_ms = ms
        _seq = 0
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | _seq << 64 | 0b10 << 62 | rand
    return uuid.UUID(int=value)
