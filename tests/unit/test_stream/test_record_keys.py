"""Records keyed by something other than their user_id: counted by topic and warned of (thinned),
and still processed; records with no key are not counted (docs/events.md, Topics and keys)."""

from __future__ import annotations

import asyncio
import logging

from fakes import Sink
from prometheus_client import CollectorRegistry

from online_models import Recommender
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, PurchaseEvent, decode_recommendation, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import InMemoryUserStateStore

TOPICS = TopicNames(prefix="record-keys.")  # its own topics: the warning's filter is the process's
T0 = 1_700_000_000_000


def count(metrics: Metrics, topic: str) -> float | None:
    return metrics.registry.get_sample_value("streamrec_events_not_keyed_by_user_total", {"topic": topic})


def test_records_keyed_by_another_id_are_counted_by_topic_warned_of_once_and_still_processed(caplog):
    sink, metrics = Sink(), Metrics(CollectorRegistry())
    h = BatchHandler(RecommendationStep(Recommender.default()), InMemoryUserStateStore(), sink, TOPICS, metrics,
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0))
    with caplog.at_level(logging.WARNING, logger="streamrec.worker.keys"):
        for n in range(2):
            click = ClickEvent(event_id=f"c{n}", user_id="ü-right", item_id="i1", ts=T0 + n)
            by_session = ClickEvent(event_id=f"s{n}", user_id="u-wrong", item_id="i2", ts=T0 + n)
            unkeyed = ClickEvent(event_id=f"n{n}", user_id="u-none", item_id="i3", ts=T0 + n)
            bought = PurchaseEvent(event_id=f"p{n}", user_id="u-wrong", item_id="i2", ts=T0 + n, quantity=1, price=2.0)
            asyncio.run(h.handle([RawMessage(TOPICS.clicks, 0, 3 * n, "ü-right".encode(), encode(click)),
                                  RawMessage(TOPICS.clicks, 0, 3 * n + 1, b"session-9", encode(by_session)),
                                  RawMessage(TOPICS.clicks, 0, 3 * n + 2, None, encode(unkeyed)),
                                  RawMessage(TOPICS.purchases, 0, n, b"order-7", encode(bought))]))
    # keyed by the user (UTF-8, here not ASCII) or by nothing: not counted
    assert count(metrics, TOPICS.clicks) == 2 and count(metrics, TOPICS.purchases) == 2
    lines = [r.getMessage() for r in caplog.records if r.name == "streamrec.worker.keys"]
    assert len(lines) == 2  # one per topic; the second batch's were held back
    assert all("keyed by something other than their user_id" in line and "Key each record by its user_id" in line
               for line in lines)
    assert "session-9" not in "".join(lines)  # the producer's key is not echoed
    published = {decode_recommendation(v).user_id for t, _, v in sink.records if t == TOPICS.recommendations}
    assert published == {"ü-right", "u-wrong", "u-none"}  # all processed
    assert not [r for r in sink.records if r[0] == TOPICS.dlq]
    assert not metrics.registry.get_sample_value("streamrec_events_invalid_total", {"reason": "processing_error"})

