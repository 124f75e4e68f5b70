"""What a handler receives beside its payload: :class:`JobContext`."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

__all__ = ["JobContext"]


class JobContext:
    """Per-attempt context for a handler.

    Attributes:
        job_id: the job's id.
        task: the task name.
        queue: the queue the job ran from.
        attempt: this attempt's number (1 for the first run).
        max_attempts: attempts allowed in all.
        meta: the job's ``meta`` (user tags, trace context).
        logger: a logger whose records carry the job id, task and attempt.

    ``session`` opens an ``AsyncSession`` whose transaction also records this job's
    completion: the handler's writes and "job succeeded" commit together, or, when
    the handler raises or the worker lost the job, roll back together. Do not commit
    it yourself; polyqueue does.
    """

    def __init__(
        self,
        *,
        job_id: uuid.UUID,
        task: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        meta: dict[str, Any],
        engine: AsyncEngine,
        heartbeat: Callable[[], Awaitable[None]],
    ) -> None:
        self.job_id = job_id
        self.task = task
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.meta = meta
        self.logger = logging.LoggerAdapter(
            logging.getLogger(f"polyqueue.task.{task}"),
            {"job_id": str(job_id), "task": task, "queue": queue, "attempt": attempt},
        )
        self._engine = engine
        self._heartbeat = heartbeat
        self._session: AsyncSession | None = None

    @property
    def session(self) -> AsyncSession:
        """The job's transactional session (opened on first use)."""
        if self._session is None:
            self._session = AsyncSession(self._engine, expire_on_commit=False)
        return self._session

    @property
    def session_used(self) -> bool:
        """Whether the handler opened :attr:`session`."""
        return self._session is not None

    async def heartbeat(self) -> None:
        """Report progress: refreshes the job's ``progress_heartbeat_at`` and extends the broker lease."""
        await self._heartbeat()

    @property
    def is_last_attempt(self) -> bool:
        """True when a failure of this attempt fails the job for good."""
        return self.attempt >= self.max_attempts
