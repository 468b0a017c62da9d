"""A topic deleted and created again starts its offsets over. The users' states and the models
then hold positions of records that are gone; the worker tells the two apart by the broker's
topic ids (stream/shell.py reads them at each assignment) and applies and learns the new
topic's events, instead of passing them over as redeliveries."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from online_models import Recommender
from stream import shell as shell_module
from stream.app import create_app
from stream.errors import ServiceUnavailable
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, encode
from stream.replay import Gap
from stream.retry import Backoff
from stream.settings import Settings, TopicNames
from stream.state import InMemoryUserStateStore, incarnation

OLD = incarnation({"streamrec.clicks": "id-1", "streamrec.purchases": "id-2"})
NEW = incarnation({"streamrec.clicks": "id-3", "streamrec.purchases": "id-2"})


class Sink:
    def __init__(self) -> None:
        self.records = []

    async def __call__(self, records):
        self.records += records
        return []


def handler(step: RecommendationStep, store: InMemoryUserStateStore, tag: str | None) -> BatchHandler:
    h = BatchHandler(step, store, Sink(), TopicNames(), Metrics(CollectorRegistry()),
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0))
    h.incarnation = tag
    return h


def batch(tag: str, n: int, start: int = 0) -> list[RawMessage]:
    events = [ClickEvent(event_id=f"{tag}{i}", user_id="u1", item_id=f"i{i % 5}", ts=1_700_000_000_000 + i)
              for i in range(n)]
    return [RawMessage("streamrec.clicks", 0, start + i, b"u1", encode(ev)) for i, ev in enumerate(events)]


async def test_events_of_a_recreated_topic_are_applied_and_learned_though_their_offsets_are_lower():
    step, store = RecommendationStep(Recommender.default()), InMemoryUserStateStore()
    await handler(step, store, OLD).handle(batch("a", 30))
    assert (await store.load_many(["u1"]))["u1"].clicks == 30
    assert step.recommender.learned_offsets == {"streamrec.clicks:0": 29}
    assert step.align_topics({"streamrec.clicks": "id-1"}) == []

    assert step.align_topics({"streamrec.clicks": "id-3"}) == ["streamrec.clicks"]  # what the shell does
    h = handler(step, store, NEW)
    await h.handle(batch("b", 10))  # offsets 0-9 again
    state = (await store.load_many(["u1"]))["u1"]
    assert (state.clicks, state.offsets, state.incarnation) == (40, {"streamrec.clicks:0": 9}, NEW)
    assert step.recommender.n_learned == 40 and h.offsets_reset == 1
    assert h.metrics.registry.get_sample_value("streamrec_state_offsets_reset_total") == 1  # StreamrecInputTopicRecreated
    await h.handle(batch("b", 10))  # Kafka delivers them again: redeliveries now, of the new topic
    assert (await store.load_many(["u1"]))["u1"].clicks == 40 and step.recommender.n_learned == 40


async def test_without_topic_ids_the_offsets_are_taken_as_they_are():
    step, store = RecommendationStep(Recommender.default()), InMemoryUserStateStore()
    await handler(step, store, OLD).handle(batch("a", 30))
    await handler(step, store, None).handle(batch("b", 10))  # the broker's ids unknown: redeliveries, as before
    assert (await store.load_many(["u1"]))["u1"].clicks == 30


async def test_a_state_from_before_tags_were_kept_counts_in_the_topics_of_now():
    step, store = RecommendationStep(Recommender.default()), InMemoryUserStateStore()
    await handler(step, store, None).handle(batch("a", 30))
    assert (await store.load_many(["u1"]))["u1"].incarnation == ""
    h = handler(step, store, NEW)
    await h.handle(batch("a", 30))  # the same records again: all redeliveries, nothing written
    assert (await store.load_many(["u1"]))["u1"].clicks == 30
    await h.handle(batch("c", 1, start=30))
    state = (await store.load_many(["u1"]))["u1"]
    assert (state.clicks, state.incarnation, h.offsets_reset) == (31, NEW, 0)
    assert h.metrics.registry.get_sample_value("streamrec_state_offsets_reset_total") == 0


def test_the_models_snapshot_keeps_the_topic_ids_it_learned_under():
    step = RecommendationStep(Recommender.default())
    step.recommender.learned_offsets["streamrec.clicks:0"] = 29
    step.align_topics({"streamrec.clicks": "id-1"})
    restored = Recommender.restore(step.recommender.snapshot())
    assert restored.topic_ids == {"streamrec.clicks": "id-1"}
    again = RecommendationStep(restored)
    assert again.align_topics({"streamrec.clicks": "id-3"}) == ["streamrec.clicks"]
    assert again.recommender.learned_offsets == {}
    state = step.recommender.__getstate__()
    del state["topic_ids"]  # a snapshot from before topic ids were kept
    old = Recommender.__new__(Recommender)
    old.__setstate__(state)
    assert old.topic_ids == {} and RecommendationStep(old).align_topics({"streamrec.clicks": "id-3"}) == []
    assert old.learned_offsets == {"streamrec.clicks:0": 29}


def shell_reading(monkeypatch, answers: list):
    """A worker's shell whose reads of the topics' ids give ``answers`` in turn (an exception: raised)."""
    def read(*args, **kw):
        got = answers.pop(0)
        if isinstance(got, BaseException):
            raise got
        return got

    monkeypatch.setattr(shell_module, "topic_ids", read)
    shell = create_app(Settings.from_env({"STREAMREC_TOPIC_PREFIX": "t."}), load_model=False,
                       store=InMemoryUserStateStore()).streamrec
    return shell


async def test_the_shell_tags_the_states_by_the_input_topics_and_aligns_the_models(monkeypatch, caplog):
    first = {"t.clicks": "c1", "t.purchases": "p1", "t.searches": "s1", "t.forget": "f1", "t.impressions": "i1"}
    shell = shell_reading(monkeypatch, [first, {**first, "t.forget": "f2"},
                                        {**first, "t.forget": "f2", "t.clicks": "c2"},
                                        {t: i for t, i in first.items() if t != "t.clicks"},
                                        ServiceUnavailable("Kafka at localhost:9092 did not answer")])
    models = shell.step.recommender
    models.learned_offsets.update({"t.clicks:0": 41, "t.forget:0": 5, "t.purchases:0": 3})
    await shell.read_topic_ids()
    tag = shell.handler.incarnation
    assert tag == incarnation({"t.clicks": "c1", "t.purchases": "p1", "t.searches": "s1"})
    shell.align_models()
    assert models.topic_ids == first and len(models.learned_offsets) == 3

    await shell.read_topic_ids()  # the forget topic again: no offset of it is in a user's state
    shell.forget_floors["t.forget:0"] = 2
    shell.align_models()
    assert shell.handler.incarnation == tag
    assert models.learned_offsets == {"t.clicks:0": 41, "t.purchases:0": 3} and shell.forget_floors == {}

    await shell.read_topic_ids()
    shell.align_models()
    assert shell.handler.incarnation != tag and models.learned_offsets == {"t.purchases:0": 3}
    assert "topic(s) t.clicks were deleted and created again" in caplog.text

    tag = shell.handler.incarnation
    await shell.read_topic_ids()  # the clicks topic missing a moment (deleted, not created again yet): no change
    assert shell.handler.incarnation == tag and shell.topic_ids["t.clicks"] == "c2"
    await shell.read_topic_ids()  # the broker away: the ids known stay
    assert shell.handler.incarnation == tag and shell.topic_ids["t.clicks"] == "c2"
    assert "could not read the input topics' ids" in caplog.text


async def test_a_replay_after_a_rebalance_that_could_not_align_aligns_first(monkeypatch):
    """The forget topic was deleted and created again; the rebalance could not take the models'
    lock to align them. The replay after it aligns them first, so that it reads the new topic's
    requests from its beginning rather than taking the old topic's watermark as learned."""
    monkeypatch.setattr(shell_module, "topic_ids", lambda *args, **kw: {"t.forget": "f2"})
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: {("t.forget", 0): 3})
    calls = []

    async def replay(step, kafka, todo, bounds, **kw):
        calls.append(list(todo))
        return 0

    monkeypatch.setattr(shell_module, "replay", replay)
    env = {"STREAMREC_TOPIC_PREFIX": "t.", "STREAMREC_PARTITIONS": "1", "STREAMREC_KAFKA_SESSION_TIMEOUT_S": "1"}
    shell = create_app(Settings.from_env(env), load_model=False, store=InMemoryUserStateStore()).streamrec
    models = shell.step.recommender
    models.learned_offsets["t.forget:0"] = 50  # of the topic before
    models.topic_ids["t.forget"] = "f1"
    shell.replayed = True
    shell.restored.set()
    shell.models_ready.set()
    futures = []
    app = SimpleNamespace(add_future=futures.append, consumer=SimpleNamespace(
        topic_partitions=lambda topic: 1, assignment=lambda: {TopicPartition("t.forget", 0)}, held=set()))
    await shell.busy.acquire()
    await shell.on_assigned(app, {TopicPartition("t.forget", 0)})
    shell.busy.release()
    assert models.learned_offsets["t.forget:0"] == 50
    for future in futures:
        if future.__name__ == "replay_after_rebalance":
            await future
        else:
            future.close()
    assert calls == [[Gap("t.forget", 0, 0, 3)]] and models.topic_ids["t.forget"] == "f2"
