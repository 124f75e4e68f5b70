"""Two apps in one process, side by side: tasks belong to their app. A task name or payload
model that both register never lets one app's enqueues, workers, metrics or typed results
stand in for the other's; where the payload cannot tell which app is meant, polyqueue says so
instead of picking one."""

from __future__ import annotations

import pytest
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import (
    UnknownTaskError,
    enqueue,
    enqueue_many,
    get_job_result_typed_via_registry,
    wait_for_result,
)
from tests.helpers import make_app, running_worker


class Recorder:
    """A metrics hook that keeps what it heard."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[str, str, int]] = []
        self.finished: list[tuple[str, str]] = []

    def job_enqueued(self, task: str, queue: str, count: int) -> None:
        self.enqueued.append((task, queue, count))

    def job_finished(self, task: str, queue: str, outcome: str, run_seconds: float) -> None:
        self.finished.append((task, outcome))


class Invoice(BaseModel):
    number: int


class Refund(BaseModel):
    number: int


class Shared(BaseModel):
    n: int


class Doubled(BaseModel):
    value: int


class Tripled(BaseModel):
    value: int


billing_metrics, payments_metrics = Recorder(), Recorder()
billing = make_app(metrics=billing_metrics, queues=["billing"])
payments = make_app(metrics=payments_metrics, queues=["payments"])


# The same task name in both apps, each for its own model and result.
@billing.register(name="send", queue="billing")
async def send_invoice(payload: Invoice) -> Doubled:
    return Doubled(value=payload.number * 2)


@payments.register(name="send", queue="payments")
async def send_refund(payload: Refund) -> Tripled:
    return Tripled(value=payload.number * 3)


# The same model in both apps.
@billing.register(name="shared_b", queue="billing")
async def shared_b(payload: Shared) -> int:
    return payload.n


@payments.register(name="shared_p", queue="payments")
async def shared_p(payload: Shared) -> int:
    return -payload.n


async def test_each_payload_finds_its_own_app_and_the_apps_run_side_by_side(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as s, s.begin():
        invoice = (await enqueue(s, Invoice(number=5))).id
        refund = (await enqueue(s, Refund(number=5))).id
        refunds = await enqueue_many(s, [Refund(number=1), Refund(number=2)])
    assert billing_metrics.enqueued == [("send", "billing", 1)]
    assert payments_metrics.enqueued == [("send", "payments", 1), ("send", "payments", 2)]

    async with running_worker(billing, engine), running_worker(payments, engine):
        assert await wait_for_result(invoice, engine=engine, timeout=20) == {"value": 10}
        assert await wait_for_result(refund, engine=engine, timeout=20) == {"value": 15}
        for job in refunds:
            await wait_for_result(job, engine=engine, timeout=20)
    assert billing_metrics.finished == [("send", "succeeded")]
    assert payments_metrics.finished == [("send", "succeeded")] * 3

    async with AsyncSession(engine) as s:
        assert await get_job_result_typed_via_registry(s, invoice, app=billing) == Doubled(value=10)
        assert await get_job_result_typed_via_registry(s, refund, app=payments) == Tripled(value=15)
        with pytest.raises(UnknownTaskError, match=r"task 'send' is registered by 2 apps.*pass app="):
            await get_job_result_typed_via_registry(s, invoice)


async def test_what_two_apps_could_mean_is_refused_until_app_says_which(engine: AsyncEngine) -> None:
    async with AsyncSession(engine) as s, s.begin():
        with pytest.raises(UnknownTaskError, match=r"Shared is registered by 2 apps.*pass app="):
            await enqueue(s, Shared(n=1))
        with pytest.raises(UnknownTaskError, match=r"task 'send' is registered by 2 apps"):
            await enqueue(s, {"number": 1}, task="send")
        job = await enqueue(s, Shared(n=1), app=payments)
        named = await enqueue(s, Shared(n=2), task="shared_b")  # the name settles it
        by_dict = await enqueue(s, {"number": 3}, task="send", app=billing)
        assert (job.task, job.queue) == ("shared_p", "payments")
        assert (named.task, named.queue) == ("shared_b", "billing")
        assert (by_dict.task, by_dict.queue) == ("send", "billing")


def test_an_app_with_no_such_task_says_so() -> None:
    lone = make_app()
    with pytest.raises(UnknownTaskError, match="unknown task 'send'; registered: \\[\\]"):
        lone.get("send")
