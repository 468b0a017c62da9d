"""The pure step and the worker's shell, with the in-memory store and a recording sender.

(The same handler runs against the real Kafka broker and Redis server in
tests/integration/test_pipeline_e2e.py.)
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

import stream.handler as worker
from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import (
    ClickEvent,
    PurchaseEvent,
    decode_dead_letter,
    decode_recommendation,
    encode,
)
from stream.settings import TopicNames
from stream.state import InMemoryUserStateStore, UserState, apply_event, fingerprint
from stream.step_inputs import StepConfig
from stream.step_results import judge


def click(eid, user, item, ts, **kw):
    return ClickEvent(event_id=eid, user_id=user, item_id=item, ts=ts, **kw)


def buy(eid, user, item, ts, **kw):
    return PurchaseEvent(event_id=eid, user_id=user, item_id=item, ts=ts, **kw)


def history(n_users=30, n_items=40, per_user=6):
    """Users browsing overlapping item runs, so co-visitation has something to learn."""
    events, ts = [], 1_700_000_000_000
    for u in range(n_users):
        for j in range(per_user):
            ts += 1000
            events.append(click(f"h{u}-{j}", f"u{u}", f"i{(u + j) % n_items}", ts))
    return events


def new_step(**cfg):
    return RecommendationStep(Recommender.default(RecommenderConfig(k=5, n_candidates=50)), None, StepConfig(**cfg))


def run(step, events, states, clock):
    """The step on ``states``, which then hold what it returns (as a store would after saving)."""
    result = step(events, states, clock)
    states.update(result.states)
    return result


def test_apply_event_caps_recent_items_and_dedupe_window():
    s = UserState("u")
    for i in range(10):
        apply_event(s, f"e{i}", f"i{i}", i, "click", max_recent=3, dedupe_window=4)
    assert s.recent_items == ["i7", "i8", "i9"]
    assert s.seen == "".join(fingerprint(f"e{i}") for i in range(6, 10))
    assert s.has_seen("e6") and not s.has_seen("e5") and not s.has_seen("e10")
    assert s.clicks == 10 and s.purchases == 0 and s.last_seen_ts == 9


def test_step_recommends_once_per_changed_user_and_counts_duplicates():
    step = new_step()
    events = history()
    states = {}
    result = step(events, states, lambda: 42)
    assert {r.user_id for r in result.recommendations} == {e.user_id for e in events}
    assert all(r.generated_ts == 42 for r in result.recommendations)
    assert result.duplicates == 0 and len(result.applied) == len(events)
    # the trigger is each user's newest event of the batch
    last = {e.user_id: e for e in events}
    assert all(r.trigger_event_id == last[r.user_id].event_id for r in result.recommendations)
    # the same events again (a redelivery) change nothing
    again = step(events, result.states, lambda: 43)
    assert again.duplicates == len(events) and again.applied == [] and again.recommendations == []


def test_duplicates_within_one_batch_are_applied_once():
    step = new_step()
    e = click("same", "u1", "i1", 1)
    result = step([e, e, e], {}, lambda: 1)
    assert result.duplicates == 2
    assert result.states["u1"].clicks == 1


def test_purchased_items_are_never_recommended():
    step = new_step()
    warm = history()
    step(warm, {}, lambda: 1)
    # u1 buys the items most likely to be proposed to it
    states = {}
    first = run(step, [click("a", "u1", "i1", 10**13), click("b", "u1", "i2", 10**13 + 1)], states, lambda: 2)
    top = [it.item_id for it in first.recommendations[0].items]
    assert top, "a warm user gets recommendations"
    buys = [buy(f"p{k}", "u1", item, 10**13 + 10 + k) for k, item in enumerate(top[:3])]
    after = run(step, buys, states, lambda: 3)
    rec = after.recommendations[0]
    assert not set(top[:3]) & {it.item_id for it in rec.items}
    assert set(top[:3]) <= set(after.states["u1"].purchased)


def test_scores_are_descending_and_model_versions_reported():
    step = new_step()
    result = step(history(), {}, lambda: 1)
    for rec in result.recommendations:
        scores = [it.score for it in rec.items]
        assert scores == sorted(scores, reverse=True)
        assert len({it.item_id for it in rec.items}) == len(rec.items) <= 5
        assert rec.model["transformer"] == "none"


class FakeScorer:
    """Scores a candidate by a fixed preference; records each call's batch size."""

    version, provider = "v-test", "CPUExecutionProvider"

    def __init__(self, favourite):
        self.favourite = favourite
        self.calls = []

    def score(self, sequences, candidates):
        self.calls.append(len(sequences))
        return [np.array([10.0 if c == self.favourite else 0.0 for c in cands], dtype=np.float32) for cands in candidates]


def test_transformer_scores_are_batched_once_per_step_and_blended():
    scorer = FakeScorer("i5")
    recommender = Recommender.default(RecommenderConfig(k=5, n_candidates=50, weights={**RecommenderConfig().weights, "transformer": 100.0}))
    step = RecommendationStep(recommender, scorer, StepConfig())
    result = step(history(), {}, lambda: 1)
    assert scorer.calls == [len(result.recommendations)]
    with_i5 = [r for r in result.recommendations if any(it.item_id == "i5" for it in r.items)]
    assert with_i5 and all(r.items[0].item_id == "i5" for r in with_i5)
    assert result.recommendations[0].model["transformer"] == "v-test"


def test_live_quality_judges_the_next_event_against_the_last_list():
    step = new_step()
    states = {}
    run(step, history(), states, lambda: 1)
    shown = states["u3"].last_recommended
    assert shown
    result = run(step, [click("next", "u3", shown[0], 10**13)], states, lambda: 2)
    assert result.live.judged == 1 and result.live.hits[10] == 1 and result.live.reciprocal_rank_sum == 1.0


class RecordingPublisher:
    """Confirms records like a broker would; the first ``fail_first`` records are refused once."""

    def __init__(self, fail_first=0):
        self.records = []
        self.fail_first = fail_first

    async def __call__(self, records):
        failed = records[: self.fail_first]
        self.fail_first = 0
        self.records.extend(records[len(failed):])
        return failed


def raw(value, offset, topic="streamrec.clicks", key=b"u"):
    return RawMessage(topic, 0, offset, key, value, None)


async def test_handler_sends_bad_values_to_the_dlq_and_good_ones_through():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    send = RecordingPublisher(fail_first=1)
    store = InMemoryUserStateStore()
    handler = BatchHandler(new_step(), store, send, TopicNames(), metrics)
    good = [encode(e) for e in history(n_users=3, per_user=2)]
    bad = [b"{not json", b'{"type":"click"}', b"\xff\xfe", b"x" * 70_000, b'{"event_id":"e","type":"view","user_id":"u","item_id":"i","ts":1}']
    messages = [raw(v, i) for i, v in enumerate(good[:3] + bad + good[3:])]
    await handler.handle(messages)

    recs = [decode_recommendation(v) for t, _, v in send.records if t == "streamrec.recommendations"]
    dead = [decode_dead_letter(v) for t, _, v in send.records if t == "streamrec.dlq"]
    assert {r.user_id for r in recs} == {"u0", "u1", "u2"}
    assert [d.code for d in sorted(dead, key=lambda d: d.offset)] == ["malformed_json", "missing_field", "not_utf8", "oversize", "unknown_type"]
    assert all(d.topic == "streamrec.clicks" and d.partition == 0 for d in dead)
    assert sorted(d.offset for d in dead) == [3, 4, 5, 6, 7]
    non_utf8 = next(d for d in dead if d.code == "not_utf8")
    assert non_utf8.raw_encoding == "base64" and non_utf8.raw == "//4="
    assert registry.get_sample_value("streamrec_events_invalid_total", {"reason": "oversize"}) == 1
    assert registry.get_sample_value("streamrec_events_consumed_total", {"type": "click"}) == 6
    assert registry.get_sample_value("streamrec_kafka_errors_total", {"op": "publish"}) == 1
    saved = await store.load_many(["u0"])
    assert saved["u0"].clicks == 2

    # the whole batch redelivered: nothing applied twice
    await handler.handle(messages)
    saved = await store.load_many(["u0"])
    assert saved["u0"].clicks == 2
    assert registry.get_sample_value("streamrec_duplicates_skipped_total") == 6


async def test_a_large_batch_is_stepped_on_the_event_loop_not_in_a_thread(monkeypatch):
    """In a thread the step shared the interpreter with the loop's fetching, and a large batch
    made the next one larger (docs/architecture.md, "The step on the event loop")."""
    threads = []
    stepped = RecommendationStep.__call__

    def recording(self, *args, **kwargs):
        threads.append(threading.get_ident())
        return stepped(self, *args, **kwargs)

    monkeypatch.setattr(RecommendationStep, "__call__", recording)
    send = RecordingPublisher()
    handler = BatchHandler(new_step(), InMemoryUserStateStore(), send, TopicNames(), Metrics(CollectorRegistry()))
    events = [encode(e) for e in history(n_users=30, per_user=10)]
    await handler.handle([raw(v, i) for i, v in enumerate(events)])
    assert len(events) == 300 and threads == [threading.get_ident()]
    assert len({k for t, k, _ in send.records if t == "streamrec.recommendations"}) == 30


@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_step_result_is_independent_of_batch_boundaries(batch):
    """Cutting the same stream into different micro-batches gives the same user states."""
    events = history(n_users=10, per_user=5)
    step = new_step()
    states = {}
    for i in range(0, len(events), batch):
        run(step, events[i : i + batch], states, lambda: 1)
    assert {u: s.recent_items for u, s in states.items()} == {
        f"u{u}": [f"i{(u + j) % 40}" for j in range(5)] for u in range(10)
    }


async def test_a_slow_batch_is_logged_with_its_stages_at_most_every_so_often(monkeypatch, caplog):
    handler = BatchHandler(new_step(), InMemoryUserStateStore(), RecordingPublisher(), TopicNames(), Metrics(CollectorRegistry()))
    events = [encode(e) for e in history(n_users=2, per_user=2)]
    monkeypatch.setattr(worker, "SLOW_BATCH_S", 0.0)  # every batch is "slow"
    with caplog.at_level("WARNING", logger="streamrec.worker"):
        await handler.handle([raw(v, i) for i, v in enumerate(events[:2])])
        await handler.handle([raw(v, i) for i, v in enumerate(events[2:], start=2)])
    lines = [r.getMessage() for r in caplog.records if "slow batch" in r.getMessage()]
    assert len(lines) == 1  # the second is counted, not logged, within SLOW_LOG_EVERY_S
    assert "2 events in" in lines[0] and "rank" in lines[0] and "state_save" in lines[0]
    monkeypatch.setattr(worker, "SLOW_LOG_EVERY_S", 0.0)
    with caplog.at_level("WARNING", logger="streamrec.worker"):
        await handler.handle([raw(v, i) for i, v in enumerate(events[:2], start=10)])
    lines = [r.getMessage() for r in caplog.records if "slow batch" in r.getMessage()]
    assert len(lines) == 2 and "2 batch(es) over 0 ms" in lines[1]


def test_live_quality_judges_every_event_of_a_batch_against_the_list_published_before_it():
    """Not only a user's first event of the batch: every one, each against the latest list
    published before it, which within a batch is the list the batch began with."""
    step = new_step()
    states = {}
    run(step, history(), states, lambda: 1)
    shown = states["u3"].last_recommended
    assert len(shown) >= 2
    batch = [click("n1", "u3", shown[1], 10**13), click("n2", "u3", "never-shown", 10**13 + 1),
             click("n3", "u3", shown[0], 10**13 + 2)]
    result = run(step, batch, states, lambda: 2)
    assert result.judged == [(0, shown), (1, shown), (2, shown)]
    assert result.live.judged == 3 and result.live.hits[10] == 2
    assert result.live.reciprocal_rank_sum == 1 / 2 + 1.0


def test_judge_gives_each_judged_events_rank_in_batch_order_so_no_one_looks_for_it_again():
    """Two users' events interleaved: the judged events come back in batch order, each with
    its 1-based rank in the list its user was shown (None where it is not in it)."""
    events = [click("a", "u1", "x", 1), click("b", "u2", "q", 2), click("c", "u1", "z", 3), click("d", "u2", "p", 4)]
    states = {"u1": UserState("u1", recent_items=["old"], last_recommended=["y", "z", "x"]),
              "u2": UserState("u2", recent_items=["old"], last_recommended=["p"])}
    live, judged, ranks = judge(events, states, {"u1": [0, 2], "u2": [1, 3]})
    assert [n for n, _ in judged] == [0, 1, 2, 3]
    assert ranks == [3, None, 2, 1]
    assert live.judged == 4 and live.hits[20] == 3


def test_a_new_users_later_events_of_its_first_batch_are_misses_nothing_was_shown_yet():
    step = new_step()
    result = step([click("a", "fresh", "i1", 1), click("b", "fresh", "i2", 2)], {}, lambda: 1)
    assert result.judged == [(1, [])] and result.live.judged == 1 and result.live.hits[20] == 0
