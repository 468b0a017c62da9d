"""A user whose events reach two workers at once (partitions added while a backlog waits, records
not keyed by user id): each worker saves the user's state, and a versioned save
(stream/state.py, ``UserState.version``) refuses the one that would overwrite the other's events;
the handler applies its batch again to what the other saved (``RecommendationStep.merged_docs``),
so no event is lost from the user's state."""

from __future__ import annotations

import asyncio

import pytest
from fakes import Sink
from prometheus_client import CollectorRegistry

from online_models import Recommender
from stream.experiments import SHOWN
from stream.handler import MERGES, BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, ImpressionEvent, SearchEvent, decode_recommendation, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import (
    CachedUserStateStore,
    InMemoryUserStateStore,
    StateConflict,
    UserState,
    doc_version,
    encode_state,
)

T0 = 1_700_000_000_000
TOPICS = TopicNames()


def run(coro):
    return asyncio.run(coro)


def worker(store: InMemoryUserStateStore) -> tuple[BatchHandler, Metrics]:
    """A worker's handler on the shared store, through a cache of its own, as stream/app.py builds it."""
    metrics = Metrics(CollectorRegistry())
    handler = BatchHandler(RecommendationStep(Recommender.default()), CachedUserStateStore(store), Sink(),
                           TOPICS, metrics, backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0))
    return handler, metrics


def click(n: int, user: str = "u1", partition: int = 0, offset: int | None = None) -> RawMessage:
    ev = ClickEvent(event_id=f"e{n}", user_id=user, item_id=f"i{n}", ts=T0 + n)
    return RawMessage(TOPICS.clicks, partition, n if offset is None else offset, user.encode(), encode(ev))


def test_a_versioned_save_writes_only_where_the_stored_version_is_older():
    store = InMemoryUserStateStore()
    run(store.save_docs({"u1": encode_state(UserState("u1", clicks=5, version=3))}))
    new = {"u1": encode_state(UserState("u1", clicks=9, version=3)), "u2": encode_state(UserState("u2", version=1))}
    with pytest.raises(StateConflict) as raised:
        run(store.save_docs(new, versioned=True))
    assert raised.value.users == ["u1"]
    states = run(store.load_many(["u1", "u2"]))
    assert (states["u1"].clicks, states["u2"].version) == (5, 1)  # u1 as the other writer left it; u2 written
    run(store.save_docs({"u1": encode_state(UserState("u1", clicks=9, version=4))}, versioned=True))
    assert run(store.load_many(["u1"]))["u1"].clicks == 9


def test_the_version_is_the_last_field_of_a_document_and_documents_without_one_count_as_zero():
    doc = encode_state(UserState("u1", recent_items=["a"], version=12))
    assert doc.endswith(b',"v":12}') and doc_version(doc) == 12
    assert doc_version(b'{"user_id":"u1","clicks":2}') == 0
    assert doc_version(b'{"user_id":"u1","recent_items":["x,\\"v\\":9}"]}') == 0  # never read from inside a string


def test_a_conflict_keeps_the_users_it_wrote_in_the_cache_and_drops_the_others():
    inner = InMemoryUserStateStore()
    run(inner.save_docs({"u1": encode_state(UserState("u1", clicks=1, version=5))}))
    cache = CachedUserStateStore(inner)
    with pytest.raises(StateConflict):
        run(cache.save_docs({"u1": encode_state(UserState("u1", version=5)),
                             "u2": encode_state(UserState("u2", clicks=2, version=1))}, versioned=True))
    inner._docs.clear()
    states = run(cache.load_many(["u1", "u2"]))
    assert (states["u1"].clicks, states["u2"].clicks) == (0, 2)  # u1 read from the store again (now gone)


def test_two_workers_saving_one_user_lose_none_of_its_events():
    """Worker A saved the user and trusts its cached document; worker B applies an event of the
    user's from another partition; A's next batch must not overwrite it. Before versions, A's
    save left the user with A's two events, B's gone from their state."""
    store = InMemoryUserStateStore()
    a, a_metrics = worker(store)
    b, _ = worker(store)
    run(a.handle_isolated([click(1, partition=0, offset=0)]))
    run(b.handle_isolated([click(2, partition=1, offset=0)]))
    run(a.handle_isolated([click(3, partition=0, offset=1)]))
    state = run(store.load_many(["u1"]))["u1"]
    assert state.clicks == 3 and state.recent_items == ["i1", "i2", "i3"]
    assert state.offsets == {"streamrec.clicks:0": 1, "streamrec.clicks:1": 0}
    assert state.version == 3
    assert a_metrics.registry.get_sample_value("streamrec_state_conflicts_total") == 1
    # a redelivery to A of what it applied is still caught, after the merge as before it
    run(a.handle_isolated([click(3, partition=0, offset=1)]))
    assert run(store.load_many(["u1"]))["u1"].clicks == 3


def test_a_user_saved_by_the_other_writer_at_every_try_is_saved_as_it_stands_after_the_last(caplog):
    class Racing(InMemoryUserStateStore):
        """Another writer saves the user between every load and save of this one's."""

        async def save_docs(self, docs, fence=None, delete=(), versioned=False):
            if versioned and "u1" in self._docs:
                held = self._docs["u1"]
                self._docs["u1"] = held[:held.rindex(b',"v":')] + b',"v":%d}' % (doc_version(held) + 1000)
            return await super().save_docs(docs, fence, delete, versioned)

    store = Racing()
    run(store.save_docs({"u1": encode_state(UserState("u1", clicks=1, version=1))}))
    handler, metrics = worker(store)
    run(handler.handle_isolated([click(1)]))
    assert run(store.load_many(["u1"]))["u1"].clicks == 2  # saved at last, with the stored click and its own
    assert metrics.registry.get_sample_value("streamrec_state_conflicts_total") == MERGES
    assert "saved by another worker after each of" in caplog.text


def search(n: int, query: str, partition: int, offset: int, user: str = "u1") -> RawMessage:
    ev = SearchEvent(event_id=f"q{n}", type="search", user_id=user, query=query, ts=T0 + n, results=["i1", "i2"])
    return RawMessage(TOPICS.searches, partition, offset, user.encode(), encode(ev))


def test_a_search_and_an_impression_saved_over_by_another_worker_are_merged_too():
    """The side topics' saves are versioned as the events' are: worker A's search and impression,
    with worker B's event saved in between, all stay in the user's state."""
    store = InMemoryUserStateStore()
    a, a_metrics = worker(store)
    b, _ = worker(store)
    run(a.handle_isolated([click(1, partition=0, offset=0)]))
    (rec,) = [decode_recommendation(v) for t, _, v in a.publish.records if t == TOPICS.recommendations]
    run(b.handle_isolated([click(2, partition=1, offset=0)]))
    run(a.handle_isolated([search(3, "red shoes", partition=0, offset=0)]))
    run(b.handle_isolated([click(4, partition=1, offset=1)]))
    run(a.handle_isolated([RawMessage(TOPICS.impressions, 0, 0, b"u1", encode(ImpressionEvent(
        rec_id=rec.rec_id, user_id="u1", item_ids=[it.item_id for it in rec.items[:2]], ts=T0 + 5)))]))
    state = run(store.load_many(["u1"]))["u1"]
    assert state.clicks == 3 and state.recent_items == ["i1", "i2", "i4"]
    assert state.recent_queries == ["red shoes"]
    assert state.has_seen("q3", f"{TOPICS.searches}:0", 0)
    assert [entry[2] & SHOWN for entry in state.recs if entry[0] == rec.rec_id] == [SHOWN]
    assert a_metrics.registry.get_sample_value("streamrec_state_conflicts_total") == 2  # the search, the impression
