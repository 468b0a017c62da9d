"""An event the worker accepts from ahead of its clock (up to STREAMREC_MAX_FUTURE_S) is learned
as of the clock: it counts no more in trending, and moves the models' event time no further,
than the same event sent now. A replayed log (the evaluator: no clock) is learned as it is."""

from __future__ import annotations

import time

import pytest
from fakes import Sink
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig, UserContext
from online_models.popularity import RecentPopularity, TrendingPopularity
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, decode_recommendation, encode
from stream.settings import TopicNames
from stream.state import InMemoryUserStateStore

T = 1_700_000_000_000
HOUR = 3_600_000  # STREAMREC_MAX_FUTURE_S's default, in ms


def popularity_step() -> RecommendationStep:
    learners = {"trending": TrendingPopularity(), "recent_popularity": RecentPopularity(window_s=3600)}
    return RecommendationStep(Recommender(learners, RecommenderConfig(k=5, n_candidates=20)))


def clicks(item: str, ts: int, n: int = 3) -> list[ClickEvent]:
    return [ClickEvent(event_id=f"{item}-{i}", user_id=f"u-{item}-{i}", item_id=item, ts=ts) for i in range(n)]


def trending(step: RecommendationStep, item: str, at: int | None = None) -> float:
    return step.recommender.learners["trending"].predict_one(UserContext("someone", ts=at), item)


@pytest.mark.parametrize("lead_ms", [1, 600_000, HOUR])
def test_with_the_workers_clock_an_item_dated_ahead_trends_no_higher_than_one_dated_now(lead_ms):
    now, ahead = clicks("now", T), clicks("ahead", T + lead_ms)
    step = popularity_step()
    result = step(now + ahead, {}, lambda: T, clock_ms=T)
    assert len(result.applied) == 6 and not result.failures
    assert trending(step, "ahead", T) <= trending(step, "now", T)
    assert trending(step, "ahead") == pytest.approx(trending(step, "now")) == pytest.approx(3.0)  # as of T, undecayed
    # without a clock (a replayed log: the evaluator, the benchmarks) the events are learned as dated
    replayed = popularity_step()
    replayed(now + ahead, {}, lambda: 0)
    assert trending(replayed, "ahead", T) == pytest.approx(3.0 * 2 ** (lead_ms / 1_800_000))
    assert trending(replayed, "now", T + lead_ms) == pytest.approx(3.0 * 0.5 ** (lead_ms / 1_800_000))


def test_one_event_dated_an_hour_ahead_does_not_empty_the_recent_popularity_window():
    step = popularity_step()
    step(clicks("earlier", T - 600_000), {}, lambda: T, clock_ms=T)  # ten minutes before the clock
    step(clicks("ahead", T + HOUR, n=1), {}, lambda: T, clock_ms=T)
    recent = step.recommender.learners["recent_popularity"]
    assert recent.predict_one(UserContext("someone"), "earlier") == 3.0  # still within the hour's window
    assert recent.predict_one(UserContext("someone"), "ahead") == 1.0


def test_relearning_another_workers_events_caps_their_time_at_the_clock_too():
    ahead = clicks("ahead", T + HOUR)
    step = popularity_step()
    assert step.relearn(ahead, [("c:0", i) for i in range(3)], clock_ms=T) == 3
    assert trending(step, "ahead") == pytest.approx(3.0)
    assert step.recommender.learners["trending"]._max_ts == T


async def test_the_worker_learns_an_event_from_ahead_at_its_clock_and_publishes_the_events_own_ts():
    sent = Sink()
    handler = BatchHandler(popularity_step(), InMemoryUserStateStore(), sent, TopicNames(), Metrics(CollectorRegistry()))
    before = time.time_ns() // 1_000_000
    ts = before + 1_800_000  # half an hour ahead: accepted (the window is an hour)
    await handler.handle([RawMessage("streamrec.clicks", 0, 0, b"u1", encode(ClickEvent(
        event_id="e1", user_id="u1", item_id="i1", ts=ts)))])
    after = time.time_ns() // 1_000_000
    learned = handler.step.recommender.learners["trending"]._max_ts
    assert before <= learned <= after  # the worker's clock, not the event's half hour ahead
    (rec,) = [decode_recommendation(v) for t, _, v in sent.records if t == "streamrec.recommendations"]
    assert rec.event_ts == ts  # the published contract keeps the producer's ts
    state = (await handler.store.load_many(["u1"]))["u1"]
    assert state.last_seen_ts == ts  # so do the user's state (and a forget request's bound by it)

