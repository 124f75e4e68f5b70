"""The example's tables and its one task. A worker runs it with ``polyqueue worker jobs:app``."""

from __future__ import annotations

import datetime as dt
import uuid

from pydantic import BaseModel
from sqlalchemy import DateTime, Integer, Text, Uuid
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polyqueue import JobContext, Polyqueue

app = Polyqueue()  # settings from POLYQUEUE_* environment variables


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "example_orders"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    email: Mapped[str] = mapped_column(Text)
    total_cents: Mapped[int] = mapped_column(Integer)
    confirmation_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    confirmed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class ConfirmationEmail(BaseModel):
    """The job's payload."""

    order_id: int
    email: str


class Confirmation(BaseModel):
    """The job's result, read back typed by ``GET /orders/{id}/confirmation``."""

    order_id: int
    sent_to: str
    message_id: str


@app.register(max_attempts=5, max_run_seconds=30)
async def send_order_confirmation(payload: ConfirmationEmail, ctx: JobContext) -> Confirmation:
    # A real app would call its mail provider here, with ctx.job_id as the idempotency key.
    message_id = f"msg-{ctx.job_id}"
    order = await ctx.session.get(Order, payload.order_id)
    assert order is not None
    order.confirmed_at = dt.datetime.now(dt.UTC)  # committed together with "job succeeded"
    return Confirmation(order_id=payload.order_id, sent_to=payload.email, message_id=message_id)
