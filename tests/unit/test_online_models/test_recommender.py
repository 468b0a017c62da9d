"""The blend: candidates, ranking invariants, filters, diversity, re-ranker wiring, snapshots."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from online_models import Explanation, Recommender, RecommenderConfig, ScoredItem, UserContext
from online_models.datasets import synthetic_interactions
from online_models.types import Interaction

EVENTS = list(synthetic_interactions(n_events=3000, n_users=100, n_items=300, n_categories=12, seed=11))
CATALOGUE = sorted({x.item_id for x in EVENTS})


@pytest.fixture(scope="module")
def trained() -> Recommender:
    rec = Recommender.default(seed=1)
    for x in EVENTS:
        rec.learn_one(x)
    return rec


users = st.builds(
    UserContext,
    user_id=st.sampled_from(["u1", "u2", "u7", "brand-new"]),
    recent_items=st.lists(st.sampled_from([*CATALOGUE[:80], "unseen-item"]), max_size=8).map(tuple),
    purchased=st.frozensets(st.sampled_from(CATALOGUE[:60]), max_size=10),
)
candidate_lists = st.lists(st.sampled_from([*CATALOGUE[:100], "unseen-item"]), max_size=120)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=users, candidates=candidate_lists, k=st.integers(0, 30), cap=st.one_of(st.none(), st.integers(1, 4)),
       transformer=st.booleans())
def test_rank_invariants(trained, user, candidates, k, cap, transformer):
    trained.config = dataclasses.replace(trained.config, max_per_category=cap)
    extra = {"transformer": {c: float(len(c)) for c in candidates[::2]}} if transformer else None
    ranked = trained.rank(user, candidates, k=k, extra_scores=extra)
    ids = [s.item_id for s in ranked]
    assert len(ranked) <= k
    assert len(ids) == len(set(ids))
    assert set(ids) <= set(candidates)
    assert not set(ids) & user.purchased
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:], strict=False))
    if cap is not None:
        cats = [trained.category(i) for i in ids if trained.category(i) is not None]
        assert all(cats.count(c) <= cap for c in cats)
    else:
        eligible = set(candidates) - user.purchased
        assert len(ranked) == min(k, len(eligible))
    sources = {*trained.learners, "transformer", None}
    assert all(s.reason in sources for s in ranked)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(user=users, n=st.integers(0, 250))
def test_candidates_are_unique_unpurchased_and_bounded(trained, user, n):
    trained.config = dataclasses.replace(trained.config, max_per_category=None)
    cands = trained.candidates(user, n)
    assert len(cands) <= n
    assert len(cands) == len(set(cands))
    assert not set(cands) & user.purchased


def test_recommend_never_returns_purchased_unless_configured(trained):
    user = UserContext("u1", recent_items=tuple(CATALOGUE[:3]))
    top = [s.item_id for s in trained.recommend(user, k=10)]
    bought = UserContext("u1", recent_items=user.recent_items, purchased=frozenset(top[:5]))
    assert not set(top[:5]) & {s.item_id for s in trained.recommend(bought, k=10)}
    keep = Recommender(trained.learners, RecommenderConfig(exclude_purchased=False))
    assert set(top[:5]) & set(keep.candidates(bought))


def test_a_new_user_gets_trending_items_and_covisitation_after_one_click():
    rec = Recommender.default(seed=0)
    for x in EVENTS:
        rec.learn_one(x)
    cold = rec.recommend(UserContext("never-seen"), k=10)
    assert len(cold) == 10 and {s.reason for s in cold} <= {"trending", "mf", None}
    one_click = rec.recommend(UserContext("never-seen", recent_items=(EVENTS[-1].item_id,)), k=10)
    assert "covisit" in {s.reason for s in one_click}


def test_a_new_item_is_recommendable_as_soon_as_it_is_seen():
    rec = Recommender.default(seed=0)
    for x in EVENTS:
        rec.learn_one(x)
    anchor = EVENTS[-1].item_id
    rec.learn_one(Interaction("z", anchor, EVENTS[-1].ts + 1, session_id="z1"))
    rec.learn_one(Interaction("z", "just-listed", EVENTS[-1].ts + 2, session_id="z1", category_id="c0"))
    assert "just-listed" in rec.candidates(UserContext("other", recent_items=(anchor,)))


def test_extra_scores_blend_in_and_can_dominate(trained):
    user = UserContext("u2", recent_items=tuple(CATALOGUE[:2]))
    cands = trained.candidates(user, 50)
    favourite = cands[-1]
    heavy = Recommender(trained.learners, RecommenderConfig(weights={**trained.config.weights, "transformer": 100.0},
                                                            reranker_weight=0.0))
    extra = {"transformer": {c: (1.0 if c == favourite else 0.0) for c in cands}}
    top = heavy.rank(user, cands, k=5, extra_scores=extra)
    assert top[0] == ScoredItem(favourite, top[0].score, "transformer", Explanation("transformer"))
    ignored = heavy.rank(user, cands, k=5, extra_scores={"unknown-source": {favourite: 1e9}})
    assert ignored == heavy.rank(user, cands, k=5)


def test_the_reranker_learns_from_shown_then_clicked():
    rec = Recommender.default(RecommenderConfig(reranker_min_samples=20), seed=0)
    recent: dict[str, tuple[str, ...]] = {}
    for x in EVENTS[:1500]:
        rec.learn_one(x)
        recent[x.user_id] = (*recent.get(x.user_id, ()), x.item_id)[-10:]
        user = UserContext(x.user_id, recent[x.user_id])
        rec.record_shown(x.user_id, rec.recommend(user))
    assert rec.reranker.n_learned > 100 and rec.reranker.n_positives > 0
    assert rec.reranker.ready


def test_snapshot_restores_the_same_recommendations_and_versions(trained):
    user = UserContext("u7", recent_items=tuple(CATALOGUE[5:9]))
    restored = Recommender.restore(trained.snapshot())
    assert restored.recommend(user) == trained.recommend(user)
    assert restored.versions == trained.versions
    assert set(trained.versions) == {*trained.learners, "reranker"}
    assert trained.versions["covisit"] == f"covisit-{len(EVENTS)}"


def test_same_seed_same_recommendations():
    def run():
        rec = Recommender.default(seed=4)
        for x in EVENTS[:800]:
            rec.learn_one(x)
        return rec.recommend(UserContext("u1", recent_items=(EVENTS[700].item_id,)))

    assert run() == run()


def test_lists_waiting_for_a_label_are_bounded_and_not_snapshotted():
    rec = Recommender.default(RecommenderConfig(max_tracked_users=5), seed=0)
    rec.learn_many((x, None) for x in EVENTS[:300])
    for u in range(20):
        user = UserContext(f"viewer{u}", recent_items=(EVENTS[u].item_id,))
        rec.record_shown(user.user_id, rec.recommend(user))
    assert len(rec._shown) == 5 and list(rec._shown) == [f"viewer{u}" for u in range(15, 20)]
    names, items, rows = rec._shown["viewer19"]
    assert rows.shape == (len(items), len(names)) and len(items) <= rec.config.k
    assert Recommender.restore(rec.snapshot())._shown == {}


def test_default_builds_only_the_learners_with_a_weight():
    assert set(Recommender.default().learners) == {"covisit", "reminder", "trending"}
    config = RecommenderConfig()
    config.weights = {**config.weights, "mf": 0.2, "trending": 0.0}
    assert set(Recommender.default(config).learners) == {"covisit", "reminder", "mf"}


def test_parse_weights_rejects_what_it_cannot_read():
    from online_models.recommender import parse_weights

    assert parse_weights("") == {} and parse_weights(" covisit = 2 ,") == {"covisit": 2.0}
    for bad in ("mf", "mf=", "mf=-1", "mf=nan", "=1", "mf=inf", "mf=" + "9" * 400, "mf=1e300"):
        with pytest.raises(ValueError, match="name=weight"):
            parse_weights(bad)
