"""Retry policy as a small pure object; the loop that does the I/O owns it.

>>> list(Backoff(base_s=0.1, factor=2, cap_s=0.5, jitter=0).delays(5))
[0.1, 0.2, 0.4, 0.5, 0.5]
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from stream.errors import described


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


async def run_until_done(attempt: Callable[[], Awaitable[None]], backoff: Backoff, log: logging.Logger, what: str,
                         on_failure: Callable[[], None] | None = None, reset_after_s: float = 60.0) -> None:
    """``await attempt()`` until it returns; each failure is logged (saying ``what`` failed),
    handed to ``on_failure`` (a counter) and followed by the next of ``backoff``'s delays. An
    attempt that ran ``reset_after_s`` before failing had recovered: the delays start short again.
    Cancellation passes through. A background reader's loop (stream/peers.py, stream/catalogue_feed.py)."""
    delays = backoff.delays()
    while True:
        started = time.monotonic()
        try:
            await attempt()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged, counted, tried again
            if on_failure is not None:
                on_failure()
            if time.monotonic() - started > reset_after_s:
                delays = backoff.delays()
            delay = next(delays)
            log.warning("%s failed (%s); starting again in %.1f s", what, described(exc), delay)
            await asyncio.sleep(delay)
        else:
            return
