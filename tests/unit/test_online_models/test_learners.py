"""Behaviour of each streamrec learner (the shared contract is in the conformance suite)."""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest

from online_models import (
    ClickReranker,
    CoVisitation,
    GlobalPopularity,
    ImplicitMF,
    RecentPopularity,
    TrendingPopularity,
)
from online_models.base import SnapshotError
from online_models.types import Interaction, UserContext

MINUTE = 60_000


def click(user, item, ts=0, session=None, kind="click"):
    return Interaction(user, item, ts, kind, session)


@pytest.mark.parametrize(
    "name",
    ["online_models.base", "online_models.popularity", "online_models.covisit", "online_models.mf",
     "online_models.reranker", "online_models.recommender", "online_models.checks"],
)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


# -- popularity ------------------------------------------------------------------------
def test_global_popularity_counts_purchases_heavier():
    pop = GlobalPopularity(click_weight=1.0, purchase_weight=3.0)
    for _ in range(2):
        pop.learn_one(click("u", "clicked"))
    pop.learn_one(click("u", "bought", kind="purchase"))
    assert [s.item_id for s in pop.rank(UserContext("x"))] == ["bought", "clicked"]
    assert pop.predict_one(UserContext("x"), "bought") == 3.0


def test_trending_halves_every_half_life_and_survives_long_gaps():
    tr = TrendingPopularity(half_life_s=60)
    tr.learn_one(click("u", "a", ts=0))
    assert tr.predict_one(UserContext("x", ts=MINUTE), "a") == pytest.approx(0.5)
    # days later (far past the rescaling threshold) ratios still hold
    day = 24 * 60 * MINUTE
    tr.learn_one(click("u", "b", ts=day))
    tr.learn_one(click("u", "c", ts=day + MINUTE))
    now = UserContext("x", ts=day + MINUTE)
    assert tr.predict_one(now, "c") == pytest.approx(1.0)
    assert tr.predict_one(now, "b") == pytest.approx(0.5)
    assert tr.predict_one(now, "a") == pytest.approx(0.0, abs=1e-12)
    assert np.all(np.isfinite(tr._scores))


def test_trending_prefers_recent_activity_over_old_volume():
    tr = TrendingPopularity(half_life_s=60)
    for i in range(5):
        tr.learn_one(click("u", "old", ts=i))
    tr.learn_one(click("u", "new", ts=10 * MINUTE))
    assert tr.rank(UserContext("x"), k=1)[0].item_id == "new"


def test_a_new_item_that_takes_off_is_proposed_before_the_pool_refresh():
    tr = TrendingPopularity(half_life_s=600, pool_size=3, refresh_every=1000)
    for i, item in enumerate(["a", "b", "c", "d", "e"] * 3):
        tr.learn_one(click("u", item, ts=i))
    for i in range(6):
        tr.learn_one(click("u", "fresh", ts=100 + i))
    assert tr.rank(UserContext("x"), k=1)[0].item_id == "fresh"


@pytest.mark.parametrize("cls", [GlobalPopularity, TrendingPopularity])
def test_a_refresh_that_ranks_only_the_pool_keeps_the_rows_ranking_every_item_keeps(cls):
    # scores that only grow: every row that can be in the new top is in the pool, so the top's
    # scores and the floor are those of ranking every item; the rows too, where no two scores
    # tie (trending's sums here), and then the proposals (counts tie: which rows at the floor
    # stay is argpartition's choice either way)
    rng = np.random.default_rng(7)
    pooled, full = cls(pool_size=40, refresh_every=25), cls(pool_size=40, refresh_every=25)
    full.grows_only = False  # every refresh ranks every item
    items = [f"i{n}" for n in range(600)]
    for t in range(6_000):
        x = click(f"u{t}", items[int(rng.zipf(1.3)) % 600 if t % 3 else rng.integers(600)], ts=t * 997 + t % 7,
                  kind="purchase" if t % 11 == 0 else "click")
        pooled.learn_one(x)
        full.learn_one(x)
        if t % 250 == 249:
            assert pooled._pool_floor == full._pool_floor
            assert sorted(pooled._scores[list(pooled._pool)]) == sorted(full._scores[list(full._pool)])
            if cls is TrendingPopularity:
                assert list(pooled._pool) == list(full._pool)
                ctx = UserContext("x", ts=x.ts)
                assert ([(s.item_id, s.score) for s in pooled.rank(ctx, k=20)]
                        == [(s.item_id, s.score) for s in full.rank(ctx, k=20)])
    assert len(pooled._items) > 500 and pooled.n_learned == 6_000


def test_a_pool_stays_its_size_when_every_score_ties():
    # a bulk load: every event at one timestamp, each of a new item
    tr = TrendingPopularity(pool_size=50, refresh_every=20)
    for i in range(2_000):
        tr.learn_one(click(f"u{i}", f"i{i}", ts=5))
    assert len(tr._pool) <= 50 + 20


def test_recent_popularity_forgets_events_that_leave_the_window():
    rp = RecentPopularity(window_s=60)
    for i in range(3):
        rp.learn_one(click("u", "old", ts=i))
    rp.learn_one(click("u", "new", ts=2 * MINUTE))
    assert rp.predict_one(UserContext("x"), "old") == 0.0
    assert [s.item_id for s in rp.rank(UserContext("x"))] == ["new"]


# -- co-visitation ---------------------------------------------------------------------
def test_covisitation_weighs_forward_close_pairs_most():
    cv = CoVisitation(window=5, distance_decay=0.5, forward_weight=1.0, backward_weight=0.5)
    for item in ["a", "b", "c"]:
        cv.learn_one(click("u", item, session="s"))
    nb = dict(cv.neighbors("a"))
    assert nb["b"] == pytest.approx(1.0) and nb["c"] == pytest.approx(0.5)
    assert dict(cv.neighbors("b"))["a"] == pytest.approx(0.5)  # backward


def test_covisitation_pairs_only_within_a_session():
    cv = CoVisitation()
    cv.learn_one(click("u", "a", session="s1"))
    cv.learn_one(click("u", "b", session="s2"))
    assert cv.neighbors("a") == []


def test_covisitation_favours_the_users_newest_items():
    cv = CoVisitation(recency_decay=0.5)
    for s, (x, y) in enumerate([("old", "after_old"), ("new", "after_new")]):
        cv.learn_one(click("u", x, session=f"s{s}"))
        cv.learn_one(click("u", y, session=f"s{s}"))
    top = cv.rank(UserContext("v", recent_items=("old", "new")), k=1)
    assert top[0].item_id == "after_new"


def test_covisitation_serves_a_brand_new_user_and_a_brand_new_item():
    cv = CoVisitation()
    cv.learn_one(click("u1", "phone", session="s1"))
    cv.learn_one(click("u1", "just-listed", session="s1"))
    assert [s.item_id for s in cv.rank(UserContext("new-user", recent_items=("phone",)))] == ["just-listed"]


def test_covisitation_memory_is_bounded():
    cv = CoVisitation(max_neighbors=5, max_sessions=10)
    for s in range(100):
        cv.learn_one(click("u", "hub", session=f"s{s}"))
        cv.learn_one(click("u", f"item{s}", session=f"s{s}"))
    assert len(cv._neighbors["hub"]) < 2 * 5
    assert len(cv._sessions) <= 10


# -- matrix factorisation --------------------------------------------------------------
def _two_tastes(n=3000):
    """Users u0..u9 like items a0..a9, users u10..u19 like b0..b9."""
    rng = np.random.default_rng(0)
    for t in range(n):
        u = int(rng.integers(20))
        group = "a" if u < 10 else "b"
        yield click(f"u{u}", f"{group}{int(rng.integers(10))}", ts=t)


def test_mf_learns_which_items_a_user_likes():
    mf = ImplicitMF(n_factors=8, seed=3)
    for x in _two_tastes():
        mf.learn_one(x)
    fan_a, fan_b = UserContext("u1"), UserContext("u15")
    a_items, b_items = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    assert np.mean(mf.score_many(fan_a, a_items)) > np.mean(mf.score_many(fan_a, b_items))
    assert np.mean(mf.score_many(fan_b, b_items)) > np.mean(mf.score_many(fan_b, a_items))
    proposed = [s.item_id for s in mf.rank(fan_a, None, k=10)]
    assert sum(i.startswith("a") for i in proposed) >= 8
    # a new user is served from the factors of the items they just saw
    newcomer = UserContext("new", recent_items=("b1", "b2"))
    assert sum(s.item_id.startswith("b") for s in mf.rank(newcomer, None, k=10)) >= 8


def test_mf_prediction_creates_no_state():
    mf = ImplicitMF()
    mf.learn_one(click("u", "a"))
    users, items = len(mf.model.u_latents), len(mf.model.i_latents)
    mf.predict_one(UserContext("ghost"), "ghost-item")
    mf.rank(UserContext("ghost"), ["ghost-item", "a"])
    assert (len(mf.model.u_latents), len(mf.model.i_latents)) == (users, items)


# -- re-ranker and snapshots -----------------------------------------------------------
def test_reranker_learns_which_feature_predicts_the_click_and_waits_until_ready():
    rr = ClickReranker(min_samples=50, seed=0)
    shown = {"hot": {"covisit": 1.0, "mf": 0.0}, "cold": {"covisit": 0.0, "mf": 1.0}, "x": {"covisit": 0.2, "mf": 0.2}}
    assert rr.score(["covisit", "mf"], np.eye(2)) is None
    for _ in range(60):
        rr.learn_shown(shown, "hot")
    p = rr.score(["covisit", "mf"], np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert p[0] > p[1]
    restored = ClickReranker.restore(rr.snapshot())
    assert np.array_equal(restored.score(["covisit", "mf"], np.eye(2)), rr.score(["covisit", "mf"], np.eye(2)))


def test_restore_refuses_foreign_bytes_and_other_classes():
    with pytest.raises(SnapshotError):
        CoVisitation.restore(b"not a snapshot")
    with pytest.raises(SnapshotError):
        CoVisitation.restore(GlobalPopularity().snapshot())
    assert b'"class": "online_models.covisit.CoVisitation"' in CoVisitation(window=3).snapshot().split(b"\n")[1]


# -- re-consumption --------------------------------------------------------------------
def test_reminder_ranks_often_and_lately_seen_items_first_and_falls_back_to_its_own_history():
    from online_models import RecentlyViewed

    rv = RecentlyViewed(recency_decay=0.5)
    ranked = rv.rank(UserContext("u", recent_items=("a", "b", "a", "c")))
    assert [(s.item_id, s.score) for s in ranked] == [("c", 1.0), ("a", 0.5 + 0.125), ("b", 0.25)]
    slower = RecentlyViewed(recency_decay=0.9)  # seen twice beats seen last
    assert slower.rank(UserContext("u", recent_items=("a", "b", "a", "c")))[0].item_id == "a"
    for item in ["x", "y"]:
        rv.learn_one(click("v", item))
    assert [s.item_id for s in rv.rank(UserContext("v"))] == ["y", "x"]


def test_mf_forgets_the_least_recently_active_users_beyond_max_users():
    mf = ImplicitMF(max_users=3)
    for u in ["a", "b", "c", "a", "d"]:
        mf.learn_one(click(u, "item"))
    assert list(mf.model.u_latents) == ["c", "a", "d"]


def test_popularity_windows_must_be_positive():
    with pytest.raises(ValueError, match="half_life_s"):
        TrendingPopularity(half_life_s=0)
    with pytest.raises(ValueError, match="window_s"):
        RecentPopularity(window_s=-1)
