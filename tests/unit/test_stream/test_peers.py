"""The arithmetic of learning the other workers' partitions (stream/peers.py): which partitions
a worker reads, where it starts each, and that what it learns it learns once, in the watermark's
terms, whatever the order of assignments and fetches."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from online_models import Recommender
from stream.peers import PeerLearner, RecentKeys, foreign_partitions, start_offsets
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import Bounds, ClickEvent, ForgetRequest, encode
from stream.replay import Gap, gaps
from stream.settings import Settings
from stream.shell import input_partitions

TOPICS = ("s.clicks", "s.purchases")


@given(n_partitions=st.integers(1, 12), owners=st.lists(st.integers(0, 5), min_size=12, max_size=12))
def test_every_partition_is_owned_by_one_worker_and_read_by_every_other(n_partitions, owners):
    """However the group spreads the partitions over workers, each partition is learned by its
    owner's step and by every other worker's reader: each worker's models see all of them."""
    workers = sorted(set(owners[:n_partitions]))
    partitions = {t: range(n_partitions) for t in TOPICS}
    owned = {w: {(t, p) for t in TOPICS for p in range(n_partitions) if owners[p] == w} for w in workers}
    everything = {(t, p) for t in TOPICS for p in range(n_partitions)}
    for w in workers:
        foreign = foreign_partitions(partitions, owned[w])
        assert foreign.isdisjoint(owned[w])
        assert foreign | owned[w] == everything
    for tp in everything:
        assert sum(tp in foreign_partitions(partitions, owned[w]) for w in workers) == len(workers) - 1


def test_a_lone_worker_reads_nothing_and_other_topics_do_not_count():
    partitions = {"s.clicks": range(2)}
    assert foreign_partitions(partitions, {("s.clicks", 0), ("s.clicks", 1), ("leader", 0)}) == set()
    assert foreign_partitions(partitions, set()) == {("s.clicks", 0), ("s.clicks", 1)}


def test_each_partition_starts_after_the_watermark_else_at_the_committed_offset_else_at_the_beginning():
    starts = start_offsets([("s.clicks", 0), ("s.clicks", 1), ("s.clicks", 2), ("s.purchases", 0)],
                           {"s.clicks:0": 99, "s.clicks:3": 5},
                           {("s.clicks", 0): 40, ("s.clicks", 1): 17})
    assert starts == {("s.clicks", 0): 100,  # the watermark wins over an older commit
                      ("s.clicks", 1): 17,  # never learned: where the group's owner resumes
                      ("s.clicks", 2): None, ("s.purchases", 0): None}  # nothing committed: the beginning


def test_recent_keys_stay_bounded_and_remember_the_latest():
    keys = RecentKeys(size=100)
    for i in range(1000):
        keys.add(("u", str(i)))
    assert len(keys) <= 200
    assert ("u", "999") in keys and ("u", "900") in keys and ("u", "0") not in keys


def test_input_partitions_come_from_the_groups_metadata_else_from_the_settings():
    settings = Settings.from_env({"STREAMREC_TOPIC_PREFIX": "s.", "STREAMREC_PARTITIONS": "3"})
    tp = SimpleNamespace
    app = SimpleNamespace(consumer=SimpleNamespace(topic_partitions=lambda t: {"s.clicks": 8}.get(t)))
    got = input_partitions(app, settings, [tp(topic="s.purchases", partition=4)])
    assert got == {"s.clicks": range(8), "s.purchases": range(5), "s.forget": range(3), "s.impressions": range(3),
                   "s.searches": range(3)}


# -- learning a fetched chunk -----------------------------------------------------------


class Fetched:
    """What the reader's consumer reports after its fetches: each partition's high-water mark
    and position (a partition not fetched from yet has neither)."""

    def __init__(self, fetched: dict[tuple[str, int], tuple[int, int]]) -> None:
        self.fetched = fetched  # (topic, partition): (high-water mark, position)

    def highwater(self, tp) -> int | None:
        return self.fetched.get((tp.topic, tp.partition), (None, None))[0]

    async def position(self, tp) -> int:
        return self.fetched[(tp.topic, tp.partition)][1]  # a KeyError: asked of one not fetched (it would wait)


def record(offset: int, value: bytes) -> SimpleNamespace:
    return SimpleNamespace(offset=offset, value=value)


def click(i: int, user: str = "u1") -> bytes:
    return encode(ClickEvent(event_id=f"e{i}", user_id=user, item_id=f"i{i % 7}", ts=1_700_000_000_000 + i))


def reader(step: RecommendationStep, metrics: Metrics) -> PeerLearner:
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, TOPICS, Bounds(), asyncio.Lock(), metrics, committed=dict)
    peers.assign({("s.clicks", 0), ("s.purchases", 0)}, {t: range(2) for t in TOPICS})
    peers.reading = frozenset({("s.clicks", 1), ("s.purchases", 1)})
    return peers


async def test_a_chunk_is_learned_once_above_the_watermark_and_moves_it_past_values_that_do_not_decode():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    step.recommender.learned_offsets["s.clicks:1"] = 4  # 0-4 learned already (the owner's step, before a move)
    peers = reader(step, metrics)
    tp = TopicPartition("s.clicks", 1)
    batch = {tp: [record(i, click(i)) for i in range(3, 10)] + [record(10, b"not json")]}
    await peers._learn(batch, peers._version)
    assert step.recommender.n_learned == 5  # offsets 5-9
    assert step.recommender.learned_offsets["s.clicks:1"] == 10  # past the dead letter too
    await peers._learn(batch, peers._version)  # fetched again: nothing new
    assert step.recommender.n_learned == 5
    assert metrics.peer_events_learned._value.get() == 5


async def test_the_lag_is_the_high_water_mark_less_the_position_so_a_transactions_trailing_marker_counts_nothing():
    peers = reader(RecommendationStep(Recommender.default()), Metrics())
    peers.reading = frozenset({("s.clicks", 1), ("s.purchases", 1), ("s.clicks", 3)})  # s.clicks[3]: not fetched yet
    # s.clicks[1]: records up to offset 9, then a commit marker (10), which no record stands
    # behind: the position is past it; s.purchases[1]: offsets 5-7 still to come
    await peers._measure_lag(Fetched({("s.clicks", 1): (11, 11), ("s.purchases", 1): (8, 5)}))
    assert peers._lag == {("s.clicks", 1): 0, ("s.purchases", 1): 3}


async def test_an_event_the_owner_refuses_by_its_clock_is_not_learned_by_the_others_either():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = reader(step, metrics)
    ahead = encode(ClickEvent(event_id="e9", user_id="u1", item_id="i9", ts=time.time_ns() // 1_000_000 + 30 * 86_400_000))
    batch = {TopicPartition("s.clicks", 1): [record(0, click(0)), record(1, ahead)]}
    await peers._learn(batch, peers._version)
    assert step.recommender.n_learned == 1  # the owner dead-letters the event a month ahead (ts_out_of_window)
    assert step.recommender.learned_offsets["s.clicks:1"] == 1


async def test_an_event_from_ahead_of_the_clock_is_learned_by_the_others_as_of_their_clock():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = reader(step, metrics)
    before = time.time_ns() // 1_000_000
    ahead = encode(ClickEvent(event_id="e9", user_id="u1", item_id="i9", ts=before + 1_800_000))  # within the hour
    await peers._learn({TopicPartition("s.clicks", 1): [record(0, ahead)]}, peers._version)
    assert step.recommender.n_learned == 1
    assert before <= step.recommender.learners["trending"]._max_ts <= time.time_ns() // 1_000_000  # as its owner learns it


async def test_an_old_event_the_owner_took_is_learned_by_the_others_whatever_the_age_bound():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, TOPICS, Bounds(max_age_ms=60_000), asyncio.Lock(),
                        metrics, committed=dict)
    peers.assign({("s.clicks", 0), ("s.purchases", 0)}, {t: range(2) for t in TOPICS})
    peers.reading = frozenset({("s.clicks", 1), ("s.purchases", 1)})
    now = time.time_ns() // 1_000_000  # read again two minutes after the owner took it, with a minute's bound
    old = encode(ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=now - 120_000))
    await peers._learn({TopicPartition("s.clicks", 1): [record(0, old)]}, peers._version)
    assert step.recommender.n_learned == 1


async def test_a_chunk_fetched_before_a_rebalance_is_dropped_and_owned_partitions_are_never_learned():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = reader(step, metrics)
    foreign = TopicPartition("s.clicks", 1)
    owned = TopicPartition("s.clicks", 0)
    version = peers._version
    peers.pause()  # a rebalance began after the fetch
    await peers._learn({foreign: [record(i, click(i)) for i in range(3)]}, version)
    assert step.recommender.n_learned == 0 and step.recommender.learned_offsets == {}
    await peers._learn({owned: [record(i, click(i)) for i in range(3)]}, peers._version)
    assert step.recommender.n_learned == 0 and step.recommender.learned_offsets == {}


async def test_learning_waits_for_the_batch_in_hand():
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = reader(step, metrics)
    tp = TopicPartition("s.clicks", 1)
    async with peers.lock:  # a batch is being handled
        learning = asyncio.ensure_future(peers._learn({tp: [record(0, click(0))]}, peers._version))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not learning.done() and step.recommender.n_learned == 0
    await learning
    assert step.recommender.n_learned == 1


def test_the_metrics_count_what_each_learner_learned():
    metrics, model = Metrics(), Recommender.default()
    metrics.watch_models(lambda: model)
    assert metrics.registry.get_sample_value("streamrec_model_events_learned", {"model": "recommender"}) == 0
    step = RecommendationStep(model)
    step.relearn([ClickEvent(event_id="e", user_id="u", item_id="i", ts=1)], [("s.clicks:0", 0)])
    for name in ("recommender", *model.learners):
        assert metrics.registry.get_sample_value("streamrec_model_events_learned", {"model": name}) == 1


async def test_the_back_off_starts_short_again_after_the_reader_recovered(monkeypatch):
    """Failures in a row wait longer each time; a failure after a long good run waits the
    shortest time again, not what the last outage had grown to."""
    import stream.peers as peers_module
    from stream.retry import Backoff

    clock = [0.0]
    monkeypatch.setattr(peers_module.time, "monotonic", lambda: clock[0])
    waits: list[float] = []

    async def sleep(delay):
        waits.append(delay)

    monkeypatch.setattr(peers_module.asyncio, "sleep", sleep)
    runs = iter([0.0, 0.0, 0.0, 3600.0, 0.0, None])  # how long each _read runs before failing; None: cancelled

    async def read():
        ran = next(runs)
        if ran is None:
            raise asyncio.CancelledError
        clock[0] += ran
        raise ConnectionError("broker gone")

    step = RecommendationStep(Recommender.default(), None)
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, TOPICS, Bounds(), asyncio.Lock(),
                        Metrics(CollectorRegistry()), committed=dict,
                        backoff=Backoff(base_s=0.5, cap_s=30.0, jitter=0.0))
    peers._read = read
    ready = asyncio.Event()
    ready.set()
    try:
        await peers.run(ready)
    except asyncio.CancelledError:
        pass
    assert waits == [0.5, 1.0, 2.0, 0.5, 1.0]


async def test_the_models_know_a_partition_from_where_the_reader_starts_it_so_a_takeover_replays_from_there():
    """A fresh worker (no snapshot) starts reading another's partition at the group's commit (7)
    and has learned nothing of it when the partition becomes its own at a later commit (12):
    the events 7-11 are replayed then, where with no watermark the models skipped them."""
    class Consumer:
        def assign(self, tps):
            self.assigned = set(tps)

        def seek(self, tp, offset):
            pass

    step = RecommendationStep(Recommender.default())
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, TOPICS, Bounds(), asyncio.Lock(), Metrics(),
                        committed=lambda: {("s.clicks", 1): 7})
    peers.assign({("s.clicks", 0), ("s.purchases", 0)}, {t: range(2) for t in TOPICS})
    await peers._apply(Consumer(), peers._version)
    assert step.recommender.learned_offsets == {"s.clicks:1": 6, "s.purchases:1": -1}
    assert gaps(step.recommender.learned_offsets, {("s.clicks", 1): 12, ("s.purchases", 1): 3}) == [
        Gap("s.clicks", 1, 7, 12), Gap("s.purchases", 1, 0, 3)]


async def test_a_fetch_of_many_forget_requests_names_a_few_in_its_log_line_and_counts_the_rest(caplog):
    step, metrics = RecommendationStep(Recommender.default()), Metrics()
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, TOPICS, Bounds(), asyncio.Lock(), metrics,
                        committed=dict, forget_topic="s.forget")
    peers.assign({("s.clicks", 0)}, {**{t: range(2) for t in TOPICS}, "s.forget": range(2)})
    peers.reading = frozenset({("s.forget", 1)})
    now = time.time_ns() // 1_000_000
    requests = [record(n, encode(ForgetRequest(user_id=f"u{n}", request_id=f"req-{n}-" + "x" * 100, ts=now)))
                for n in range(1000)]
    with caplog.at_level("INFO", logger="streamrec.peers"):
        await peers._learn({TopicPartition("s.forget", 1): requests}, peers._version)
    [line] = [r.getMessage() for r in caplog.records if "purged" in r.getMessage()]
    assert line.startswith("purged 1000 forgotten user(s)") and "(and 995 more)" in line
    assert "req-4-" in line and "req-5-" not in line and len(line) < 1_000
