"""The FastAPI app. Serve it with ``uvicorn api:api`` (from this folder) beside a worker."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from jobs import Confirmation, ConfirmationEmail, Order, app
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polyqueue import JobFailedError, ResultTimeoutError, enqueue, wait_for_result
from polyqueue.db import database_url, make_engine

# POLYQUEUE_DATABASE_URL, else the embedded Postgres (the URL polyqueue's CLI would use).
engine = make_engine(database_url(app.settings.database_url, app.settings.embedded_dir, embedded_by_default=True))
sessions = async_sessionmaker(engine, expire_on_commit=False)
api = FastAPI(title="orders")


async def get_session() -> AsyncIterator[AsyncSession]:
    async with sessions() as session:
        yield session


Session = Annotated[AsyncSession, Depends(get_session)]


class OrderIn(BaseModel):
    email: str
    total_cents: int


class OrderOut(BaseModel):
    id: int
    confirmation_job_id: uuid.UUID


@api.post("/orders", status_code=201)
async def create_order(body: OrderIn, session: Session) -> OrderOut:
    async with session.begin():  # the order and its e-mail job: one commit, or neither
        order = Order(email=body.email, total_cents=body.total_cents)
        session.add(order)
        await session.flush()  # assigns order.id
        job = await enqueue(session, ConfirmationEmail(order_id=order.id, email=order.email))
        order.confirmation_job_id = job.id
    return OrderOut(id=order.id, confirmation_job_id=job.id)


@api.get("/orders/{order_id}/confirmation")
async def get_confirmation(order_id: int, session: Session, wait: float = 0.0) -> Confirmation:
    order = await session.get(Order, order_id)
    if order is None or order.confirmation_job_id is None:
        raise HTTPException(404, "no such order")
    job_id = order.confirmation_job_id
    await session.rollback()  # don't hold a transaction open while waiting
    try:
        # wait_for_result wakes on the job's completion NOTIFY; wait=0 answers at once.
        result: Confirmation = await wait_for_result(job_id, engine=engine, timeout=wait, model=Confirmation)
    except ResultTimeoutError:
        raise HTTPException(202, "the confirmation is not sent yet") from None
    except JobFailedError as exc:
        raise HTTPException(500, f"the confirmation failed: {exc.last_error}") from None
    return result
