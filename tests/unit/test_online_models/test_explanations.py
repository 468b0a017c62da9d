"""Each blended item's ``explanation``: the source that contributed most, and what it says."""

from __future__ import annotations

import json

import msgspec
import pytest

from online_models import (
    CoVisitation,
    Explanation,
    Recommender,
    RecommenderConfig,
    ScoredItem,
    UserContext,
)
from online_models.base import OnlineLearner
from online_models.popularity import TrendingPopularity
from online_models.reminder import RecentlyViewed
from online_models.types import Interaction
from stream.records import Recommendation, decode_recommendation, encode
from stream.tail import explanation_text, recommendation_line


class Fixed(OnlineLearner):
    """Scores from a dict; says ``because`` from another dict, and counts what it was asked."""

    name = "fixed"

    def __init__(self, scores: dict[str, float], because: dict[str, str] | None = None, seed: int = 0):
        self.scores = scores
        self.explains = because
        self.seed = seed
        self.asked: list[list[str]] = []

    def learn_one(self, x, user=None):
        pass

    def predict_one(self, user, item_id):
        return self.scores.get(item_id, 0.0)

    def propose_scores(self, user, k):
        return sorted(self.scores.items(), key=lambda kv: -kv[1])[:k]

    def because(self, user, items):
        self.asked.append(list(items))
        return None if self.explains is None else [self.explains.get(i) for i in items]


def _rec(learners, weights, **config) -> Recommender:
    return Recommender(learners, RecommenderConfig(weights=weights, reranker_weight=0.0, **config))


USER = UserContext("u1", recent_items=("r1", "r2"))


def test_the_source_is_the_largest_weighted_contribution():
    # normalised: a = {x 1, y 0.5, z 0, w 0}, b = {x 0, y 1, z 0.5, w 0}
    a = Fixed({"x": 4.0, "y": 2.0, "z": 0.0, "w": 0.0}, because={"x": "r1", "y": "r2"})
    b = Fixed({"x": 0.0, "y": 10.0, "z": 5.0, "w": 0.0})
    rec = _rec({"a": a, "b": b}, {"a": 1.0, "b": 3.0})
    top = {s.item_id: s for s in rec.rank(USER, ["x", "y", "z", "w"], k=4)}
    weights = {"a": 1.0, "b": 3.0}
    norm = {"a": {"x": 1.0, "y": 0.5, "z": 0.0, "w": 0.0}, "b": {"x": 0.0, "y": 1.0, "z": 0.5, "w": 0.0}}
    for item in ["x", "y", "z"]:
        expected = max(weights, key=lambda s: weights[s] * norm[s][item])
        assert top[item].reason == expected
        assert top[item].explanation is not None and top[item].explanation.source == expected
    assert top["x"].explanation == Explanation("a", because="r1")  # a's own word on it
    assert top["y"].explanation == Explanation("b")  # b dominates y (3 x 1 > 1 x 0.5); b cannot say more
    assert top["w"].reason is None and top["w"].explanation is None  # no source contributed: nothing known


def test_only_the_published_items_are_explained():
    scores = {f"i{n}": float(n) for n in range(40)}
    a = Fixed(scores, because={})
    rec = _rec({"a": a}, {"a": 1.0})
    top = rec.rank(USER, list(scores), k=5)
    assert len(top) == 5
    assert a.asked == [[s.item_id for s in top]]  # asked once, for the top k only


def test_covisit_names_the_recent_item_with_the_largest_share():
    cv = CoVisitation(window=1, normalize=False, recency_decay=0.5)
    # pairs (window 1: only the item just before): a -> x twice, b -> x once, b -> y once
    for session, items in [("s1", ["a", "x"]), ("s2", ["a", "x"]), ("s3", ["b", "x"]), ("s4", ["b", "y"])]:
        for n, item in enumerate(items):
            cv.learn_one(Interaction("v", item, ts=n, session_id=session))
    # anchors newest first: b (recency 1), a (recency 0.5): x gets b 1 x 1 = 1, a 0.5 x 2 = 1 -> tie, newest wins
    user = UserContext("u", recent_items=("a", "b"))
    assert cv.because(user, ["x", "y", "nowhere"]) == ["b", "b", None]
    # a third a -> x makes a's term 1.5 against b's 1
    for n, item in enumerate(["a", "x"]):
        cv.learn_one(Interaction("v", item, ts=n, session_id="s5"))
    assert cv.because(user, ["x"]) == ["a"]


def test_covisit_explanation_in_the_blend():
    cv = CoVisitation()
    for item in ["phone", "case", "charger"]:
        cv.learn_one(Interaction("v", item, ts=1, session_id="s1"))
    rec = _rec({"covisit": cv}, {"covisit": 1.0})
    user = UserContext("u", recent_items=("phone", "case"))
    top = rec.recommend(user, k=5)
    by_item = {s.item_id: s for s in top}
    assert by_item["charger"].reason == "covisit"
    assert by_item["charger"].explanation == Explanation("covisit", because=cv.because(user, ["charger"])[0])
    assert by_item["charger"].explanation.because == "case"  # 1 x 1/1.5 beats 0.6 x 0.7/1.7


def test_reminder_says_viewed_before_and_trending_its_category():
    rv, trending = RecentlyViewed(), TrendingPopularity()
    rec = _rec({"reminder": rv, "trending": trending}, {"reminder": 1.0, "trending": 1.0})
    for n, (item, cat) in enumerate([("hot", "c12"), ("hot", "c12"), ("hot", "c12"), ("plain", None), ("seen", "c3")]):
        rec.learn_one(Interaction("other", item, ts=n * 1000, category_id=cat))
    user = UserContext("u", recent_items=("seen", "old"))
    by_item = {s.item_id: s for s in rec.rank(user, ["hot", "seen", "old", "plain"], k=4)}
    assert by_item["seen"].explanation == Explanation("reminder", because="seen")
    assert by_item["hot"].explanation == Explanation("trending", category="c12")
    assert by_item["plain"].reason == "trending"
    assert by_item["plain"].explanation == Explanation("trending")  # category unknown: left out


def test_an_extra_source_is_named_without_because():
    a = Fixed({"x": 1.0, "y": 0.0}, because={"x": "r1", "y": "r2"})
    rec = _rec({"a": a}, {"a": 1.0, "transformer": 5.0})
    top = {s.item_id: s for s in rec.rank(USER, ["x", "y"], k=2, extra_scores={"transformer": {"y": 1.0, "x": 0.0}})}
    assert top["y"] == ScoredItem("y", top["y"].score, "transformer", Explanation("transformer"))
    assert top["x"].explanation == Explanation("a", because="r1")


def test_batched_ranking_explains_each_user_with_their_own_items():
    cv = CoVisitation()
    for session, items in [("s1", ["a", "x"]), ("s2", ["b", "y"])]:
        for item in items:
            cv.learn_one(Interaction("v", item, ts=1, session_id=session))
    rec = _rec({"covisit": cv}, {"covisit": 1.0})
    users = [UserContext("u1", recent_items=("a",)), UserContext("u2", recent_items=("b",))]
    first, second = rec.rank_many(users, [["x", "y"], ["x", "y"]], k=1)
    assert first == [ScoredItem("x", 1.0, "covisit", Explanation("covisit", because="a"))]
    assert second == [ScoredItem("y", 1.0, "covisit", Explanation("covisit", because="b"))]
    assert rec.rank(users[1], ["x", "y"], k=1) == second  # the same alone as in a batch


def test_ranking_without_explanations_then_explaining_some_items_gives_what_ranking_explains():
    cv = CoVisitation()
    for session, items in [("s1", ["a", "x", "z"]), ("s2", ["b", "y"])]:
        for item in items:
            cv.learn_one(Interaction("v", item, ts=1, session_id=session))
    hot = TrendingPopularity()
    for item in ["w", "w", "y"]:
        hot.learn_one(Interaction("v", item, ts=1))
    rec = _rec({"covisit": cv, "trending": hot}, {"covisit": 1.0, "trending": 0.5})
    rec._categories["w"] = "c1"
    user = UserContext("u1", recent_items=("a", "b"))
    cands = ["x", "y", "z", "w", "q"]
    (explained,) = rec.rank_many([user], [cands], 5)
    (bare,) = rec.rank_many([user], [cands], 5, explain=False)
    assert [(s.item_id, s.score, s.reason) for s in bare] == [(s.item_id, s.score, s.reason) for s in explained]
    assert all(s.explanation is None for s in bare)
    assert any(s.explanation is not None for s in explained)
    some = [s for s in bare if s.item_id in {"w", "y", "q"}]  # a subset, in another order
    asked = rec.explain(user, [s.item_id for s in some[::-1]], [s.reason for s in some[::-1]])
    by_item = {s.item_id: s.explanation for s in explained}
    assert asked == [by_item[s.item_id] for s in some[::-1]]


# --- on the wire: old readers keep working ------------------------------------------------

def _published(items) -> bytes:
    return encode(Recommendation(user_id="u1", items=items, trigger_event_id="e1", event_ts=1, generated_ts=3,
                                 model={}))


def test_explanation_is_left_out_when_nothing_is_known_and_reason_is_unchanged():
    body = json.loads(_published([ScoredItem("i1", 0.9, "covisit", Explanation("covisit", because="i7")),
                                  ScoredItem("i2", 0.5, "trending", Explanation("trending")),
                                  ScoredItem("i3", 0.1)]))
    assert body["items"] == [
        {"item_id": "i1", "score": 0.9, "reason": "covisit", "explanation": {"source": "covisit", "because": "i7"}},
        {"item_id": "i2", "score": 0.5, "reason": "trending", "explanation": {"source": "trending"}},
        {"item_id": "i3", "score": 0.1},
    ]


def test_a_recommendation_without_explanations_still_decodes():
    old = b'{"user_id":"u1","items":[{"item_id":"i1","score":0.9,"reason":"covisit"},{"item_id":"i2","score":0.5}],' \
          b'"trigger_event_id":"e1","event_ts":1,"generated_ts":3,"model":{}}'
    rec = decode_recommendation(old)
    assert rec.items == [ScoredItem("i1", 0.9, "covisit"), ScoredItem("i2", 0.5)]
    assert rec.items[0].explanation is None and rec.items[0].reason == "covisit"


class OldItem(msgspec.Struct):  # what a reader built before explanations decodes
    item_id: str
    score: float
    reason: str | None = None


class OldRecommendation(msgspec.Struct):
    user_id: str
    items: list[OldItem]


def test_an_old_reader_ignores_the_new_field():
    value = _published([ScoredItem("i1", 0.9, "covisit", Explanation("covisit", because="i7"))])
    old = msgspec.json.decode(value, type=OldRecommendation)
    assert old.items == [OldItem("i1", 0.9, "covisit")]


@pytest.mark.parametrize(("why", "said"), [
    (Explanation("covisit", because="i77"), "because you viewed i77"),
    (Explanation("covisit"), "often viewed together"),
    (Explanation("reminder", because="i5"), "you viewed it before"),
    (Explanation("trending", category="c12"), "popular now in c12"),
    (Explanation("trending"), "popular now"),
    (Explanation("transformer"), "picked for you from what you viewed"),
    (Explanation("something_new", because="i3"), "because you viewed i3"),
    (None, None),
])
def test_tail_says_it_as_a_sentence(why, said):
    assert explanation_text(why) == said


def test_tail_line_shows_explanations_and_omits_them_when_absent():
    rec = decode_recommendation(_published([ScoredItem("i501", 0.91, "covisit", Explanation("covisit", because="i77")),
                                            ScoredItem("i2", 0.5)]))
    assert recommendation_line(rec) == "u1  i501 0.910 (because you viewed i77), i2 0.500  latency 2 ms  after e1"
