"""polyqueue: an async-first job queue built into SQLAlchemy, with Postgres as the truth.

Enqueue inside your own transaction, run typed handlers, read results back::

    app = Polyqueue()

    @app.register
    async def send_email(payload: Email) -> Receipt: ...

    async with session.begin():
        session.add(order)
        await enqueue(session, Email(to=order.email))
"""

import warnings
from typing import TYPE_CHECKING, Any

from polyqueue.context import JobContext
from polyqueue.enqueue import enqueue, enqueue_many
from polyqueue.errors import (
    BrokerError,
    ConfigurationError,
    JobFailedError,
    JobNotFinishedError,
    JobNotFoundError,
    LeaseLostError,
    PayloadError,
    PolyqueueError,
    ResultError,
    ResultTimeoutError,
    Retry,
    TaskError,
    TerminalError,
    UnknownTaskError,
)
from polyqueue.models import Job, WorkerRecord
from polyqueue.models import metadata as polyqueue_metadata
from polyqueue.registry import Polyqueue, TaskSpec
from polyqueue.results import (
    get_job_result,
    get_job_result_typed,
    get_job_result_typed_via_registry,
    wait_for_result,
)
from polyqueue.retry import Backoff
from polyqueue.runner import WorkerProcess, main, run_relay, run_worker
from polyqueue.settings import Settings
from polyqueue.types import JobStatus, TimeoutStrategy

__all__ = [
    "Backoff",
    "BrokerError",
    "ConfigurationError",
    "Job",
    "JobContext",
    "JobFailedError",
    "JobNotFinishedError",
    "JobNotFoundError",
    "JobStatus",
    "LeaseLostError",
    "PayloadError",
    "Polyqueue",
    "PolyqueueError",
    "ResultError",
    "ResultTimeoutError",
    "Retry",
    "Settings",
    "TaskError",
    "TaskSpec",
    "TerminalError",
    "TimeoutStrategy",
    "UnknownTaskError",
    "WorkerProcess",
    "WorkerRecord",
    "enqueue",
    "enqueue_many",
    "get_job_result",
    "get_job_result_typed",
    "get_job_result_typed_via_registry",
    "main",
    "polyqueue_metadata",
    "run_relay",
    "run_worker",
    "wait_for_result",
]


if not TYPE_CHECKING:  # at run time only: type checkers keep flagging names that do not exist

    def __getattr__(name: str) -> Any:
        # Deprecated names, kept working with a warning: ``Worker`` was the table row, easily
        # taken for the worker process (now ``WorkerRecord`` and ``WorkerProcess``).
        if name == "Worker":
            warnings.warn(
                "polyqueue.Worker is deprecated: the polyqueue_workers row is polyqueue.WorkerRecord "
                "(the worker process is polyqueue.WorkerProcess)",
                DeprecationWarning,
                stacklevel=2,
            )
            return WorkerRecord
        raise AttributeError(f"module 'polyqueue' has no attribute {name!r}")
