"""The worker's close after its last batch, with the broker away: its producer's stop waits for
what it still holds to be confirmed, up to its request timeout; after a batch that waited the
drain's 30 s, the stop ran past Kubernetes' grace period (seen in CI: the worker still running
90 s after SIGTERM, stuck after "Monitor: Stopping..."). Now it is given up after
PUBLISHER_STOP_S, said once, and the store is still closed."""

from __future__ import annotations

import asyncio
import time

from stream import shell as shell_module
from stream.app import create_app
from stream.settings import Settings
from stream.state import InMemoryUserStateStore


class StuckPublisher:
    """A producer whose stop never returns (aiokafka flushing to a broker that refuses)."""

    def __init__(self) -> None:
        self.cancelled = False

    async def stop(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


class Store(InMemoryUserStateStore):
    closed = False

    async def close(self) -> None:
        self.closed = True


async def test_a_producer_that_cannot_flush_is_given_up_and_the_store_still_closed(monkeypatch, caplog):
    monkeypatch.setattr(shell_module, "PUBLISHER_STOP_S", 0.2)
    store = Store()
    shell = create_app(Settings.from_env({"STREAMREC_TOPIC_PREFIX": "c."}), load_model=False, store=store).streamrec
    shell.publisher = publisher = StuckPublisher()
    started = time.monotonic()
    await asyncio.wait_for(shell.close(), 10)
    assert time.monotonic() - started < 3
    assert publisher.cancelled and store.closed
    assert "the producer did not stop within 0.2 s" in caplog.text
