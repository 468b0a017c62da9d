"""Forgetting a user (an erasure request): every learner and the Recommender drop what they keep
of the user and of the user's sessions, remember the user only by a keyed hash, and refuse the
user's events up to the erasure time."""

from __future__ import annotations

import hashlib
import importlib
import pkgutil

import pytest

import online_models
from online_models.base import learner_classes
from online_models.checks import learner_instance
from online_models.recommender import Recommender, RecommenderConfig
from online_models.session_knn import SessionKNN
from online_models.types import Interaction, UserContext

for _module in pkgutil.iter_modules(online_models.__path__):
    importlib.import_module(f"online_models.{_module.name}")

# only the package's own learners (a test module may define learners of its own)
LEARNERS = [cls for cls in learner_classes() if cls.__module__.startswith("online_models.")]

VICTIM, VICTIM_SESSION = "victim-7f3a", "sess-victim-91"
KEEP, KEEP_SESSION = "keeper-2c9d", "sess-keeper-55"
MINUTE = 60_000
ITEMS = [f"i{n}" for n in range(12)]
ITEM_KEYED = ("GlobalPopularity", "RecentPopularity", "TrendingPopularity")  # keep nothing of a user


def _stream() -> list[Interaction]:
    """Several users, with and without session ids and with gaps that start new sessions; the
    victim browses the same items as the others (items are no one's)."""
    events: list[Interaction] = []
    ts = 1_700_000_000_000

    def add(user: str, item: str, session: str | None, step: int = MINUTE) -> None:
        nonlocal ts
        ts += step
        events.append(Interaction(user, item, ts=ts, session_id=session,
                                  kind="purchase" if item == "i5" else "click", category_id=f"c{item[-1]}"))

    for rnd in range(4):
        for u in range(5):
            user = f"other-{u}"
            for j in range(3):
                add(user, ITEMS[(u + j + rnd) % len(ITEMS)], f"sess-other-{u}-{rnd}" if u % 2 else None)
        for j in range(4):
            add(VICTIM, ITEMS[(2 * j + rnd) % len(ITEMS)], VICTIM_SESSION)
            add(KEEP, ITEMS[(2 * j + rnd + 1) % len(ITEMS)], KEEP_SESSION)
        for j in range(3):  # no session id: keyed by the user (u:<user>#n with a session gap)
            add(VICTIM, ITEMS[(j + 3 * rnd) % len(ITEMS)], None)
            add(KEEP, ITEMS[(j + 3 * rnd + 2) % len(ITEMS)], None)
        add(VICTIM, ITEMS[rnd], VICTIM)  # a session id that is the user id
        ts += 2 * 60 * MINUTE  # past the session gap: the next round's events start new sessions
    return events


def _keeper() -> UserContext:
    return UserContext(KEEP, recent_items=("i1", "i3"), session_id=KEEP_SESSION)


def _ranked(model, user: UserContext) -> list[str]:
    return [s.item_id for s in model.rank(user, ITEMS, k=5)]


def test_the_learners_are_discovered():
    assert {"CoVisitation", "RecentlyViewed", "ImplicitMF", "SessionKNN", "SequentialRules",
            "SessionHybrid", "GlobalPopularity"} <= {cls.__name__ for cls in LEARNERS}


def _learned(cls):
    """A learner of ``cls`` that learned :func:`_stream` (the victim, the keeper and others)."""
    learner = learner_instance(cls)
    for x in _stream():
        learner.learn_one(x)
    return learner


@pytest.mark.parametrize("cls", LEARNERS, ids=lambda cls: cls.__name__)
def test_a_learner_forgets_the_user_and_their_sessions(cls):
    learner = _learned(cls)
    before = learner.snapshot()
    holds_users = KEEP.encode() in before
    assert holds_users == (cls.__name__ not in ITEM_KEYED)
    assert (VICTIM.encode() in before) == holds_users  # the victim is kept as the keeper is
    proposed = learner.propose_items(_keeper(), 5)

    learner.forget_user(VICTIM, [VICTIM_SESSION])

    after = learner.snapshot()
    assert VICTIM.encode() not in after
    assert VICTIM_SESSION.encode() not in after
    if holds_users:  # the others stay: the check above can fail
        assert KEEP.encode() in after
        assert KEEP_SESSION.encode() in after or cls.__name__ in ("RecentlyViewed", "ImplicitMF")
    restored = type(learner).restore(after)
    assert _ranked(restored, _keeper())
    assert bool(restored.propose_items(_keeper(), 5)) == bool(proposed)
    restored.learn_one(Interaction(KEEP, "i2", ts=1_800_000_000_000, session_id=KEEP_SESSION))
    restored.learn_one(Interaction(VICTIM, "i2", ts=1_800_000_000_001, session_id="sess-victim-new"))
    assert _ranked(restored, _keeper())


@pytest.mark.parametrize("cls", LEARNERS, ids=lambda cls: cls.__name__)
def test_forgetting_someone_unknown_changes_nothing(cls):
    learner = _learned(cls)
    before = learner.snapshot()
    learner.forget_user("nobody", ["no-session"])
    assert learner.snapshot() == before


@pytest.mark.parametrize("cls", LEARNERS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("crafted", [f"u:{KEEP}#1", f"u:{KEEP}#2", f"s:{KEEP_SESSION}", f"s:{KEEP}"])
def test_a_user_whose_id_is_another_users_session_key_forgets_none_of_their_sessions(cls, crafted):
    # a learner keyed by session_key with a gap holds the keeper's sessions as u:<keeper>#n and
    # s:<session id>; an erasure request for a user whose id was one of those keys dropped them
    learner = _learned(cls)
    before = learner.snapshot()
    learner.forget_user(crafted, [])
    assert learner.snapshot() == before


def _check_index(index) -> None:
    """The session index's bookkeeping agrees with its sessions, as after evictions."""
    held: dict[str, int] = {}
    for items in index.sessions.values():
        for item in set(items):
            held[item] = held.get(item, 0) + 1
    assert index.df == held
    assert set(index.item_sessions) <= set(index.df)
    assert set(index.session_ts) == set(index.sessions)


def test_the_session_index_drops_the_keys_eviction_leaves_behind():
    knn = SessionKNN(max_sessions=4, max_session_len=3)
    knn.learn_one(Interaction("other-0", "a", ts=0, session_id="o0"))
    for t, item in enumerate("abcd"):  # a falls out of the session (max_session_len); a's index keeps it
        knn.learn_one(Interaction(VICTIM, item, ts=10 + t, session_id=VICTIM_SESSION))
    knn.learn_one(Interaction(VICTIM, "a", ts=20))  # no session id: u:<user>#1
    knn.learn_one(Interaction("other-0", "x", ts=30, session_id="o0"))
    index = knn.index
    assert "s:" + VICTIM_SESSION in index.item_sessions["a"]
    assert f"u:{VICTIM}#1" in index.sessions
    for s in (1, 2):  # the victim's first session is the least recently active: evicted
        knn.learn_one(Interaction(f"other-{s}", "a", ts=40 + s, session_id=f"o{s}"))
    assert "s:" + VICTIM_SESSION not in index.sessions
    assert "s:" + VICTIM_SESSION in index.item_sessions["a"]  # stale, left by eviction
    _check_index(index)

    knn.forget_user(VICTIM, [VICTIM_SESSION])

    _check_index(index)
    keys = [k for keys in index.item_sessions.values() for k in keys] + list(index.sessions) + list(index.user_session)
    assert not [k for k in keys if VICTIM in k]
    assert VICTIM.encode() not in knn.snapshot()
    # the others' sessions and the index still work, also for an item all of whose listed sessions went
    knn.learn_one(Interaction(VICTIM, "d", ts=300, session_id="fresh"))
    knn.learn_one(Interaction(VICTIM, "d", ts=301, session_id="fresh"))
    _check_index(index)
    assert [s.item_id for s in knn.rank(UserContext("new", recent_items=("a", "b")), k=3)]


def test_an_item_whose_listed_sessions_were_all_the_users_stays_indexed():
    knn = SessionKNN(max_sessions_per_item=1)
    knn.learn_one(Interaction("other-0", "q", ts=0, session_id="o0"))
    knn.learn_one(Interaction(VICTIM, "q", ts=1, session_id=VICTIM_SESSION))  # o0 falls off q's list
    index = knn.index
    assert list(index.item_sessions["q"]) == ["s:" + VICTIM_SESSION] and index.df["q"] == 2

    knn.forget_user(VICTIM, [VICTIM_SESSION])

    assert list(index.item_sessions["q"]) == [] and index.df["q"] == 1
    _check_index(index)
    knn.learn_one(Interaction("other-0", "q", ts=2, session_id="o0"))  # o0 holds q already: listed again
    assert list(index.item_sessions["q"]) == ["s:o0"] and index.df["q"] == 1
    _check_index(index)


def _everything() -> Recommender:
    config = RecommenderConfig(weights={name: 1.0 for name in Recommender.DEFAULT_LEARNERS}, reranker_min_samples=5)
    rec = Recommender.default(config)
    assert set(rec.learners) == set(Recommender.DEFAULT_LEARNERS)
    for x in _stream():
        rec.learn_one(x)
        user = UserContext(x.user_id, recent_items=(x.item_id,), session_id=x.session_id)
        rec.record_shown(x.user_id, rec.recommend(user))
    return rec


def test_the_recommender_forgets_the_user_everywhere():
    rec = _everything()
    rec.rank(UserContext(VICTIM, recent_items=("i1",)), ITEMS)  # a list waiting for record_shown
    assert VICTIM in rec._ranked
    before = rec.snapshot()
    assert VICTIM.encode() in before and VICTIM_SESSION.encode() in before

    rec.forget_user(VICTIM, before_ts=1_800_000_000_000)

    after = rec.snapshot()
    assert VICTIM.encode() not in after
    assert VICTIM_SESSION.encode() not in after
    assert KEEP.encode() in after and KEEP_SESSION.encode() in after
    assert VICTIM not in rec._ranked and VICTIM not in rec._shown
    assert VICTIM not in rec._session_users.values() and VICTIM_SESSION not in rec._session_users
    assert rec.forgotten_users == 1
    for model in (rec, Recommender.restore(after)):
        assert len(model.recommend(_keeper(), k=5)) == 5
        assert model.recommend(UserContext(VICTIM), k=5) is not None
        model.learn_one(Interaction(KEEP, "i2", ts=1_800_000_000_001, session_id=KEEP_SESSION))


def test_refuses_the_users_events_up_to_the_erasure_time():
    rec = _everything()
    assert rec.forgotten_users == 0
    assert not rec.refuses(VICTIM, 0)
    assert not rec.refuses(VICTIM, 10**15)

    rec.forget_user(VICTIM, before_ts=1000)

    assert rec.refuses(VICTIM, 999) and rec.refuses(VICTIM, 1000)
    assert not rec.refuses(VICTIM, 1001)
    assert not rec.refuses(KEEP, 5)
    rec.forget_user(VICTIM, before_ts=500)  # twice: the later erasure time holds
    assert rec.refuses(VICTIM, 1000) and rec.forgotten_users == 1
    rec.forget_user("someone-else", before_ts=2000)
    assert rec.forgotten_users == 2

    data = rec.snapshot()
    assert VICTIM.encode() not in data and b"someone-else" not in data
    back = Recommender.restore(data)
    assert back.refuses(VICTIM, 1000) and not back.refuses(VICTIM, 1001)
    assert back.refuses("someone-else", 2000) and not back.refuses(KEEP, 5)
    assert back.forgotten_users == 2
    assert Recommender().refuses(VICTIM, 0) is False  # another Recommender, another salt: knows nobody


def test_the_forgotten_are_hashed_with_a_salt_of_each_recommender():
    a, b = Recommender(), Recommender()
    a.forget_user(VICTIM, 1)
    b.forget_user(VICTIM, 1)
    assert a._forget_salt != b._forget_salt
    assert set(a._forgotten).isdisjoint(b._forgotten)
    assert all(isinstance(k, bytes) and len(k) == 16 for k in a._forgotten)


def test_a_snapshot_from_before_forget_user_restores_and_works():
    rec = _everything()
    for name in ("_forget_salt", "_forgotten", "_forgotten_at", "_session_users"):  # as the old code wrote it
        del rec.__dict__[name]
    data = rec.snapshot()
    assert b"_forgotten" not in data and b"_session_users" not in data
    old = Recommender.restore(data)
    assert old.forgotten_users == 0 and not old.refuses(VICTIM, 0)
    assert len(old.recommend(_keeper(), k=5)) == 5
    old.learn_one(Interaction(KEEP, "i3", ts=1_800_000_000_000, session_id="sess-keeper-new"))
    assert old._session_users == {"sess-keeper-new": KEEP}
    # the victim's sessions from before are not tracked, but the learners still find the ones
    # derived from the user id; the rest is what the test above checks with tracking
    old.forget_user(VICTIM, before_ts=10)
    assert old.refuses(VICTIM, 10)
    assert Recommender.restore(old.snapshot()).refuses(VICTIM, 10)


def test_session_tracking_is_bounded_by_max_users():
    rec = Recommender.default(RecommenderConfig(max_users=3))
    for n in range(10):
        rec.learn_one(Interaction("u", "a", ts=n, session_id=f"s{n}"))
    rec.learn_one(Interaction("v", "a", ts=20, session_id="v"))  # the user id as session id: nothing to track
    rec.learn_one(Interaction("w", "a", ts=21))
    assert rec._session_users == {"s7": "u", "s8": "u", "s9": "u"}
    rec.learn_one(Interaction("u", "a", ts=22, session_id="s7"))  # s7 is the most recently active again
    rec.learn_one(Interaction("x", "a", ts=23, session_id="sx"))
    assert list(rec._session_users) == ["s9", "s7", "sx"]


def test_a_large_session_table_is_trimmed_in_chunks_yet_keeps_every_session_a_learner_can_hold():
    # trimmed a 64th at a time (one walk of the dict per chunk, not one per event), never
    # below the cap: a learner that holds max_users sessions still finds each one's owner
    rec = Recommender.default(RecommenderConfig(max_users=640))
    for n in range(3_000):
        rec.learn_one(Interaction(f"u{n % 7}", "a", ts=n, session_id=f"s{n}"))
        assert 640 <= len(rec._session_users) <= 650 or n < 640
    assert set(rec.learners["covisit"]._sessions) <= set(rec._session_users)
    assert all(f"s{n}" in rec._session_users for n in range(3_000 - 640, 3_000))
    assert len(rec.learners["covisit"]._sessions) <= 640


def test_the_forgotten_key_is_a_keyed_blake2b_of_the_user_id():
    rec = Recommender()
    rec.forget_user(VICTIM, 7)
    assert rec._forgotten == {hashlib.blake2b(VICTIM.encode(), key=rec._forget_salt, digest_size=16).digest(): 7}
    assert Recommender.restore(rec.snapshot())._forgotten == rec._forgotten


def test_the_forgotten_set_is_trimmed_by_the_later_of_the_bound_and_the_erasure_and_survives_a_snapshot():
    rec = Recommender.default()
    rec.forget_user("dated-in-the-past", before_ts=1_000, at_ms=50_000)  # a replayed log's request
    rec.forget_user("recent", before_ts=40_000, at_ms=40_000)
    rec.forget_user("old", before_ts=2_000)
    assert rec.forgotten_users == 3
    restored = Recommender.restore(rec.snapshot())
    for models in (rec, restored):
        assert models.trim_forgotten(45_000) == 2  # "old" and "recent"; "dated-in-the-past" was erased at 50,000
        assert models.refuses("dated-in-the-past", 900) and not models.refuses("recent", 30_000)
        assert models.trim_forgotten(60_000) == 1 and models.forgotten_users == 0
    rec.forget_user("again", before_ts=5_000, at_ms=70_000)
    rec.forget_user("again", before_ts=4_000, at_ms=80_000)  # delivered again: the later erasure counts
    assert rec.trim_forgotten(75_000) == 0 and rec.refuses("again", 5_000)


@pytest.mark.parametrize("forgotten", ["alice", "bob"])
def test_a_session_id_two_users_sent_goes_whole_when_either_is_forgotten(forgotten):
    # a shared device, or session ids the site numbers per user: one session key holds both
    # users' items in co-visitation and in the session index; the session -> user link kept
    # only the latest sender, so forgetting the earlier one left their items in that session
    rec = Recommender.default(RecommenderConfig(weights={**RecommenderConfig().weights, "session_hybrid": 1.0}))
    ts = 1_700_000_000_000
    for n, item in enumerate(["alice-item-1", "alice-item-2", "alice-item-3"]):
        rec.learn_one(Interaction("alice", item, ts=ts + n, session_id="kiosk-7"))
    for n, item in enumerate(["bob-item-1", "bob-item-2"]):
        rec.learn_one(Interaction("bob", item, ts=ts + 10 + n, session_id="kiosk-7"))
    rec.learn_one(Interaction("carol", "carol-item", ts=ts + 20, session_id="carol-s1"))
    assert b"kiosk-7" in rec.snapshot()

    rec.forget_user(forgotten, before_ts=ts + 100)

    after = rec.snapshot()
    assert b"kiosk-7" not in after, "the forgotten user's items stay in a session another user also sent"
    assert b"carol-s1" in after and b"carol" in after  # nobody else's session goes
    assert "kiosk-7" not in rec._session_users
    for name in ("covisit", "session_hybrid"):
        learner = rec.learners[name]
        index = getattr(learner, "_sessions", None) or learner._knn.index.sessions
        assert not [key for key in index if "kiosk-7" in key], name


def test_a_session_id_sent_by_more_users_than_are_kept_goes_with_any_forgotten_user():
    rec = Recommender.default()
    for n in range(40):  # one session id, 40 users (ids the site numbers per user: "1" for everyone)
        rec.learn_one(Interaction(f"user-{n}", f"i{n}", ts=n, session_id="1"))
    rec.forget_user("user-0", before_ts=100)
    assert "1" not in rec._session_users and "1" not in rec.learners["covisit"]._sessions
    rec.learn_one(Interaction("user-5", "i5", ts=200, session_id="1"))  # the others go on, in a fresh session
    assert rec._session_users == {"1": "user-5"} and rec.learners["covisit"]._sessions["1"] == ["i5"]
