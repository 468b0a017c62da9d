"""Micro-batches from a Faust stream, acknowledged only after they were handled.

Faust's own ``Stream.take_events`` acknowledges a batch in a ``finally`` block, that is
also when the agent is cancelled or raises while handling it; the consumer then commits
offsets of events whose effects never happened. ``take_batches`` is the same buffering
(Faust's processor + passive consumption of the channel), but acknowledges a batch only
when the caller comes back for the next one. If the caller stops, crashes or is cancelled
mid-batch, that batch stays unacknowledged and is delivered again after a restart (and
recognised by event_id where its effects were partly done).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from mode.utils.aiter import aiter
from mode.utils.futures import notify


async def take_batches(stream, max_: int, within: float) -> AsyncIterator[list]:
    """Yield lists of at most ``max_`` Faust events, waiting at most ``within`` seconds to fill one."""
    events: list = []
    buffer_full = asyncio.Event()
    buffer_consumed = asyncio.Event()
    buffer_consuming: asyncio.Future | None = None
    saved_enable_acks = stream.enable_acks
    channel_it = aiter(stream.channel)

    async def add_to_buffer(value):
        nonlocal buffer_consuming
        if buffer_consuming is not None:
            try:
                await buffer_consuming
            finally:
                buffer_consuming = None
        event = stream.current_event
        if event is None:  # pragma: no cover - Faust sets it for every value
            raise RuntimeError("take_batches found no current event")
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
            await stream.wait_for_stopped(buffer_full, timeout=within)
            if not events:
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
                buffer_full.clear()
                buffer_consumed.set()
    finally:
        stream.enable_acks = saved_enable_acks
        stream._processors.remove(add_to_buffer)
