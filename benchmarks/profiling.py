"""Profiling the worker subprocess: attach ``py-spy record`` to it and summarise the folded stacks."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

__all__ = ["PySpy", "summarise_folded"]


def _py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class PySpy:
    """``py-spy record --pid`` for the span of a ``async with``; writes folded stacks to ``path``."""

    def __init__(self, pid: int, path: Path, *, rate: int = 200) -> None:
        self.pid = pid
        self.path = path
        self.rate = rate
        self._proc: asyncio.subprocess.Process | None = None

    @staticmethod
    def available() -> bool:
        return _py_spy() is not None

    async def __aenter__(self) -> PySpy:
        exe = _py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        self._proc = await asyncio.create_subprocess_exec(
            exe,
            "record",
            "--pid",
            str(self.pid),
            "--rate",
            str(self.rate),
            "--format",
            "raw",
            "--function",
            "--nonblocking",
            "-o",
            str(self.path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await asyncio.sleep(0.3)  # let it attach
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            await asyncio.wait_for(self._proc.wait(), 30)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


def _short(frame: str) -> str:
    # py-spy raw frames (with --function) look like "function (path/to/file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{name} ({where})" if where else name


def summarise_folded(path: Path, *, top: int = 15) -> str:
    """Top functions by self and by inclusive samples from a py-spy raw (folded) file."""
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        funcs = [_short(f) for f in stack.split(";") if f and not f.startswith("process ")]
        total += count
        if funcs:
            self_c[funcs[-1]] += count
        for f in set(funcs):
            incl_c[f] += count
    if not total:
        return "(no samples)"
    lines = [f"{total} samples (on-CPU only: idle waits are not sampled)", "", "top by self time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    lines += ["", "top by inclusive time:"]
    lines += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl_c.most_common(top)]
    return "\n".join(lines)
