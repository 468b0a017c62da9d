"""The sample-ratio check: the users each arm served against the split its shares ask for.
An arm whose users go missing (a broken split, workers on different files, an arm whose lists
fail) makes every lift meaningless; the report says so."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from online_models import Recommender
from stream import cli
from stream.experiments import SEARCHED, parse_experiment, rec_tag
from stream.pipeline import RecommendationStep
from stream.records import ClickEvent
from stream.report import chi2_sf, sample_ratio, summarize, summarize_experiment
from stream.state import UserState

T0 = 1_700_000_000_000
SPLIT = {"experiment": "srm", "control": "A", "arms": [{"name": "A", "share": 0.5}, {"name": "B", "share": 0.5}]}


def _arms(users_a: int, users_b: int) -> dict:
    return {"A": {"users": users_a, "lists": 4 * users_a, "clicked_lists": users_a},
            "B": {"users": users_b, "lists": 4 * users_b, "clicked_lists": users_b}}


def test_a_split_off_its_shares_is_a_warning_and_one_within_chance_is_not():
    off = summarize(_arms(5_000, 5_400), "A", {"A": 0.5, "B": 0.5})
    assert off["sample_ratio"]["p"] < 0.001
    (said,) = [w for w in off["warnings"] if "sample ratio mismatch" in w]
    assert "A 5,000 (expected 5,200)" in said and "B 5,400" in said
    fair = summarize(_arms(5_000, 5_080), "A", {"A": 0.5, "B": 0.5})
    assert fair["sample_ratio"]["p"] > 0.1 and not any("sample ratio" in w for w in fair["warnings"])
    # uneven shares: 20/80 is what a 0.2/0.8 split should give
    assert summarize(_arms(2_000, 8_050), "A", {"A": 0.2, "B": 0.8})["sample_ratio"]["p"] > 0.1


def test_no_check_without_shares_too_few_users_or_counters_without_users():
    assert summarize(_arms(5_000, 5_400), "A")["sample_ratio"] is None
    assert sample_ratio({"A": 3, "B": 4}, {"A": 0.5, "B": 0.5}) is None  # expected 3.5 each: no guide
    assert sample_ratio({"A": 0, "B": 0}, {"A": 0.5, "B": 0.5}) is None  # workers that counted no users
    only = sample_ratio({"A": 900, "B": 1_100, "default": 7}, {"A": 0.5, "B": 0.5})
    assert set(only["users"]) == {"A", "B"}  # a variant that is no arm of the shares is not in it


def test_the_workers_experiment_file_gives_the_shares():
    summary = summarize_experiment(_arms(5_000, 5_400), parse_experiment(SPLIT))
    assert summary["sample_ratio"]["df"] == 1 and any("sample ratio mismatch" in w for w in summary["warnings"])


def test_chi2_tail_matches_the_tables():
    # upper 5% and 0.1% points of chi-square (1, 2 and 3 degrees of freedom)
    for x, df, p in ((3.841, 1, 0.05), (10.828, 1, 0.001), (5.991, 2, 0.05), (13.816, 2, 0.001), (7.815, 3, 0.05)):
        assert chi2_sf(x, df) == pytest.approx(p, rel=2e-3)


def _step():
    return RecommendationStep(Recommender.default(), experiment=parse_experiment(SPLIT))


def test_a_user_counts_once_per_arm_at_their_first_home_list_as_their_state_remembers():
    step = _step()
    users = [f"u{i}" for i in range(30)]
    first = step([ClickEvent(event_id=f"{u}-1", user_id=u, item_id="i1", ts=T0) for u in users], {}, lambda: T0)
    assert sum(c.users for c in first.variants.values()) == len(users)
    assert all(c.users == c.lists for c in first.variants.values())
    again = step([ClickEvent(event_id=f"{u}-2", user_id=u, item_id="i2", ts=T0 + 1) for u in users],
                 dict(first.states), lambda: T0)
    assert sum(c.lists for c in again.variants.values()) == len(users)
    assert sum(c.users for c in again.variants.values()) == 0
    # a user whose state remembers only a search's answer of their arm: their first home list counts
    arm = step.variant_of("s1")
    searched = UserState("s1", recent_items=["i1"], recs=[[f"abc-{rec_tag(arm)}", T0, SEARCHED]])
    result = step([ClickEvent(event_id="s1-1", user_id="s1", item_id="i3", ts=T0 + 2)], {"s1": searched}, lambda: T0)
    assert result.variants[arm].users == 1


def test_a_replays_json_carries_the_shares_and_the_report_checks_them(tmp_path):
    data = {"control": "A", "shares": {"A": 0.5, "B": 0.5}, "variants": _arms(5_000, 5_400)}
    path = tmp_path / "replay.json"
    path.write_text(json.dumps(data))
    out = CliRunner().invoke(cli.app, ["report", "--json", str(path)])
    assert out.exit_code == 0, out.output
    assert "warning: sample ratio mismatch" in out.output
    assert "5,400" in out.output.splitlines()[2]  # the users column
