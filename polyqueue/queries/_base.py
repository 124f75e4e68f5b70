"""What every statement module shares: the executor type and the jobs table for Core statements."""

from __future__ import annotations

from typing import cast

from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from polyqueue.models import Job, WorkerRecord
from polyqueue.types import DONE_CHANNEL, NEW_JOB_CHANNEL

__all__ = ["CHANNEL_PARAMS", "JOBS", "WORKERS", "Conn"]

#: Whatever runs a statement: the caller's connection or session (the caller owns the transaction).
Conn = AsyncConnection | AsyncSession

#: The tables, for statements composed in SQLAlchemy Core.
JOBS = cast(Table, Job.__table__)
WORKERS = cast(Table, WorkerRecord.__table__)

#: The NOTIFY channels as the bound values ``:new_channel`` and ``:done_channel`` of the statements
#: that notify: the names are spelled once (polyqueue.types), never spliced into SQL text.
CHANNEL_PARAMS = {"new_channel": NEW_JOB_CHANNEL, "done_channel": DONE_CHANNEL}
