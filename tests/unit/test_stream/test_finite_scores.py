"""Numbers stay finite: whatever valid events arrive, in whatever order and with whatever jumps
in time, every published score is a finite number, no numpy warning is raised on the way, and
the same events give the same lists."""

from __future__ import annotations

import math
import warnings

import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from online_models import Recommender, RecommenderConfig
from stream.pipeline import RecommendationStep
from stream.records import MAX_QUANTITY, MAX_TS_MS, ClickEvent, PurchaseEvent
from stream.step_inputs import StepConfig

DAY_MS = 86_400_000
NOW = 1_700_000_000_000

timestamps = st.one_of(
    st.integers(0, MAX_TS_MS),  # anywhere from 1970 to the year 9999
    st.integers(NOW - 400 * DAY_MS, NOW + DAY_MS),  # a log spanning months, out of order
    st.sampled_from([0, 1, NOW, NOW + 1, MAX_TS_MS]),  # the edges, and repeats
)


@st.composite
def events(draw):
    n = draw(st.integers(1, 60))
    out = []
    for i in range(n):
        user = f"u{draw(st.integers(0, 5))}"
        item = f"i{draw(st.integers(0, 12))}"
        ts = draw(timestamps)
        session = draw(st.none() | st.sampled_from(["s1", "s2"]))
        category = draw(st.none() | st.sampled_from(["c1", "c2", "c3"]))
        if draw(st.booleans()):
            out.append(ClickEvent(event_id=f"e{i}", user_id=user, item_id=item, ts=ts, session_id=session,
                                  category_id=category))
        else:
            out.append(PurchaseEvent(event_id=f"e{i}", user_id=user, item_id=item, ts=ts, session_id=session,
                                     category_id=category, quantity=draw(st.integers(1, MAX_QUANTITY)),
                                     price=draw(st.none() | st.floats(0, 1e12))))
    return out


def run(stream, cuts):
    """Every recommendation of ``stream`` cut into batches at ``cuts``, with all learners on
    (implicit MF included) and a re-ranker that starts reordering at once."""
    config = RecommenderConfig(k=10, n_candidates=30, weights={**RecommenderConfig().weights, "mf": 0.2},
                               reranker_min_samples=1, max_per_category=3)
    step = RecommendationStep(Recommender.default(config), None, StepConfig())
    states: dict = {}
    published = []
    bounds = sorted({0, len(stream), *[c for c in cuts if 0 < c < len(stream)]})
    for start, end in zip(bounds, bounds[1:], strict=False):
        result = step(stream[start:end], states, lambda: NOW)
        assert not result.failures, [f.reason for f in result.failures]
        states.update(result.states)
        published += [(r.user_id, [(it.item_id, it.score, it.reason) for it in r.items]) for r in result.recommendations]
    return published


# a user whose events are two months behind the models' clock: trending's decay, undone, was
# e**700 times a purchase's weight (RuntimeWarning: overflow encountered in multiply)
RETURNING = [PurchaseEvent(event_id="p", user_id="u0", item_id="i0", ts=NOW, quantity=MAX_QUANTITY),
             ClickEvent(event_id="c", user_id="u1", item_id="i1", ts=NOW - 60 * DAY_MS)]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.lists(st.integers(0, 60), max_size=5))
@example(RETURNING, [1])
@example([*RETURNING, ClickEvent(event_id="j", user_id="u2", item_id="i0", ts=MAX_TS_MS), *RETURNING[:1]], [1, 2, 3])
def test_every_score_is_finite_and_the_ranking_is_deterministic(stream, cuts):
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")  # a RuntimeWarning (overflow, invalid value) fails the test
        first = run(stream, cuts)
        second = run(stream, cuts)
    assert first == second
    for _, items in first:
        assert all(math.isfinite(score) for _, score, _ in items)
