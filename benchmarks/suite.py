"""The measurements. Each public coroutine of :class:`Bench` runs one benchmark and returns its results.

Honesty rules kept throughout: warm-up work is done first and excluded (and the
notes say so); payload objects are built before the clock starts; the database is
this run's own; the worker is a real subprocess, never a task in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from benchmarks.cpu import CpuSampler
from benchmarks.db import BenchDatabase
from benchmarks.profiling import PySpy, summarise_folded
from benchmarks.report import Result, percentile
from polyqueue.db import make_engine

__all__ = ["Bench", "WorkerProcess"]

ENQUEUE_TARGET = 20_000.0  # jobs/s, enqueue_many
E2E_TARGET = 5_000.0  # jobs/s, one worker process at concurrency 32, direct Postgres mode
LATENCY_P50_TARGET = 5.0  # ms

_REPO = Path(__file__).resolve().parent.parent
#: Broker servers whose CPU is reported when they run on this machine: backend name -> process name.
BROKER_PROCESSES = {"redis": "redis-server"}


class WorkerProcess:
    """``python -m benchmarks.worker_proc`` as a real subprocess; stderr goes to a log file."""

    def __init__(self, db: BenchDatabase, args: argparse.Namespace, *, pyinstrument: Path | None = None) -> None:
        self._db = db
        self._args = args
        self._pyinstrument = pyinstrument
        self.proc: asyncio.subprocess.Process | None = None
        self.spawned_at = 0.0  # time.time() just before the spawn
        self.ready_at = 0.0  # the worker's own time.time() after its imports
        self.processed: int | None = None
        fd, name = tempfile.mkstemp(prefix="pqbench-worker-", suffix=".log")
        os.close(fd)
        self.log_path = Path(name)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.worker_proc",
            "--database-url",
            self._db.url_str,
            "--backend",
            self._args.backend,
            "--concurrency",
            str(self._args.concurrency),
        ]
        if self._args.broker_url:
            cmd += ["--broker-url", self._args.broker_url]
        if self._pyinstrument is not None:
            cmd += ["--pyinstrument", str(self._pyinstrument)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get("PYTHONPATH")]))}
        with self.log_path.open("wb") as log:
            self.spawned_at = time.time()
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=_REPO, env=env, stdout=asyncio.subprocess.PIPE, stderr=log
            )
        assert self.proc.stdout is not None
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
            if not line:
                raise RuntimeError(f"worker exited before it was ready; its log:\n{self.log_tail()}")
            if line.startswith(b"READY "):
                self.ready_at = float(line.split()[1])
                return

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_warnings(self) -> int:
        return sum(1 for line in self.log_path.read_text(errors="replace").splitlines() if " WARNING " in line)

    @property
    def exited(self) -> bool:
        return self.proc is not None and self.proc.returncode is not None

    async def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            self.proc.kill()
            out, _ = await self.proc.communicate()
        for line in (out or b"").splitlines():
            if line.startswith(b"STOPPED processed="):
                self.processed = int(line.split(b"=")[1])

    def cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self.log_path.unlink()


class Bench:
    """Runs the benchmarks against one database."""

    def __init__(self, db: BenchDatabase, args: argparse.Namespace) -> None:
        self.db = db
        self.args = args
        self.engine: AsyncEngine | None = None

    async def open(self) -> None:
        self.engine = make_engine(self.db.url, pool_size=max(10, self.args.enqueue_tasks + 2))

    async def close(self) -> None:
        if self.engine is not None:
            await self.engine.dispose()

    @property
    def eng(self) -> AsyncEngine:
        assert self.engine is not None
        return self.engine

    async def server_info(self) -> str:
        async with self.eng.connect() as conn:
            version = await conn.scalar(text("SHOW server_version"))
            settings = {
                name: await conn.scalar(text(f"SHOW {name}"))
                for name in ("shared_buffers", "synchronous_commit", "fsync", "max_connections")
            }
        return f"{version} " + " ".join(f"{k}={v}" for k, v in settings.items())

    def _cpu(self, worker: int | None = None) -> CpuSampler:
        pids = {"worker": [worker]} if worker is not None else {}
        servers = {name: comm for name, comm in BROKER_PROCESSES.items() if name == self.args.backend}
        return CpuSampler(
            {**pids, "bench": [os.getpid()]}, postgres=self.db.local, database=self.db.url.database, servers=servers
        )

    async def _truncate(self) -> None:
        async with self.eng.begin() as conn:
            await conn.execute(text("TRUNCATE polyqueue_jobs, polyqueue_workers"))

    # -- 1. enqueue, one job per transaction --------------------------------------------------
    async def _enqueue_one(self, payload: BaseModel) -> uuid.UUID:
        from polyqueue import enqueue

        async with AsyncSession(self.eng) as s, s.begin():
            job = await enqueue(s, payload)
            return job.id

    async def enqueue(self) -> list[Result]:
        from benchmarks.app import Noop

        n = self.args.single_jobs
        tasks = self.args.enqueue_tasks
        warm = 200
        for i in range(warm):
            await self._enqueue_one(Noop(n=i))
        payloads = [Noop(n=i) for i in range(n)]

        t0 = time.perf_counter()
        for p in payloads:
            await self._enqueue_one(p)
        seq = n / (time.perf_counter() - t0)
        print(f"  sequential: {seq:,.0f} jobs/s", flush=True)

        it = iter(payloads)

        async def producer() -> None:
            for p in it:
                await self._enqueue_one(p)

        with self._cpu() as cpu:
            t0 = time.perf_counter()
            await asyncio.gather(*(producer() for _ in range(tasks)))
            conc = n / (time.perf_counter() - t0)
        print(f"  {tasks} concurrent tasks: {conc:,.0f} jobs/s", flush=True)
        notes = [f"{warm} warm-up enqueues excluded; payload objects built before timing; synchronous_commit as shown"]
        conc_notes = [f"{tasks} asyncio tasks in one process, one connection each"]
        if cpu.report:
            conc_notes.append(f"CPU: {cpu.report.describe()}")
        return [
            Result("enqueue 1/tx sequential", seq, "jobs/s", jobs=n, notes=notes),
            Result(f"enqueue 1/tx {tasks} tasks", conc, "jobs/s", jobs=n, notes=conc_notes),
        ]

    # -- 2. enqueue_many ----------------------------------------------------------------------
    async def _enqueue_batch(self, payloads: Sequence[BaseModel]) -> list[uuid.UUID]:
        from polyqueue import enqueue_many

        async with AsyncSession(self.eng) as s, s.begin():
            return await enqueue_many(s, payloads)

    async def enqueue_many(self) -> list[Result]:
        from benchmarks.app import Noop

        results = []
        await self._enqueue_batch([Noop(n=i) for i in range(1000)])  # warm-up
        for batch in (1_000, 10_000):
            total = max(self.args.jobs, 5 * batch) // batch * batch
            payloads = [Noop(n=i) for i in range(batch)]
            with self._cpu() as cpu:
                t0 = time.perf_counter()
                for _ in range(total // batch):
                    await self._enqueue_batch(payloads)
                rate = total / (time.perf_counter() - t0)
            print(f"  batches of {batch:,}: {rate:,.0f} jobs/s", flush=True)
            notes = [f"{total // batch} transactions of {batch:,}; one warm-up batch of 1,000 excluded"]
            if cpu.report:
                notes.append(f"CPU: {cpu.report.describe()}")
            results.append(
                Result(f"enqueue_many batch {batch:,}", rate, "jobs/s", jobs=total, target=ENQUEUE_TARGET, notes=notes)
            )
        await self._truncate()
        return results

    # -- 3. end-to-end throughput -------------------------------------------------------------
    async def _fill(self, n: int, model: type[BaseModel]) -> float:
        payloads = [model(n=i) for i in range(1000)]
        t0 = time.perf_counter()
        left = n
        while left > 0:
            await self._enqueue_batch(payloads[: min(1000, left)])
            left -= 1000
        return n / (time.perf_counter() - t0)

    async def _counts(self) -> tuple[int, int, int]:
        """(succeeded, failed, running) jobs."""
        async with self.eng.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                        "count(*) FILTER (WHERE status = 'failed'), "
                        "count(*) FILTER (WHERE status = 'running') FROM polyqueue_jobs"
                    )
                )
            ).one()
        return int(row[0]), int(row[1]), int(row[2])

    async def _wait_done(self, n: int, worker: WorkerProcess, timeout: float, poll: float = 0.1) -> int:
        """Poll until ``n`` jobs succeeded; returns the most jobs seen ``running`` at once.

        ``running`` counts jobs claimed whose outcome is not yet written: in-flight
        handlers plus the completer's backlog.
        """
        deadline = time.monotonic() + timeout
        most_running = 0
        while True:
            succeeded, failed, running = await self._counts()
            most_running = max(most_running, running)
            if failed:
                raise RuntimeError(f"{failed} jobs failed; worker log:\n{worker.log_tail()}")
            if succeeded >= n:
                return most_running
            if worker.exited:
                raise RuntimeError(f"worker exited early ({succeeded}/{n} done); its log:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out with {succeeded}/{n} jobs done; worker log:\n{worker.log_tail()}")
            await asyncio.sleep(poll)

    async def _has_stats(self) -> bool:
        async with self.eng.connect() as conn:
            return bool(await conn.scalar(text("SELECT count(*) FROM pg_stats WHERE tablename = 'polyqueue_jobs'")))

    async def _analyze(self) -> None:
        async with self.eng.connect() as conn:
            conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text("ANALYZE polyqueue_jobs"))

    async def e2e(self) -> list[Result]:
        """Throughput of one worker process on a pre-filled queue.

        Run on an analysed table (what autovacuum leaves after a 20k-row insert) and,
        when the table has never been analysed yet, also on that (a new install's first
        burst, or any server with autovacuum off): the claim plan depends on it.
        """
        results: list[Result] = []
        variants = {"both": ("never analysed", "analysed"), "never": ("never analysed",), "analysed": ("analysed",)}
        for variant in variants[self.args.e2e_stats]:
            if variant == "never analysed" and await self._has_stats():
                print("  skipped the never-analysed variant: polyqueue_jobs already has statistics", flush=True)
                continue
            results += await self._e2e_once(variant)
        return results

    async def _e2e_once(self, variant: str) -> list[Result]:
        from benchmarks.app import Noop

        args = self.args
        n = args.jobs
        await self._truncate()
        fill_rate = await self._fill(n, Noop)
        if variant == "analysed":
            await self._analyze()
        print(f"  [{variant}] pre-enqueued {n:,} no-op jobs ({fill_rate:,.0f} jobs/s)", flush=True)
        profile_dir: Path = args.profile_dir.resolve()  # created by cli.main; absolute for the subprocess
        tag = variant.replace(" ", "-")
        pyinstrument = profile_dir / f"e2e-{tag}.pyinstrument.txt" if args.profile == "pyinstrument" else None
        worker = WorkerProcess(self.db, args, pyinstrument=pyinstrument)
        spy_path = profile_dir / f"e2e-{tag}.py-spy.folded"
        try:
            await worker.start()
            spy = PySpy(worker.pid, spy_path) if args.profile == "py-spy" else contextlib.nullcontext()
            async with spy:
                with self._cpu(worker.pid) as cpu:
                    most_running = await self._wait_done(n, worker, timeout=max(120.0, n / 100))
            await worker.stop()
        finally:
            if not worker.exited:
                await worker.stop()
        async with self.eng.connect() as conn:
            rows = (
                await conn.execute(
                    text(
                        "SELECT extract(epoch FROM started_at)::float8, extract(epoch FROM finished_at)::float8 "
                        "FROM polyqueue_jobs WHERE status = 'succeeded' ORDER BY finished_at"
                    )
                )
            ).all()
        started = sorted(r[0] for r in rows)
        finished = [r[1] for r in rows]
        total_s = finished[-1] - worker.spawned_at
        total = n / total_s
        lo, hi = int(0.1 * n), int(0.9 * n) - 1
        steady = (hi - lo) / (finished[hi] - finished[lo]) if finished[hi] > finished[lo] else float("nan")
        first_claim_ms = (started[0] - worker.spawned_at) * 1000
        claims = len(set(started))
        flushes = len(set(finished))
        print(
            f"  [{variant}] spawn → all succeeded: {total_s:.2f}s = {total:,.0f} jobs/s; "
            f"steady 10-90%: {steady:,.0f} jobs/s",
            flush=True,
        )
        notes = [
            f"spawn → last job finished, {total_s:.2f}s, includes interpreter start-up and imports "
            f"({(worker.ready_at - worker.spawned_at) * 1000:.0f} ms), registration, LISTEN and first claim "
            f"({first_claim_ms:.0f} ms after spawn)",
        ]
        steady_notes = [
            "rate between the 10% and 90% completion marks (finished_at in the DB): start-up and tail excluded",
            f"{claims:,} claim statements (avg {n / claims:.1f} jobs each), "
            f"{flushes:,} completion flushes (avg {n / flushes:.1f} jobs each); at most {most_running:,} jobs "
            "seen 'running' at once (claimed, outcome not yet written)",
            f"worker: concurrency {args.concurrency}, backend {args.backend}; DB polled every 0.1 s for the end; "
            + ("ANALYZE run after the fill" if variant == "analysed" else "polyqueue_jobs never analysed"),
        ]
        if cpu.report:
            steady_notes.append(f"CPU over the run: {cpu.report.describe()}")
        warnings = worker.log_warnings()
        if warnings:
            steady_notes.append(f"worker logged {warnings} warnings")
        if args.profile == "py-spy" and spy_path.exists():
            summary = summarise_folded(spy_path)
            spy_path.with_suffix(".txt").write_text(summary + "\n")
            print(f"  py-spy profile: {spy_path} (summary beside it)\n" + summary)
        if pyinstrument is not None and pyinstrument.exists():
            print(f"  pyinstrument profile: {pyinstrument}")
        worker.cleanup()
        await self._truncate()
        return [
            Result(f"e2e no-op [{variant}] spawn→done", total, "jobs/s", jobs=n, target=E2E_TARGET, notes=notes),
            Result(f"e2e no-op [{variant}] steady", steady, "jobs/s", jobs=n, target=E2E_TARGET, notes=steady_notes),
            Result(f"e2e [{variant}] spawn→first claim", first_claim_ms, "ms"),
        ]

    # -- 4. pickup latency ----------------------------------------------------------------------
    async def _paced(self, count: int, rate: float, model: type[BaseModel]) -> tuple[dict[uuid.UUID, float], float]:
        """Enqueue ``count`` jobs, one per transaction, at ``rate``/s; (commit-return time by id, achieved rate)."""
        committed: dict[uuid.UUID, float] = {}
        t0 = time.perf_counter()
        for i in range(count):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            job_id = await self._enqueue_one(model(n=i))
            committed[job_id] = time.time()  # the commit has returned to the client
        return committed, count / (time.perf_counter() - t0)

    async def latency(self) -> list[Result]:
        from benchmarks.app import Stamp

        args = self.args
        rate, duration = args.rate, args.duration
        count = int(rate * duration)
        warm = int(min(rate, 100))
        await self._truncate()
        worker = WorkerProcess(self.db, args)
        try:
            await worker.start()
            await self._paced(warm, rate, Stamp)  # warm-up: connections, LISTEN, caches
            await self._wait_done(warm, worker, timeout=60)
            with self._cpu(worker.pid) as cpu:
                committed, achieved = await self._paced(count, rate, Stamp)
                await self._wait_done(warm + count, worker, timeout=60)
            await worker.stop()
        finally:
            if not worker.exited:
                await worker.stop()
        async with self.eng.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT id, (result->>'started')::float8 FROM polyqueue_jobs WHERE id = ANY(:ids)"),
                    {"ids": list(committed)},
                )
            ).all()
        lat = sorted((started - committed[job_id]) * 1000 for job_id, started in rows)
        worker.cleanup()
        await self._truncate()
        p = {q: percentile(lat, q) for q in (50, 95, 99)}
        print(
            f"  {len(lat)} jobs at {achieved:.0f}/s: p50 {p[50]:.2f} ms, p95 {p[95]:.2f} ms, "
            f"p99 {p[99]:.2f} ms, max {lat[-1]:.2f} ms, min {lat[0]:.2f} ms",
            flush=True,
        )
        notes = [
            f"handler start (time.time() in the worker) minus the client's commit return; {count} jobs, one per "
            f"transaction, at {achieved:.0f}/s for {duration:.0f}s; {warm} warm-up jobs excluded",
            f"min {lat[0]:.2f} ms"
            + (" (negative: the handler began before the client's commit call returned)" if lat[0] < 0 else ""),
        ]
        if cpu.report:
            notes.append(f"CPU: {cpu.report.describe()}")
        common: dict[str, Any] = {"unit": "ms", "higher_is_better": False}
        return [
            Result("pickup latency p50", p[50], jobs=len(lat), target=LATENCY_P50_TARGET, notes=notes, **common),
            Result("pickup latency p95", p[95], **common),
            Result("pickup latency p99", p[99], **common),
            Result("pickup latency max", lat[-1], **common),
        ]
