"""Detects a blocked event loop and says which job blocked it.

A handler that calls blocking code (``time.sleep``, a synchronous HTTP client, heavy CPU work)
inside ``async def`` stops every other job of the process, the heartbeats and the time limits:
``asyncio.timeout`` cannot fire while the loop does not run. The worker cannot stop such a
handler; it can make it visible at once.

A thread watches a timestamp the loop refreshes every ``threshold / 4``. When the timestamp is
older than ``threshold``, the thread reads which task the loop is running (each job runs in a
task named ``polyqueue-job-<id>``) and the loop thread's innermost frames, and logs them while
the loop is still blocked. When the loop runs again, the blocked time is logged and reported
to the metrics hook (``loop_blocked``).

A process that did not run at all (``SIGSTOP``, a paused VM, a starved machine) looks the same
from the loop, but then the watching thread did not run either and no CPU time was spent: that
is logged as a suspension, not blamed on the job that happened to be current, and not counted.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["LoopWatchdog"]

log = logging.getLogger("polyqueue.worker")

#: Frames of the loop thread's stack shown in the warning (innermost last).
STACK_FRAMES = 6


class LoopWatchdog:
    """Run ``await watchdog.run()`` as a task on the loop it watches; ``on_blocked(seconds, task_name)``
    is called on that loop once a block of at least ``threshold`` seconds is over."""

    def __init__(self, threshold: float, on_blocked: Callable[[float, str | None], None]) -> None:
        self.threshold = threshold
        self.tick = threshold / 4
        self._on_blocked = on_blocked
        self._beat = time.monotonic()
        self._culprit: str | None = None  # the task the thread saw running during the current block
        self._stop = threading.Event()
        self._thread_wakes = 0  # how often the watching thread has run: it keeps running while the loop blocks

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        thread = threading.Thread(
            target=self._watch, args=(loop, loop_thread), name="polyqueue-loop-watchdog", daemon=True
        )
        self._beat = time.monotonic()
        thread.start()
        try:
            while True:
                before, cpu_before, wakes_before = time.monotonic(), time.process_time(), self._thread_wakes
                await asyncio.sleep(self.tick)
                now = time.monotonic()
                self._beat = now
                blocked = now - before - self.tick
                if blocked >= self.threshold:
                    culprit, self._culprit = self._culprit, None
                    if self._thread_wakes - wakes_before <= 2 and _idle(time.process_time() - cpu_before, blocked):
                        log.warning("the worker process did not run for %.1f s (stopped or starved)", blocked)
                        continue
                    log.warning(
                        "the event loop was blocked for %.1f s%s: every job of this worker, its heartbeats "
                        "and time limits waited; run blocking code with asyncio.to_thread",
                        blocked,
                        f" by {culprit}" if culprit else "",
                    )
                    self._on_blocked(blocked, culprit)
        finally:
            self._stop.set()

    def _watch(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        reported_beat = 0.0
        woke, cpu = time.monotonic(), time.process_time()
        while not self._stop.wait(self.tick):
            self._thread_wakes += 1
            now, cpu_now = time.monotonic(), time.process_time()
            overslept = now - woke - self.tick
            if overslept >= self.threshold and _idle(cpu_now - cpu, overslept):
                reported_beat = self._beat  # the process was not running: the loop is not to blame
            woke, cpu = now, cpu_now
            beat = self._beat
            stalled = time.monotonic() - beat
            if stalled < self.threshold or beat == reported_beat:
                continue
            reported_beat = beat  # one warning per block
            task = asyncio.current_task(loop)  # a read of the loop's current-task slot; the loop is stuck
            name = task.get_name() if task is not None else None
            self._culprit = name
            frame = sys._current_frames().get(loop_thread)
            stack = "".join(traceback.format_stack(frame)[-STACK_FRAMES:]) if frame is not None else ""
            log.warning(
                "the event loop has been blocked for %.1f s%s; it is at:\n%s",
                stalled,
                f" by {name}" if name else "",
                stack.rstrip(),
            )


def _idle(cpu_seconds: float, wall_seconds: float) -> bool:
    """Whether the process spent under half of ``wall_seconds`` on the CPU: a loop held by
    CPU-bound code burns CPU time, a suspended process does not."""
    return cpu_seconds < wall_seconds / 2
