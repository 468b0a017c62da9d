"""Failure isolation: whatever raises while a batch is handled stays with the events that cause
it. They are dead-lettered as ``processing_error``; every other event is applied exactly once,
and a failed attempt leaves no trace in the user states or the models."""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

import stream.handler as worker_module
from online_models import Recommender, RecommenderConfig
from online_models.base import OnlineLearner
from stream.errors import DEAD_LETTER_CODES
from stream.handler import BatchHandler, Claims, RawMessage
from stream.health import Health
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, decode_dead_letter, decode_recommendation, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import Fenced, InMemoryUserStateStore, UserState, fingerprint
from stream.step_inputs import StepConfig, to_interaction


class _Booby(OnlineLearner):
    """A learner with a bug: it raises on one item when learning, and on users who saw another
    item when scoring. It counts what it learned, as every learner does."""

    name = "booby"

    def __init__(self, learn_bomb: str = "poison", score_bomb: str = "cursed", seed: int = 0) -> None:
        self.learn_bomb, self.score_bomb, self.seed = learn_bomb, score_bomb, seed
        self.n_learned = 0
        self.learned: list[str] = []

    def learn_one(self, x, user=None) -> None:
        if x.item_id == self.learn_bomb:
            raise ZeroDivisionError("the learner's bug")
        self.n_learned += 1
        self.learned.append(x.item_id)

    def predict_one(self, user, item_id) -> float:
        if self.score_bomb in user.recent_items:
            raise KeyError("the ranker's bug")
        return 0.0


def booby_step() -> RecommendationStep:
    """The default learners, with the buggy one first (so that it is the only one a failing
    event reaches before the failure)."""
    config = RecommenderConfig(k=5, n_candidates=20, weights={**RecommenderConfig().weights, "booby": 1.0})
    default = Recommender.default(config)
    recommender = Recommender({"booby": _Booby(), **default.learners}, config)
    return RecommendationStep(recommender, None, StepConfig())


def clicks(*specs: tuple[str, str, str]) -> list[ClickEvent]:
    return [ClickEvent(event_id=eid, user_id=user, item_id=item, ts=1_700_000_000_000 + i)
            for i, (eid, user, item) in enumerate(specs)]


def test_an_event_whose_learning_raises_is_taken_out_and_the_rest_applied_once():
    step = booby_step()
    events = clicks(("a1", "a", "i1"), ("b1", "b", "i2"), ("a2", "a", "poison"), ("a3", "a", "i3"), ("b2", "b", "i4"))
    result = step(events, {}, lambda: 1)
    assert [(f.index, f.stage, type(f.error)) for f in result.failures] == [(2, "learn", ZeroDivisionError)]
    assert "ZeroDivisionError: the learner's bug" in result.failures[0].reason
    assert [e.event_id for e in result.applied] == ["a1", "b1", "a3", "b2"]
    assert result.states["a"].recent_items == ["i1", "i3"] and result.states["a"].clicks == 2
    assert result.states["a"].seen == fingerprint("a1") + fingerprint("a3")
    # the models learned each good event once and nothing of the bad one
    rec = step.recommender
    assert rec.n_learned == 4 and rec.learners["booby"].learned == ["i1", "i2", "i3", "i4"]
    assert all(learner.n_learned == 4 for learner in rec.learners.values())
    assert "poison" not in rec._counts
    # a list for each user, its trigger the user's last applied event
    assert {r.user_id: r.trigger_event_id for r in result.recommendations} == {"a": "a3", "b": "b2"}
    assert decode_recommendation(result.payloads[0]).user_id == result.recommendations[0].user_id


def test_a_user_whose_ranking_raises_is_found_among_many_and_teaches_the_models_nothing():
    step = booby_step()
    specs = [(f"e{u}-{j}", f"u{u}", f"i{u + j}") for u in range(40) for j in range(2)]
    specs.insert(33, ("bad", "u7", "cursed"))  # u7's list cannot be ranked
    events = clicks(*specs)
    result = step(events, {}, lambda: 1)
    failed = {events[f.index].event_id for f in result.failures}
    assert failed == {"e7-0", "e7-1", "bad"} and {f.stage for f in result.failures} == {"rank"}
    assert "u7" not in result.states and len(result.recommendations) == 39
    assert len(result.applied) == len(events) - 3
    assert step.recommender.n_learned == len(events) - 3
    assert "cursed" not in step.recommender.learners["booby"].learned


def test_the_same_batch_again_is_all_duplicates_and_the_failed_events_stay_failed():
    step = booby_step()
    events = clicks(("a1", "a", "i1"), ("a2", "a", "poison"), ("b1", "b", "i2"))
    positions = [("streamrec.clicks:0", n) for n in range(len(events))]
    first = step(events, {}, lambda: 1, positions)
    assert len(first.failures) == 1
    again = step(events, dict(first.states), lambda: 2, positions)
    # the good events are redeliveries, and the failed one a dead letter already: all passed over
    assert again.duplicates == 3 and again.applied == [] and again.failures == [] and step.recommender.n_learned == 2
    assert step.recommender.learned_offsets == {"streamrec.clicks:0": 2}


def test_the_step_never_changes_the_states_it_is_given():
    step = booby_step()
    before = UserState("a", recent_items=["i0"], clicks=1, seen=fingerprint("a0"))
    given = {"a": before}
    result = step(clicks(("a1", "a", "i1"), ("a2", "a", "cursed")), given, lambda: 1)
    assert given["a"] is before and before.recent_items == ["i0"] and before.clicks == 1
    assert {f.stage for f in result.failures} == {"rank"} and result.states == {}


def test_redelivered_events_the_models_lost_are_learned_once_without_a_change_of_state():
    step = booby_step()
    events = clicks(("a1", "a", "i1"), ("a2", "a", "i2"), ("a3", "a", "i3"))
    positions = [("streamrec.clicks:0", n) for n in range(3)]
    first = step(events, {}, lambda: 1, positions)
    # a restart: the models come back from a snapshot taken after the first event only
    step.recommender = booby_step().recommender
    step.recommender.learn_one(to_interaction(events[0]))
    step.recommender.learned_offsets = {"streamrec.clicks:0": 0}
    again = step(events, dict(first.states), lambda: 2, positions)
    assert again.learned_only == 2 and again.duplicates == 1 and again.applied == [] and again.recommendations == []
    assert step.recommender.learners["booby"].learned == ["i1", "i2", "i3"]
    # and a replay from the log teaches nothing twice
    assert step.relearn(events, positions) == 0


# --- the handler ---------------------------------------------------------------------------

class Sink:
    """Confirms every record; ``refuse`` makes it refuse records for a topic while set."""

    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []
        self.refuse: str | None = None

    async def __call__(self, records):
        refused = [r for r in records if r[0] == self.refuse]
        self.records += [r for r in records if r[0] != self.refuse]
        return refused

    def dead(self):
        return [decode_dead_letter(v) for t, _, v in self.records if t == "streamrec.dlq"]


def handler_for(step=None, store=None, sink=None, **kw) -> tuple[BatchHandler, Sink, Metrics]:
    metrics = Metrics(CollectorRegistry())
    sink = sink or Sink()
    h = BatchHandler(step or booby_step(), store or InMemoryUserStateStore(), sink, TopicNames(), metrics,
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), **kw)
    return h, sink, metrics


def messages(events, start=0, partition=0, generation=0):
    return [RawMessage("streamrec.clicks", partition, start + n, ev.user_id.encode(), encode(ev), None, generation)
            for n, ev in enumerate(events)]


async def test_handler_dead_letters_processing_errors_and_applies_the_rest():
    h, sink, metrics = handler_for()
    events = clicks(("a1", "a", "i1"), ("a2", "a", "poison"), ("b1", "b", "cursed"), ("c1", "c", "i9"))
    await h.handle_isolated(messages(events))
    dead = sink.dead()
    assert sorted((d.offset, d.code) for d in dead) == [(1, "processing_error"), (2, "processing_error")]
    assert "ZeroDivisionError" in dead[0].reason and "KeyError" in dead[1].reason
    saved = await h.store.load_many(["a", "b", "c"])
    assert (saved["a"].clicks, saved["b"].clicks, saved["c"].clicks) == (1, 0, 1)
    registry = metrics.registry
    assert registry.get_sample_value("streamrec_events_invalid_total", {"reason": "processing_error"}) == 2
    assert registry.get_sample_value("streamrec_events_consumed_total", {"type": "click"}) == 2


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised too")


@pytest.mark.parametrize("error", [ValueError("no embedding file /models/\udcff.bin"), _Unprintable()])
async def test_a_learner_error_whose_message_is_not_text_still_gets_its_dead_letter(error):
    """A message with a lone surrogate (bytes that were not UTF-8) or an exception whose
    ``__str__`` raises: the dead letter is written all the same, and the other events applied."""

    class Booby(_Booby):
        def learn_one(self, x, user=None) -> None:
            if x.item_id == self.learn_bomb:
                raise error
            super().learn_one(x, user)

    config = RecommenderConfig(k=5, n_candidates=20, weights={**RecommenderConfig().weights, "booby": 1.0})
    step = RecommendationStep(Recommender({"booby": Booby(), **Recommender.default(config).learners}, config), None,
                              StepConfig())
    h, sink, _ = handler_for(step=step)
    await h.handle_isolated(messages(clicks(("a1", "a", "i1"), ("x1", "x", "poison"), ("c1", "c", "i3"))))
    (dead,) = sink.dead()
    assert dead.offset == 1 and dead.code == "processing_error" and type(error).__name__ in dead.reason
    saved = await h.store.load_many(["a", "x", "c"])
    assert (saved["a"].clicks, saved["x"].clicks, saved["c"].clicks) == (1, 0, 1)


async def test_an_impression_whose_handling_raises_is_a_dead_letter_and_the_batch_events_are_applied(monkeypatch):
    """Forget requests, impressions and searches are isolated like the events: one whose
    handling raises (here the impression's attribution, a bug) is dead-lettered, the others
    are handled."""

    def broken(recs, rec_id):
        raise IndexError("list index out of range")

    monkeypatch.setattr(worker_module, "shown", broken)
    h, sink, metrics = handler_for()
    impression = RawMessage("streamrec.impressions", 0, 7, b"u",
                            b'{"rec_id":"r1","user_id":"u","item_ids":["i1"],"ts":1700000000000}', None)
    await h.handle_isolated([*messages(clicks(("a1", "a", "i1"), ("b1", "b", "i2"))), impression])
    (dead,) = sink.dead()
    assert (dead.topic, dead.offset, dead.code) == ("streamrec.impressions", 7, "processing_error")
    saved = await h.store.load_many(["a", "b"])
    assert (saved["a"].clicks, saved["b"].clicks) == (1, 1)
    assert metrics.registry.get_sample_value("streamrec_events_invalid_total", {"reason": "processing_error"}) == 1


async def test_a_value_whose_decoding_raises_anything_is_a_dead_letter(monkeypatch):
    real = worker_module.decode_event

    def flaky(raw, *args):
        if b'"b1"' in raw:
            raise RecursionError("maximum recursion depth exceeded while deserializing an object")
        return real(raw, *args)

    monkeypatch.setattr(worker_module, "decode_event", flaky)
    h, sink, _ = handler_for()
    await h.handle_isolated(messages(clicks(("a1", "a", "i1"), ("b1", "b", "i2"))))
    (letter,) = sink.dead()
    assert letter.code == "processing_error" and "RecursionError" in letter.reason and letter.offset == 1


#: a bug's exception that carries what it failed on whole: a producer's 1 MB value, a user's text
HUGE = "v" * 1_000_000


def _formatted(caplog) -> list[str]:
    """The worker's records as the log prints them, tracebacks included."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    return [formatter.format(r) for r in caplog.records if r.name == "streamrec.worker"]


async def test_a_huge_exception_text_is_cut_short_in_the_logged_traceback(caplog):
    """A traceback quotes the exception's text whole: one event's bug wrote a 1 MB log line, or
    more (the step's failure, the halves of the batch split apart, and the culprit's line)."""

    class Booby(_Booby):
        def learn_one(self, x, user=None) -> None:
            if x.item_id == self.learn_bomb:
                raise ValueError(HUGE)
            super().learn_one(x, user)

    class HugeStore(InMemoryUserStateStore):
        async def load_many(self, user_ids):
            ids = list(user_ids)
            if "b" in ids:
                raise UnicodeError(HUGE)
            return await super().load_many(ids)

    config = RecommenderConfig(k=5, n_candidates=20, weights={**RecommenderConfig().weights, "booby": 1.0})
    step = RecommendationStep(Recommender({"booby": Booby(), **Recommender.default(config).learners}, config), None,
                              StepConfig())
    h, sink, _ = handler_for(step=step, store=HugeStore())
    with caplog.at_level(logging.ERROR, logger="streamrec.worker"):
        await h.handle_isolated(messages(clicks(("a1", "a", "i1"), ("x1", "x", "poison"), ("b1", "b", "i3"))))
    assert sorted(d.offset for d in sink.dead()) == [1, 2]
    lines = _formatted(caplog)
    assert any("dead-lettered: " in line and "ValueError: " + "v" * 300 + "…" in line for line in lines), lines
    assert any("handling its halves apart" in line for line in lines)
    assert any("is dead-lettered" in line and "UnicodeError: " + "v" * 300 + "…" in line for line in lines)
    # the halves' failures and the culprit's: one line each, the text cut short too
    assert all(len(line) < 20_000 for line in lines), [len(x) for x in lines]


class PickyStore(InMemoryUserStateStore):
    """Loading one user raises (a bug, not Redis being away)."""

    async def load_many(self, user_ids):
        ids = list(user_ids)
        if "b" in ids:
            raise UnicodeError("a user id this store cannot take")
        return await super().load_many(ids)


async def test_a_batch_that_raises_anyway_is_split_until_the_culprit_is_alone():
    h, sink, _ = handler_for(store=PickyStore())
    events = clicks(*[(f"a{i}", "a", f"i{i}") for i in range(5)], ("b1", "b", "i9"), *[(f"c{i}", "c", f"i{i}") for i in range(5)])
    await h.handle_isolated(messages(events))
    (letter,) = sink.dead()
    assert (letter.code, letter.offset) == ("processing_error", 5) and "UnicodeError" in letter.reason
    saved = await h.store.load_many(["a", "c"])
    assert saved["a"].clicks == 5 and saved["c"].clicks == 5
    assert h.step.recommender.n_learned == 10  # split twice, and still each event learned once


async def test_one_poisoned_message_logs_one_traceback_however_often_the_batch_is_split(caplog):
    """A bug that raises whenever one message is in the batch: the batch of 32 is halved five
    times down to that message, and each split logged its traceback, then the dead letter its
    own (six for one message; a dozen in a batch of a thousand), burying the cause. One
    traceback, then a line for the message dead-lettered."""
    h, sink, _ = handler_for(store=PickyStore())
    events = clicks(*[(f"e{n}", "b" if n == 13 else f"u{n % 5}", f"i{n}") for n in range(32)])
    with caplog.at_level(logging.INFO, logger="streamrec.worker"):
        await h.handle_isolated(messages(events))
    (letter,) = sink.dead()
    assert letter.offset == 13 and "UnicodeError" in letter.reason
    worker = [r for r in caplog.records if r.name == "streamrec.worker"]
    traced = [r for r in worker if r.exc_info]
    assert len(traced) == 1 and "handling a batch of 32 messages raised" in traced[0].getMessage(), \
        [r.getMessage() for r in traced]
    dead_lines = [r.getMessage() for r in worker if "dead-lettered" in r.getMessage() and not r.exc_info]
    assert dead_lines == ["the message at streamrec.clicks[0]@13 is dead-lettered: handling the message raised "
                          "UnicodeError: a user id this store cannot take"]
    saved = await h.store.load_many([f"u{n}" for n in range(5)])
    assert sum(state.clicks for state in saved.values()) == 31


class TwoBugStore(InMemoryUserStateStore):
    """Loading user "b" raises one exception, loading user "m" another."""

    async def load_many(self, user_ids):
        ids = list(user_ids)
        if "b" in ids:
            raise UnicodeError("a user id this store cannot take")
        if "m" in ids:
            raise OverflowError("a number this store cannot take")
        return await super().load_many(ids)


async def test_a_second_kind_of_failure_in_the_same_batch_logs_its_own_traceback(caplog):
    h, sink, _ = handler_for(store=TwoBugStore())
    events = clicks(*[(f"e{n}", {3: "b", 12: "m"}.get(n, "u"), f"i{n}") for n in range(16)])
    with caplog.at_level(logging.INFO, logger="streamrec.worker"):
        await h.handle_isolated(messages(events))
    assert sorted(d.offset for d in sink.dead()) == [3, 12]
    traced = [r.exc_info[0] for r in caplog.records if r.name == "streamrec.worker" and r.exc_info]
    assert traced == [UnicodeError, OverflowError]


async def test_a_dead_letter_goes_out_under_the_messages_key_cut_to_a_kibibyte():
    """A key near Kafka's 1 MiB limit, on a bad value: with the letter added to it the record
    would not fit a message, and its publication would be refused, and retried, for ever."""
    h, sink, _ = handler_for()
    huge = RawMessage("streamrec.clicks", 0, 0, b"u" * 1_040_000, b"x" * 8_300, None)
    await h.handle_isolated([huge, *messages(clicks(("a1", "a", "i1")), start=1)])
    ((topic, key, value),) = [r for r in sink.records if r[0] == "streamrec.dlq"]
    assert key == b"u" * 1024 and decode_dead_letter(value).code == "malformed_json"
    assert (await h.store.load_many(["a"]))["a"].clicks == 1


async def test_a_document_that_does_not_decode_starts_the_user_afresh(caplog):
    store = InMemoryUserStateStore()
    store._docs["a"] = b'{"user_id": "a", "recent_items": 7}'
    h, _, metrics = handler_for(store=store)
    await h.handle_isolated(messages(clicks(("a1", "a", "i1"))))
    assert (await store.load_many(["a"]))["a"].clicks == 1
    assert metrics.registry.get_sample_value("streamrec_states_rebuilt_total") == 1
    assert "does not decode" in caplog.text


async def test_a_document_nested_too_deeply_to_decode_starts_the_user_afresh(caplog):
    """msgspec refuses such a document with RecursionError, not DecodeError: the user is
    rebuilt like any other document that does not decode, not dead-lettered for good."""
    store = InMemoryUserStateStore()
    store._docs["a"] = b'{"user_id": "a", "recs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    h, sink, metrics = handler_for(store=store)
    await h.handle_isolated(messages(clicks(("a1", "a", "i1"))))
    assert sink.dead() == [] and (await store.load_many(["a"]))["a"].clicks == 1
    assert metrics.registry.get_sample_value("streamrec_states_rebuilt_total") == 1


async def test_remembered_lists_that_are_not_rec_id_ts_flags_are_dropped_and_the_users_events_handled(caplog):
    """A stored document whose remembered lists are malformed (edited by hand, or a bug in an
    older version) decodes; its bad entries are dropped on load, so the user's clicks and
    impressions are attributed from then on instead of failing each time."""
    store = InMemoryUserStateStore()
    store._docs["u"] = (b'{"user_id":"u","last_recommended":["i1"],'
                        b'"recs":[["r2",1700000000000,0],["r0","x",0],["r1",1700000000000],[7,1,0],[]]}')
    h, sink, metrics = handler_for(store=store)
    impression = RawMessage("streamrec.impressions", 0, 7, b"u",
                            b'{"rec_id":"r2","user_id":"u","item_ids":["i1"],"ts":1700000000000}', None)
    await h.handle_isolated([impression, *messages(clicks(("u1", "u", "i1")))])
    assert sink.dead() == []
    assert "remembered lists" in caplog.text
    assert (await store.load_many(["u"]))["u"].clicks == 1


async def test_a_refused_dead_letter_holds_the_batch_and_says_unready_until_kafka_takes_it():
    health = Health()
    h, sink, metrics = handler_for(health=health)
    sink.refuse = "streamrec.dlq"
    bad = RawMessage("streamrec.clicks", 0, 1, b"a", b"{broken", None)
    task = asyncio.ensure_future(h.handle_isolated([*messages(clicks(("a1", "a", "i1"))), bad]))
    for _ in range(200):
        await asyncio.sleep(0.005)
        if metrics.output_blocked._value.get() == 1:
            break
    ready, text = health.readiness()
    assert not task.done() and not ready and "streamrec.dlq" in text
    # when it began, as a clock time: what /readyz shows stands until the next try ends (up to
    # the producer's request timeout), and "for 0 s" stood there all that time
    assert re.search(r"not accepted by Kafka since \d\d:\d\d:\d\d UTC", text), text
    assert (await h.store.load_many(["a"]))["a"].clicks == 0  # nothing saved while the batch is held
    sink.refuse = None
    await asyncio.wait_for(task, 2)
    assert [d.code for d in sink.dead()] == ["malformed_json"] and metrics.output_blocked._value.get() == 0
    assert "output: ok" in health.readiness()[1]
    assert (await h.store.load_many(["a"]))["a"].clicks == 1


async def test_a_worker_whose_partition_was_claimed_since_is_fenced_and_writes_nothing():
    store = InMemoryUserStateStore()
    generation = {"now": 1}
    old, _, _ = handler_for(store=store, claims=Claims(lambda: generation["now"]))
    new, _, _ = handler_for(store=store, claims=Claims(lambda: generation["now"]))
    old.claims.hold(await store.claim([0]), 1)
    await old.handle_isolated(messages(clicks(("a1", "a", "i1")), generation=1))
    generation["now"] = 2
    new.claims.hold(await store.claim([0]), 2)  # the partition's next owner
    await new.handle_isolated(messages(clicks(("a1", "a", "i1"), ("a2", "a", "i2")), generation=2))
    with pytest.raises(Fenced) as info:  # the old owner's late write of a batch taken before
        await old.handle_isolated(messages(clicks(("a2", "a", "i2"), ("a3", "a", "i3")), start=1, generation=1))
    assert info.value.partitions == [0]
    saved = (await store.load_many(["a"]))["a"]
    assert saved.recent_items == ["i1", "i2"] and saved.clicks == 2


async def test_a_partition_not_claimed_at_assignment_is_claimed_before_its_first_batch():
    store = InMemoryUserStateStore()
    h, _, _ = handler_for(store=store, claims=Claims(lambda: 3))
    await h.handle_isolated(messages(clicks(("a1", "a", "i1")), partition=2, generation=3))
    assert h.claims.fence([2]) == {2: 1} and (await store.load_many(["a"]))["a"].clicks == 1
    # a batch of an older generation claims nothing: it is the next owner's now
    with pytest.raises(Fenced):
        await h.handle_isolated(messages(clicks(("b1", "b", "i1")), partition=1, generation=2))


def test_processing_error_is_a_known_code_everywhere():
    assert "processing_error" in DEAD_LETTER_CODES
    assert Counter(DEAD_LETTER_CODES).most_common(1)[0][1] == 1


async def test_a_retry_that_ends_in_an_error_it_does_not_retry_leaves_the_worker_ready():
    """A Redis blip, then the store answers that the partition moved on (Fenced): the retry
    loop gives up, and readiness no longer says "retrying" while later batches save fine."""

    class BlipThenFenced(InMemoryUserStateStore):
        saves = 0

        async def save_docs(self, docs, fence=None, delete=(), versioned=False):
            self.saves += 1
            if self.saves == 1:
                raise ConnectionError("Connection reset by peer")
            if self.saves == 2:
                raise Fenced([0])
            return await super().save_docs(docs, fence, delete, versioned)

    health = Health()
    health.set("kafka", True)
    health.set("redis", True)
    health.beat()
    h, _, _ = handler_for(store=BlipThenFenced(), health=health)
    with pytest.raises(Fenced):
        await h.handle_isolated(messages(clicks(("a1", "a", "i1"))))
    await h.handle_isolated(messages(clicks(("b1", "b", "i2")), start=10))
    assert (await h.store.load_many(["b"]))["b"].clicks == 1
    ready, detail = health.readiness()
    assert ready, detail


async def test_a_claim_retried_through_an_outage_is_not_taken_once_a_rebalance_moved_the_partition():
    """Worker A's batch (generation 5) claims its partition lazily while Redis is down; a
    rebalance gives the partition to B (generation 6), which claims it. When Redis answers
    again, A's claim must not be taken: it would be newer than B's and fence B out."""
    generation = {"now": 5}

    class Outage(InMemoryUserStateStore):
        down = True

        async def claim(self, partitions):
            if self.down:
                raise ConnectionError("Redis is unreachable")
            return await super().claim(partitions)

    store = Outage()
    a, _, _ = handler_for(store=store, claims=Claims(lambda: generation["now"]))
    b, _, _ = handler_for(store=store, claims=Claims(lambda: generation["now"]))
    batch = asyncio.ensure_future(a.handle_isolated(messages(clicks(("a1", "a", "i1")), partition=3, generation=5)))
    await asyncio.sleep(0.05)  # A retries its claim
    generation["now"] = 6
    store.down = False
    b.claims.hold(await store.claim([3]), 6)
    with pytest.raises(Fenced):
        await asyncio.wait_for(batch, 5)
    await b.handle_isolated(messages(clicks(("b1", "b", "i2")), start=10, partition=3, generation=6))
    assert (await store.load_many(["a", "b"]))["b"].clicks == 1
    assert (await store.load_many(["a"]))["a"].clicks == 0
