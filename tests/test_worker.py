"""The worker against a real Postgres: results, retries, time limits, validation,
complete-in-transaction, ownership, shutdown. Direct-Postgres mode unless noted."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import (
    Backoff,
    JobContext,
    JobFailedError,
    Retry,
    TerminalError,
    enqueue,
    get_job_result,
    get_job_result_typed,
    get_job_result_typed_via_registry,
)
from polyqueue.brokers.memory import MemoryBroker
from polyqueue.queries import Outcome, job_claim_pending, job_complete_many
from polyqueue.types import JobStatus
from polyqueue.worker.executor import error_record
from tests.helpers import make_app, rows, running_worker, scalar, wait_all_terminal

app = make_app()
FAST_RETRY = Backoff(base=0.01, maximum=0.05, jitter=False)


class Numbers(BaseModel):
    a: int
    b: int


class Total(BaseModel):
    total: int


class Flaky(BaseModel):
    key: str
    fail_times: int


class Sleep(BaseModel):
    seconds: float


class Note(BaseModel):
    text: str
    fail: bool = False


attempts_seen: dict[str, int] = {}


@app.register
async def add(payload: Numbers) -> Total:
    return Total(total=payload.a + payload.b)


@app.register
async def returns_list(payload: Note) -> list[str]:
    return [payload.text, payload.text]


@app.register
async def returns_none(payload: Note, ctx: JobContext) -> None:
    return None


@app.register(max_attempts=4, backoff=FAST_RETRY)
async def flaky(payload: Flaky, ctx: JobContext) -> int:
    attempts_seen[payload.key] = ctx.attempt
    if ctx.attempt <= payload.fail_times:
        raise ConnectionError(f"flaky failure {ctx.attempt}")
    return ctx.attempt


@app.register(max_attempts=5)
async def terminal(payload: Note) -> None:
    raise TerminalError("card declined")


@app.register(max_attempts=3)
async def asks_retry(payload: Note, ctx: JobContext) -> str:
    if ctx.attempt == 1:
        raise Retry(delay=0.01, reason="not yet")
    return "ok"


@app.register(max_attempts=2, max_run_seconds=0.2, timeout_strategy="retry", backoff=FAST_RETRY)
async def slow_retry(payload: Sleep) -> str:
    await asyncio.sleep(payload.seconds)
    return "finished"


@app.register(max_attempts=5, max_run_seconds=0.2, timeout_strategy="fail")
async def slow_fail(payload: Sleep) -> str:
    await asyncio.sleep(payload.seconds)
    return "finished"


@app.register(max_attempts=2, max_run_seconds=0.1, timeout_strategy="ignore")
async def slow_ignore(payload: Sleep) -> str:
    await asyncio.sleep(payload.seconds)
    return "finished"


@app.register
async def unserialisable(payload: Note) -> object:
    return object()


small = make_app(max_result_bytes=100, max_payload_bytes=200)


@small.register(name="huge_result", queue="small")
async def huge_result(payload: Note) -> str:
    return payload.text * 1000


@app.register(max_attempts=3, backoff=FAST_RETRY)
async def writes_note(payload: Note, ctx: JobContext) -> str:
    await ctx.session.execute(text("INSERT INTO notes (text) VALUES (:t)"), {"t": payload.text})
    if payload.fail:
        raise TerminalError("after writing")
    return payload.text


async def status_of(engine: AsyncEngine, job_id: uuid.UUID) -> tuple[str, int, list[dict[str, object]]]:
    row = (await rows(engine, "SELECT status, attempt, errors FROM polyqueue_jobs WHERE id = :i", i=job_id))[0]
    return row[0], row[1], row[2]


async def enqueue_one(engine: AsyncEngine, payload: BaseModel, **kw: object) -> uuid.UUID:
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, payload, **kw)  # type: ignore[arg-type]
        return job.id


async def test_results_of_every_shape_are_stored_and_read_back_typed(engine: AsyncEngine) -> None:
    a = await enqueue_one(engine, Numbers(a=2, b=3))
    b = await enqueue_one(engine, Note(text="hi"), task="returns_list")
    c = await enqueue_one(engine, Note(text="x"), task="returns_none")
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 3)
    async with AsyncSession(engine) as s:
        assert await get_job_result(s, a) == {"total": 5}
        assert await get_job_result_typed(s, a, Total) == Total(total=5)
        assert await get_job_result_typed_via_registry(s, a) == Total(total=5)
        assert await get_job_result_typed_via_registry(s, b) == ["hi", "hi"]
        assert await get_job_result(s, c) is None
    assert (await status_of(engine, c))[0] == "succeeded"


async def test_flaky_handler_retries_with_backoff_and_keeps_every_error(engine: AsyncEngine) -> None:
    job = await enqueue_one(engine, Flaky(key="k1", fail_times=2))
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 1)
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt) == ("succeeded", 3)
    assert [e["attempt"] for e in errors] == [1, 2]
    assert all(e["type"] == "ConnectionError" and "flaky failure" in str(e["message"]) for e in errors)
    assert "Traceback" in str(errors[0]["traceback"])


async def test_retries_stop_at_max_attempts(engine: AsyncEngine) -> None:
    job = await enqueue_one(engine, Flaky(key="k2", fail_times=99))
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 1)
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt, len(errors)) == ("failed", 4, 4)
    async with AsyncSession(engine) as s:
        with pytest.raises(JobFailedError, match="flaky failure 4") as info:
            await get_job_result(s, job)
    assert info.value.last_error is not None and info.value.last_error["attempt"] == 4


async def test_terminal_error_fails_without_retry_and_retry_signal_retries(engine: AsyncEngine) -> None:
    t = await enqueue_one(engine, Note(text="x"), task="terminal")
    r = await enqueue_one(engine, Note(text="x"), task="asks_retry")
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 2)
    status, attempt, errors = await status_of(engine, t)
    assert (status, attempt, errors[0]["type"], errors[0]["message"]) == ("failed", 1, "TerminalError", "card declined")
    status, attempt, errors = await status_of(engine, r)
    assert (status, attempt, errors[0]["type"]) == ("succeeded", 2, "Retry")


async def test_invalid_payload_on_dispatch_is_terminal_with_message(engine: AsyncEngine) -> None:
    job = await enqueue_one(engine, Numbers(a=1, b=2))
    async with engine.begin() as conn:  # the stored payload no longer fits the model (a deploy changed it)
        await conn.execute(text("""UPDATE polyqueue_jobs SET payload = '{"a": "x"}', max_attempts = 5"""))
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 1)
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt) == ("failed", 1)
    assert errors[0]["type"] == "ValidationError" and "Numbers" in str(errors[0]["message"])


async def test_unknown_task_and_unserialisable_result_fail_clearly_and_worker_keeps_serving(
    engine: AsyncEngine,
) -> None:
    ghost = await enqueue_one(engine, Numbers(a=1, b=1))
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE polyqueue_jobs SET task = 'no_such_task'"))
    bad = await enqueue_one(engine, Note(text="x"), task="unserialisable")
    good = await enqueue_one(engine, Numbers(a=1, b=1))
    impatient = make_app(unknown_task_grace=0)  # fail an unknown task at once (no rolling-deploy grace)
    impatient.tasks.update(app.tasks)
    async with running_worker(impatient, engine):
        await wait_all_terminal(engine, 3)
    s1, _, e1 = await status_of(engine, ghost)
    assert s1 == "failed" and e1[0]["type"] == "UnknownTaskError" and "no_such_task" in str(e1[0]["message"])
    s2, _, e2 = await status_of(engine, bad)
    assert s2 == "failed" and e2[0]["type"] == "ResultNotSerializable"
    assert (await status_of(engine, good))[0] == "succeeded"


@pytest.mark.parametrize(
    ("task", "expected_status", "expected_attempts", "result"),
    [
        ("slow_retry", "failed", 2, None),  # each attempt times out; retried once, then failed
        ("slow_fail", "failed", 1, None),  # terminal on the first timeout despite 5 attempts
        ("slow_ignore", "succeeded", 1, "finished"),  # runs past its limit and finishes
    ],
)
async def test_time_limit_strategies(
    engine: AsyncEngine, task: str, expected_status: str, expected_attempts: int, result: str | None
) -> None:
    job = await enqueue_one(engine, Sleep(seconds=0.5), task=task)
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 1)
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt) == (expected_status, expected_attempts)
    if expected_status == "failed":
        assert {e["type"] for e in errors} == {"TimeLimitExceeded"}
    else:
        async with AsyncSession(engine) as s:
            assert await get_job_result(s, job) == result


async def test_complete_in_transaction_commits_writes_with_success_and_rolls_back_on_failure(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE notes (text text)"))
    ok = await enqueue_one(engine, Note(text="kept"), task="writes_note")
    bad = await enqueue_one(engine, Note(text="discarded", fail=True), task="writes_note")
    async with running_worker(app, engine):
        await wait_all_terminal(engine, 2)
    assert await scalar(engine, "SELECT array_agg(text) FROM notes") == ["kept"]
    assert (await status_of(engine, ok))[0] == "succeeded"
    assert (await status_of(engine, bad))[0] == "failed"


async def test_late_finisher_of_a_reaped_job_changes_nothing(engine: AsyncEngine) -> None:
    await enqueue_one(engine, Numbers(a=1, b=1))
    me, other = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        [job] = await job_claim_pending(conn, me, ["default"], 10)
    async with engine.begin() as conn:  # maintenance reaps it, another worker claims attempt 2
        await conn.execute(text("UPDATE polyqueue_jobs SET status = 'pending', worker_id = NULL"))
        [again] = await job_claim_pending(conn, other, ["default"], 10)
    assert again.attempt == 2
    async with engine.begin() as conn:  # the first worker wakes up and reports success
        written = await job_complete_many(
            conn, [Outcome(job.id, job.attempt, me, JobStatus.SUCCEEDED, result_json="1")]
        )
    assert written == set()
    assert await scalar(engine, "SELECT status FROM polyqueue_jobs") == "running"
    async with engine.begin() as conn:
        error = error_record(2, "X", "y")
        written = await job_complete_many(conn, [Outcome(job.id, 2, other, JobStatus.FAILED, error_json=error)])
    assert written == {job.id}


async def test_graceful_shutdown_hands_back_running_jobs_without_counting_the_attempt(engine: AsyncEngine) -> None:
    quick = make_app(shutdown_grace=0.2)

    @quick.register(name="sleep_long")
    async def sleep_long(payload: Sleep) -> None:
        await asyncio.sleep(payload.seconds)

    job = await enqueue_one(engine, Sleep(seconds=60), task="sleep_long")
    async with running_worker(quick, engine):
        await _wait_status(engine, job, "running")
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt, errors) == ("pending", 0, [])
    assert await scalar(engine, "SELECT run_at <= now() FROM polyqueue_jobs") is True  # claimable at once
    assert await scalar(engine, "SELECT status FROM polyqueue_workers") == "stopped"


async def _wait_status(engine: AsyncEngine, job: uuid.UUID, status: str) -> None:
    from tests.helpers import wait_until

    async def check() -> bool:
        return bool((await status_of(engine, job))[0] == status)

    await wait_until(check, what=f"job {status}")


async def test_priority_orders_claims(engine: AsyncEngine) -> None:
    low = await enqueue_one(engine, Numbers(a=0, b=0), priority=10)
    high = await enqueue_one(engine, Numbers(a=0, b=0), priority=-10)
    async with engine.begin() as conn:
        first = await job_claim_pending(conn, uuid.uuid4(), ["default"], 1)
    assert [j.id for j in first] == [high]
    assert low != high


async def test_delayed_job_is_not_claimed_before_run_at(engine: AsyncEngine) -> None:
    await enqueue_one(engine, Numbers(a=0, b=0), delay=3600)
    async with engine.begin() as conn:
        assert await job_claim_pending(conn, uuid.uuid4(), ["default"], 10) == []


async def test_memory_mode_runs_jobs_and_stores_results(engine: AsyncEngine) -> None:
    job = await enqueue_one(engine, Numbers(a=20, b=22))
    async with running_worker(app, engine, broker=MemoryBroker()):
        await wait_all_terminal(engine, 1)
    async with AsyncSession(engine) as s:
        assert await get_job_result_typed(s, job, Total) == Total(total=42)
    assert await scalar(engine, "SELECT dispatched_at IS NOT NULL FROM polyqueue_jobs") is True


class Count(BaseModel):
    n: int


async def test_a_burst_worker_with_a_broker_drains_what_the_relay_has_still_to_publish(engine: AsyncEngine) -> None:
    """``run_worker(..., burst=True)`` with a broker found the broker empty on its first receive and
    stopped before its relay had published anything: in memory mode it ran none of 50 jobs. It
    now stops only once Postgres has no due job of its queues left; the relay bound (10 here)
    makes the relay publish in rounds, so the worker meets an empty broker several times."""
    from polyqueue import enqueue_many
    from polyqueue.runner import WorkerProcess

    small = make_app(relay_max_enqueued=10)

    @small.register(name="burst_count")
    async def burst_count(payload: Count) -> int:
        return payload.n

    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Count(n=i) for i in range(40)], task="burst_count")
    worker = WorkerProcess(small, engine, broker=MemoryBroker())
    await asyncio.wait_for(worker.run(burst=True), 30)
    assert worker.processed == 40
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded'") == 40


async def test_two_workers_race_on_500_jobs_each_runs_exactly_once(engine: AsyncEngine, db_url: object) -> None:
    from polyqueue.db import make_engine

    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE effects (job_id uuid PRIMARY KEY, worker text)"))
    racer = make_app(concurrency=16)

    @racer.register(name="effect")
    async def effect(payload: Note, ctx: JobContext) -> None:
        await ctx.session.execute(text("INSERT INTO effects VALUES (:j, :w)"), {"j": ctx.job_id, "w": payload.text})

    from polyqueue import enqueue_many

    async with AsyncSession(engine) as s, s.begin():
        await enqueue_many(s, [Note(text="-")] * 500, task="effect")
    engine2 = make_engine(db_url)  # type: ignore[arg-type]
    try:
        async with running_worker(racer, engine) as w1, running_worker(racer, engine2) as w2:
            await wait_all_terminal(engine, 500)
    finally:
        await engine2.dispose()
    assert await scalar(engine, "SELECT count(*) FROM effects") == 500
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded' AND attempt = 1") == 500
    assert w1.processed + w2.processed == 500
    assert w1.processed > 0 and w2.processed > 0


async def test_a_claim_whose_reply_was_lost_is_handed_back_and_run(engine: AsyncEngine) -> None:
    """The claim UPDATE committed but the connection died before the worker read it."""
    from tests.helpers import wait_until

    job = await enqueue_one(engine, Numbers(a=4, b=4), delay=3600)  # not claimable by the normal path
    async with running_worker(app, engine) as worker:
        async with engine.begin() as conn:  # what the lost claim did in Postgres
            await conn.execute(
                text(
                    "UPDATE polyqueue_jobs SET status = 'running', attempt = 1, worker_id = :w, "
                    "started_at = now() - interval '10 seconds', run_at = now() WHERE id = :i"
                ),
                {"w": worker.worker_id, "i": job},
            )

        async def done() -> bool:
            return (await status_of(engine, job))[0] == "succeeded"

        await wait_until(done, what="the orphaned claim to be handed back and run")
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt, errors) == ("succeeded", 1, [])  # the lost attempt was never counted


async def test_size_limits_are_configurable_with_clear_errors(engine: AsyncEngine) -> None:
    from polyqueue import PayloadError

    with pytest.raises(PayloadError, match="limit is 200"):
        await enqueue_one(engine, Note(text="x" * 500), task="huge_result")
    job = await enqueue_one(engine, Note(text="abc"), task="huge_result")
    ok = await enqueue_one(engine, Numbers(a=1, b=1))
    async with running_worker(small, engine, queues=["small"]), running_worker(app, engine):
        await wait_all_terminal(engine, 2)
    status, attempt, errors = await status_of(engine, job)
    assert (status, attempt, errors[0]["type"]) == ("failed", 1, "ResultTooLarge")
    assert "max_result_bytes" in str(errors[0]["message"])
    assert (await status_of(engine, ok))[0] == "succeeded"


async def test_registering_again_after_a_lost_reply_is_harmless(engine: AsyncEngine) -> None:
    """A worker retries its registration while Postgres is unreachable; when the first INSERT
    committed but its reply was lost, the retry must not fail on the duplicate key (a chaos run's
    worker exited on it during a Postgres restart)."""
    import uuid

    from polyqueue.queries import worker_register

    me = uuid.uuid4()
    for _ in range(2):
        async with engine.begin() as conn:
            await worker_register(
                conn, worker_id=me, hostname="h", pid=1, queues=["default"], broker="direct", concurrency=1
            )
    assert await scalar(engine, "SELECT count(*) FROM polyqueue_workers WHERE id = :w", w=me) == 1
