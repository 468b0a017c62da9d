"""A recommendation step warmed on a small click log, and a helper that runs it and keeps the
states it returns: what the experiment tests (counters, attribution, groups of users) start from."""

from __future__ import annotations

from online_models import Recommender
from stream.experiments import Experiment
from stream.pipeline import RecommendationStep
from stream.records import ClickEvent
from stream.state import UserState

T0 = 1_700_000_000_000


def run(step: RecommendationStep, events, states: dict[str, UserState]):
    """``step`` over ``events`` at ``T0``; the states it returns replace those in ``states``."""
    result = step(events, states, lambda: T0)
    for uid, st in result.states.items():
        states[uid] = st
    return result


def warm_step(experiment: Experiment | None = None) -> tuple[RecommendationStep, dict[str, UserState]]:
    """A step (with ``experiment``) that learned 600 clicks of 30 users on 9 items, and their states."""
    step = RecommendationStep(Recommender.default(), experiment=experiment)
    states: dict[str, UserState] = {}
    warm = [ClickEvent(event_id=f"w{i}", user_id=f"w{i % 30}", item_id=f"i{i % 9}", ts=T0 - 10_000 + i)
            for i in range(600)]
    run(step, warm, states)
    return step, states
