"""A user's key holding another Redis type than a string (a hash, a list, a set, ...: another
application writing under the prefix, an operator's mistake, an old tool), on the real server.

``MGET`` reads such a key as nil, so the user starts afresh, and the save's ``SET`` replaces it:
that must not pass silently. The save notices it (its script asks the ``TYPE`` of the keys of
the users loaded as absent), counts it in ``rebuilt`` (``streamrec_states_rebuilt_total``) and
logs the key once; nothing on the way crashes (``WRONGTYPE``).
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, Claims, RawMessage
from stream.health import Health
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import (
    CachedUserStateStore,
    Fenced,
    RedisUserStateStore,
    UserState,
    apply_event,
    encode_state,
)
from stream.step_inputs import StepConfig

#: a foreign value of each type a Redis key can hold besides a string
FOREIGN = {
    "hash": lambda r, key: r.hset(key, mapping={"owner": "other-app", "n": "1"}),
    "list": lambda r, key: r.rpush(key, "a", "b"),
    "set": lambda r, key: r.sadd(key, "a", "b"),
    "zset": lambda r, key: r.zadd(key, {"a": 1.0}),
    "stream": lambda r, key: r.xadd(key, {"f": "v"}),
}


@pytest.fixture
async def store(redis_url, redis_prefix, redis_client):  # redis_client: deletes the test's keys after it
    s = RedisUserStateStore(aioredis.Redis.from_url(redis_url), key_prefix=redis_prefix, ttl_s=3600)
    yield s
    await s.close()


def clicked(uid: str, event_id: str = "e1") -> UserState:
    return apply_event(UserState(uid), event_id, "i1", 1000, "click", max_recent=5, dedupe_window=4)


def wrong_type_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "streamrec.state" and "held a Redis" in r.getMessage()]


@pytest.mark.parametrize("versioned", [False, True], ids=["plain", "versioned"])  # the worker's events: versioned
@pytest.mark.parametrize("kind", sorted(FOREIGN))
async def test_a_key_of_another_type_is_counted_logged_and_replaced(store, redis_client, caplog, kind, versioned):
    key = store.key("u1")
    FOREIGN[kind](redis_client, key)
    redis_client.set(store.key("u2"), encode_state(clicked("u2")))
    caplog.set_level(logging.ERROR, "streamrec.state")

    loaded = await store.load_many(["u1", "u2", "u3"])  # u3: never seen
    assert loaded["u1"] == UserState("u1") and loaded["u2"].clicks == 1 and loaded["u3"] == UserState("u3")
    for state in loaded.values():
        state.version += versioned  # one save more, as the step counts them
    await store.save_docs({uid: encode_state(apply_event(state, "e2", "i2", 2000, "click", max_recent=5,
                                                        dedupe_window=4)) for uid, state in loaded.items()},
                          versioned=versioned)

    assert store.rebuilt == 1, "the key of another type went unnoticed: the user was reset silently"
    lines = wrong_type_lines(caplog)
    assert len(lines) == 1, lines
    assert key in lines[0] and f"held a Redis {kind}" in lines[0] and "started the user afresh" in lines[0]
    assert redis_client.type(key) == "string" and 0 < redis_client.ttl(key) <= 3600
    assert msgspec.json.decode(redis_client.get(key))["clicks"] == 1
    assert (await store.load_many(["u2"]))["u2"].clicks == 2
    assert not store._absent  # the users loaded as absent were checked once, and forgotten


async def test_each_key_is_logged_once_and_counted_each_time(store, redis_client, caplog):
    caplog.set_level(logging.ERROR, "streamrec.state")
    for round_ in range(3):  # the other application writes its hash again each time
        redis_client.delete(store.key("u1"))
        redis_client.hset(store.key("u1"), "owner", "other-app")
        state = (await store.load_many(["u1"]))["u1"]
        await store.save_docs({"u1": encode_state(apply_event(state, f"e{round_}", "i1", 1, "click",
                                                              max_recent=5, dedupe_window=4))})
    assert store.rebuilt == 3
    assert len(wrong_type_lines(caplog)) == 1


async def test_a_valid_document_and_an_absent_key_are_not_counted(store, redis_client):
    await store.save_docs({"u1": encode_state(clicked("u1"))})
    loaded = await store.load_many(["u1", "u2"])
    await store.save_docs({uid: encode_state(s) for uid, s in loaded.items()})
    await store.save_docs({"u1": encode_state(clicked("u1", "e9"))})  # saved without a load: not checked
    assert store.rebuilt == 0
    assert redis_client.type(store.key("u2")) == "string"


async def test_a_fenced_save_leaves_the_key_and_the_retry_still_notices_it(store, redis_client):
    redis_client.sadd(store.key("u1"), "a")
    state = (await store.load_many(["u1"]))["u1"]
    mine = await store.claim([0])
    await store.claim([0])  # a newer owner
    with pytest.raises(Fenced):
        await store.save_docs({"u1": encode_state(state)}, mine)
    assert redis_client.type(store.key("u1")) == "set" and store.rebuilt == 0
    await store.save_docs({"u1": encode_state(state)}, await store.claim([0]))
    assert store.rebuilt == 1 and redis_client.type(store.key("u1")) == "string"


async def test_deleting_and_reading_keys_of_another_type_never_raise(store, redis_client):
    """An erasure deletes whatever the user's key holds; serve's reads (``load_many``, one
    ``MGET``) and the worker's cached store read a key of another type as a fresh user."""
    for uid, kind in (("u1", "hash"), ("u2", "list"), ("u3", "stream")):
        FOREIGN[kind](redis_client, store.key(uid))
    cached = CachedUserStateStore(store)
    assert await cached.load_many(["u1", "u2"]) == {"u1": UserState("u1"), "u2": UserState("u2")}
    assert (await store.load_many(["u3"]))["u3"] == UserState("u3")
    await cached.save_docs({}, delete=["u1", "u3"])
    assert redis_client.exists(store.key("u1"), store.key("u3")) == 0
    await cached.save_docs({"u2": encode_state(clicked("u2"))})
    assert cached.rebuilt == 1 and (await cached.load_many(["u2"]))["u2"].clicks == 1


async def test_the_loads_that_are_never_saved_are_remembered_within_a_bound(store, monkeypatch):
    """Serve loads users and never saves them: what the store remembers for the save stays bounded."""
    monkeypatch.setattr("stream.state.ABSENT_KEPT", 100)
    for start in range(0, 1000, 50):
        await store.load_many([f"u{i}" for i in range(start, start + 50)])
    assert len(store._absent) <= 100 and "u999" in store._absent


async def test_the_worker_counts_it_in_its_metric_and_keeps_the_event(redis_url, redis_prefix, redis_client):
    """End to end through the worker's batch handler over the real server: the event is applied
    to a fresh state that replaces the hash, and streamrec_states_rebuilt_total counts it."""
    redis_client.hset(f"{redis_prefix}user:u1", mapping={"owner": "other-app"})
    store = CachedUserStateStore(RedisUserStateStore(aioredis.Redis.from_url(redis_url), key_prefix=redis_prefix))
    metrics = Metrics(CollectorRegistry())
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=5, n_candidates=20)), None, StepConfig())
    handler = BatchHandler(step, store, Sink(), TopicNames(), metrics, backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0),
                           health=Health(), claims=Claims(lambda: 1))
    ev = ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=1_700_000_000_000)
    try:
        await asyncio.wait_for(handler.handle_isolated([RawMessage("streamrec.clicks", 0, 0, b"u1", encode(ev), None, 1)]), 30)
    finally:
        await store.close()
    assert metrics.registry.get_sample_value("streamrec_states_rebuilt_total") == 1
    assert msgspec.json.decode(redis_client.get(f"{redis_prefix}user:u1"))["clicks"] == 1


async def test_a_claim_or_blob_key_of_another_type_is_refused_with_its_name(store, redis_client):
    """Not a user's key: nothing to start afresh, so the worker retries (unready, logged) and the
    error names the key and what to do, rather than Redis's bare WRONGTYPE."""
    redis_client.hset(store.claim_key(1), "a", "b")
    with pytest.raises(redis.ResponseError, match=f"{store.claim_key(1)} holds another Redis type .*delete the key"):
        await store.claim([1])
    fence = await store.claim([0])
    redis_client.delete(store.claim_key(0))
    redis_client.rpush(store.claim_key(0), "a")
    with pytest.raises(redis.ResponseError, match=f"{store.claim_key(0)} holds another Redis type .*delete the key"):
        await store.save_docs({"u1": encode_state(clicked("u1"))}, fence)
    assert redis_client.exists(store.key("u1")) == 0
    redis_client.sadd(store.blob_key("models:snapshot"), "a")
    with pytest.raises(redis.ResponseError, match=f"{store.blob_key('models:snapshot')} holds another Redis type"):
        await store.get_blob("models:snapshot")


class Sink:
    async def __call__(self, records):
        return []
