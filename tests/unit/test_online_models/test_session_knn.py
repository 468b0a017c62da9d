"""Session kNN, sequential rules and their hybrid: what they learn, what they forget, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from online_models import sequential_rules, session_index
from online_models.checks import check_learner
from online_models.datasets import read_otto
from online_models.session_knn import SequentialRules, SessionHybrid, SessionKNN
from online_models.types import Interaction, UserContext
from stream.evaluation import prequential

OTTO = Path(__file__).resolve().parents[2] / "data" / "otto-sample.jsonl"


def learn_sessions(model, sessions: list[str], start: int = 0) -> None:
    for sid, items in enumerate(sessions, start=start):
        for t, item in enumerate(items):
            model.learn_one(Interaction(f"u{sid}", item, ts=60_000 * (10 * sid + t), session_id=f"s{sid}"))


def top(model, recent: str, k: int = 5, session_id: str | None = None) -> list[str]:
    return [s.item_id for s in model.rank(UserContext("probe", tuple(recent), session_id=session_id), k=k)]


@pytest.mark.parametrize("cls", [SessionKNN, SequentialRules, SessionHybrid])
def test_passes_the_conformance_suite(cls):
    check_learner(cls())


def test_knn_proposes_what_similar_sessions_did_next():
    model = SessionKNN()
    learn_sessions(model, ["abc", "abc", "abd", "xyz"])
    ranked = top(model, "ab")
    assert ranked[:1] == ["c"] or ranked[2] == "c"  # a and b themselves may come first
    assert "c" in ranked and "d" in ranked and "x" not in ranked
    assert model.predict_one(UserContext("p", ("a", "b")), "c") > model.predict_one(UserContext("p", ("a", "b")), "d")


def test_the_current_session_is_not_its_own_neighbour():
    model = SessionKNN()
    learn_sessions(model, ["pq"])  # session s0 is the only one that holds p
    assert top(model, "p", session_id="s0") == []
    assert top(model, "p", session_id="other") == ["p", "q"] or set(top(model, "p")) == {"p", "q"}


def test_newer_items_of_the_session_weigh_more():
    model = SessionKNN()
    learn_sessions(model, ["am", "bn"])
    assert top(model, "ab")[0] in {"b", "n"}  # b is the newest item
    assert model.predict_one(UserContext("p", ("a", "b")), "n") > model.predict_one(UserContext("p", ("a", "b")), "m")


def test_rules_follow_the_order_and_weigh_by_distance():
    model = SequentialRules(steps=3)
    learn_sessions(model, ["abc"])
    assert model.rules["a"] == {"b": 1.0, "c": 0.5}
    assert top(model, "b") == ["c"] and top(model, "c") == []


def test_memory_is_bounded():
    model = SessionHybrid(knn={"max_sessions": 5, "max_session_len": 4, "max_sessions_per_item": 3},
                          rules={"max_rules_per_item": 4})
    learn_sessions(model, [f"{i % 7}{(i + 1) % 7}{(i + 2) % 7}abcdefg"[: 3 + i % 5] for i in range(40)])
    index = model._knn.index
    assert len(index.sessions) <= 5
    assert all(len(items) <= 4 for items in index.sessions.values())
    assert all(len(keys) <= 3 for keys in index.item_sessions.values())
    live = {i for items in index.sessions.values() for i in items}
    assert set(index.df) == live and set(index.item_sessions) == live
    assert all(len(f) <= 4 for f in model._rules.rules.values())


def test_forgotten_sessions_stop_being_neighbours():
    model = SessionKNN(max_sessions=2)
    learn_sessions(model, ["ab", "cd", "ef"])
    assert top(model, "a") == [] and "f" in top(model, "e")


def test_events_without_session_id_split_on_inactivity():
    model = SessionKNN(session_gap_ms=1000)
    for t, item in [(0, "a"), (500, "b"), (5000, "c")]:
        model.learn_one(Interaction("u", item, ts=t))
    assert sorted(model.index.sessions.values()) == [["a", "b"], ["c"]]


def test_snapshot_restores_the_same_predictions_and_clone_is_fresh():
    model = SessionHybrid()
    learn_sessions(model, ["abc", "abd", "bcd", "xbc"])
    again = SessionHybrid.restore(model.snapshot())
    user = UserContext("p", ("a", "b"))
    assert again.rank(user, k=10) == model.rank(user, k=10)
    assert again._rules.index is again._knn.index  # still one shared index
    fresh = model.clone()
    assert fresh.n_learned == 0 and {s.item_id for s in fresh.rank(user, k=10)} == {"a", "b"}  # only the reminder


def test_snapshots_that_name_the_classes_where_they_were_before_the_split_still_restore(monkeypatch):
    # SequentialRules and _SessionIndex lived in online_models.session_knn, and a snapshot
    # records each object's module: written under those names, it must still restore
    hybrid, rules = SessionHybrid(), SequentialRules()
    learn_sessions(hybrid, ["abc", "abd", "bcd", "xbc"])
    learn_sessions(rules, ["abc", "abd", "bcd", "xbc"])
    with monkeypatch.context() as m:
        m.setattr(sequential_rules.SequentialRules, "__module__", "online_models.session_knn")
        m.setattr(session_index._SessionIndex, "__module__", "online_models.session_knn")
        old_hybrid, old_rules = hybrid.snapshot(), rules.snapshot()
    assert b"online_models.session_knn._SessionIndex" in old_hybrid
    assert b'"class": "online_models.session_knn.SequentialRules"' in old_rules
    user = UserContext("p", ("a", "b"))
    again = SessionHybrid.restore(old_hybrid)
    assert type(again._rules) is SequentialRules and again.rank(user, k=10) == hybrid.rank(user, k=10)
    assert SequentialRules.restore(old_rules).rank(user, k=10) == rules.rank(user, k=10)


def test_new_items_become_recommendable_at_once():
    model = SessionHybrid()
    learn_sessions(model, ["ab", "ab"])
    learn_sessions(model, [["a"], ["a", "new"]], start=10)  # "new" is seen once, after a
    assert "new" in top(model, "a", k=10)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text("abcdefgh", min_size=1, max_size=6), min_size=1, max_size=12),
       st.text("abcdefghz", max_size=5), st.integers(1, 6))
def test_rank_is_ordered_without_duplicates(sessions, recent, k):
    model = SessionHybrid()
    learn_sessions(model, sessions)
    ranked = model.rank(UserContext("p", tuple(recent)), k=k)
    ids = [s.item_id for s in ranked]
    assert len(ids) == len(set(ids)) <= k
    assert all(a.score >= b.score for a, b in zip(ranked, ranked[1:], strict=False))


def test_beats_popularity_on_real_otto_sessions():
    report = prequential(read_otto(OTTO), models=["popularity", "session_hybrid"], ks=(20,))
    m = report["models"]
    assert m["session_hybrid"]["predictions"] == m["popularity"]["predictions"] > 700
    assert m["session_hybrid"]["HR@20"] > m["popularity"]["HR@20"] + 0.1
