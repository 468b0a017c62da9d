"""take_batches over a real mode ThrowableQueue, with the few Faust objects it touches faked."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from faust.sensors.monitor import Monitor
from faust.types import TP, EventT
from mode.utils.queues import FlowControlEvent, ThrowableQueue

from stream.batching import drop_stale, take_batches


class FakeEvent:
    def __init__(self, offset: int, generation: int = 1, age_s: float = 60.0, partition: int = 0) -> None:
        self.message = SimpleNamespace(topic="clicks", partition=partition, tp=TP("clicks", partition), offset=offset,
                                       generation_id=generation, timestamp=time.time() - age_s, tracked=False)
        self.acked = False

    def ack(self) -> bool:
        self.acked = True
        return True


EventT.register(FakeEvent)


class FakeStream:
    def __init__(self) -> None:
        flow = FlowControlEvent()
        flow.resume()
        self.tracked: list[int] = []
        self.app = SimpleNamespace(
            consumer=SimpleNamespace(track_message=lambda m: self.tracked.append(m.offset), held=set()),
            topics=SimpleNamespace(acking_topics={"clicks"}),
            flow_control=SimpleNamespace(is_active=lambda: True),
            consumer_generation_id=1,
            monitor=Monitor(),
        )
        self.channel = SimpleNamespace(queue=ThrowableQueue(flow_control=flow))
        self.should_stop = False

    def put(self, *events: FakeEvent) -> None:
        for ev in events:
            self.channel.queue.put_nowait(ev)


async def test_what_queued_goes_at_once_and_is_acked_only_when_the_caller_comes_back():
    stream = FakeStream()
    evs = [FakeEvent(i) for i in range(3)]
    stream.put(*evs)
    batches = take_batches(stream, max_=10, within=5.0)  # old events: no waiting for the window
    batch = await asyncio.wait_for(anext(batches), 1.0)
    assert batch == evs and stream.tracked == [0, 1, 2]
    assert not any(ev.acked for ev in evs)  # being handled
    later = FakeEvent(3)
    stream.put(later)
    assert await asyncio.wait_for(anext(batches), 1.0) == [later]
    assert all(ev.acked for ev in evs) and not later.acked
    await batches.aclose()
    assert not later.acked  # the caller never came back: redelivered after a restart


async def test_each_batch_tells_fausts_stall_check_its_partitions_are_being_read():
    # Faust's consumer logs "Stream has not started processing TP (started 5.01 minutes ago)"
    # as an ERROR for each partition with a backlog whose stream_inbound_time was never set
    # (its Stream iterator sets it per event; take_batches bypasses that iterator): a worker
    # up for 5 minutes logged it for all 8 input partitions at the next burst of events
    stream = FakeStream()
    inbound = stream.app.monitor.stream_inbound_time
    stream.put(FakeEvent(0, partition=0), FakeEvent(1, partition=2))
    batches = take_batches(stream, max_=10, within=5.0)
    before = time.monotonic()
    await asyncio.wait_for(anext(batches), 1.0)
    assert set(inbound) == {TP("clicks", 0), TP("clicks", 2)} and min(inbound.values()) >= before
    stream.put(FakeEvent(2, partition=2))
    later = time.monotonic()
    await asyncio.wait_for(anext(batches), 1.0)
    assert inbound[TP("clicks", 2)] >= later > inbound[TP("clicks", 0)]
    await batches.aclose()


async def test_a_batch_stops_at_max_and_the_rest_waits_for_the_next():
    stream = FakeStream()
    evs = [FakeEvent(i) for i in range(5)]
    stream.put(*evs)
    batches = take_batches(stream, max_=2, within=5.0)
    assert [await anext(batches) for _ in range(3)] == [evs[:2], evs[2:4], evs[4:]]
    await batches.aclose()


async def test_a_fresh_event_waits_up_to_the_window_for_company():
    stream = FakeStream()
    first = FakeEvent(0, age_s=0.0)
    stream.put(first)
    batches = take_batches(stream, max_=10, within=0.2)
    task = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.05)
    assert not task.done()
    second = FakeEvent(1, age_s=0.0)
    stream.put(second)
    started = time.monotonic()
    assert await asyncio.wait_for(task, 1.0) == [first, second]
    assert time.monotonic() - started < 0.3
    await batches.aclose()


async def test_events_of_an_older_generation_are_dropped_unacknowledged():
    stream = FakeStream()
    stale, fresh = FakeEvent(0, generation=0), FakeEvent(1)
    stream.put(stale, fresh)
    batches = take_batches(stream, max_=10, within=0.01)
    assert await asyncio.wait_for(anext(batches), 1.0) == [fresh]
    assert not stale.acked and stream.tracked == [1]  # the rebalance's seek delivers it again
    await batches.aclose()


async def test_a_batch_taken_before_a_rebalance_is_dropped_and_never_acknowledged():
    stream = FakeStream()
    evs = [FakeEvent(i) for i in range(3)]
    stream.put(*evs)
    batches = take_batches(stream, max_=10, within=0.01)
    batch = await asyncio.wait_for(anext(batches), 1.0)
    assert drop_stale(stream.app, batch) == 0 and batch == evs  # nothing happened since
    stream.app.consumer_generation_id = 2  # a rebalance happened while the batch waited
    assert drop_stale(stream.app, batch) == 3 and batch == []
    later = FakeEvent(3, generation=2)
    stream.put(later)
    assert await asyncio.wait_for(anext(batches), 1.0) == [later]
    assert not any(ev.acked for ev in evs)  # the caller came back: only what it kept is acked
    await batches.aclose()


def test_drop_stale_keeps_the_current_generation_and_drops_all_while_the_flow_is_suspended():
    app = FakeStream().app
    old, new = FakeEvent(0, generation=0), FakeEvent(1, generation=1)
    batch = [old, new]
    assert drop_stale(app, batch) == 1 and batch == [new]
    app.flow_control = SimpleNamespace(is_active=lambda: False)  # a rebalance has begun
    assert drop_stale(app, batch) == 1 and batch == []


@pytest.mark.parametrize("pending", [0, 2])
async def test_faust_stopping_the_channel_ends_the_batches_without_acking(pending):
    stream = FakeStream()
    evs = [FakeEvent(i, age_s=0.0) for i in range(pending)]
    stream.put(*evs)
    batches = take_batches(stream, max_=10, within=0.2)  # a stop is seen by the window's end at the latest
    task = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0.01)
    await stream.channel.queue.throw(StopAsyncIteration())
    with pytest.raises(StopAsyncIteration):  # the generator returned; no RuntimeError
        await asyncio.wait_for(task, 1.0)
    assert not any(ev.acked for ev in evs)
