"""A snapshot taken before the models learned anything of a partition still says where they
start it, so that a restart from it learns again what they learned of it since.

Found by a tester following docs/operations.md (*Shutting down and deploying*): a worker started
with no snapshot while the forget topic held a request replayed it, and snapshotted within a
second (the erasure must leave the store's snapshot), before any click was learned. That
snapshot's watermark named the forget partition alone. The worker then learned 2,000 clicks
and stopped on SIGTERM (which takes no snapshot) before the next interval; the restarted worker
restored that snapshot, and since the replay after a restart covers only the partitions a
snapshot knows (stream/replay.py ``gaps``), it never learned the 2,000 clicks again. And that
erasure's snapshot counted as the worker's first, so the one due about 5 s after its models
first learned (``Shell.first_snapshot_due``) never came either: serve ranked with empty models
until the interval."""

from __future__ import annotations

import time
from types import SimpleNamespace

from aiokafka import TopicPartition

from online_models import Recommender
from stream import shell as shell_module
from stream.app import create_app
from stream.decoding import decode_event
from stream.handler import RawMessage
from stream.records import ClickEvent, ForgetRequest, encode
from stream.replay import Gap
from stream.settings import Settings
from stream.snapshots import SNAPSHOT_KEY
from stream.state import InMemoryUserStateStore
from stream.step_inputs import source_of

P = "t."
CLICKS, PURCHASES, FORGET = P + "clicks", P + "purchases", P + "forget"
ENV = {"STREAMREC_TOPIC_PREFIX": P, "STREAMREC_PARTITIONS": "1", "STREAMREC_SNAPSHOT_FORK": "false"}
NOW = time.time_ns() // 1_000_000
CLICKS_LEARNED = 40


def click(offset: int) -> bytes:
    return encode(ClickEvent(event_id=f"e{offset}", user_id=f"u{offset % 5}", item_id=f"i{offset % 7}",
                             ts=NOW - 60_000 + offset))


class FakeApp:
    """What the shell reads of the Faust app: the assignment (all of partition 0) and the generation."""

    def __init__(self, generation: int):
        self.futures: list = []
        self.assigned = {TopicPartition(t, 0) for t in (CLICKS, PURCHASES, FORGET)}
        self.consumer = SimpleNamespace(topic_partitions=lambda topic: 1, assignment=lambda: self.assigned, held=set())
        self.consumer_generation_id = generation
        self.flow_control = SimpleNamespace(is_active=lambda: True)

    def add_future(self, coro):
        self.futures.append(coro)


def taken(offset: int, generation: int):
    """A click of clicks[0] as take_batches hands it over."""
    msg = RawMessage(CLICKS, 0, offset, f"u{offset % 5}".encode(), click(offset), None, generation)
    return SimpleNamespace(message=SimpleNamespace(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                                   key=msg.key, value=msg.value, timestamp=None,
                                                   generation_id=msg.generation, tp=TopicPartition(CLICKS, 0),
                                                   headers=None))


def kafka(monkeypatch, committed: dict[tuple[str, int], int], calls: list) -> None:
    """The group's commits, and a replay that reads the forget request at forget[0] offset 0 and
    the clicks at their offsets."""
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: dict(committed))

    async def replay(step, bootstrap, todo, bounds, on_forget=None, **kw):
        calls.append(list(todo))
        n = 0
        for gap in todo:
            source = source_of(gap.topic, gap.partition)
            offsets = range(gap.start, gap.end)
            if gap.topic == FORGET:
                step.forget([ForgetRequest(user_id="gone", request_id="r0", ts=NOW)], [(source, 0)], NOW)
                on_forget(1)
            else:
                n += step.relearn([decode_event(click(o)) for o in offsets], [(source, o) for o in offsets], set())
            step.advance([(source, gap.end - 1)])
        return n

    monkeypatch.setattr(shell_module, "replay", replay)


async def started(store, clock=time.monotonic):
    """A worker's shell, started over ``store`` (its snapshot restored) and assigned every partition,
    its replay at start done; ``(shell, fake app)``."""
    shell = create_app(Settings.from_env(ENV), load_model=False, store=store).streamrec
    shell.clock = clock

    async def sink(records):
        return []

    shell.handler.publish = sink
    await shell.restore_models()
    fake = FakeApp(shell.generation())
    await shell.on_assigned(fake, fake.assigned)
    for future in fake.futures:
        if future.__name__ == "replay_once":
            await future
        else:  # the peer reader: nothing to read, one worker owns every partition
            future.close()
    return shell, fake


async def test_a_restart_from_a_snapshot_taken_before_any_click_learns_the_clicks_again(monkeypatch):
    store = InMemoryUserStateStore()
    calls: list = []
    committed = {(FORGET, 0): 1}  # a fresh group: nothing of the clicks committed, one erasure done
    kafka(monkeypatch, committed, calls)
    shell, fake = await started(store)
    assert calls == [[Gap(FORGET, 0, 0, 1)]] and shell.forgets_pending.is_set()
    await shell.snapshot_soon()  # the erasure's snapshot, within a second: nothing learned yet
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 0

    for start in range(0, CLICKS_LEARNED, 10):  # the agent's batches, committed
        await shell.handle_taken(fake, [taken(o, fake.consumer_generation_id) for o in range(start, start + 10)])
    assert shell.step.recommender.n_learned == CLICKS_LEARNED
    committed[(CLICKS, 0)] = CLICKS_LEARNED
    # SIGTERM: the worker stops with no snapshot; the restarted one restores the erasure's
    calls.clear()
    restarted, _ = await started(store)
    assert calls == [[Gap(CLICKS, 0, 0, CLICKS_LEARNED)]]
    assert restarted.step.recommender.n_learned == CLICKS_LEARNED


async def test_the_models_start_each_partition_they_never_learned_at_the_committed_offset(monkeypatch):
    """Where the group had committed before (a worker that restored a snapshot knowing none of
    the clicks, or one from before the positions were kept): the restart replays from that
    commit, not the partition's whole retention, which the models never learned."""
    store = InMemoryUserStateStore()
    calls: list = []
    committed = {(CLICKS, 0): 100, (FORGET, 0): 1}
    kafka(monkeypatch, committed, calls)
    shell, fake = await started(store)
    learned = shell.step.recommender.learned_offsets
    assert learned[source_of(CLICKS, 0)] == 99 and learned[source_of(PURCHASES, 0)] == -1
    await shell.snapshot_soon()
    await shell.handle_taken(fake, [taken(o, fake.consumer_generation_id) for o in range(100, 110)])
    committed[(CLICKS, 0)] = 110
    calls.clear()
    restarted, _ = await started(store)
    assert calls == [[Gap(CLICKS, 0, 100, 110)]] and restarted.step.recommender.n_learned == 10


async def test_an_erasures_snapshot_before_anything_was_learned_is_not_the_first(monkeypatch):
    """The worker's first snapshot follows its models' first lessons by FIRST_SNAPSHOT_DELAY_S
    even when an erasure's snapshot came before them (serve ranks with the snapshot)."""
    store = InMemoryUserStateStore()
    calls: list = []
    kafka(monkeypatch, {(FORGET, 0): 1}, calls)
    now = [1000.0]
    shell, fake = await started(store, clock=lambda: now[0])
    await shell.snapshot_soon()  # the erasure's
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 0
    await shell.handle_taken(fake, [taken(o, fake.consumer_generation_id) for o in range(10)])
    assert not shell.first_snapshot_due()  # seen now: due FIRST_SNAPSHOT_DELAY_S later
    now[0] += shell_module.FIRST_SNAPSHOT_DELAY_S
    await shell.snapshot_soon()
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 10
    await shell.handle_taken(fake, [taken(o, fake.consumer_generation_id) for o in range(10, 20)])
    now[0] += shell_module.FIRST_SNAPSHOT_DELAY_S
    assert not shell.first_snapshot_due()  # the first is taken: the next at the interval
