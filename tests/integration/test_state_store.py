"""One suite for both user-state stores: the in-memory one and Redis on the real server."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from stream.state import (
    FINGERPRINT_CHARS,
    Fenced,
    InMemoryUserStateStore,
    RedisUserStateStore,
    StateConflict,
    UserState,
    apply_event,
    encode_state,
)


@pytest.fixture(params=["memory", "redis"])
async def store(request, redis_url, redis_prefix):
    if request.param == "memory":
        s = InMemoryUserStateStore()
    else:
        s = RedisUserStateStore(aioredis.Redis.from_url(redis_url), key_prefix=redis_prefix, ttl_s=3600)
    yield s
    if request.param == "redis":
        keys = [k async for k in s.client.scan_iter(match=f"{redis_prefix}*")]
        if keys:
            await s.client.delete(*keys)
    await s.close()


async def test_unknown_users_load_as_fresh_state(store):
    got = await store.load_many(["nobody", "nobody-else"])
    assert got == {"nobody": UserState("nobody"), "nobody-else": UserState("nobody-else")}


async def test_saved_state_round_trips(store):
    states = {}
    for u in range(50):
        s = UserState(f"u{u}")
        for j in range(u % 7 + 1):
            apply_event(s, f"e{u}-{j}", f"i{j}", 1000 + j, "purchase" if j == 3 else "click",
                        max_recent=5, dedupe_window=4, source="clicks:1", offset=j)
        states[s.user_id] = s
    await store.save_many(states)
    assert await store.load_many(list(states)) == states
    assert (await store.load_many(["u6"]))["u6"].offsets == {"clicks:1": 6}


async def test_a_document_that_kept_the_ids_as_sent_is_read_and_saved_as_fingerprints(store):
    """Documents written before fingerprints hold ``event_ids``: their duplicates are still
    caught, and the next save writes fingerprints only (a rolling upgrade loses nothing)."""
    old = b'{"user_id":"u1","recent_items":["i1","i2"],"clicks":2,"event_ids":["e1","e2"],"offsets":{"clicks:0":7}}'
    await store.save_docs({"u1": old})
    state = (await store.load_many(["u1"]))["u1"]
    assert state.has_seen("e1") and state.has_seen("e2") and not state.has_seen("e3")
    assert state.event_ids == [] and len(state.seen) == 2 * FINGERPRINT_CHARS and state.clicks == 2
    apply_event(state, "e3", "i3", 3, "click", max_recent=5, dedupe_window=2)
    await store.save_docs({"u1": encode_state(state)})
    again = (await store.load_many(["u1"]))["u1"]
    assert not again.has_seen("e1") and again.has_seen("e2") and again.has_seen("e3")  # a window of 2
    assert b"event_ids" not in encode_state(again)


async def test_fingerprints_cut_short_by_hand_still_catch_the_latest_ids(store):
    """A ``seen`` whose length is no multiple of 11 (edited by hand) loses its broken oldest
    fingerprint, not the alignment of all the others."""
    state = UserState("u1")
    for i in range(3):
        apply_event(state, f"e{i}", "i", i, "click", max_recent=5, dedupe_window=8)
    doc = encode_state(state).replace(state.seen.encode(), state.seen[4:].encode())
    await store.save_docs({"u1": doc})
    got = (await store.load_many(["u1"]))["u1"]
    assert not got.has_seen("e0") and got.has_seen("e1") and got.has_seen("e2")
    assert len(got.seen) == 2 * FINGERPRINT_CHARS


def test_a_fingerprint_found_across_two_others_is_not_seen():
    """The fingerprints sit side by side in one string: a match that straddles two of them
    is not one of them."""
    state = UserState("u", seen="ABCDEFGHIJK" + "LMNOPQRSTUV")
    assert state.saw("ABCDEFGHIJK") and state.saw("LMNOPQRSTUV")
    assert not state.saw("CDEFGHIJKLM") and not state.saw("KLMNOPQRSTU")
    state = UserState("u", seen="xxABCDEFGHI" + "JKxxxxxxxxx" + "ABCDEFGHIJK")  # a straddle before the real one
    assert state.saw("ABCDEFGHIJK")


async def test_save_of_nothing_is_a_no_op(store):
    await store.save_many({})
    assert await store.load_many([]) == {}


async def test_redis_keys_carry_the_state_ttl(redis_url, redis_prefix):
    store = RedisUserStateStore(aioredis.Redis.from_url(redis_url), key_prefix=redis_prefix, ttl_s=120)
    try:
        await store.save_many({"u1": UserState("u1")})
        ttl = await store.client.ttl(f"{redis_prefix}user:u1")
        assert 100 < ttl <= 120
        raw = await store.client.get(f"{redis_prefix}user:u1")
        assert raw.startswith(b'{"user_id":"u1"')  # a readable JSON document for operators
    finally:
        await store.client.delete(f"{redis_prefix}user:u1")
        await store.close()


async def lose_claim(store, partition: int, how: str) -> None:
    """What Redis holds of a claim after it lost writes (a restart, a failover, a restored dump)."""
    if isinstance(store, InMemoryUserStateStore):
        if how == "missing":
            del store._claims[partition]
        else:
            store._claims[partition] -= 1
    elif how == "missing":
        await store.client.delete(store.claim_key(partition))
    else:
        await store.client.decr(store.claim_key(partition))


@pytest.mark.parametrize("how", ["missing", "older"])
async def test_a_claim_redis_lost_is_put_back_by_its_owner_and_still_fences_it_out_later(store, how):
    """Before, every save of the partition was refused as fenced when none had claimed it since:
    the partition stood still until a rebalance."""
    await store.claim([0])
    fence = await store.claim([0, 1])
    await lose_claim(store, 0, how)
    await store.save_many({"u1": UserState("u1", clicks=1)}, fence)
    assert (await store.load_many(["u1"]))["u1"].clicks == 1
    newer = await store.claim([0])  # the next owner
    assert newer[0] > fence[0]
    with pytest.raises(Fenced):
        await store.save_many({"u1": UserState("u1", clicks=2)}, fence)
    await store.save_many({"u1": UserState("u1", clicks=3)}, {**fence, **newer})
    assert (await store.load_many(["u1"]))["u1"].clicks == 3


async def test_a_claim_taken_after_redis_lost_older_ones_outnumbers_them(redis_url, redis_prefix):
    """A dump restored with claims far behind: the next owner's claim still outnumbers the one the
    old owner holds (claims count from the clock), so the old owner's late save is refused rather
    than putting its claim back over the new one."""
    store = RedisUserStateStore(aioredis.Redis.from_url(redis_url), key_prefix=redis_prefix)
    try:
        for _ in range(3):
            old = await store.claim([0])
        await store.client.set(store.claim_key(0), 1)
        new = await store.claim([0])
        with pytest.raises(Fenced):
            await store.save_many({"u1": UserState("u1", clicks=1)}, old)
        await store.save_many({"u1": UserState("u1", clicks=2)}, new)
        assert (await store.load_many(["u1"]))["u1"].clicks == 2
    finally:
        await store.client.delete(store.claim_key(0), store.key("u1"))
        await store.close()


async def test_a_versioned_save_refuses_each_user_another_writer_saved_since_and_writes_the_rest(store):
    """Two writers loaded u1 at version 4 and u2 absent; the other saved both first: this one's
    save of them is refused (StateConflict names them), and its u3 is written."""
    await store.save_docs({"u1": encode_state(UserState("u1", clicks=4, version=4))})
    other = {"u1": encode_state(UserState("u1", clicks=5, version=5)), "u2": encode_state(UserState("u2", clicks=1, version=1))}
    await store.save_docs(other, versioned=True)
    mine = {"u1": encode_state(UserState("u1", clicks=9, version=5)), "u2": encode_state(UserState("u2", clicks=7, version=1)),
            "u3": encode_state(UserState("u3", clicks=3, version=1))}
    with pytest.raises(StateConflict) as raised:
        await store.save_docs(mine, versioned=True)
    assert sorted(raised.value.users) == ["u1", "u2"]
    got = await store.load_many(["u1", "u2", "u3"])
    assert [(got[u].clicks, got[u].version) for u in ("u1", "u2", "u3")] == [(5, 5), (1, 1), (3, 1)]


async def test_a_versioned_save_writes_over_a_document_without_a_version_and_over_none(store):
    """Documents written before versions (none: 0), and users whose key expired since their load."""
    await store.save_docs({"u1": b'{"user_id":"u1","clicks":2}'})
    await store.save_docs({"u1": encode_state(UserState("u1", clicks=3, version=1)),
                           "gone": encode_state(UserState("gone", clicks=8, version=6))}, versioned=True)
    got = await store.load_many(["u1", "gone"])
    assert (got["u1"].clicks, got["gone"].clicks) == (3, 8)
    await store.save_docs({"u1": encode_state(UserState("u1", clicks=1, version=1))})  # not versioned: as before
    assert (await store.load_many(["u1"]))["u1"].clicks == 1
