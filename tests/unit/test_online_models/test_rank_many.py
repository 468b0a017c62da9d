"""Recommender.rank_many ranks a batch exactly as rank does user by user (and as rank did before)."""

from __future__ import annotations

import copy
import dataclasses
import random

import msgspec
import numpy as np
import pytest

from online_models import Recommender, RecommenderConfig, ScoredItem, UserContext
from online_models.datasets import synthetic_interactions

EVENTS = list(synthetic_interactions(n_events=3000, n_users=120, n_items=300, n_categories=12, seed=7))
CATALOGUE = sorted({x.item_id for x in EVENTS})
POOL = [*CATALOGUE[:150], "unseen-a", "unseen-b"]
WEIGHTS = {"covisit": 1.0, "reminder": 1.0, "trending": 0.3, "mf": 0.2, "transformer": 1.0, "other": 0.5}


def _train(min_samples: int) -> Recommender:
    rec = Recommender.default(RecommenderConfig(weights=WEIGHTS, reranker_min_samples=min_samples), seed=3)
    recent: dict[str, tuple[str, ...]] = {}
    for x in EVENTS:
        rec.learn_one(x)
        recent[x.user_id] = (*recent.get(x.user_id, ()), x.item_id)[-8:]
        if x.ts % 3 == 0:  # some lists shown, so that the re-ranker learns
            rec.record_shown(x.user_id, rec.recommend(UserContext(x.user_id, recent[x.user_id])))
    rec._ranked.clear()
    return rec


@pytest.fixture(scope="module", params=["reranker-ready", "reranker-cold"])
def trained(request) -> Recommender:
    rec = _train(20 if request.param == "reranker-ready" else 10**9)
    assert rec.reranker.ready == (request.param == "reranker-ready")
    return rec


def _batch(seed: int, n_users: int = 40):
    """Users (some repeated, some unknown), candidates with repeats, unknown and purchased items
    (some lists empty), and extra scores as dicts, as aligned arrays, in either key order, or none."""
    rng = random.Random(seed)
    users, cands, extras = [], [], []
    for _ in range(n_users):
        users.append(UserContext(
            rng.choice(["u1", "u2", "u3", "u4", "never-seen", f"x{rng.randrange(10**6)}"]),
            recent_items=tuple(rng.choices(POOL, k=rng.randrange(0, 25))),
            purchased=frozenset(rng.sample(POOL, rng.randrange(0, 20))),
        ))
        c = [] if rng.random() < 0.1 else rng.choices(POOL, k=rng.randrange(1, 90))
        cands.append(c)
        extra: dict = {}
        for name in rng.sample(["transformer", "other", "weightless"], rng.randrange(0, 4)):
            values = [rng.choice([rng.random(), rng.random(), float(rng.randrange(3)), np.nan]) for _ in c]
            if rng.random() < 0.5:
                extra[name] = np.array(values)
            else:
                extra[name] = {item: v for item, v in zip(c, values, strict=True) if rng.random() < 0.8}
        extras.append(extra if extra or rng.random() < 0.5 else None)
    return users, cands, extras


def _as_dicts(cands, extra):
    """The Mapping form of extra scores given as arrays (the last of repeats wins, as in dict(zip()))."""
    if extra is None:
        return None
    return {name: s if isinstance(s, dict) else dict(zip(cands, s.tolist(), strict=True)) for name, s in extra.items()}


def _same(a: list[ScoredItem], b: list[ScoredItem]) -> None:
    assert [(s.item_id, s.reason) for s in a] == [(s.item_id, s.reason) for s in b]
    assert np.allclose([s.score for s in a], [s.score for s in b], rtol=0.0, atol=1e-9)


def _same_pending(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for user in a:
        (names_a, items_a, rows_a), (names_b, items_b, rows_b) = a[user], b[user]
        assert list(names_a) == list(names_b) and list(items_a) == list(items_b)
        assert rows_a.dtype == rows_b.dtype == np.float32 and np.array_equal(rows_a, rows_b)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [None, 2])
@pytest.mark.parametrize("exclude_purchased", [True, False])
def test_rank_many_is_rank_user_by_user(trained, seed, cap, exclude_purchased):
    rec = trained
    rec.config = dataclasses.replace(rec.config, max_per_category=cap, exclude_purchased=exclude_purchased)
    users, cands, extras = _batch(seed)
    k = [1, 5, 20, 100][seed % 4]
    rec._ranked.clear()
    many = rec.rank_many(users, cands, k, extras)
    pending_many = dict(rec._ranked)
    rec._ranked.clear()
    one = [rec.rank(u, c, k, extra_scores=_as_dicts(c, e)) for u, c, e in zip(users, cands, extras, strict=True)]
    assert len(many) == len(users)
    for a, b in zip(many, one, strict=True):
        _same(a, b)
    _same_pending(pending_many, rec._ranked)
    # the arrays themselves, one user at a time, and a batch cut differently
    for i in range(0, len(users), 7):
        _same(rec.rank(users[i], cands[i], k, extra_scores=extras[i]), one[i])
    halves = rec.rank_many(users[:13], cands[:13], k, extras[:13]) + rec.rank_many(users[13:], cands[13:], k, extras[13:])
    for a, b in zip(halves, one, strict=True):
        _same(a, b)
    assert not any(many[i] for i, c in enumerate(cands) if not c)
    assert rec.rank_many(users, cands, 0, extras) == [[] for _ in users]


def test_rank_many_without_extra_scores_and_empty_batch(trained):
    rec = trained
    rec.config = dataclasses.replace(rec.config, max_per_category=None, exclude_purchased=True)
    users, cands, _ = _batch(99)
    for a, b in zip(rec.rank_many(users, cands), [rec.rank(u, c) for u, c in zip(users, cands, strict=True)],
                    strict=True):
        _same(a, b)
    assert rec.rank_many([], []) == []
    with pytest.raises(ValueError):
        rec.rank_many(users, cands[:-1])
    with pytest.raises(ValueError):
        rec.rank_many(users[:1], cands[:1], extra_scores=[{"transformer": np.zeros(len(cands[0]) + 1)}])


@pytest.mark.parametrize("cap", [None, 3])
def test_record_shown_after_rank_many_feeds_the_reranker_the_same_rows(trained, cap):
    users, cands, extras = _batch(5, n_users=60)
    first = list({u.user_id: i for i, u in reversed(list(enumerate(users)))}.values())  # one list per user,
    users, cands, extras = ([xs[i] for i in first] for xs in (users, cands, extras))  # as in the worker
    base = copy.deepcopy(trained)
    base.config = dataclasses.replace(base.config, max_per_category=cap, exclude_purchased=True)
    base._shown.clear()
    batched, single = copy.deepcopy(base), copy.deepcopy(base)
    lists = batched.rank_many(users, cands, 10, extras)
    for i, (u, ranked) in enumerate(zip(users, lists, strict=True)):
        batched.record_shown(u.user_id, ranked if i % 2 else ranked[::2])  # all, or a part as after a filter
    for i, (u, c, e) in enumerate(zip(users, cands, extras, strict=True)):
        ranked = single.rank(u, c, 10, extra_scores=e)
        single.record_shown(u.user_id, ranked if i % 2 else ranked[::2])
    _same_pending(batched._shown, single._shown)
    assert batched._ranked == single._ranked == {}
    for x in EVENTS[-300:]:  # the users' next events label the shown lists
        batched.learn_one(msgspec.structs.replace(x, user_id=users[x.ts % len(users)].user_id))
        single.learn_one(msgspec.structs.replace(x, user_id=users[x.ts % len(users)].user_id))
    assert batched.reranker.n_learned == single.reranker.n_learned > base.reranker.n_learned
    assert dict(batched.reranker.model.weights) == dict(single.reranker.model.weights)


# -- the per-user rank as it was before rank_many (numpy over one list), as a reference ----
def _reference_rank(rec: Recommender, user: UserContext, candidates, k, extra_scores):
    cfg = rec.config
    purchased = user.purchased if cfg.exclude_purchased else frozenset()
    items = [c for c in dict.fromkeys(candidates) if c not in purchased]
    if k <= 0 or not items:
        return []
    names, cols = [], []
    for name, learner in rec.learners.items():
        if cfg.weights.get(name, 0.0) != 0.0:
            names.append(name)
            cols.append(_norm(np.array(learner.score_many(user, items), dtype=float)))
    for name, scores in (extra_scores or {}).items():
        if cfg.weights.get(name, 0.0) != 0.0 and name not in rec.learners:
            names.append(name)
            cols.append(_norm(np.array([scores.get(i, np.nan) for i in items], dtype=float)))
    n = len(items)
    matrix = np.stack(cols, axis=1)
    contrib = matrix * np.array([cfg.weights[nm] for nm in names])
    blend, dominant = contrib.sum(axis=1), contrib.argmax(axis=1)
    order = np.lexsort((np.arange(n), -blend))
    position = np.empty(n)
    position[order] = np.arange(n)
    recency = np.zeros(n)
    for back, item in enumerate(reversed(user.recent_items[-20:]), start=1):
        if item in items and recency[items.index(item)] == 0.0:
            recency[items.index(item)] = 1.0 / back
    rank_in_source = np.empty_like(matrix)
    np.put_along_axis(rank_in_source, np.argsort(-matrix, axis=0, kind="stable"),
                      np.arange(n, dtype=float)[:, None], axis=0)
    popularity = np.log1p(np.array([rec._counts.get(i, 0.0) for i in items]))
    features = np.hstack([matrix, np.where(matrix > 0.0, 1.0 / (1.0 + rank_in_source), 0.0),
                          np.stack([1.0 / (1.0 + position), popularity / (1.0 + popularity), recency], axis=1)])
    feature_names = [*names, *(f"{nm}_rank" for nm in names), "blend_position", "popularity", "recency"]
    final = blend
    p = rec.reranker.score(feature_names, features) if cfg.reranker_weight else None
    if p is not None:
        final = blend + cfg.reranker_weight * p
        order = np.lexsort((np.arange(n), -final))
    picked, per_category = [], {}
    for i in order.tolist():
        cat = rec.category(items[i]) if cfg.max_per_category is not None else None
        if cat is not None:
            if per_category.get(cat, 0) >= cfg.max_per_category:
                continue
            per_category[cat] = per_category.get(cat, 0) + 1
        picked.append(i)
        if len(picked) >= k:
            break
    return [ScoredItem(items[i], float(final[i]), names[dominant[i]] if contrib[i, dominant[i]] > 0 else None)
            for i in picked]


def _norm(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    if not ok.any() or x[ok].max() <= x[ok].min():
        return np.zeros_like(x)
    return np.where(ok, (x - x[ok].min()) / (x[ok].max() - x[ok].min()), 0.0)


@pytest.mark.parametrize("cap", [None, 2])
def test_rank_many_ranks_as_the_per_user_rank_did(trained, cap):
    rec = trained
    rec.config = dataclasses.replace(rec.config, max_per_category=cap, exclude_purchased=True)
    for seed in range(3):
        users, cands, extras = _batch(100 + seed)
        extras = [_as_dicts(c, e) for c, e in zip(cands, extras, strict=True)]
        many = rec.rank_many(users, cands, 20, extras)
        for u, c, e, got in zip(users, cands, extras, many, strict=True):
            _same(got, _reference_rank(rec, u, c, 20, e))
