"""CPU accounting from ``/proc`` (Linux): the worker process, Postgres, this process, the machine.

Sampled in a background thread every ``interval`` seconds, so that backends that
start during the run are counted and those that exit lose at most one interval.
Only meaningful when Postgres runs on this machine.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CpuReport", "CpuSampler"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")
# The process title of a client backend names its peer: "... user db 127.0.0.1(51234) idle" or "[local]".
_CLIENT = re.compile(r"\(\d+\) |\[local\]")


def _proc_times(pid: int) -> tuple[str, float] | None:
    """(comm, user+system CPU seconds) of ``pid``, None when it is gone."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return comm, (int(fields[11]) + int(fields[12])) / _TICK


def _machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine."""
    values = [int(v) for v in (_PROC / "stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / _TICK, total / _TICK


@dataclass
class CpuReport:
    """CPU seconds used during the sampled span, by group."""

    wall: float
    groups: dict[str, float] = field(default_factory=dict)
    machine_busy: float = 0.0  # CPU seconds of all cores
    cores: int = os.cpu_count() or 1

    def percent(self, name: str) -> float:
        """CPU of ``name`` as percent of one core (200% = two cores busy)."""
        return 100.0 * self.groups.get(name, 0.0) / self.wall if self.wall > 0 else 0.0

    @property
    def other(self) -> float:
        """CPU seconds of everything else: kernel (loopback networking, fsync), other processes."""
        return max(0.0, self.machine_busy - sum(self.groups.values()))

    def describe(self) -> str:
        parts = [f"{name} {self.percent(name):.0f}%" for name in self.groups]
        pct = 100.0 / self.wall if self.wall > 0 else 0.0
        parts.append(f"other {self.other * pct:.0f}%")
        return ", ".join(parts) + f" (machine {self.machine_busy * pct:.0f}% of {self.cores * 100}%)"


class CpuSampler:
    """Samples the CPU time of named process groups while running (``with CpuSampler(...) as s``)."""

    def __init__(
        self,
        pids: dict[str, list[int]],
        *,
        postgres: bool,
        database: str | None = None,
        servers: dict[str, str] | None = None,
        interval: float = 0.2,
    ) -> None:
        self._pids = pids
        self._servers = servers or {}  # group name -> process comm, e.g. {"redis": "redis-server"}
        self._postgres = postgres
        self._database = database
        self._pg_mine: dict[int, bool] = {}
        self._interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._m0 = 0.0
        self.report: CpuReport | None = None
        self.enabled = _PROC.joinpath("stat").exists()

    def _counts_as_ours(self, pid: int) -> bool:
        """Postgres processes of this run: our database's backends and the server's background processes.

        Backends of other databases (other people's tests on a shared server) are left out;
        their CPU shows in "other".
        """
        if pid in self._pg_mine:  # a client backend, classified once
            return self._pg_mine[pid]
        try:
            title = (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return False
        if not (_CLIENT.search(title) or "autovacuum worker" in title):
            return True  # postmaster or a background process (re-read: a fresh fork shows the postmaster's title)
        self._pg_mine[pid] = self._database is None or f" {self._database} " in f"{title} "
        return self._pg_mine[pid]

    def _server_pids(self) -> list[int]:
        """Postgres processes of this run, and those of the named servers (brokers)."""
        wanted = set(self._servers.values())
        pids = []
        for entry in _PROC.iterdir():
            if entry.name.isdigit():
                try:
                    comm = (entry / "comm").read_text().strip()
                    if comm in wanted or (
                        self._postgres and comm == "postgres" and self._counts_as_ours(int(entry.name))
                    ):
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def _sample(self, *, first: bool) -> None:
        pids = {p for group in self._pids.values() for p in group}
        if self._postgres or self._servers:
            pids.update(self._server_pids())
        for pid in pids:
            t = _proc_times(pid)
            if t is None:
                continue
            if pid not in self._first:
                self._first[pid] = t[1] if first else 0.0  # started during the span: all of it counts
            self._last[pid] = t

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample(first=False)

    def __enter__(self) -> CpuSampler:
        if self.enabled:
            self._t0 = time.monotonic()
            self._m0 = _machine()[0]
            self._sample(first=True)
            self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.enabled or self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._sample(first=False)
        wall = time.monotonic() - self._t0
        groups: dict[str, float] = {}
        named = {p: name for name, group in self._pids.items() for p in group}
        by_comm = {comm: name for name, comm in self._servers.items()}
        for pid, (comm, used) in self._last.items():
            ours = comm == "postgres" and self._pg_mine.get(pid, True)
            name = named.get(pid, "postgres" if ours else by_comm.get(comm))
            if name is not None:
                groups[name] = groups.get(name, 0.0) + used - self._first.get(pid, 0.0)
        order = [*self._pids, "postgres", *self._servers]
        self.report = CpuReport(
            wall=wall,
            groups={n: groups.get(n, 0.0) for n in order if n in groups or n in self._pids},
            machine_busy=_machine()[0] - self._m0,
        )
