"""Guarantee 7 (nothing from the wire is trusted), against real Postgres and a real Redis:
a delivery, a NOTIFY and a worker's own view of its tasks only make a worker look at the row.

Also: every path that makes a job terminal wakes its waiters, notifications stay under
Postgres's payload limit, stored errors hide credentials, and a blocked event loop is named.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import JobContext, JobFailedError, Polyqueue, Retry, enqueue, wait_for_result
from polyqueue.brokers import make_broker
from polyqueue.brokers.base import Message, encode_message
from polyqueue.db import make_engine
from polyqueue.maintenance.service import Maintenance
from polyqueue.queries import CANCEL_CHANNEL, DONE_CHANNEL, Outcome, job_claim_pending, job_complete_many
from polyqueue.runner import WorkerProcess
from polyqueue.types import JobStatus
from tests.helpers import make_app, rows, running_worker, scalar, wait_until
from tests.redis_service import RedisServer

app = make_app()


class Item(BaseModel):
    n: int


class Gate(BaseModel):
    key: str


gates: dict[str, asyncio.Event] = {}
handler_cancelled: set[str] = set()


@app.register
async def work(payload: Item) -> int:
    return payload.n


@app.register(queue="admin")
async def admin_work(payload: Item) -> int:
    return -payload.n


@app.register
async def wait_at_gate(payload: Gate) -> str:
    try:
        await gates.setdefault(payload.key, asyncio.Event()).wait()
    except asyncio.CancelledError:
        handler_cancelled.add(payload.key)
        raise
    return payload.key


async def _enqueue(engine: AsyncEngine, payload: BaseModel, **options: Any) -> uuid.UUID:
    """Enqueue for ``app`` unless ``app=`` says otherwise (``old_app`` below also has ``work``)."""
    async with AsyncSession(engine) as session, session.begin():
        job = await enqueue(session, payload, **{"app": app, **options})
        job_id: uuid.UUID = job.id
    return job_id


async def _status(engine: AsyncEngine, job_id: uuid.UUID) -> tuple[str, int, list[dict[str, Any]]]:
    (row,) = await rows(engine, "SELECT status, attempt, errors FROM polyqueue_jobs WHERE id = :id", id=job_id)
    return row[0], row[1], row[2]


# -- deliveries -----------------------------------------------------------------------------------


async def test_a_forged_delivery_cannot_claim_a_job_of_another_queue(
    engine: AsyncEngine, redis_server: RedisServer
) -> None:
    """A message on the `default` stream naming an `admin` job (forged with XADD, or misrouted)
    is acked and dropped: a `default` worker claims only jobs of the queues it serves."""
    settings = Polyqueue(queue_backend="redis", broker_url=redis_server.url).settings
    broker = make_broker(settings)
    assert broker is not None
    admin_job = await _enqueue(engine, Item(n=7), task="admin_work")
    async with engine.begin() as conn:  # as if a relay had published it to the admin stream
        await conn.execute(
            text("UPDATE polyqueue_jobs SET status = 'enqueued', dispatched_at = now() WHERE id = :id"),
            {"id": admin_job},
        )
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with running_worker(app, engine, broker=broker, queues=["default"], run_relay=False):
            await raw.xadd("polyqueue:default", {"body": encode_message(Message(admin_job, "default"))})
            sentinel = await _enqueue(engine, Item(n=1), task="work")
            await broker.publish([Message(sentinel, "default")])

            async def sentinel_done_and_stream_empty() -> bool:
                done = await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :id", id=sentinel)
                return done == "succeeded" and await raw.xlen("polyqueue:default") == 0

            await wait_until(sentinel_done_and_stream_empty, what="the sentinel job and the forged entry's ack")
    finally:
        await raw.aclose()
        await broker.close()
    assert await _status(engine, admin_job) == ("enqueued", 0, [])


# -- NOTIFY ---------------------------------------------------------------------------------------
@pytest.fixture
async def intruder(db_url: URL) -> AsyncIterator[AsyncEngine]:
    """An engine on the test database as a role that may connect and nothing else."""
    role = f"pq_intruder_{uuid.uuid4().hex[:8]}"
    admin = make_engine(db_url, pool_size=1)
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
        await conn.commit()
    engine = make_engine(db_url.set(username=role, password=None), pool_size=1)
    try:
        async with engine.connect() as conn:  # it really has no rights on the tables
            with pytest.raises(Exception, match="permission denied"):
                await conn.execute(text("SELECT 1 FROM polyqueue_jobs"))
        yield engine
    finally:
        await engine.dispose()
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP ROLE "{role}"'))
            await conn.commit()
        await admin.dispose()


async def _running(engine: AsyncEngine, job_id: uuid.UUID) -> None:
    async def check() -> bool:
        return bool(await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :id", id=job_id) == "running")

    await wait_until(check, what="the job to run")


async def test_a_forged_cancel_notify_does_not_interrupt_a_running_job(
    engine: AsyncEngine, intruder: AsyncEngine
) -> None:
    key = f"forged-{uuid.uuid4()}"
    job_id = await _enqueue(engine, Gate(key=key))
    async with running_worker(app, engine) as worker:
        await _running(engine, job_id)
        heard = asyncio.Event()
        worker.listener.subscribe(CANCEL_CHANNEL, lambda _payload: heard.set())  # after the worker's own
        async with intruder.connect() as conn:
            await conn.execute(
                text("SELECT pg_notify(:channel, :payload)"), {"channel": CANCEL_CHANNEL, "payload": str(job_id)}
            )
            await conn.commit()
        await asyncio.wait_for(heard.wait(), 20)

        async def checked() -> bool:
            return not worker.worker._checks

        await wait_until(checked, what="the worker to look at the row")
        gates[key].set()
        await wait_until(lambda: _is(engine, job_id, "succeeded"), what="the job to finish despite the forged cancel")
    assert key not in handler_cancelled
    status, attempt, errors = await _status(engine, job_id)
    assert (status, attempt, errors) == ("succeeded", 1, [])


async def _is(engine: AsyncEngine, job_id: uuid.UUID, status: str) -> bool:
    return bool(await scalar(engine, "SELECT status FROM polyqueue_jobs WHERE id = :id", id=job_id) == status)


async def test_an_operator_cancel_stops_the_handler_even_when_its_notify_is_lost(engine: AsyncEngine) -> None:
    """Postgres is the truth: a cancel whose NOTIFY never arrived is found by the heartbeat."""
    key = f"lost-notify-{uuid.uuid4()}"
    job_id = await _enqueue(engine, Gate(key=key))
    async with running_worker(app, engine):
        await _running(engine, job_id)
        async with engine.begin() as conn:  # what `admin cancel` writes, without its NOTIFY
            await conn.execute(
                text("UPDATE polyqueue_jobs SET status = 'cancelled', finished_at = now() WHERE id = :id"),
                {"id": job_id},
            )

        async def handler_stopped() -> bool:
            return key in handler_cancelled

        await wait_until(handler_stopped, what="the heartbeat to stop the cancelled job's handler")
    assert (await _status(engine, job_id))[:2] == ("cancelled", 1)


# -- rolling deploys ------------------------------------------------------------------------------
class Fresh(BaseModel):
    n: int


new_app = make_app()
old_app = make_app()  # an older deploy: it has `work` but not `fresh_task`


@new_app.register
async def fresh_task(payload: Fresh) -> str:
    return f"fresh {payload.n}"


@old_app.register(name="work")
async def old_work(payload: Item) -> int:
    return payload.n


async def test_an_old_worker_hands_a_new_task_back_for_a_worker_that_has_it(engine: AsyncEngine) -> None:
    job_id = await _enqueue(engine, Fresh(n=3), app=new_app)
    async with running_worker(old_app, engine) as old:

        async def handed_back() -> bool:
            _, _, errors = await _status(engine, job_id)
            return len(errors) >= 2  # handed back, claimed again after its backoff, handed back again

        await wait_until(handed_back, what="the old worker to hand the job back twice")
        status, attempt, errors = await _status(engine, job_id)
        assert status in ("pending", "running") and attempt in (0, 1)
        assert {e["type"] for e in errors} == {"UnknownTaskError"}
        assert old.worker.label in errors[0]["message"] and "fresh_task" in errors[0]["message"]
    async with running_worker(new_app, engine):  # the deploy replaced the old worker
        await wait_until(lambda: _is(engine, job_id, "succeeded"), what="the new worker to run it")
    status, attempt, errors = await _status(engine, job_id)
    assert (status, attempt) == ("succeeded", 1)  # the hand-backs did not count as attempts


async def test_an_unknown_task_fails_after_the_grace_naming_the_workers_that_lacked_it(engine: AsyncEngine) -> None:
    job_id = await _enqueue(engine, Fresh(n=4), app=new_app)
    impatient = make_app(unknown_task_grace=0.5)
    impatient.tasks.update(old_app.tasks)
    async with running_worker(impatient, engine) as worker:
        await wait_until(lambda: _is(engine, job_id, "failed"), what="the job to fail after the grace")
    status, attempt, errors = await _status(engine, job_id)
    assert status == "failed" and attempt >= 1
    last = errors[-1]
    assert last["type"] == "UnknownTaskError"
    assert "'fresh_task'" in last["message"] and "unknown_task_grace" in last["message"]
    assert worker.worker.label in last["message"].split("workers that lacked it: ")[1]


# -- waking waiters ----------------------------------------------------------------------------------
async def test_a_job_failed_by_maintenance_wakes_its_waiter(engine: AsyncEngine) -> None:
    """A worker that died on the job's last attempt: maintenance fails it and the waiter hears
    at once, not at its poll interval (300 s here, past the test's deadline)."""
    job_id = await _enqueue(engine, Item(n=1), task="work", max_attempts=1)
    dead = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO polyqueue_workers (id, hostname, pid, queues, broker, concurrency, status, heartbeat_at) "
                "VALUES (:id, 'gone', 1, '{default}', 'direct', 1, 'running', now() - interval '1 hour')"
            ),
            {"id": dead},
        )
        await conn.execute(
            text("UPDATE polyqueue_jobs SET status = 'running', attempt = 1, worker_id = :w WHERE id = :id"),
            {"w": dead, "id": job_id},
        )
    waiter = asyncio.create_task(wait_for_result(job_id, engine=engine, timeout=300, poll_interval=300))
    await asyncio.sleep(0.2)  # let it LISTEN (an earlier failure would be found by its first read anyway)
    await Maintenance(engine, app.settings).run_once()
    with pytest.raises(JobFailedError) as failed:
        await asyncio.wait_for(waiter, 30)  # only the NOTIFY can wake it this early
    assert failed.value.status == "failed" and (failed.value.last_error or {}).get("type") == "WorkerLost"


async def test_a_large_completion_batch_notifies_every_finished_job(engine: AsyncEngine) -> None:
    """500 outcomes in one statement: the ids go out in payloads under Postgres's 8,000-byte limit."""
    async with AsyncSession(engine) as session, session.begin():
        for n in range(500):
            await enqueue(session, Item(n=n), task="work", app=app)
    worker_id = uuid.uuid4()
    async with engine.begin() as conn:
        claimed = await job_claim_pending(conn, worker_id, ["default"], 500)
    assert len(claimed) == 500
    heard: set[str] = set()
    async with engine.connect() as listen:
        raw = (await listen.get_raw_connection()).driver_connection
        assert raw is not None
        everything = asyncio.Event()

        def on_done(_c: Any, _p: int, _ch: str, payload: str) -> None:
            assert len(payload.encode()) < 8000
            heard.update(payload.split(","))
            if len(heard) == 500:
                everything.set()

        await raw.add_listener(DONE_CHANNEL, on_done)
        async with engine.begin() as conn:
            outcomes = [Outcome(j.id, j.attempt, worker_id, JobStatus.SUCCEEDED, result_json="1") for j in claimed]
            written = await job_complete_many(conn, outcomes)
        assert len(written) == 500
        await asyncio.wait_for(everything.wait(), 20)
        await raw.remove_listener(DONE_CHANNEL, on_done)
    assert heard == {str(j.id) for j in claimed}


# -- what is stored and logged ---------------------------------------------------------------------
class Boom(BaseModel):
    kind: str


@app.register(max_attempts=1)
async def leak_secrets(payload: Boom) -> None:
    if payload.kind == "dsn":
        raise RuntimeError("could not connect to postgresql://app:hunter2@db.internal:5432/app (password=hunter2)")
    raise RuntimeError("x" * 50_000)


@app.register(max_attempts=1)
async def wide_result(payload: Item) -> str:
    return "é" * payload.n  # 2 bytes each in UTF-8


async def test_stored_errors_mask_credentials_and_are_capped(engine: AsyncEngine) -> None:
    dsn = await _enqueue(engine, Boom(kind="dsn"), task="leak_secrets")
    huge = await _enqueue(engine, Boom(kind="huge"), task="leak_secrets")
    async with running_worker(app, engine):
        await wait_until(lambda: _is(engine, huge, "failed"), what="the jobs to fail")
        await wait_until(lambda: _is(engine, dsn, "failed"), what="the jobs to fail")
    (error,) = (await _status(engine, dsn))[2]
    assert "hunter2" not in error["message"] and "hunter2" not in error["traceback"]
    assert "postgresql://app:***@db.internal" in error["message"]
    (error,) = (await _status(engine, huge))[2]
    assert len(error["message"]) < 2_100 and error["message"].endswith("characters cut]")
    assert len(error["traceback"]) < 8_100 and "RuntimeError: xxx" in error["traceback"]
    assert "in leak_secrets" in error["traceback"]  # the frames survive a huge message


async def test_the_result_limit_counts_bytes(engine: AsyncEngine) -> None:
    limited = make_app()
    limited.tasks["wide_result"] = app.tasks["wide_result"].__class__(
        **{**app.tasks["wide_result"].__dict__, "max_result_bytes": 1_000}
    )
    job_id = await _enqueue(engine, Item(n=600), task="wide_result")  # 602 characters, 1,202 bytes of JSON
    async with running_worker(limited, engine):
        await wait_until(lambda: _is(engine, job_id, "failed"), what="the job to fail")
    (error,) = (await _status(engine, job_id))[2]
    assert error["type"] == "ResultTooLarge" and "1202 bytes" in error["message"]


# -- a blocked event loop --------------------------------------------------------------------------------
class Nap(BaseModel):
    seconds: float


@app.register
async def blocking_nap(payload: Nap) -> None:
    time.sleep(payload.seconds)  # noqa: ASYNC251 - the mistake the watchdog is there for


class Recorder:
    def __init__(self) -> None:
        self.blocked: list[float] = []

    def loop_blocked(self, seconds: float) -> None:
        self.blocked.append(seconds)


async def test_a_blocked_event_loop_is_logged_with_its_job_and_counted(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "polyqueue.worker")
    recorder = Recorder()
    watched = make_app(blocked_loop_threshold=0.3)
    watched.tasks.update(app.tasks)
    job_id = await _enqueue(engine, Nap(seconds=1.5), task="blocking_nap")
    async with running_worker(watched, engine, metrics=recorder):
        await wait_until(lambda: _is(engine, job_id, "succeeded"), what="the blocking job to finish")
        await wait_until(lambda: bool(recorder.blocked), what="the block to be reported")
    assert max(recorder.blocked) >= 1.0
    during = [r.getMessage() for r in caplog.records if "has been blocked" in r.getMessage()]
    assert during and f"polyqueue-job-{job_id}" in during[0] and "time.sleep" in during[0]
    after = [r.getMessage() for r in caplog.records if "was blocked for" in r.getMessage()]
    assert after and f"polyqueue-job-{job_id}" in after[0]


WATCHED_PROCESS = """
import asyncio, logging, sys, time
from polyqueue.worker.watchdog import LoopWatchdog
logging.basicConfig(level=logging.WARNING, format="%(message)s")

async def main():
    watchdog = LoopWatchdog(0.3, lambda seconds, culprit: print("COUNTED", flush=True))
    task = asyncio.create_task(watchdog.run())
    print("READY", flush=True)
    await asyncio.sleep(1.0)
    if sys.argv[1] == "block":
        time.sleep(1.5)
    await asyncio.sleep(3.0)
    task.cancel()

asyncio.run(main())
"""


@pytest.mark.parametrize("fault", ["block", "sigstop"])
def test_a_stopped_process_is_not_reported_as_a_blocked_loop(fault: str) -> None:
    """SIGSTOP for 1.5 s stops the loop and the watching thread alike: a suspension, not a
    block to pin on a job; the same 1.5 s in ``time.sleep`` on the loop is a block (the control)."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHED_PROCESS, fault], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    if fault == "sigstop":
        time.sleep(0.5)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(1.5)
        proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    if fault == "block":
        assert "COUNTED" in out and "has been blocked" in err and "was blocked for" in err
    else:
        assert "COUNTED" not in out and "blocked" not in err, err
        assert "did not run for" in err


def test_worker_label_names_host_and_pid(engine: AsyncEngine) -> None:
    import os

    assert WorkerProcess(app, engine).worker.label.endswith(f":{os.getpid()}")


# -- outcomes Postgres refuses, parameters of the app's own engine --------------------------------
class Odd(BaseModel):
    kind: str


@app.register(max_attempts=3)
async def odd_outcome(payload: Odd) -> str:
    if payload.kind == "nul-result":
        return "a\x00b"
    if payload.kind == "nul-error":
        raise RuntimeError("bad\x00byte")
    if payload.kind == "huge-delay":
        raise Retry(delay=1e300)  # `now() + delay` is out of Postgres's range
    return "fine"


async def test_an_outcome_postgres_refuses_fails_its_job_alone(engine: AsyncEngine) -> None:
    """A NUL in a result or message, or a delay past Postgres's range, once failed the whole
    completion batch, retried forever, and held back every later outcome of the worker."""
    kinds = ["nul-result", "nul-error", "huge-delay", *["fine"] * 20]
    async with AsyncSession(engine) as session, session.begin():
        ids = {kind + str(n): (await enqueue(session, Odd(kind=kind))).id for n, kind in enumerate(kinds)}
    batched = make_app(completion_flush_interval=0.5)  # the outcomes meet in one batch
    batched.tasks.update(app.tasks)
    async with running_worker(batched, engine):

        async def all_settled() -> bool:
            n = await scalar(
                engine,
                "SELECT count(*) FROM polyqueue_jobs WHERE status IN ('succeeded', 'failed') OR attempt > 1",
            )
            return bool(n == len(kinds))

        await wait_until(all_settled, what="every outcome to be written")
    status, _, errors = await _status(engine, ids["nul-result0"])
    assert status == "failed" and errors[-1]["type"] == "ResultNotSerializable" and "NUL" in errors[-1]["message"]
    status, _, errors = await _status(engine, ids["nul-error1"])
    assert status in ("pending", "running", "succeeded", "failed") and errors[0]["message"] == "badbyte"
    status, _, errors = await _status(engine, ids["huge-delay2"])
    assert status == "failed" and errors[-1]["type"] == "OutcomeNotStored"
    assert "out of range" in errors[-1]["message"]
    fine = [v for k, v in ids.items() if k.startswith("fine")]
    assert await scalar(
        engine, "SELECT count(*) FROM polyqueue_jobs WHERE id = ANY(:ids) AND status = 'succeeded'", ids=fine
    ) == len(fine)


class Query(BaseModel):
    secret: str


async def test_sql_parameters_of_the_apps_own_engine_are_not_stored(db_url: URL) -> None:
    """The app's engine (passed to the worker) does not hide parameters; a failing statement
    with a secret parameter inside a handler must not store it."""
    from sqlalchemy.ext.asyncio import create_async_engine

    own = create_async_engine(db_url.set(drivername="postgresql+asyncpg"))
    leaky = make_app()

    @leaky.register(max_attempts=1)
    async def bad_query(payload: Query, ctx: JobContext) -> None:
        await ctx.session.execute(text("SELECT 1 / 0 WHERE CAST(:v AS text) IS NOT NULL"), {"v": payload.secret})

    try:
        job_id = await _enqueue(own, Query(secret="hunter2-not-a-number"), task="bad_query", app=leaky)
        async with running_worker(leaky, own):
            await wait_until(lambda: _is(own, job_id, "failed"), what="the job to fail")
        (error,) = (await _status(own, job_id))[2]
        assert "hunter2" not in error["message"] and "hunter2" not in (error["traceback"] or "")
        assert "division by zero" in error["message"]
    finally:
        await own.dispose()


async def test_an_unknown_task_requeued_after_giving_up_gets_a_new_grace(engine: AsyncEngine) -> None:
    job_id = await _enqueue(engine, Fresh(n=5), app=new_app)
    impatient = make_app(unknown_task_grace=0)
    impatient.tasks.update(old_app.tasks)
    async with running_worker(impatient, engine):
        await wait_until(lambda: _is(engine, job_id, "failed"), what="the job to fail at once")
    async with engine.begin() as conn:  # an hour later, `admin requeue` (errors are kept)
        await conn.execute(
            text(
                "UPDATE polyqueue_jobs SET status = 'pending', finished_at = NULL, worker_id = NULL, "
                "errors = (SELECT jsonb_agg(e || jsonb_build_object('at', now() - interval '1 hour')) "
                "          FROM jsonb_array_elements(errors) e) WHERE id = :id"
            ),
            {"id": job_id},
        )
    patient = make_app(unknown_task_grace=60)  # 60 s from the requeue, not from the hour-old records
    patient.tasks.update(old_app.tasks)
    async with running_worker(patient, engine):

        async def handed_back() -> bool:
            return len((await _status(engine, job_id))[2]) >= 2

        await wait_until(handed_back, what="a hand-back after the requeue")
    status, _, errors = await _status(engine, job_id)
    assert status in ("pending", "running") and errors[0]["gave_up"] is True and errors[-1]["gave_up"] is False
