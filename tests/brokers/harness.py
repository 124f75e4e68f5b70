"""Types shared by the conformance suite's per-adapter harness modules (``harness_*.py``).

Adding a broker means writing one harness factory (an async context manager that
yields a :class:`Harness` on the real service) and one ``ADAPTERS`` entry. Tests
skip by ``broker.capabilities`` or by a hook the harness cannot offer, never by name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from polyqueue.brokers.base import Broker


class MakeBroker(Protocol):
    """A new consumer of the harness's queues (a separate connection where the adapter has one)."""

    def __call__(self, *, lease_seconds: float = 30.0, dead_letter_after: int = 20) -> Awaitable[Broker]: ...


@dataclass
class Harness:
    """One adapter on its service, with the raw hooks the suite needs.

    ``inject_malformed(queue, body)`` puts a message with that body (None: no body at
    all) straight into the queue. ``dead_letters(queue)`` reads the dead-letter bodies.
    ``stop``/``start(keep_data)`` exist only on a service the test owns.
    """

    make: MakeBroker
    inject_malformed: Callable[[str, bytes | None], Awaitable[None]]
    dead_letters: Callable[[str], Awaitable[list[bytes]]] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    start: Callable[[bool], Awaitable[None]] | None = None


@dataclass(frozen=True)
class Adapter:
    """How the suite reaches one adapter.

    ``service`` names a session fixture whose value is passed to ``open`` (None: no
    service); ``open_private`` starts a service of the test's own, under a directory.
    """

    open: Callable[[Any], AbstractAsyncContextManager[Harness]]
    service: str | None = None
    open_private: Callable[[Path], AbstractAsyncContextManager[Harness]] | None = None
