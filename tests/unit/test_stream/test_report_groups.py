"""The experiment's counts per group of users, and the intervals ``streamrec report`` works
out from them: each user's lists taken together, so that an A/A comparison excludes 0% in
about 5% of splits (taking each list as independent, it did in 27-46%: docs/operations.md)."""

from __future__ import annotations

import math
import random

import pytest
from warm_steps import run, warm_step

from stream.experiments import GROUP_FIELDS, VARIANCE_GROUPS, parse_experiment, variance_group
from stream.records import ClickEvent, PurchaseEvent, decode_recommendation
from stream.report import (
    counters_from_json,
    counters_from_metrics_text,
    format_table,
    merge_counters,
    summarize,
    t_quantile,
)
from stream.step_results import (
    G_CLICKED,
    G_HITS20,
    G_JUDGED,
    G_LISTS,
    G_PURCHASED,
    G_REVENUE,
    VariantCounts,
)

T0 = 1_700_000_000_000


def _arm(users: list[tuple[str, int, float]], rng: random.Random) -> dict:
    """One arm's counters, in the shape the report reads, for users ``(id, lists, click rate)``:
    each list clicked with the user's own rate."""
    totals = {"lists": 0, "clicked_lists": 0}
    groups: dict[str, dict[int, int]] = {"lists": {}, "clicked_lists": {}}
    for uid, lists, p in users:
        clicked = sum(rng.random() < p for _ in range(lists))
        g = variance_group(uid)
        totals["lists"] += lists
        totals["clicked_lists"] += clicked
        groups["lists"][g] = groups["lists"].get(g, 0) + lists
        groups["clicked_lists"][g] = groups["clicked_lists"].get(g, 0) + clicked
    return {**totals, "groups": groups}


def _aa_exclusions(splits: int, grouped: bool, seed: int = 7) -> float:
    """The share of A/A splits whose CTR lift interval excludes 0: 400 users whose click rates
    differ widely (a Beta(0.6, 3) draw each), 10 to 70 lists each, split at random in halves."""
    rng = random.Random(seed)
    excluded = 0
    for s in range(splits):
        users = [(f"s{s}-u{i}", rng.randint(10, 70), rng.betavariate(0.6, 3.0)) for i in range(400)]
        rng.shuffle(users)
        a, b = _arm(users[:200], rng), _arm(users[200:], rng)
        if not grouped:
            a.pop("groups")
            b.pop("groups")
        lift = summarize({"A": a, "B": b}, "A")["variants"]["B"]["lift"]["ctr"]
        excluded += not (lift["ci"][0] <= 0 <= lift["ci"][1])
    return excluded / splits


def test_an_aa_split_excludes_no_lift_about_one_time_in_twenty_with_the_groups():
    grouped = _aa_exclusions(300, grouped=True)
    independent = _aa_exclusions(300, grouped=False)
    assert 0.01 <= grouped <= 0.10, grouped  # 95% intervals: 5% expected (binomial sd 1.3% over 300)
    assert independent >= 0.25, independent  # the same splits taken list by list: far too narrow


def test_the_rates_interval_widens_by_the_design_effect_and_says_so():
    rng = random.Random(3)
    users = [(f"u{i}", 40, rng.betavariate(0.6, 3.0)) for i in range(300)]
    arm = _arm(users, rng)
    grouped = summarize({"A": arm})
    flat = summarize({"A": {k: v for k, v in arm.items() if k != "groups"}})
    g, f = grouped["variants"]["A"]["ctr"], flat["variants"]["A"]["ctr"]
    assert g["rate"] == f["rate"] and g["design_effect"] > 3 and f["design_effect"] is None
    assert g["groups"] == VARIANCE_GROUPS
    assert (g["ci"][1] - g["ci"][0]) > 1.8 * (f["ci"][1] - f["ci"][0])
    assert grouped["grouped"] and not flat["grouped"]
    assert "count each user's lists together" in format_table(grouped)
    assert "take each list as independent" in format_table(flat)


def test_groups_that_do_not_add_up_fall_back_to_independent_intervals_with_a_warning():
    # a fleet of new workers and one of an older version: the groups hold part of the totals
    arm = {"lists": 1000, "clicked_lists": 100,
           "groups": {"lists": {0: 300, 1: 300}, "clicked_lists": {0: 30, 1: 30}}}
    summary = summarize({"A": arm})
    ctr = summary["variants"]["A"]["ctr"]
    assert ctr["design_effect"] is None and not summary["grouped"]
    assert any("add up to 60 of 600" in w and "older version" in w for w in summary["warnings"])


def test_a_fresh_deployments_single_group_is_not_blamed_on_workers_of_an_older_version():
    """The first report of a new deployment (one user, so one group) said the counters had no
    groups, "workers of an older version", when they had one, too few to measure a spread."""
    arm = {"users": 1, "lists": 3, "clicked_lists": 1, "groups": {"lists": {24: 3}, "clicked_lists": {24: 1}}}
    table = format_table(summarize({"A": arm}))
    assert "take each list as independent" in table and "older version" not in table, table
    assert "could not serve: the warnings say why" in table and "in 1 group of users, too few" in table, table


def test_revenue_per_list_gets_an_interval_from_the_groups():
    arm = {"lists": 40, "revenue": 400.0,
           "groups": {"lists": {g: 10 for g in range(4)}, "revenue": {0: 40.0, 1: 160.0, 2: 100.0, 3: 100.0}}}
    v = summarize({"A": arm})["variants"]["A"]
    lo, hi = v["revenue_per_list_ci"]
    # revenue per list 10: the groups are 60 below, 60 above and twice at what 10 lists at 10 make
    se = math.sqrt(4 / 3 * (60 ** 2 + 60 ** 2) / 40 ** 2)
    assert v["revenue_per_list"] == 10.0
    assert lo == pytest.approx(max(0.0, 10 - t_quantile(3) * se)) and hi == pytest.approx(10 + t_quantile(3) * se)
    assert "10.00 [" in format_table(summarize({"A": arm}))


def test_the_groups_are_read_from_metrics_text_and_a_replays_json_and_summed_over_workers():
    text = ('streamrec_experiment_lists_total{variant="A"} 5.0\n'
            'streamrec_experiment_groups_total{variant="A",group="3",field="lists"} 2.0\n'
            'streamrec_experiment_groups_total{variant="A",group="7",field="lists"} 3.0\n'
            'streamrec_experiment_groups_total{variant="A",group="7",field="revenue"} 2.5\n'
            'streamrec_experiment_groups_total{variant="A",group="7",field="someday"} 9.0\n')
    counters = counters_from_metrics_text(text)
    assert counters["A"]["groups"] == {"lists": {3: 2, 7: 3}, "revenue": {7: 2.5}}
    assert merge_counters([counters, counters])["A"]["groups"]["lists"] == {3: 4, 7: 6}
    replay = VariantCounts(lists=2)
    replay.group("u1")[G_LISTS] += 2
    from_json, _ = counters_from_json({"variants": {"A": replay.as_json()}})
    assert from_json["A"]["groups"]["lists"][variance_group("u1")] == 2
    assert sum(from_json["A"]["groups"]["lists"].values()) == 2
    with pytest.raises(Exception, match="groups"):
        counters_from_json({"variants": {"A": {"lists": 1, "groups": {"lists": "many"}}}})


@pytest.mark.parametrize("experiment", [None, {"experiment": "g", "control": "a",
                                               "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]}])
def test_the_step_puts_every_count_of_a_user_in_the_users_group_and_the_groups_add_up(experiment):
    step, states = warm_step(parse_experiment(experiment) if experiment else None)
    users = [f"u{i}" for i in range(60)]
    first = run(step, [ClickEvent(event_id=f"{u}-0", user_id=u, item_id="i1", ts=T0) for u in users], states)
    recs = {r.user_id: r for r in map(decode_recommendation, first.payloads)}
    events = []
    for n, u in enumerate(users):  # a click echoing the list, one on its top item, a purchase of it
        top = recs[u].items[0].item_id
        events += [ClickEvent(event_id=f"{u}-1", user_id=u, item_id="zz", ts=T0 + 1, rec_id=recs[u].rec_id),
                   ClickEvent(event_id=f"{u}-2", user_id=u, item_id=top, ts=T0 + 2),
                   PurchaseEvent(event_id=f"{u}-3", user_id=u, item_id=top, ts=T0 + 3, price=1.0 + n, quantity=1,
                                 rec_id=recs[u].rec_id)]
    for result in (first, run(step, events, states)):
        for c in result.variants.values():
            sums = [sum(counts[i] for counts in c.groups.values()) for i in range(len(GROUP_FIELDS))]
            assert sums[G_LISTS] == c.lists and sums[G_CLICKED] == c.clicked_lists
            assert sums[G_PURCHASED] == c.purchased_lists and sums[G_REVENUE] == pytest.approx(c.revenue)
            assert sums[G_JUDGED] == c.live.judged and sums[G_HITS20] == c.live.hits[20]
    assert sum(c.live.judged for c in result.variants.values()) == 3 * len(users)
    u = users[0]  # one user alone: all of their counts in their own group
    step1, states1 = warm_step(parse_experiment(experiment) if experiment else None)
    r1 = run(step1, [ClickEvent(event_id="a", user_id=u, item_id="i1", ts=T0)], states1)
    (rec,) = map(decode_recommendation, r1.payloads)
    r2 = run(step1, [ClickEvent(event_id="b", user_id=u, item_id="zz", ts=T0 + 1, rec_id=rec.rec_id)], states1)
    for r in (r1, r2):
        assert {g for c in r.variants.values() for g in c.groups} == {variance_group(u)}


@pytest.mark.parametrize("label", ["²", "1" * 5000, "-1", "1e3", " 3"])
def test_a_group_label_that_is_not_a_small_ascii_number_is_not_used(label):
    # "²" passes str.isdigit() but not int(); 5000 digits are past int()'s limit: both were a raw ValueError
    text = ('streamrec_experiment_lists_total{variant="A"} 10.0\n'
            f'streamrec_experiment_groups_total{{variant="A",group="{label}",field="lists"}} 10.0\n')
    assert counters_from_metrics_text(text)["A"]["groups"] == {}
    counters, _ = counters_from_json({"variants": {"A": {"lists": 10, "groups": {"lists": {label: 10}}}}})
    assert counters["A"]["groups"] == {}


@pytest.mark.parametrize("scale", [1e150, 1e200, 1e300])
def test_counts_too_large_for_their_spread_fall_back_with_a_warning_not_an_overflow(scale):
    # the residuals squared (and n * n) overflowed a float: an OverflowError out of `streamrec report`
    arm = {"lists": 2 * scale, "clicked_lists": scale, "revenue": scale,
           "groups": {"lists": [scale, scale], "clicked_lists": [scale, 0], "revenue": [0, scale]}}
    counters, _ = counters_from_json({"variants": {"A": arm, "B": arm}})
    summary = summarize(counters, "A")
    for name in ("A", "B"):
        v = summary["variants"][name]
        assert v["ctr"]["rate"] == 0.5 and 0 <= v["ctr"]["ci"][0] <= 0.5 <= v["ctr"]["ci"][1] <= 1
        assert v["revenue_per_list_ci"] is None or all(math.isfinite(x) for x in v["revenue_per_list_ci"])
    assert summary["variants"]["B"]["lift"]["ctr"]["lift"] == 0.0
    format_table(summary)
