"""HR@K, MRR@K, NDCG@K and coverage: definitions, edge cases and invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from online_models.metrics import (
    RankingMetrics,
    catalogue_coverage,
    hit_rate,
    ndcg,
    reciprocal_rank,
    target_rank,
)

items = st.lists(st.sampled_from("abcdefghij"), unique=True, max_size=10)


def test_first_place_scores_one_everywhere():
    assert (hit_rate(["a", "b"], "a", 1), reciprocal_rank(["a", "b"], "a", 1), ndcg(["a", "b"], "a", 1)) == (1, 1, 1)


def test_rank_beyond_k_is_a_miss():
    ranked = list("abcdefghijklmnopqrstuvwxyz")
    assert target_rank(ranked, "u", 20) is None  # 21st
    assert hit_rate(ranked, "t", 20) == 1.0 and reciprocal_rank(ranked, "t", 20) == pytest.approx(1 / 20)
    assert ndcg(ranked, "t", 20) == pytest.approx(1 / math.log2(21))


def test_empty_list_and_unknown_target_are_misses():
    assert hit_rate([], "a", 20) == 0.0 and reciprocal_rank(["b"], "a", 20) == 0.0 and ndcg([], "a", 5) == 0.0


def test_running_means_match_the_per_list_functions():
    cases = [(["a", "b", "c"], "c"), (["x"], "y"), (["q", "r"], "q"), (list("abcdefghijkl"), "l")]
    m = RankingMetrics((10, 20))
    for ranked, target in cases:
        m.update(ranked, target)
    for k in (10, 20):
        assert m.value("HR", k) == pytest.approx(sum(hit_rate(r, t, k) for r, t in cases) / len(cases))
        assert m.value("MRR", k) == pytest.approx(sum(reciprocal_rank(r, t, k) for r, t in cases) / len(cases))
        assert m.value("NDCG", k) == pytest.approx(sum(ndcg(r, t, k) for r, t in cases) / len(cases))
    assert m.coverage(24, 10) == pytest.approx(len(set("abcdefghij") | {"x", "q", "r"}) / 24)
    assert m.summary(24)["coverage@10"] == round(13 / 24, 4)


def test_coverage_counts_distinct_items_in_the_first_k():
    assert catalogue_coverage([["a", "b", "c"], ["a", "d"]], 8, k=2) == pytest.approx(3 / 8)
    assert catalogue_coverage([], 0, k=5) == 0.0


def test_bad_cutoffs_are_refused():
    with pytest.raises(ValueError, match="ks"):
        RankingMetrics(())


@given(items, st.sampled_from("abcdefghij"), st.integers(1, 12))
def test_metrics_are_ordered_and_bounded(ranked, target, k):
    hr, rr, g = hit_rate(ranked, target, k), reciprocal_rank(ranked, target, k), ndcg(ranked, target, k)
    assert 0.0 <= rr <= g <= hr <= 1.0  # 1/r <= 1/log2(r+1) for r >= 1
    assert hit_rate(ranked, target, k) <= hit_rate(ranked, target, k + 1)


@given(items, st.sampled_from("abcdefghij"))
def test_moving_the_target_up_never_lowers_a_metric(ranked, target):
    if target not in ranked or ranked.index(target) == 0:
        return
    i = ranked.index(target)
    better = ranked.copy()
    better[i - 1], better[i] = better[i], better[i - 1]
    for f in (hit_rate, reciprocal_rank, ndcg):
        assert f(better, target, 10) >= f(ranked, target, 10)
