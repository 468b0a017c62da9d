"""Retry policy as a small pure object; the loop that does the I/O owns it.

>>> list(Backoff(base_s=0.1, factor=2, cap_s=0.5, jitter=0).delays(5))
[0.1, 0.2, 0.4, 0.5, 0.5]
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Exponential back-off, capped, with proportional jitter (0 = none)."""

    base_s: float = 0.05
    factor: float = 2.0
    cap_s: float = 2.0
    jitter: float = 0.1
    seed: int | None = None

    def delays(self, attempts: int | None = None) -> Iterator[float]:
        """The waits before each retry; endless when ``attempts`` is None."""
        rng = random.Random(self.seed)
        delay = self.base_s
        n = 0
        while attempts is None or n < attempts:
            d = min(delay, self.cap_s)
            if self.jitter:
                d *= 1 + rng.uniform(-self.jitter, self.jitter)
            yield round(d, 6)
            delay *= self.factor
            n += 1
