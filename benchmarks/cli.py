"""``python -m benchmarks``: enqueue rate, end-to-end throughput, pickup latency.

Creates a fresh ``pqbench_<random>`` database, migrates it, runs the selected
benchmarks, prints a table and drops the database. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import suite
from benchmarks.brokers import local_broker
from benchmarks.db import create_database, drop_database, migrate
from benchmarks.profiling import PySpy
from benchmarks.report import Result, render

__all__ = ["main"]

BENCHMARKS = ("enqueue", "enqueue_many", "e2e", "latency")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="polyqueue benchmarks")
    p.add_argument("--jobs", type=int, default=20_000, help="jobs for enqueue_many and e2e (default 20000)")
    p.add_argument(
        "--single-jobs",
        type=int,
        default=None,
        help="jobs for one-per-transaction enqueue (default: min(--jobs, 5000))",
    )
    p.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(BENCHMARKS)}",
    )
    p.add_argument(
        "--backend",
        default="direct",
        help="queue_backend of the app for e2e and latency: direct (no broker, default), memory, redis, "
        "sqs, pgmq or azure_service_bus; without --broker-url a local stand-in is started (benchmarks/brokers.py)",
    )
    p.add_argument(
        "--broker-url", default=None, help="broker URL, for backends that take one (default: a local stand-in)"
    )
    p.add_argument("--database-url", default=None, help="server to create the database on (else env, localhost...)")
    p.add_argument("--concurrency", type=int, default=32, help="worker concurrency for e2e and latency (32)")
    p.add_argument(
        "--e2e-stats",
        choices=("both", "analysed", "never"),
        default="both",
        help="e2e on an ANALYZEd table, on a never-analysed one (fresh database only), or both (default)",
    )
    p.add_argument("--enqueue-tasks", type=int, default=8, help="concurrent tasks of the concurrent enqueue (8)")
    p.add_argument("--rate", type=float, default=200.0, help="latency: jobs enqueued per second (200)")
    p.add_argument("--duration", type=float, default=10.0, help="latency: seconds of steady enqueueing (10)")
    p.add_argument(
        "--profile",
        choices=("py-spy", "pyinstrument"),
        default=None,
        help="profile the e2e worker process (py-spy attaches to it; pyinstrument runs inside it)",
    )
    p.add_argument("--profile-dir", type=Path, default=Path("benchmarks/profiles"), help="where profiles go")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON to this path")
    p.add_argument("--keep-db", action="store_true", help="do not drop the database at the end (debugging)")
    args = p.parse_args(argv)
    only: list[str] = []
    for item in args.only or []:
        only += [x.strip() for x in item.split(",") if x.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    args.selected = [b for b in BENCHMARKS if not only or b in only]
    if args.profile == "py-spy" and not PySpy.available():
        p.error("--profile py-spy needs py-spy: pip install py-spy")
    if args.profile == "pyinstrument" and importlib.util.find_spec("pyinstrument") is None:
        p.error("--profile pyinstrument needs pyinstrument: pip install pyinstrument")
    if args.single_jobs is None:
        args.single_jobs = min(args.jobs, 5000)
    return args


async def _main(args: argparse.Namespace) -> list[Result]:
    async with contextlib.AsyncExitStack() as stack:
        if args.broker_url is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pqbench-")))
            args.broker_url, args.broker = await stack.enter_async_context(local_broker(args.backend, tmp))
        else:
            args.broker = "the one --broker-url names"
        return await _run(args)


async def _run(args: argparse.Namespace) -> list[Result]:
    db = await create_database(args.database_url)
    results: list[Result] = []
    try:
        # benchmarks.app builds its Polyqueue from these; the worker subprocess gets the same values.
        os.environ["PQBENCH_QUEUE_BACKEND"] = args.backend
        how = await migrate(db.url)
        os.environ["PQBENCH_DATABASE_URL"] = db.url_str
        if args.broker_url:
            os.environ["PQBENCH_BROKER_URL"] = args.broker_url
        print(
            f"database: {db.url.render_as_string(hide_password=True)} (server found via {db.origin}; schema by {how})",
            flush=True,
        )
        print(
            f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"backend for e2e/latency: {args.backend} (broker: {args.broker})",
            flush=True,
        )
        bench = suite.Bench(db, args)
        await bench.open()
        try:
            print(f"postgres: {await bench.server_info()}", flush=True)
            for name in args.selected:
                print(f"\n== {name} ==", flush=True)
                results += await getattr(bench, name)()
        finally:
            await bench.close()
    finally:
        if args.keep_db:
            print(f"kept database {db.url.database}")
        else:
            await drop_database(db)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    if args.profile:
        args.profile_dir.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(_main(args))
    print()
    title = f"polyqueue benchmarks ({started}, backend={args.backend}, broker: {args.broker})"
    print(render(results, title=title))
    if args.json:
        args.json.write_text(json.dumps([r.as_dict() for r in results], indent=2))
    missed = [r for r in results if r.met is False]
    if missed:
        print(f"\n{len(missed)} target(s) missed: {', '.join(r.name for r in missed)}", file=sys.stderr)
    return 0
