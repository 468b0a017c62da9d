"""User documents in the store that the worker did not write as it writes them: each is read
as what it holds or, where it cannot be, as a fresh state that is logged and counted
(stream/state.py, ``_load``); never an exception that holds up the user's events."""

from __future__ import annotations

import pytest
from fakes import Sink
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, decode_dead_letter, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import InMemoryUserStateStore, UserState, _load
from stream.step_inputs import StepConfig

#: ``recs`` twice (a hand edit, a tool that merged two documents): the first holds an entry
#: that is no remembered list, the second is no list at all
TWICE = [
    b'{"user_id":"u1","clicks":4,"recs":[["r1"]],"recs":5}',
    b'{"user_id":"u1","clicks":4,"recs":[[1,2,3]],"recs":null}',
    b'{"user_id":"u1","clicks":4,"recs":[true],"recs":1.5}',
]


@pytest.mark.parametrize("doc", TWICE)
def test_a_document_whose_recs_are_given_twice_starts_the_user_afresh(doc):
    assert _load("u1", doc) == (UserState("u1"), True)


@pytest.mark.parametrize("doc", TWICE)
async def test_the_events_of_a_user_whose_document_cannot_be_read_are_applied(doc):
    """Before, reading such a document raised TypeError: every event of the user was
    dead-lettered as ``processing_error`` (and a forget request of theirs held up its batch) for
    as long as the document stayed."""
    store = InMemoryUserStateStore()
    await store.save_docs({"u1": doc})
    sink = Sink()
    metrics = Metrics(CollectorRegistry())
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=5, n_candidates=20)), None, StepConfig())
    h = BatchHandler(step, store, sink, TopicNames(), metrics, backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0))
    ev = ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=1_700_000_000_000)
    await h.handle_isolated([RawMessage("streamrec.clicks", 0, 0, b"u1", encode(ev))])
    assert [decode_dead_letter(v) for t, _, v in sink.records if t == "streamrec.dlq"] == []
    assert (await store.load_many(["u1"]))["u1"].clicks == 1
    assert metrics.registry.get_sample_value("streamrec_states_rebuilt_total") == 1
