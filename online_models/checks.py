"""The conformance suite every :class:`~online_models.base.OnlineLearner` passes.

As River's ``utils.estimator_checks``: :func:`yield_checks` gives the checks for a
learner, each a plain function ``check(learner)`` that raises ``AssertionError`` with a
sentence naming the learner and what differed. :func:`check_learner` runs them all. The
learner handed in is used as a template (``clone()`` d, never trained itself).

A learner may define ``_unit_test_params()`` (a classmethod returning constructor
arguments) when its defaults are too slow for a unit test; :func:`learner_instance`
uses it.

>>> from online_models.popularity import GlobalPopularity
>>> check_learner(GlobalPopularity())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from online_models.base import OnlineLearner
from online_models.datasets import synthetic_interactions
from online_models.types import Interaction, ScoredItem, UserContext

Check = Callable[[OnlineLearner], None]


def learner_instance(cls: type[OnlineLearner], seed: int = 7) -> OnlineLearner:
    """An instance of ``cls`` for the checks: its unit-test parameters and ``seed``."""
    params = dict(cls._unit_test_params()) if hasattr(cls, "_unit_test_params") else {}
    try:
        return cls(**{"seed": seed, **params})
    except TypeError:
        return cls(**params)


def _stream(n: int = 600, seed: int = 5) -> list[Interaction]:
    return list(synthetic_interactions(n_events=n, n_users=25, n_items=60, n_categories=6, seed=seed))


def _probe_users(stream: list[Interaction]) -> list[UserContext]:
    """Contexts as the stream would build them, plus an unseen user with and without history."""
    recent: dict[str, list[str]] = {}
    bought: dict[str, set[str]] = {}
    for x in stream:
        recent.setdefault(x.user_id, []).append(x.item_id)
        if x.kind == "purchase":
            bought.setdefault(x.user_id, set()).add(x.item_id)
    users = [
        UserContext(u, tuple(recent[u][-10:]), frozenset(bought.get(u, ())), None, stream[-1].ts)
        for u in list(recent)[:6]
    ]
    users.append(UserContext("never-seen-user"))
    users.append(UserContext("never-seen-user-2", recent_items=(stream[0].item_id, "never-seen-item")))
    return users


def _catalogue(stream: list[Interaction]) -> list[str]:
    return [*dict.fromkeys(x.item_id for x in stream), "never-seen-item"]


def _fingerprint(model: OnlineLearner, stream: list[Interaction]) -> list:
    """Everything observable: scores of every item for every probe user, and rank lists."""
    items = _catalogue(stream)
    out: list = []
    for user in _probe_users(stream):
        out.append([model.predict_one(user, i) for i in items[:15]])
        out.append(list(model.score_many(user, items)))
        out.append(model.rank(user, items, k=10))
        out.append(model.rank(user, None, k=10))
    return out


def _same(a: list, b: list) -> bool:
    def norm(v):
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        if isinstance(v, list):
            return [norm(e) for e in v]
        if isinstance(v, ScoredItem):
            return (v.item_id, norm(v.score), v.reason)
        return v

    return norm(a) == norm(b)


def _fit(model: OnlineLearner, stream: list[Interaction]) -> OnlineLearner:
    recent: dict[str, tuple[str, ...]] = {}
    for x in stream:
        before = UserContext(x.user_id, recent.get(x.user_id, ()), frozenset(), x.session_id, x.ts)
        model.learn_one(x, before)
        recent[x.user_id] = (*before.recent_items, x.item_id)[-10:]
    return model


def check_clone(learner: OnlineLearner) -> None:
    stream = _stream()
    fitted = _fit(learner.clone(), stream)
    copy = fitted.clone()
    assert type(copy) is type(learner), f"{learner!r}.clone() is a {type(copy).__name__}"
    assert copy._get_params() == fitted._get_params(), f"{learner!r}.clone() changed the constructor parameters"
    assert _same(_fingerprint(_fit(copy, stream), stream), _fingerprint(fitted, stream)), (
        f"{type(learner).__name__}: a clone trained on the same stream predicts differently "
        "(clone() must give an unfitted copy with the same parameters)")


def check_same_seed_same_result(learner: OnlineLearner) -> None:
    stream = _stream()
    a, b = _fit(learner.clone(), stream), _fit(learner.clone(), stream)
    assert _same(_fingerprint(a, stream), _fingerprint(b, stream)), (
        f"{type(learner).__name__}: two learners with the same seed differ after the same stream")


def check_snapshot_round_trip(learner: OnlineLearner) -> None:
    stream = _stream()
    half = len(stream) // 2
    model = _fit(learner.clone(), stream[:half])
    data = model.snapshot()
    assert isinstance(data, bytes), f"{type(learner).__name__}.snapshot() returned {type(data).__name__}, not bytes"
    restored = type(learner).restore(data)
    assert type(restored) is type(learner)
    assert _same(_fingerprint(restored, stream), _fingerprint(model, stream)), (
        f"{type(learner).__name__}: the restored learner predicts differently from the one snapshotted")
    assert restored.version == model.version, f"{type(learner).__name__}: version changed by snapshot/restore"
    _fit(model, stream[half:])
    _fit(restored, stream[half:])
    assert _same(_fingerprint(restored, stream), _fingerprint(model, stream)), (
        f"{type(learner).__name__}: the restored learner learns differently after the restore")


def check_context_when_learning(learner: OnlineLearner) -> None:
    """A learner that says it does not read the user's context when it learns
    (``learns_with_context = False``, which lets the worker skip building one per event)
    learns the same without it."""
    if learner.learns_with_context:
        return
    stream = _stream()
    with_context = _fit(learner.clone(), stream)
    without = learner.clone()
    for x in stream:
        without.learn_one(x, None)
    assert _same(_fingerprint(without, stream), _fingerprint(with_context, stream)), (
        f"{type(learner).__name__} learns differently without the user's context; set learns_with_context = True")


def check_learn_many(learner: OnlineLearner) -> None:
    stream = _stream(200)
    one = learner.clone()
    for x in stream:
        one.learn_one(x, None)
    many = learner.clone()
    many.learn_many((x, None) for x in stream)
    assert _same(_fingerprint(one, stream), _fingerprint(many, stream)), (
        f"{type(learner).__name__}: learn_many((x, user) pairs) differs from learn_one in a loop")


def check_unseen_does_not_crash(learner: OnlineLearner) -> None:
    stream = _stream(200)
    for model in (learner.clone(), _fit(learner.clone(), stream)):
        for user in (UserContext("ghost"), UserContext("ghost", ("no-such-item",), frozenset({"x"}))):
            value = model.predict_one(user, "no-such-item")
            assert isinstance(value, float) and math.isfinite(value), (
                f"{type(learner).__name__}.predict_one on an unseen user and item gave {value!r}")
            assert len(model.score_many(user, ["no-such-item", "other"])) == 2
            model.rank(user, ["no-such-item"], k=5)
            model.rank(user, None, k=5)
            model.rank(user, [], k=5)


def check_rank_contract(learner: OnlineLearner) -> None:
    stream = _stream()
    model = _fit(learner.clone(), stream)
    items = _catalogue(stream)
    given = [*items[:30], *items[:10], "never-seen-item"]  # with duplicates
    name = type(learner).__name__
    for user in _probe_users(stream):
        for k in (0, 1, 5, 50):
            for candidates in (given, None):
                ranked = model.rank(user, candidates, k=k)
                ids = [s.item_id for s in ranked]
                assert len(ranked) <= k, f"{name}.rank(k={k}) returned {len(ranked)} items"
                assert len(ids) == len(set(ids)), f"{name}.rank returned duplicates: {ids}"
                scores = [s.score for s in ranked]
                assert all(x >= y for x, y in zip(scores, scores[1:], strict=False)), f"{name}.rank is not best first: {scores}"
                assert all(isinstance(s, ScoredItem) for s in ranked)
                if candidates is not None:
                    stray = set(ids) - set(candidates)
                    assert not stray, f"{name}.rank returned items it was not given: {sorted(stray)}"
                    if k >= len(set(candidates)) and not user.purchased:
                        assert set(ids) == set(candidates), f"{name}.rank dropped candidates with k large enough"


def check_score_batch(learner: OnlineLearner) -> None:
    """``score_batch`` gives, user after user, what ``score_many`` gives for each (the ranker uses the first)."""
    stream = _stream()
    model = _fit(learner.clone(), stream)
    items = _catalogue(stream)
    users = _probe_users(stream)
    lists = [items[n % 7: n % 7 + 12] for n in range(len(users))]
    lists[0] = []  # a user without candidates
    batch = model.score_batch(users, lists)
    one_by_one = [s for user, x in zip(users, lists, strict=True) for s in model.score_many(user, x)]
    assert len(batch) == len(one_by_one), (
        f"{type(learner).__name__}.score_batch gave {len(batch)} scores for {len(one_by_one)} items")
    assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b))
               for a, b in zip(map(float, batch), one_by_one, strict=True)), (
        f"{type(learner).__name__}.score_batch differs from score_many user by user")


def check_propose_items(learner: OnlineLearner) -> None:
    """``propose_items`` lists what ``propose`` does, in its order (the candidate generator uses the first)."""
    stream = _stream()
    model = _fit(learner.clone(), stream)
    for user in _probe_users(stream):
        for k in (1, 5, 50):
            items = model.propose_items(user, k)
            expected = [s.item_id for s in model.propose(user, k)] if (
                type(model).propose_scores is not OnlineLearner.propose_scores) else [
                s.item_id for s in model.rank(user, None, k)]
            assert items == expected, (
                f"{type(learner).__name__}.propose_items(k={k}) gave {items}, its proposals are {expected}")


def check_version(learner: OnlineLearner) -> None:
    model = learner.clone()
    v0 = model.version
    assert isinstance(v0, str) and v0, f"{type(learner).__name__}.version is {v0!r}"
    _fit(model, _stream(50))
    assert model.version != v0, f"{type(learner).__name__}.version did not change after learning"
    assert isinstance(type(learner).name, str) and type(learner).name, f"{type(learner).__name__} has no name"


def yield_checks(learner: OnlineLearner) -> Iterator[Check]:
    """The checks that apply to ``learner`` (all of them, for now)."""
    yield check_clone
    yield check_same_seed_same_result
    yield check_snapshot_round_trip
    yield check_context_when_learning
    yield check_learn_many
    yield check_unseen_does_not_crash
    yield check_rank_contract
    yield check_score_batch
    yield check_propose_items
    yield check_version


def check_learner(learner: OnlineLearner) -> None:
    """Run every check on ``learner``; the first failure raises ``AssertionError``."""
    for check in yield_checks(learner):
        check(learner)


__all__ = ["check_learner", "learner_instance", "yield_checks"]
