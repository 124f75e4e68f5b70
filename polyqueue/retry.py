"""Retry backoff policy: pure functions, no I/O."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: ``base * factor**(attempt-1)``, capped at ``maximum``.

    With ``jitter`` the delay is drawn uniformly from [delay/2, delay] ("equal jitter"),
    so retries of jobs that failed together spread out but never come back at once.
    """

    base: float = 1.0
    factor: float = 2.0
    maximum: float = 300.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.base < 0 or self.factor < 1 or self.maximum < 0:
            raise ValueError("Backoff needs base >= 0, factor >= 1 and maximum >= 0")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before the attempt after ``attempt`` (1-based) failed."""
        # The exponent is clamped: past 2**64 every delay is the maximum anyway, and a float power
        # overflows (a relay retrying a 13-minute outage reached attempt 1,025 and crashed).
        raw = min(self.maximum, self.base * self.factor ** min(max(0, attempt - 1), 64))
        if not self.jitter:
            return raw
        r = (rng or random).random()
        return raw / 2 + r * raw / 2
