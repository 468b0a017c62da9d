"""The worker's cache of the documents it saved last (stream/state.py, CachedUserStateStore):
what it keeps, when it trusts nothing any more (a claim, a failed save, an erasure, age), and
that through the batch handler a user's next batch reads nothing back, with the same result."""

from __future__ import annotations

import asyncio

import pytest
from fakes import Sink
from prometheus_client import CollectorRegistry

from online_models import Recommender
from stream.handler import BatchHandler, Claims, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms
from stream.records import ClickEvent, decode_recommendation, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import (
    CachedUserStateStore,
    Fenced,
    InMemoryUserStateStore,
    UserState,
    encode_state,
)

TOPICS = TopicNames()
T0 = 1_700_000_000_000


class Counting(InMemoryUserStateStore):
    """The in-memory store, counting the users it was asked to load."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []

    async def load_many(self, user_ids):
        ids = list(user_ids)
        self.loaded += ids
        return await super().load_many(ids)

    async def inner_load(self, user_ids):
        return await super().load_many(user_ids)


def run(coro):
    return asyncio.run(coro)


def doc(uid: str, clicks: int) -> bytes:
    return encode_state(UserState(uid, clicks=clicks))


def test_a_saved_user_is_read_from_the_cache_as_a_state_of_its_own():
    inner = Counting()
    store = CachedUserStateStore(inner)
    run(store.save_docs({"u1": doc("u1", 3), "u2": doc("u2", 5)}))
    first = run(store.load_many(["u1", "u2", "u3"]))
    assert inner.loaded == ["u3"] and (store.hits, store.misses) == (2, 1)
    assert [first[u].clicks for u in ("u1", "u2", "u3")] == [3, 5, 0]
    first["u1"].recent_items.append("x")  # the step owns what it loaded
    assert run(store.load_many(["u1"]))["u1"].recent_items == []


@pytest.mark.parametrize("event", ["claim", "fenced", "erased", "aged"])
def test_nothing_kept_is_trusted_after_a_claim_a_refused_save_an_erasure_or_its_age(event):
    now = [0.0]
    inner = Counting()
    store = CachedUserStateStore(inner, max_age_s=30.0, clock=lambda: now[0])
    fence = run(store.claim([0]))
    run(store.save_docs({"u1": doc("u1", 1)}, fence))
    inner._docs["u1"] = doc("u1", 7)  # as another owner would have written it meanwhile
    if event == "claim":
        run(store.claim([1]))
    elif event == "fenced":
        run(inner.claim([0]))  # another worker claims partition 0
        with pytest.raises(Fenced):
            run(store.save_docs({"u2": doc("u2", 1)}, fence))
    elif event == "erased":
        run(store.save_docs({}, fence, delete=["u1"]))
        inner._docs["u1"] = doc("u1", 7)
    else:
        now[0] = 30.5
    assert run(store.load_many(["u1"]))["u1"].clicks == 7 and inner.loaded == ["u1"]


def test_at_most_max_users_are_kept_the_least_recently_saved_going_first():
    inner = Counting()
    store = CachedUserStateStore(inner, max_users=3)
    for i in range(5):
        run(store.save_docs({f"u{i}": doc(f"u{i}", i)}))
    run(store.save_docs({"u2": doc("u2", 2)}))  # saved again: the newest
    run(store.load_many([f"u{i}" for i in range(5)]))
    assert sorted(inner.loaded) == ["u0", "u1"]


def test_through_the_handler_a_users_next_batch_reads_nothing_back_and_gives_the_same_lists():
    def handler(store):
        return BatchHandler(RecommendationStep(Recommender.default()), store, Sink(), TOPICS, Metrics(CollectorRegistry()),
                            backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), claims=Claims())

    def batch(n0: int) -> list[RawMessage]:
        out = []
        for i in range(n0, n0 + 6):
            user = f"u{i % 3}"
            ev = ClickEvent(event_id=f"e{i}", user_id=user, item_id=f"i{i % 5}", ts=T0 + i, session_id=f"s-{user}")
            out.append(RawMessage(TOPICS.clicks, 0, i, user.encode(), encode(ev)))
        return out

    plain, cached_inner = Counting(), Counting()
    h_plain, h_cached = handler(plain), handler(CachedUserStateStore(cached_inner))
    for n0 in (0, 6, 12):
        run(h_plain.handle(batch(n0)))
        run(h_cached.handle(batch(n0)))
    assert plain.loaded.count("u0") == 3 and cached_inner.loaded.count("u0") == 1
    def states(store):  # each list's own id is random: left out
        return {uid: (st.recent_items, st.clicks, st.offsets, st.seen, st.last_recommended, len(st.recs))
                for uid, st in run(store.inner_load(list(store._docs))).items()}

    assert states(cached_inner) == states(plain)  # the same states saved
    lists = [[[i.item_id for i in decode_recommendation(v).items] for t, k, v in h.publish.records if v is not None]
             for h in (h_plain, h_cached)]
    assert lists[0] == lists[1] and len(lists[0]) == 9  # the same lists published


@pytest.mark.parametrize("pseudonyms", [None, Pseudonyms("k")])
def test_a_user_whose_messages_are_not_keyed_by_their_id_is_read_from_redis_every_batch(pseudonyms):
    """An unkeyed producer: the same user's events may reach another worker, which writes too.
    Under pseudonyms the store holds the pseudonym: that is what is read again."""
    inner = Counting()
    h = BatchHandler(RecommendationStep(Recommender.default()), CachedUserStateStore(inner), Sink(), TOPICS,
                     Metrics(CollectorRegistry()), backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), claims=Claims(),
                     pseudonyms=pseudonyms)
    of = pseudonyms.of if pseudonyms is not None else (lambda uid: uid)
    for n in range(3):
        keyed = ClickEvent(event_id=f"k{n}", user_id="keyed", item_id=f"i{n}", ts=T0 + n)
        loose = ClickEvent(event_id=f"l{n}", user_id="loose", item_id=f"i{n}", ts=T0 + n)
        run(h.handle([RawMessage(TOPICS.clicks, 0, 2 * n, b"keyed", encode(keyed)),
                      RawMessage(TOPICS.clicks, 0, 2 * n + 1, None, encode(loose))]))
    assert inner.loaded.count(of("keyed")) == 1 and inner.loaded.count(of("loose")) == 3
    assert run(inner.load_many([of("loose")]))[of("loose")].clicks == 3
