"""Micro-batches from a Faust agent's stream, acknowledged only after they were handled.

Faust's own ``Stream.take_events`` acknowledges a batch in a ``finally`` block, that is
also when the agent is cancelled or raises while handling it; the consumer then commits
offsets of events whose effects never happened. ``take_batches`` acknowledges a batch only
when the caller comes back for the next one. If the caller stops, crashes or is cancelled
mid-batch, that batch stays unacknowledged and is delivered again after a restart (and
recognised by event_id where its effects were partly done).

It takes the events from the agent's channel queue in bulk, doing per event what Faust's
stream iterator does that matters here (drop events of an older consumer generation or
while flow is suspended, as Faust does, but without acknowledging them; track the message as pending;
acknowledge it once handled) and leaving out what does not (a processor coroutine, the
``current_event`` context and four sensor calls per event). On the 2-core box that per-event
machinery was a large share of a worker's CPU at 2,000 events/s (measured in
docs/architecture.md). Of the sensors it keeps one thing, once a batch: the time each of the
batch's partitions was last read (the monitor's ``stream_inbound_time``), which Faust's stall
check reads. Without it, a worker up longer than Faust's ``stream_processing_timeout`` (300 s)
logged "Stream has not started processing TP(...)" as an error, with a page of possible causes,
for every partition that had a backlog when the check ran, while it was reading them.

The ``within`` window starts when the batch's first event was written to Kafka (its record
timestamp), as a producer's ``linger.ms`` starts at a batch's first record, not when the
caller comes back: events that queued while the previous batch was being handled have
waited already, so they are handed over at once. Under load batches grow by themselves
(whatever arrived during the last one); at a trickle an event waits at most ``within`` for
company.

A rebalance can begin while a batch is being filled or waits to be handled. The caller
checks with :func:`drop_stale` just before handling it (under the lock that the rebalance
waits on): events taken before the rebalance are removed from the batch, and events removed
from the list it was given are never acknowledged, so Kafka delivers them again to whichever
worker owns their partition now. The same goes for events of a partition whose commits are
held after a batch there was left unacknowledged (:func:`stream.shell.leave_unacknowledged`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from faust.types import EventT


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
    app = stream.app
    consumer = app.consumer
    acking_topics = app.topics.acking_topics
    queue = stream.channel.queue
    get_now = queue.get_nowait
    inbound = app.monitor.stream_inbound_time
    events: list = []

    def accept(item) -> None:
        if not isinstance(item, EventT):  # pragma: no cover - agents' channels carry events
            return
        message = item.message
        if is_stale(app, message):
            # from before a rebalance: dropped as Faust drops it, but not acknowledged (an
            # acknowledged offset could let a commit pass it); the rebalance's seek to the
            # committed offsets delivers it again
            return
        if message.topic in acking_topics and not message.tracked:
            message.tracked = True
            consumer.track_message(message)
        events.append(item)

    def drain() -> None:
        while len(events) < max_ and not queue.empty():
            accept(get_now())

    while not stream.should_stop:
        try:
            if not events:
                accept(await queue.get())
                if not events:
                    continue
            drain()
            remaining = _arrived_at(events[0]) + within - time.monotonic()
            if remaining > 0 and len(events) < max_:
                # one timer per batch, not a wait_for (a task) per arriving event; what arrives
                # meanwhile waits in the channel queue, which holds more than a batch
                await asyncio.sleep(remaining)
                drain()
        except StopAsyncIteration:
            # Faust ends a channel's readers this way when it stops the stream; the events
            # taken but not handed over stay unacknowledged and are delivered again
            return
        batch = list(events)
        events.clear()
        now = time.monotonic()
        for tp in {event.message.tp for event in batch}:
            inbound[tp] = now
        yield batch  # handled partly or not at all (an exception, a cancel): left unacknowledged
        for event in batch:  # what the caller left in it (drop_stale removes events)
            event.ack()


def is_stale(app, message) -> bool:
    """Whether ``message`` was fetched before a rebalance that has begun since (the flow is
    suspended) or has happened since (an older consumer generation), or belongs to a partition
    whose commits are held (:meth:`stream.consumer.Consumer.hold`): Kafka delivers it again from
    the commit, after the events of the batch that was left unacknowledged there. Handled now,
    it would move its user's offset past theirs, and they would then be skipped as duplicates."""
    if not app.flow_control.is_active() or message.generation_id != app.consumer_generation_id:
        return True
    held = app.consumer.held
    return bool(held) and (message.topic, message.partition) in held


def drop_stale(app, batch: list) -> int:
    """Remove from ``batch`` (in place) the events :func:`is_stale` names; return how many.
    :func:`take_batches` does not acknowledge them."""
    keep = [ev for ev in batch if not is_stale(app, ev.message)]
    dropped = len(batch) - len(keep)
    if dropped:
        batch[:] = keep
    return dropped
