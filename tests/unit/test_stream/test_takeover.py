"""A partition taken over from another worker: the models learn every event of it once.

The peer reader (stream/peers.py) learns a partition this worker does not own, but it may be
behind the owner's commits (catching up from a snapshot, backing off after a failure, or
simply slower). When the partition becomes this worker's, its agent starts at the group's
committed offset, so the events between what the models learned and that commit must be
learned from Kafka first (stream/replay.py), as at a restart; a replay that failed at start is
tried again before the next batch."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition

from online_models import Recommender
from stream import replay as replay_module
from stream import shell as shell_module
from stream.app import create_app
from stream.decoding import decode_event
from stream.errors import ServiceUnavailable
from stream.handler import BatchHandler, RawMessage
from stream.peers import start_offsets
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import Bounds, ClickEvent, ForgetRequest, encode
from stream.replay import Gap
from stream.retry import Backoff
from stream.settings import Settings
from stream.snapshots import SNAPSHOT_KEY
from stream.state import InMemoryUserStateStore
from stream.step_inputs import source_of

P = "t."
CLICKS = P + "clicks"
FORGET = P + "forget"
ENV = {"STREAMREC_TOPIC_PREFIX": P, "STREAMREC_PARTITIONS": "2", "STREAMREC_LEARN_ALL_PARTITIONS": "true"}


def click(offset: int) -> tuple[str, bytes]:
    user = f"u{offset % 3}"
    return user, encode(ClickEvent(event_id=f"e{offset}", user_id=user, item_id=f"i{offset % 7}",
                                   ts=1_700_000_000_000 + offset))


def message(offset: int, generation: int) -> RawMessage:
    user, value = click(offset)
    return RawMessage(CLICKS, 0, offset, user.encode(), value, None, generation)


class FakeApp:
    """What the shell's rebalance callbacks read of the Faust app."""

    def __init__(self, assigned: set[TopicPartition], generation: int):
        self.futures: list = []
        self.assigned = assigned
        self.consumer = SimpleNamespace(topic_partitions=lambda topic: 2, assignment=lambda: self.assigned, held=set())
        self.consumer_generation_id = generation
        self.flow_control = SimpleNamespace(is_active=lambda: True)

    def add_future(self, coro):
        self.futures.append(coro)


async def run_futures(fake: FakeApp, name: str) -> None:
    """Run the futures the shell handed the app under ``name`` (a replay), close the others (the reader)."""
    for future in fake.futures:
        if getattr(future, "__name__", "") == name:
            await future
        else:
            future.close()


def unplugged_shell(settings: Settings, store):
    """The worker's shell, publishing its lists nowhere: a unit test needs no broker."""
    shell = create_app(settings, load_model=False, store=store).streamrec
    shell.handler.publish = _sink
    return shell


def kafka_log(monkeypatch, committed: dict[tuple[str, int], int], calls: list, fail: list) -> None:
    """The group's commits and a replay that reads partition 0 of the clicks from this list."""
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: dict(committed))

    async def replay(step, kafka, todo, bounds, **kw):
        calls.append(list(todo))
        if fail:
            raise fail.pop()
        n = 0
        for gap in todo:
            if gap.topic == FORGET:  # requests for users the models never saw
                step.advance([(source_of(gap.topic, gap.partition), gap.end - 1)])
                continue
            offsets = range(gap.start, gap.end)
            events = [decode_event(click(o)[1]) for o in offsets]
            n += step.relearn(events, [(source_of(gap.topic, gap.partition), o) for o in offsets], set())
            step.advance([(source_of(gap.topic, gap.partition), gap.end - 1)])
        return n

    monkeypatch.setattr(shell_module, "replay", replay)


@pytest.mark.parametrize("learn_all", [True, False])
async def test_a_partition_taken_over_from_behind_the_commit_learns_the_events_in_between(monkeypatch, learn_all):
    """Without STREAMREC_LEARN_ALL_PARTITIONS the models learn their own partitions alone, and a
    rebalance replays only the forget requests the reader would have read (a takeover does not
    start a replay of the partition's history)."""
    env = {**ENV, "STREAMREC_LEARN_ALL_PARTITIONS": str(learn_all).lower()}
    store = InMemoryUserStateStore()
    topics = Settings.from_env(env).topics
    # worker A owned partition 0 and handled (and committed) offsets 0-9
    owner = BatchHandler(RecommendationStep(Recommender.default()), store, _sink, topics, Metrics())
    await owner.handle([message(o, 1) for o in range(10)])
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10, (CLICKS, 1): 0, (FORGET, 0): 2}, calls, [])

    # worker B owned partition 1; its peer reader learned partition 0 up to offset 4 only
    shell = unplugged_shell(Settings.from_env(env), store)
    fake = FakeApp({TopicPartition(CLICKS, 1)}, shell.generation())
    shell.restored.set()  # no snapshot
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_once")  # the first assignment's replay (nothing to learn) and the reader
    events = [decode(o) for o in range(5)]
    shell.step.relearn(events, [(source_of(CLICKS, 0), o) for o in range(5)])
    assert shell.step.recommender.learned_offsets[source_of(CLICKS, 0)] == 4

    # A leaves: B owns both; its agent reads partition 0 from the commit (10)
    await shell.on_revoked({TopicPartition(CLICKS, 1)})
    fake.assigned = {TopicPartition(CLICKS, 0), TopicPartition(CLICKS, 1), TopicPartition(FORGET, 0)}
    fake.futures.clear()
    await shell.on_assigned(fake, fake.assigned)
    [after] = fake.futures  # at once: the partition may bring no new event for a batch to do it
    await after
    replayed = [[Gap(CLICKS, 0, 5, 10), Gap(FORGET, 0, 0, 2)] if learn_all else [Gap(FORGET, 0, 0, 2)]]
    assert calls == replayed and shell.step.recommender.n_learned == (10 if learn_all else 5)
    await shell.handle_taken(fake, [_event(message(o, fake.consumer_generation_id)) for o in range(10, 15)])
    assert calls == replayed  # once
    # 0-4 by the reader, 5-9 replayed, 10-14 by the agent
    assert shell.step.recommender.n_learned == (15 if learn_all else 10)
    assert "models: ok" in shell.health.readiness()[1]  # unready only while it learned them


async def test_a_replay_that_failed_at_start_is_tried_again_before_the_first_batch(monkeypatch):
    store = InMemoryUserStateStore()
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10}, calls, [TimeoutError("no records within 30 s")])
    shell = unplugged_shell(Settings.from_env(ENV), store)
    models = shell.step.recommender
    models.learned_offsets[source_of(CLICKS, 0)] = 4  # as restored from a snapshot
    fake = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    shell.restored.set()
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_once")  # fails: logged, the worker serves on
    assert shell.models_ready.is_set() and models.n_learned == 0
    await shell.handle_taken(fake, [_event(message(o, fake.consumer_generation_id)) for o in range(10, 12)])
    assert calls == [[Gap(CLICKS, 0, 5, 10)]] * 2
    assert models.n_learned == 5 + 2


def no_waits(monkeypatch) -> None:
    """A replay that failed before a batch is tried again at once (not after REPLAY_RETRY's back-off)."""
    monkeypatch.setattr(shell_module, "REPLAY_RETRY", Backoff(base_s=0.0, jitter=0.0), raising=False)


async def restored_short_of_the_commit():
    """A worker whose models, restored, learned clicks[0] up to offset 4 while the group committed
    10; its replay at start has run (and failed, as ``kafka_log`` makes it); and a batch of
    offsets 10-11 of the new generation: (shell, models, app, batch)."""
    shell = unplugged_shell(Settings.from_env(ENV), InMemoryUserStateStore())
    models = shell.step.recommender
    models.learned_offsets[source_of(CLICKS, 0)] = 4  # as restored from a snapshot
    fake = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    shell.restored.set()
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_once")  # fails: logged, the worker serves on
    return shell, models, fake, [_event(message(o, fake.consumer_generation_id)) for o in range(10, 12)]


async def test_a_replay_that_fails_again_before_the_first_batch_holds_the_batch_until_it_is_learned(monkeypatch):
    """A worker started while the broker restarts: its replay fails at start, and again before
    its first batch (fetched before the broker went). The batch waits (it could not publish
    either) and the replay is tried until the models learned the events between their snapshot
    and the commit. Before, the second failure was the last: the batch moved the models past
    those events (a partition's learned offset is its highest), and neither they nor any worker
    restoring their next snapshot ever learned them (found by a chaos soak, 8 of 177,252 events)."""
    no_waits(monkeypatch)
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10}, calls,
              [TimeoutError("no records within 30 s"), ServiceUnavailable("Kafka at b:9092 refused the connection"),
               ServiceUnavailable("Kafka at b:9092 refused the connection")])
    shell, models, fake, batch = await restored_short_of_the_commit()
    await shell.handle_taken(fake, batch)
    assert calls == [[Gap(CLICKS, 0, 5, 10)]] * 4  # at start, then before the batch until it worked
    assert models.n_learned == 5 + 2 and models.learned_offsets[source_of(CLICKS, 0)] == 11
    assert len(batch) == 2  # handled: take_batches acknowledges it
    assert shell.replay_due == frozenset() and "models: ok" in shell.health.readiness()[1]


async def test_a_replay_that_raises_a_bug_before_a_batch_is_not_retried_and_the_batch_is_handled(monkeypatch, caplog):
    """Only Kafka away or slow is waited out: a replay that raises what no retry mends (a bug)
    would otherwise hold every batch of the worker for ever. The models go on without those
    events, as they did before retries, and the error says so."""
    no_waits(monkeypatch)
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10}, calls, [RuntimeError("a bug in the replay")] * 100)
    shell, models, fake, batch = await restored_short_of_the_commit()
    await asyncio.wait_for(shell.handle_taken(fake, batch), 5)
    # at start, then once before the batch (as before retries), then handled with the gap left out
    assert len(calls) == 2 and len(batch) == 2 and models.n_learned == 2
    assert "not an outage of Kafka" in caplog.text


async def test_a_rebalance_while_the_replay_before_a_batch_is_retried_leaves_the_batch_unhandled(monkeypatch, caplog):
    """The broker stays away: the replay before the batch keeps failing, and a rebalance comes.
    The revocation does not wait out its limit for the batch, which is left unhandled and
    unacknowledged (its partitions' owner reads it again from the commit), the models stay
    short of the gap, and the replay is due again for the next assignment."""
    no_waits(monkeypatch)
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10}, calls, [ServiceUnavailable("Kafka at b:9092 refused the connection")] * 10_000)
    shell, models, fake, batch = await restored_short_of_the_commit()
    handling = asyncio.ensure_future(shell.handle_taken(fake, batch))
    for _ in range(200):
        await asyncio.sleep(0.01)
        if len(calls) >= 3:
            break
    assert len(calls) >= 3 and not handling.done()  # the batch waits while the replay is tried again
    assert "models: FAIL" in shell.health.readiness()[1]
    t0 = time.monotonic()
    await shell.on_revoked(set(fake.assigned))
    assert time.monotonic() - t0 < 1.0 and "did not finish" not in caplog.text
    await asyncio.wait_for(handling, 5)
    assert batch == []  # take_batches acknowledges nothing of it
    assert models.n_learned == 0 and models.learned_offsets[source_of(CLICKS, 0)] == 4
    assert frozenset(shell.settings.topics.inputs) <= shell.replay_due


async def test_no_snapshot_while_the_forget_requests_replay_failed_at_start(monkeypatch, caplog):
    """The restored models may still hold a user erased after their snapshot was taken: until the
    replay of the forget requests has run, an interval snapshot (or one after a peer's erasure)
    would put them back over the store's snapshot, which another worker may have taken clean."""
    store = InMemoryUserStateStore()
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10, (FORGET, 0): 1}, calls, [TimeoutError("no records within 30 s")] * 2)
    shell = unplugged_shell(Settings.from_env({**ENV, "STREAMREC_SNAPSHOT_FORK": "false"}), store)
    clean = shell.step.recommender.snapshot()
    await store.set_blob(SNAPSHOT_KEY, clean)  # another worker's, taken after the erasure
    fake = FakeApp({TopicPartition(CLICKS, 0), TopicPartition(FORGET, 0)}, shell.generation())
    shell.restored.set()
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_once")  # fails: logged, the worker serves on
    shell.step.relearn([decode(o) for o in range(3)], [(source_of(CLICKS, 1), o) for o in range(3)])
    shell.forgets_pending.set()  # a peer's erasure: the one-second timer asks for a snapshot
    for _ in range(2):  # the first tries the replay again (it fails too), the rest wait FORGET_RETRY_S
        await shell.snapshot_soon()
        await shell.snapshot_models()
    assert await store.get_blob(SNAPSHOT_KEY) == clean and len(calls) == 2
    assert caplog.text.count("not snapshotting the models") == 1  # said once, not every second
    shell.forget_retry_at = 0.0  # FORGET_RETRY_S later
    await shell.handle_taken(fake, [_event(message(10, fake.consumer_generation_id))])  # replays first
    await shell.snapshot_models()
    assert len(calls) == 3 and shell.step.recommender.n_learned == 4
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 4


async def test_a_failed_replay_of_forget_requests_is_tried_again_from_where_the_models_stood(monkeypatch):
    """A takeover's replay of the forget requests the peer reader had not read yet fails: they
    are tried again later from the offset the models had learned then, though this worker's own
    batch moved that partition's offset past them meanwhile, and no snapshot is taken until
    then (the models still hold the erased user). Before, the failure was logged and the
    erasure was never applied to these models."""
    env = {**ENV, "STREAMREC_LEARN_ALL_PARTITIONS": "false", "STREAMREC_SNAPSHOT_FORK": "false"}
    topics = Settings.from_env(env).topics
    store = InMemoryUserStateStore()
    forget0 = source_of(FORGET, 0)

    def request(offset: int) -> ForgetRequest:
        return ForgetRequest(user_id=f"u{offset}", request_id=f"r{offset}", ts=1_700_000_000_000 + 10 * offset)

    committed = {(FORGET, 0): 2}  # the old owner carried out the requests at offsets 0 and 1
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: dict(committed))
    calls: list = []
    fail = [TimeoutError("no records within 30 s")]

    async def replay(step, kafka, todo, bounds, **kw):
        calls.append(list(todo))
        if fail:
            raise fail.pop()
        for gap in todo:
            step.forget([request(o) for o in range(gap.start, gap.end)],
                        [(source_of(gap.topic, gap.partition), o) for o in range(gap.start, gap.end)])
        return 0

    monkeypatch.setattr(shell_module, "replay", replay)
    shell = unplugged_shell(Settings.from_env(env), store)
    models = shell.step.recommender
    models.learned_offsets[forget0] = 0  # the peer reader had read the request at offset 0 only
    # users the models learned (u1 is erased at offset 1, u3 never)
    shell.step.relearn([ClickEvent(event_id=f"e-{uid}", user_id=uid, item_id="i1", ts=1_700_000_000_000)
                        for uid in ("u1", "u3")], [(source_of(CLICKS, 1), 0), (source_of(CLICKS, 1), 1)])
    fake = FakeApp({TopicPartition(CLICKS, 1), TopicPartition(FORGET, 1)}, shell.generation())
    shell.replayed = True  # past the first assignment: this one is a rebalance
    shell.models_ready.set()
    fake.assigned = {TopicPartition(CLICKS, 0), TopicPartition(CLICKS, 1), TopicPartition(FORGET, 0),
                     TopicPartition(FORGET, 1)}
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_after_rebalance")  # fails
    assert calls == [[Gap(FORGET, 0, 1, 2)]] and not models.refuses("u1", 1_700_000_000_000)

    # this worker's own batch carries out the request at offset 2 and moves the partition past 1
    await shell.handle_taken(fake, [_event(RawMessage(topics.forget, 0, 2, b"u2", encode(request(2)), None,
                                                      fake.consumer_generation_id))])
    committed[(FORGET, 0)] = 3
    assert models.learned_offsets[forget0] == 2
    await shell.snapshot_models()
    assert await store.get_blob(SNAPSHOT_KEY) is None  # not while the models may hold u1
    await shell.handle_taken(fake, [_event(message(20, fake.consumer_generation_id))])
    assert len(calls) == 1  # not before FORGET_RETRY_S
    shell.forget_retry_at = 0.0  # FORGET_RETRY_S later
    await shell.handle_taken(fake, [_event(message(21, fake.consumer_generation_id))])
    assert calls[1] == [Gap(FORGET, 0, 1, 3)] and models.refuses("u1", 1_700_000_000_000)
    assert not models.refuses("u3", 1_700_000_000_000) and shell.forget_floors == {}
    await shell.snapshot_models()
    assert await store.get_blob(SNAPSHOT_KEY) is not None


async def test_an_idle_worker_retries_a_failed_forget_replay_at_its_snapshot(monkeypatch):
    """No batch comes to an idle worker: its snapshot timer tries the replay again (at most every
    FORGET_RETRY_S), and snapshots once it has run."""
    env = {**ENV, "STREAMREC_LEARN_ALL_PARTITIONS": "false", "STREAMREC_SNAPSHOT_FORK": "false"}
    store = InMemoryUserStateStore()
    calls: list = []
    kafka_log(monkeypatch, {(FORGET, 0): 2}, calls, [TimeoutError("no records within 30 s")])
    shell = unplugged_shell(Settings.from_env(env), store)
    shell.step.recommender.learned_offsets[source_of(FORGET, 0)] = 0
    shell.replayed = True
    shell.models_ready.set()
    fake = FakeApp({TopicPartition(CLICKS, 0), TopicPartition(FORGET, 0)}, shell.generation())
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_after_rebalance")  # fails
    await shell.snapshot_models()  # within FORGET_RETRY_S: not tried, no snapshot
    assert len(calls) == 1 and await store.get_blob(SNAPSHOT_KEY) is None
    shell.forget_retry_at = 0.0
    await shell.snapshot_models()
    assert calls == [[Gap(FORGET, 0, 1, 2)]] * 2 and await store.get_blob(SNAPSHOT_KEY) is not None


def decode(offset: int):
    return decode_event(click(offset)[1])


def _event(msg: RawMessage):
    """A Faust event as take_batches hands it over: what raw_message and drop_stale read."""
    return SimpleNamespace(message=SimpleNamespace(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                                   key=msg.key, value=msg.value, timestamp=None,
                                                   generation_id=msg.generation, tp=TopicPartition(msg.topic, msg.partition),
                                                   headers=None))


def fetching_nothing(monkeypatch, position: int) -> None:
    """The replay's reader: every fetch returns nothing, and the position stays at ``position``."""
    class Consumer:
        def assign(self, tps):
            pass

        def seek(self, tp, offset):
            pass

        async def getmany(self, *tps, timeout_ms):
            return {}

        async def position(self, tp):
            return position

        async def stop(self):
            pass

    async def started_reader(*args, **kw):
        return Consumer()

    monkeypatch.setattr(replay_module, "started_reader", started_reader)


async def _sink(records):
    return []


async def test_a_gap_kafka_holds_no_records_for_closes_without_waiting_for_the_timeout(monkeypatch):
    """Offsets with no records behind them (a transactional producer's commit markers, a
    compacted or truncated stretch): the reader's position passes them with nothing fetched,
    and the replay ends there instead of failing after its fetch timeout."""
    fetching_nothing(monkeypatch, position=10)  # past the markers at 8 and 9
    step = RecommendationStep(Recommender.default())
    step.recommender.learned_offsets[source_of(CLICKS, 0)] = 7
    started = time.monotonic()
    assert await replay_module.replay(step, "unused:9092", [Gap(CLICKS, 0, 8, 10)], Bounds(), fetch_timeout_s=5) == 0
    assert time.monotonic() - started < 2.5
    assert step.recommender.learned_offsets[source_of(CLICKS, 0)] == 9


class SlowStore(InMemoryUserStateStore):
    """A store whose snapshot read waits for ``answer`` (Redis slow, or away at start)."""

    def __init__(self):
        super().__init__()
        self.answer = asyncio.Event()

    async def get_blob(self, name):
        await self.answer.wait()
        return await super().get_blob(name)


async def idle_loop() -> None:
    """Let every ready task run until each waits on something."""
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_rebalance_before_the_snapshot_is_restored_replays_into_the_restored_models(monkeypatch):
    """A second rebalance while the snapshot is still being read: its replay waits for the
    restored models (into the start-up models, what it learned, a forget request say, would be
    lost with them), and the models stay unready meanwhile."""
    store = SlowStore()
    settings = Settings.from_env(ENV)
    snapshot = Recommender.default()  # the store's snapshot: partition 0 learned up to offset 4
    RecommendationStep(snapshot).relearn([decode(o) for o in range(5)], [(source_of(CLICKS, 0), o) for o in range(5)])
    shell = unplugged_shell(settings, store)
    await InMemoryUserStateStore.set_blob(store, shell.snapshots.name, snapshot.snapshot(shell.snapshots.signing_key))
    calls: list = []
    kafka_log(monkeypatch, {(CLICKS, 0): 10}, calls, [])
    restore = asyncio.ensure_future(shell.restore_models())  # the app's on_start
    fake = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    await shell.on_assigned(fake, fake.assigned)
    first = [asyncio.ensure_future(f) for f in fake.futures if f.__name__ == "replay_once"]
    [f.close() for f in fake.futures if f.__name__ != "replay_once"]
    fake.futures.clear()
    await shell.on_revoked(set(fake.assigned))  # a second worker joins and leaves again
    await shell.on_assigned(fake, fake.assigned)
    [after] = [asyncio.ensure_future(f) for f in fake.futures if f.__name__ == "replay_after_rebalance"]
    [f.close() for f in fake.futures if f.__name__ != "replay_after_rebalance"]
    asked = threading.Event()  # the replay's first step: the group's committed offsets, read in a thread
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: asked.set() or {(CLICKS, 0): 10})
    assert not await asyncio.to_thread(asked.wait, 1.0)  # not within a second: it waits for the restore
    await idle_loop()
    assert calls == [] and not after.done()
    assert "models: FAIL" in shell.health.readiness()[1]
    store.answer.set()
    await asyncio.wait_for(asyncio.gather(restore, after, *first), 10)
    models = shell.step.recommender
    assert models is not snapshot and models.learned_offsets[source_of(CLICKS, 0)] == 9
    assert models.n_learned == 10 and calls == [[Gap(CLICKS, 0, 5, 10)]]
    assert "models: ok" in shell.health.readiness()[1]


async def replay_in_hand(shell, monkeypatch):
    """The shell assigned clicks[0] with its models restored at offset 4 and the commit at 10:
    its replay of 5-9 running (it fetches until asked to stop), ``(fake app, the replay's future)``."""
    shell.step.recommender.learned_offsets[source_of(CLICKS, 0)] = 4  # as restored from a snapshot
    shell.restored.set()
    started = asyncio.Event()

    async def replay(step, kafka, todo, bounds, stop, **kw):
        started.set()
        while not stop():
            await asyncio.sleep(0.01)  # a fetch
        return 0

    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: {(CLICKS, 0): 10})
    monkeypatch.setattr(shell_module, "replay", replay)
    fake = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    await shell.on_assigned(fake, fake.assigned)
    [first] = [asyncio.ensure_future(f) for f in fake.futures if f.__name__ == "replay_once"]
    [f.close() for f in fake.futures if f.__name__ != "replay_once"]
    await asyncio.wait_for(started.wait(), 5)
    return fake, first


async def test_a_revocation_stops_a_replay_in_hand_and_it_goes_on_after_the_assignment(monkeypatch, caplog):
    """A long replay holds the batch lock; a revocation must not wait for it (the group waits on
    this worker meanwhile) nor warn of a batch in hand: the replay stops where it is, and is due
    again once the partitions are assigned."""
    shell = unplugged_shell(Settings.from_env(ENV), InMemoryUserStateStore())
    fake, first = await replay_in_hand(shell, monkeypatch)
    t0 = time.monotonic()
    await shell.on_revoked(set(fake.assigned))
    assert time.monotonic() - t0 < 1.0 and "did not finish" not in caplog.text
    await first
    assert shell.replay_due == frozenset(shell.settings.topics.consumed)
    assert shell.models_ready.is_set() and "models: ok" in shell.health.readiness()[1]


async def test_a_replay_asked_to_stop_ends_between_fetches_without_moving_the_models_past_the_gap(monkeypatch):
    asked: list = []

    fetching_nothing(monkeypatch, position=8)  # a slow broker: nothing yet
    step = RecommendationStep(Recommender.default())
    step.recommender.learned_offsets[source_of(CLICKS, 0)] = 7
    assert await replay_module.replay(step, "unused:9092", [Gap(CLICKS, 0, 8, 10)], Bounds(),
                                      stop=lambda: asked.append(1) or len(asked) > 2) == 0
    assert len(asked) == 3 and step.recommender.learned_offsets[source_of(CLICKS, 0)] == 7


async def forget_partition_given_away(monkeypatch, **env: str):
    """A taken-over forget partition (forget[0]) whose replay fails, then this worker's own batch
    moves it past the requests its models never applied, then a revocation: ``(shell, fake app)``,
    the app's next assignment leaving forget[0] to another worker."""
    env = {**ENV, "STREAMREC_LEARN_ALL_PARTITIONS": "false", "STREAMREC_SNAPSHOT_FORK": "false", **env}
    forget0 = source_of(FORGET, 0)
    kafka_log(monkeypatch, {(FORGET, 0): 2, (FORGET, 1): 0}, [], [TimeoutError("no records within 30 s")])
    shell = unplugged_shell(Settings.from_env(env), InMemoryUserStateStore())
    models = shell.step.recommender
    models.learned_offsets[forget0] = 0  # the peer reader had read the request at offset 0 only
    shell.replayed = True  # past the first assignment: this one is a rebalance
    shell.restored.set()
    shell.models_ready.set()
    fake = FakeApp({TopicPartition(CLICKS, 0), TopicPartition(FORGET, 0), TopicPartition(FORGET, 1)}, shell.generation())
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_after_rebalance")  # fails: the floor of forget[0] is 0
    assert shell.forget_floors == {forget0: 0, source_of(FORGET, 1): -1}
    request = ForgetRequest(user_id="u2", request_id="r2", ts=1_700_000_000_020)
    await shell.handle_taken(fake, [_event(RawMessage(shell.settings.topics.forget, 0, 2, b"u2", encode(request), None,
                                                      fake.consumer_generation_id))])
    assert models.learned_offsets[forget0] == 2
    await shell.on_revoked(set(fake.assigned))
    fake.assigned = {TopicPartition(CLICKS, 1), TopicPartition(FORGET, 1)}  # forget[0] is another worker's now
    fake.futures.clear()
    return shell, fake


async def test_a_failed_forget_replay_of_a_partition_given_away_is_left_to_the_peer_reader_from_its_floor(monkeypatch):
    """The replay of a taken-over forget partition fails, this worker's own batch moves that
    partition past the requests its models never applied, then a rebalance gives the partition
    to another worker: the peer reader, which reads the others' forget partitions from the
    models' watermark, must start at the failure's floor. Before, the floor was dropped with the
    next successful replay of the partitions still owned, and the models kept the erased user."""
    shell, fake = await forget_partition_given_away(monkeypatch)
    models = shell.step.recommender
    await shell.on_assigned(fake, fake.assigned)
    assert shell.forget_floors == {source_of(FORGET, 1): -1}  # still this worker's: its own retry
    assert models.learned_offsets[source_of(FORGET, 0)] == 0
    assert start_offsets([(FORGET, 0)], models.learned_offsets, {}) == {(FORGET, 0): 1}
    for future in fake.futures:
        future.close()


async def test_floors_a_busy_rebalance_could_not_hand_over_go_to_the_peer_reader_with_the_next_lock(monkeypatch):
    """The same, but the rebalance cannot take the models' lock in time (a replay or a snapshot
    holds it): the floor stays until the next holder of the lock (here the snapshot timer)
    hands it over, and the peer reader is told the assignment again, so that it starts there."""
    # the rebalance waits a quarter of the session timeout for the lock: 0.25 s
    shell, fake = await forget_partition_given_away(monkeypatch, STREAMREC_KAFKA_SESSION_TIMEOUT_S="1")
    models, forget0 = shell.step.recommender, source_of(FORGET, 0)
    await shell.busy.acquire()  # held through the rebalance
    await shell.on_assigned(fake, fake.assigned)
    shell.busy.release()
    assert forget0 in shell.forget_floors and models.learned_offsets[forget0] == 2
    told = shell.peers._version
    await shell.snapshot_models()
    assert forget0 not in shell.forget_floors and models.learned_offsets[forget0] == 0
    assert shell.peers._version > told  # the reader starts again from the watermark: forget[0] from offset 1
    for future in fake.futures:
        future.close()


async def test_a_stop_signal_stops_a_replay_in_hand_and_leaves_the_waiting_batch_unhandled(monkeypatch, caplog):
    """SIGTERM during a long replay (a start from an old snapshot, a takeover): the drain waits
    for the batch lock, which the replay holds, and the replay stopped only for a revocation, so
    the drain ran out its 30 s and said the batch in hand did not finish (a pod's grace period
    spent on learning the worker then throws away). It stops the replay as a revocation does;
    and the batch that waited for the lock is not handled after a replay cut short (it would
    move the models past the events they missed): it stays unacknowledged, delivered again."""
    caplog.set_level(logging.INFO, "streamrec.app")
    store = InMemoryUserStateStore()
    shell = unplugged_shell(Settings.from_env(ENV), store)
    fake, first = await replay_in_hand(shell, monkeypatch)
    batch = [_event(message(10, fake.consumer_generation_id))]
    waiting = asyncio.ensure_future(shell.handle_taken(fake, batch))  # taken before the signal
    await idle_loop()
    t0 = time.monotonic()
    assert await shell.drain(timeout_s=3.0)
    assert time.monotonic() - t0 < 1.0
    await asyncio.wait_for(asyncio.gather(first, waiting), 5)
    assert batch == []  # take_batches acknowledges nothing of it
    assert shell.step.recommender.learned_offsets[source_of(CLICKS, 0)] == 4  # not past the gap 5-9
    assert (await store.load_many(["u1"]))["u1"].clicks == 0
    assert "then stopped for the worker's stop" in caplog.text
    assert "shutting down: a batch of 1 event(s) that waited for the models is left unhandled" in caplog.text


async def test_a_batch_of_the_new_assignment_waits_until_the_replay_is_due(monkeypatch):
    """A worker paused past its session timeout (SIGSTOP, a long GC pause) loses its partition
    to another worker, which handles and commits offsets 5-9 meanwhile; resumed, it is assigned
    the partition again. Faust resumes the flow while the assignment callback still waits on
    Redis and the broker (the claim, the topics' ids), so the agent's first batch (10-11) came
    before the callback had marked the replay due: the models learned it, their watermark passed
    5-9 for good, and the replay that followed found nothing to learn (a chaos soak: 1,883 of
    117,857 events never learned by either worker's models, which snapshot the watermark)."""
    calls: list = []
    committed = {(CLICKS, 0): 5}
    kafka_log(monkeypatch, committed, calls, [])
    store = InMemoryUserStateStore()
    claimed = asyncio.Event()
    claimed.set()
    claim = store.claim

    async def slow_claim(partitions):
        await claimed.wait()
        return await claim(partitions)

    store.claim = slow_claim
    shell = unplugged_shell(Settings.from_env(ENV), store)
    models = shell.step.recommender
    models.learned_offsets[source_of(CLICKS, 0)] = 4  # learned up to the commit as it stood
    fake = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    shell.restored.set()
    await shell.on_revoked(set())
    await shell.on_assigned(fake, fake.assigned)
    await run_futures(fake, "replay_once")
    assert calls == [] and shell.models_ready.is_set()

    # paused: the other worker handled 5-9 and committed 10; resumed, the partition is this worker's again
    committed[(CLICKS, 0)] = 10
    await shell.on_revoked(set(fake.assigned))
    fake.futures.clear()
    claimed.clear()  # Redis answers the assignment's claim late
    assigning = asyncio.ensure_future(shell.on_assigned(fake, fake.assigned))
    await idle_loop()
    batch = [_event(message(o, fake.consumer_generation_id)) for o in range(10, 12)]  # the flow resumed meanwhile
    handling = asyncio.ensure_future(shell.handle_taken(fake, batch))
    await idle_loop()
    claimed.set()
    await asyncio.wait_for(assigning, 5)
    await asyncio.wait_for(handling, 5)
    await run_futures(fake, "replay_after_rebalance")
    assert calls == [[Gap(CLICKS, 0, 5, 10)]]  # before the batch
    assert models.n_learned == 5 + 2 and models.learned_offsets[source_of(CLICKS, 0)] == 11
    assert len(batch) == 2  # handled: take_batches acknowledges it
