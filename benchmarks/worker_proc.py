"""The worker subprocess of the end-to-end and latency benchmarks.

    python -m benchmarks.worker_proc --database-url URL --backend postgres --concurrency 32

Builds the same app as the benchmark (:mod:`benchmarks.app`) and runs
``polyqueue.run_worker`` until SIGTERM/SIGINT (or, with ``--burst``, until no job is
due and none is running). Prints ``READY <epoch seconds>`` once imports are done and
the worker is about to start, and ``STOPPED processed=<n>`` when it has stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_proc", description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", required=True)
    p.add_argument("--backend", default="direct", help="queue_backend of the app (default: direct)")
    p.add_argument("--broker-url", default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--burst", action="store_true", help="stop once no job is due and none is running")
    p.add_argument("--pyinstrument", metavar="PATH", help="profile with pyinstrument; write a text report to PATH")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def _run(args: argparse.Namespace) -> int:
    from benchmarks.app import app
    from polyqueue import run_worker

    print(f"READY {time.time():.6f}", flush=True)
    worker = await run_worker(app, concurrency=args.concurrency, burst=args.burst, install_signal_handlers=True)
    return worker.processed


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ["PQBENCH_DATABASE_URL"] = args.database_url
    os.environ["PQBENCH_QUEUE_BACKEND"] = args.backend
    if args.broker_url:
        os.environ["PQBENCH_BROKER_URL"] = args.broker_url
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="worker %(levelname)s %(name)s: %(message)s")
    profiler = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
        profiler.start()
    try:
        processed = asyncio.run(_run(args))
    finally:
        if profiler is not None:
            profiler.stop()
            with open(args.pyinstrument, "w") as f:
                f.write(profiler.output_text(unicode=False, color=False, show_all=False))
    print(f"STOPPED processed={processed}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
