"""Micro-batches from a Faust stream, acknowledged only after they were handled.

Faust's own ``Stream.take_events`` acknowledges a batch in a ``finally`` block, that is
also when the agent is cancelled or raises while handling it; the consumer then commits
offsets of events whose effects never happened. ``take_batches`` is the same buffering
(Faust's processor + passive consumption of the channel), but acknowledges a batch only
when the caller comes back for the next one. If the caller stops, crashes or is cancelled
mid-batch, that batch stays unacknowledged and is delivered again after a restart (and
recognised by event_id where its effects were partly done).

The ``within`` window starts when the batch's first event was written to Kafka (its record
timestamp), as a producer's ``linger.ms`` starts at a batch's first record, not when the
caller comes back: events that queued while the previous batch was being handled have
waited already, so they are handed over at once. Under load batches grow by
themselves (whatever arrived during the last one); at a trickle an event waits at most
``within`` for company.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from mode.utils.aiter import aiter
from mode.utils.futures import notify


def _arrived_at(event) -> float:
    """``time.monotonic()`` of when ``event`` reached Kafka (its record timestamp), at most now.

    A timestamp from the future (a producer's clock ahead of ours) counts as now; an old one
    (a replay that kept its log's times) as long ago, which hands the batch over at once.
    """
    now = time.monotonic()
    ts = getattr(event.message, "timestamp", None)
    if not ts:
        return now
    return now - max(0.0, time.time() - ts)


async def take_batches(stream, max_: int, within: float) -> AsyncIterator[list]:
    """Yield lists of at most ``max_`` Faust events, waiting at most ``within`` seconds to fill one."""
    events: list = []
    first_at = 0.0  # monotonic time the batch's first event was buffered
    buffer_started = asyncio.Event()
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    buffer_consuming: asyncio.Future | None = None
    saved_enable_acks = stream.enable_acks
    channel_it = aiter(stream.channel)
    channel = stream.channel

    async def add_to_buffer(value):
        nonlocal buffer_consuming, first_at
        if buffer_consuming is not None:
            try:
                await buffer_consuming
            finally:
                buffer_consuming = None
        event = stream.current_event
        if event is None:  # pragma: no cover - Faust sets it for every value
            raise RuntimeError("take_batches found no current event")
        if not events:
            first_at = _arrived_at(event)
            buffer_started.set()
        events.append(event)
        if len(events) >= max_:
            buffer_full.set()
            buffer_consumed.clear()
            await stream.wait(buffer_consumed)
        return value

    stream.enable_acks = False
    stream.add_processor(add_to_buffer)
    stream._enable_passive(channel_it)
    try:
        while not stream.should_stop:
            if not events:
                await stream.wait_for_stopped(buffer_started, timeout=max(within, 0.1))
                if not events:
                    continue
            remaining = first_at + within - time.monotonic()
            if remaining > 0 and not buffer_full.is_set():
                await stream.wait_for_stopped(buffer_full, timeout=remaining)
            # what queued while the last batch was handled joins this one (the processor
            # moves it from the channel one event per turn of the loop)
            while len(events) < max_ and not channel.empty() and not stream.should_stop:
                await asyncio.sleep(0)
            if not events:  # pragma: no cover - only a stop empties the buffer meanwhile
                continue
            buffer_consuming = stream.loop.create_future()
            batch = list(events)
            try:
                yield batch
            except BaseException:
                # handled partly or not at all: leave it unacknowledged
                raise
            else:
                for event in batch:
                    await stream.ack(event)
            finally:
                events.clear()
                notify(buffer_consuming)
                buffer_started.clear()
                buffer_full.clear()
                buffer_consumed.set()
    finally:
        stream.enable_acks = saved_enable_acks
        stream._processors.remove(add_to_buffer)
