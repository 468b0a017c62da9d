"""Bounded memory: every item-keyed and user-keyed table of the learners has a capacity, and a
flood of new items and users never grows it past that; what stays is what the eviction rule
says (the least recently seen go, or those of lowest weight), and the learners still rank."""

from __future__ import annotations

import numpy as np
import pytest

from online_models import (
    CoVisitation,
    GlobalPopularity,
    ImplicitMF,
    Interaction,
    RecentlyViewed,
    RecentPopularity,
    Recommender,
    RecommenderConfig,
    TrendingPopularity,
    UserContext,
)
from online_models.session_knn import SequentialRules

CAP = 200


def flood(learner, n: int = 3_000, repeat_every: int = 7):
    """``n`` events of new users and new items, with item ``hot`` coming back every few events."""
    for i in range(n):
        item = "hot" if i % repeat_every == 0 else f"i{i}"
        learner.learn_one(Interaction(f"u{i}", item, ts=1_700_000_000_000 + i * 1000, session_id=f"s{i // 2}",
                                      category_id=f"c{i % 13}", kind="purchase" if i % 5 == 0 else "click"))
    return learner


@pytest.mark.parametrize("cls", [GlobalPopularity, TrendingPopularity, RecentPopularity])
def test_popularity_keeps_at_most_max_items_and_the_heaviest_of_them(cls):
    model = flood(cls(max_items=CAP))
    assert len(model._items) == len(model._index) <= CAP and len(model._scores) <= 2 * CAP
    assert max(model._index.values()) < len(model._items)
    assert model._index["hot"] < len(model._items)  # the item with the highest weight stays
    assert [s.item_id for s in model.rank(UserContext("x", ts=1_700_003_000_000), k=1)] == ["hot"]
    assert all(0 <= r < len(model._items) for r in model._pool)


def test_recent_popularity_window_is_bounded_and_renumbered():
    model = flood(RecentPopularity(window_s=10**9, max_items=CAP, max_window_events=500))
    assert len(model._window) <= 500
    assert all(r == -1 or model._items[r] for _, r, _ in model._window)


def test_co_visitation_keeps_the_neighbours_of_the_most_recently_seen_items():
    model = flood(CoVisitation(max_items=CAP, max_sessions=CAP))
    assert len(model._neighbors) <= CAP and len(model._totals) <= CAP and len(model._sessions) <= CAP
    assert len(model._seen) <= CAP
    assert "i2999" in model._totals and "i10" not in model._totals  # the least recently seen went
    assert model.rank(UserContext("x", recent_items=("i2998",)), k=5)


def test_implicit_mf_keeps_at_most_max_items_and_max_users():
    model = flood(ImplicitMF(max_items=CAP, max_users=CAP, seed=1), n=2_000)
    assert len(model._items) == len(model._index) <= CAP and len(model.model.i_latents) <= CAP
    assert len(model.model.u_latents) <= CAP and all(0 <= r < len(model._items) for r in model._recent)
    assert np.isfinite(model.score_many(UserContext("u1999", recent_items=("hot",)), ["hot", "i1"])).all()


def test_re_consumption_and_sequential_rules_are_bounded():
    reminder = flood(RecentlyViewed(max_users=CAP))
    assert len(reminder._history) <= CAP
    rules = flood(SequentialRules(max_items=CAP, max_sessions=CAP))
    assert len(rules.rules) <= CAP and len(rules.index.sessions) <= CAP
    assert len(rules.index.df) <= CAP * rules.max_session_len


def test_the_recommenders_own_tables_are_bounded():
    config = RecommenderConfig(max_items=CAP, max_tracked_users=CAP, weights={**RecommenderConfig().weights, "mf": 0.2})
    rec = Recommender.default(config)
    for i in range(3_000):
        user = UserContext(f"u{i}", recent_items=(f"i{i - 1}",))
        rec.learn_one(Interaction(f"u{i}", f"i{i}", ts=1_700_000_000_000 + i, category_id="c"), user)
        ranked = rec.rank(user, rec.candidates(user))
        rec.record_shown(user.user_id, ranked)
    assert len(rec._counts) <= CAP and len(rec._categories) <= CAP
    assert len(rec._shown) <= CAP and len(rec._ranked) <= CAP
    assert Recommender.restore(rec.snapshot()).n_learned == 3_000
