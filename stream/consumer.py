"""Faust's aiokafka consumer with a cheaper hand-over of each fetched message.

Faust's ``Consumer._drain_messages`` hands every fetched message to the conductor with
``await self.wait_first(callback(message), self.suspend_flow.wait())``, so that a hand-over
blocked on a full channel queue is abandoned when a rebalance suspends the flow. That call
wraps four awaitables in tasks, waits on them and cancels three: about 23 µs of the event
loop per message (``bench/drain_bench.py``), while the hand-over itself almost never waits
(the conductor puts the event on a queue that has room, and returns).

:class:`Consumer` runs the hand-over coroutine directly up to its first suspension. If it
finishes there, the usual case, that is all. If it suspends (a full queue, a suspended flow,
the producer's buffer), the rest of it runs under ``wait_first`` exactly as in Faust, so a
rebalance still abandons it. Everything else in the loop (gaps, commits, read offsets,
yielding to the loop every 100 messages) is Faust's code, unchanged.

One more change in that loop: when the agent's buffer is full, Faust pauses fetching from
the partitions that filled it and waits up to a second for records of the others, often
none (a topic already read to its end), while the agent empties the buffer and Faust
resumes the paused partitions. A worker catching up a backlog sat idle up to a second each
time. While partitions are paused, :class:`Consumer` waits at most
``PAUSED_FETCH_TIMEOUT_S`` before it looks again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka


def start(coro: Coroutine) -> tuple[bool, Any]:
    """Run ``coro`` up to its first suspension: ``(True, result)`` when it finished, else
    ``(False, what it yielded)``, to be resumed with :func:`resume`."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, yielded


async def resume(coro: Coroutine, yielded: Any) -> Any:
    """Drive a coroutine that :func:`start` left suspended to its end, as an asyncio task would.

    ``yielded`` is what it is waiting for (an asyncio future, or ``None`` for a bare yield).
    Cancelling this coroutine cancels that future and lets ``coro`` see the cancellation at
    the point where it waits, as ``Task.cancel()`` does.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])  # done, failed or cancelled: coro reads the result itself
        except asyncio.CancelledError:
            if yielded is not None:
                yielded.cancel()
                try:  # let coro handle the cancellation where it waits
                    yielded = coro.send(None)
                except StopIteration as stop:  # it swallowed the cancellation and finished
                    return stop.value
                coro.close()
            else:
                coro.close()
            raise
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


#: How long one fetch waits for records while some partitions are paused because the agent's
#: buffer is full (Faust waits up to 1 s; see Consumer._drain_messages).
PAUSED_FETCH_TIMEOUT_S = 0.02


class Consumer(faust_aiokafka.Consumer):
    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - the worker's loop, tested end to end
        # faust/transport/consumer.py's Consumer._drain_messages (faust-streaming 0.15), with
        # the hand-over through start()/resume() instead of a wait_first per message
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        flag_consumer_fetching = CONSUMER_FETCHING
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(flag_consumer_fetching)
                # Faust waits up to 1 s for records of the active partitions. When the agent's
                # buffer is full, Faust pauses the partitions that filled it, and this wait then
                # covers only the others, often with nothing to read (a drained topic), while
                # the agent empties the buffer and Faust resumes the paused ones: the worker
                # sat idle up to a second each time (4,800 events/s from a backlog). While some
                # are paused, look again soon.
                ait = getmany(timeout=PAUSED_FETCH_TIMEOUT_S if self._buffered_partitions else 1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset:
                                if acks_enabled_for(message.topic):
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if commit_every is not None:
                                if self._n_acked >= commit_every:
                                    self._n_acked = 0
                                    await self.commit()
                            handover = callback(message)
                            done, yielded = start(handover)
                            if not done:
                                await self.wait_first(resume(handover, yielded), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                        else:
                            self.log.dev("DROPPED MESSAGE ROFF %r: k=%r v=%r", offset, message.key, message.value)
                    unset_flag(flag_consumer_fetching)

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(flag_consumer_fetching)


class Transport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`Consumer`."""

    Consumer = Consumer


__all__ = ["Consumer", "Transport", "resume", "start"]
