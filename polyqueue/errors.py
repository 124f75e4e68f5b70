"""The exception tree. This module imports nothing of polyqueue's own.

::

    PolyqueueError
    ├── ConfigurationError          settings, URLs, unmigrated database
    ├── TaskError
    │   ├── UnknownTaskError        no handler registered under that name
    │   └── PayloadError            payload does not fit the task's model (enqueue)
    ├── ResultError
    │   ├── JobNotFoundError
    │   ├── JobNotFinishedError
    │   ├── JobFailedError          carries the last error
    │   └── ResultTimeoutError
    ├── BrokerError                 raised `from` the SDK error; is_transient()
    │   └── LeaseLostError
    └── TerminalError               raised by handlers: fail now, never retry

``Retry`` is a handler signal, not a failure: raise it to retry after a delay.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerError",
    "ConfigurationError",
    "JobFailedError",
    "JobNotFinishedError",
    "JobNotFoundError",
    "LeaseLostError",
    "PayloadError",
    "PolyqueueError",
    "ResultError",
    "ResultTimeoutError",
    "Retry",
    "TaskError",
    "TerminalError",
    "UnknownTaskError",
]


class PolyqueueError(Exception):
    """Root of every error polyqueue raises."""


class ConfigurationError(PolyqueueError):
    """Settings are invalid, a service is unreachable, or the database is not migrated."""


class TaskError(PolyqueueError):
    """A problem with a task name or its payload."""


class UnknownTaskError(TaskError):
    """No handler is registered under the given task name."""


class PayloadError(TaskError):
    """A payload does not validate against its task's Pydantic model."""


class ResultError(PolyqueueError):
    """A job's result cannot be returned."""


class JobNotFoundError(ResultError):
    """No job has that id."""


class JobNotFinishedError(ResultError):
    """The job has not reached a terminal state yet."""


class JobFailedError(ResultError):
    """The job failed or was cancelled; ``last_error`` holds its final error record."""

    def __init__(self, message: str, *, status: str, last_error: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.status = status
        self.last_error = last_error


class ResultTimeoutError(ResultError, TimeoutError):
    """``wait_for_result`` gave up before the job finished."""


class BrokerError(PolyqueueError):
    """A broker call failed. Adapters raise it ``from`` the SDK's own exception."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self._transient = transient

    def is_transient(self) -> bool:
        """True when retrying the same call later may succeed (network, throttling)."""
        return self._transient


class LeaseLostError(BrokerError):
    """The delivery's lease expired or was taken by another consumer."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class TerminalError(PolyqueueError):
    """Raise from a handler to fail the job now, without retrying."""


class Retry(Exception):
    """Raise from a handler to retry the job after ``delay`` seconds (counts as an attempt)."""

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay
