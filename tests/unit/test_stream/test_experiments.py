"""Experiment arms and attribution (stream/experiments.py) and the step serving them
(stream/pipeline.py): stable assignment by hash, each arm its own blend over shared models, the
baselines, rec_ids, and per-arm counts of lists, attributed clicks and purchases, and live hits."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter

import msgspec
import pytest
from warm_steps import run, warm_step

from online_models import Recommender
from stream.errors import ConfigError
from stream.experiments import (
    RECS_KEPT,
    SEARCHED,
    Experiment,
    attribute,
    load_experiment,
    parse_experiment,
    rec_tag,
    remembered,
    shown,
)
from stream.pipeline import RecommendationStep
from stream.records import ClickEvent, PurchaseEvent, decode_recommendation
from stream.settings import Settings
from stream.shell import load_arm_scorers
from stream.state import InMemoryUserStateStore, UserState
from stream.step_results import VariantCounts

T0 = 1_700_000_000_000

TWO_ARMS = {
    "experiment": "exp-1",
    "control": "control",
    "arms": [
        {"name": "control", "share": 0.5, "baseline": "popularity"},
        {"name": "blend", "share": 0.5, "weights": {"covisit": 2.0}, "learners_off": ["session_hybrid"],
         "model": "none", "candidates": 30},
    ],
}


def test_assignment_is_stable_and_follows_the_shares():
    e = parse_experiment({"experiment": "x", "arms": [{"name": "a", "share": 0.2}, {"name": "b", "share": 0.8}]})
    users = [f"u{i}" for i in range(20_000)]
    first = [e.arm_of(u).name for u in users]
    assert first == [e.arm_of(u).name for u in users]  # stable
    share = Counter(first)["a"] / len(users)
    assert 0.18 < share < 0.22
    other = parse_experiment({"experiment": "y", "arms": [{"name": "a", "share": 0.2}, {"name": "b", "share": 0.8}]})
    moved = sum(1 for u, arm in zip(users, first, strict=True) if other.arm_of(u).name != arm)
    assert moved > 1000  # another experiment name reshuffles who is where


def test_files_load_from_toml_and_json_and_mistakes_are_named(tmp_path):
    toml = tmp_path / "v.toml"
    toml.write_text('experiment = "e"\n[[arms]]\nname = "a"\nshare = 1.0\nweights = {covisit = 1.5}\n')
    assert load_experiment(toml).arms[0].weights == {"covisit": 1.5}
    js = tmp_path / "v.json"
    js.write_text(json.dumps(TWO_ARMS))
    assert load_experiment(js, ["covisit", "session_hybrid", "trending"]).control == "control"
    for data, words in (({"arms": []}, "`experiment`"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 0}]}, "`share`"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1, "baseline": "random"}]}, "`baseline`"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1}, {"name": "a", "share": 1}]}, "twice"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1, "colour": 1}]}, "colour"),
                        ({"experiment": "e", "control": "z", "arms": [{"name": "a", "share": 1}]}, "`control`"),
                        ({"experiment": "e", "control": ["a"], "arms": [{"name": "a", "share": 1}]}, "`control`"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1, "weights": {"covisit": float("inf")}}]},
                         "from 0 to 1e"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1, "weights": {"nope": 1}}]}, "nope"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 1}, {"name": "b", "share": 1}]},
                         "add up to 2, not 1"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 0.3}]}, "add up to 0.3, not 1"),
                        ({"experiment": "e", "arms": [{"name": "a", "share": 0.99999}, {"name": "b", "share": 0.00001}]},
                         "arm 'b' gets no user")):
        with pytest.raises(ConfigError, match=words):
            parse_experiment(data, known_sources=["covisit"])
    # a misspelt `control` left the first arm the control (and the report's lifts against it)
    (tmp_path / "typo.toml").write_text('experiment = "e"\ncontol = "b"\n[[arms]]\nname = "a"\nshare = 0.5\n'
                                        '[[arms]]\nname = "b"\nshare = 0.5\n')
    with pytest.raises(ConfigError, match="unknown field.s. contol; the file's fields are experiment, control and arms"):
        load_experiment(tmp_path / "typo.toml")
    # JSON took the last of a key given twice, where TOML refuses the file
    (tmp_path / "twice.json").write_text('{"experiment": "e", "arms": [{"name": "a", "share": 1}], '
                                         '"arms": [{"name": "c", "share": 1}]}')
    with pytest.raises(ConfigError, match="not valid JSON: key 'arms' is given twice"):
        load_experiment(tmp_path / "twice.json")
    (tmp_path / "share.json").write_text('{"experiment": "e", "arms": [{"name": "a", "share": 0.5, "share": 1}]}')
    with pytest.raises(ConfigError, match="key 'share' is given twice"):
        load_experiment(tmp_path / "share.json")
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("experiment = ")
        load_experiment(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_experiment(tmp_path / "missing.toml")
    for name, text in (("deep.json", "[" * 100_000), ("deep.toml", "x = " + "[" * 100_000)):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="nested too deeply"):
            load_experiment(tmp_path / name)


def test_an_arm_config_is_the_base_blend_with_its_changes():
    base = Recommender.default().config
    control, blend = parse_experiment(TWO_ARMS).arms
    popular = control.config(base)
    assert {n for n, w in popular.weights.items() if w > 0} == {"trending"} and popular.reranker_weight == 0
    cfg = blend.config(base)
    assert cfg.weights["covisit"] == 2.0 and cfg.weights["session_hybrid"] == 0.0 and cfg.weights["transformer"] == 0.0
    assert cfg.n_candidates == 30 and base.weights["covisit"] != 2.0  # the base is untouched


def test_attribution_by_rec_id_and_by_window():
    recs = remembered(remembered([], "r1", 1000), "r2", 5000)
    assert attribute(recs, ["x"], "r1", "anything", 6000, "click", 60_000).first
    assert not attribute(recs, ["x"], "r1", "other", 6001, "click", 60_000).first  # a repeat on r1
    assert attribute(recs, ["x"], "r1", "x", 6002, "purchase", 60_000).first  # the first purchase on r1
    assert attribute(recs, ["x"], None, "x", 5000 + 60_000, "click", 60_000).rec_id == "r2"  # in the window
    assert attribute(recs, ["x"], None, "x", 5000 + 60_001, "click", 60_000) is None  # past it
    assert not attribute(recs, ["x"], "forgotten-id", "x", 7000, "click", 60_000).first  # unknown: a click, no list
    before = list(recs)
    for i in range(40):
        recs = remembered(recs, f"q{i}", i)
    assert len(recs) == RECS_KEPT and recs[-1][0] == "q39" and len(before) == 2
    assert shown(recs, "q39") and not shown(recs, "q39") and not shown(recs, "never-published")


def test_a_copied_state_shares_the_remembered_lists_but_crediting_one_leaves_the_original_as_it_was():
    original = UserState("u", last_recommended=["x"], recs=remembered(remembered([], "r1", 1000), "r2", 5000))
    copy = original.copy()
    assert attribute(copy.recs, copy.last_recommended, "r1", "x", 6000, "click", 60_000).first
    assert attribute(copy.recs, copy.last_recommended, None, "x", 6001, "purchase", 60_000).rec_id == "r2"
    assert shown(copy.recs, "r2")
    assert original.recs == [["r1", 1000, 0], ["r2", 5000, 0]]  # the step can still drop the copy (a failed event)
    assert [r[2] for r in copy.recs] == [1, 2 | 4]


def clicks_of(user: str, n: int, start: int = 0, rec_id: str | None = None) -> list[ClickEvent]:
    return [ClickEvent(event_id=f"{user}-{start + i}", user_id=user, item_id=f"i{(start + i) % 9}", ts=T0 + start + i,
                       rec_id=rec_id) for i in range(n)]


def test_each_arm_serves_its_own_blend_with_rec_ids_and_variants():
    experiment = parse_experiment(TWO_ARMS)
    step, states = warm_step(experiment)
    users = [f"u{i}" for i in range(40)]
    result = run(step, [ev for u in users for ev in clicks_of(u, 2)], states)
    recs = [decode_recommendation(p) for p in result.payloads]
    assert {r.variant for r in recs} == {"control", "blend"}
    for r in recs:
        assert r.variant == experiment.arm_of(r.user_id).name
        assert r.rec_id and len(r.rec_id) <= 24
        if r.variant == "control":  # trending alone, no Transformer
            assert {it.reason for it in r.items} <= {"trending", None} and r.model["transformer"] == "none"
    assert len({r.rec_id for r in recs}) == len(recs)
    assert sum(c.lists for c in result.variants.values()) == len(recs)
    assert result.variants["control"].lists == sum(r.variant == "control" for r in recs)


def test_the_shuffle_baseline_serves_the_candidates_in_a_fixed_random_order():
    experiment = parse_experiment({"experiment": "s", "arms": [{"name": "shuffle", "share": 1, "baseline": "shuffle"}]})
    step, states = warm_step(experiment)
    (rec,) = [decode_recommendation(p) for p in run(step, clicks_of("u1", 3), states).payloads]
    assert rec.variant == "shuffle" and rec.items and {it.reason for it in rec.items} == {"shuffle"}


def test_serve_shows_a_shuffle_arm_user_the_shuffled_candidates_as_the_worker_does():
    # present_list (streamrec serve's recommendations) gave a shuffle arm's user the blend's
    # ranking: a site showing it would credit the shuffle arm with what ranking adds
    experiment = parse_experiment({"experiment": "s", "arms": [{"name": "shuffle", "share": 1, "baseline": "shuffle"}]})
    step, states = warm_step(experiment)
    run(step, clicks_of("u1", 3), states)
    items, variant = step.present_list(states["u1"], 5, T0 + 10, "u1")
    assert items and {it.reason for it in items} == {"shuffle"} and variant == "shuffle"
    assert [it.item_id for it in items] == [it.item_id for it in step.present_list(states["u1"], 5, T0 + 20, "u1")[0]]
    ranked, _ = RecommendationStep(step.recommender).present_list(states["u1"], 5, T0 + 10, "u1")  # no experiment
    assert {it.reason for it in ranked} != {"shuffle"}


def test_clicks_and_purchases_are_credited_once_per_list_and_counted_per_arm():
    step, states = warm_step()
    (first,) = [decode_recommendation(p) for p in run(step, clicks_of("u1", 1), states).payloads]
    shown = [it.item_id for it in first.items]
    assert first.variant == "default" and first.rec_id  # no experiment: the one "default" arm
    echo = [ClickEvent(event_id="c1", user_id="u1", item_id="zzz", ts=T0 + 10, rec_id=first.rec_id),
            ClickEvent(event_id="c2", user_id="u1", item_id="yyy", ts=T0 + 11, rec_id=first.rec_id),
            PurchaseEvent(event_id="p1", user_id="u1", item_id="xxx", ts=T0 + 12, price=2.5, quantity=2,
                          rec_id=first.rec_id)]
    counts = run(step, echo, states).variants["default"]
    assert (counts.clicks, counts.clicked_lists, counts.purchases, counts.purchased_lists, counts.revenue) == (
        2, 1, 1, 1, 5.0)
    assert counts.lists == 1 and counts.live.judged == 3
    # no rec_id: credited by the window to the last list when it holds the item
    last = states["u1"].last_recommended
    hit = ClickEvent(event_id="c3", user_id="u1", item_id=last[0], ts=T0 + 20)
    miss = ClickEvent(event_id="c4", user_id="u1", item_id="not-shown", ts=T0 + 21)
    counts = run(step, [hit, miss], states).variants["default"]
    assert (counts.clicks, counts.clicked_lists) == (1, 1) and counts.live.hits[20] >= 1
    assert shown  # the first list was not empty


def test_an_arm_pins_a_registered_model_version_and_a_missing_one_stops_the_start(tmp_path):
    pytest.importorskip("torch")
    from tiny_models import register_tiny

    first = register_tiny(tmp_path / "models", seed=0)
    register_tiny(tmp_path / "models", seed=1)  # the latest, which "latest" arms get
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path / "models"), "STREAMREC_SCORER_DEVICE": "cpu"})
    experiment = parse_experiment({"experiment": "m", "arms": [
        {"name": "pinned", "share": 0.5, "model": first}, {"name": "without", "share": 0.5, "model": "none"}]})
    scorers = load_arm_scorers(experiment, settings)
    assert set(scorers) == {"pinned"} and scorers["pinned"].version == first

    step, states = warm_step(experiment)
    step.arm_scorers = scorers
    recs = [decode_recommendation(p) for p in run(step, [ev for u in ("a", "b", "c", "d", "e", "f") for ev in
                                                       clicks_of(u, 3)], states).payloads]
    assert {r.variant for r in recs} == {"pinned", "without"}
    for r in recs:
        assert r.model["transformer"] == (first if r.variant == "pinned" else "none")

    missing = parse_experiment({"experiment": "m", "arms": [{"name": "x", "share": 1, "model": "v0042"}]})
    with pytest.raises(ConfigError, match="v0042"):
        load_arm_scorers(missing, settings)


def test_a_learner_only_an_arm_turns_on_is_built_and_serves_that_arm_only(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"experiment": "mf-on", "arms": [
        {"name": "base", "share": 0.5}, {"name": "with-mf", "share": 0.5, "weights": {"mf": 0.5}}]}))
    step = RecommendationStep.from_settings(Settings.from_env({"STREAMREC_VARIANTS": str(path)}))
    assert "mf" in step.recommender.learners  # off in the default blend, so not built without the arm
    assert step.recommender.config.weights.get("mf", 0.0) == 0.0  # the blend itself still serves without it
    plain = RecommendationStep.from_settings(Settings.from_env({}))
    assert "mf" not in plain.recommender.learners


def test_a_retried_ranking_remembers_only_the_published_list():
    """A group of users ranked again after another user's ranking raised (isolation by halves)
    must not leave a rec_id in their state that was never published."""
    experiment = parse_experiment({"experiment": "e", "arms": [{"name": "a", "share": 0.5},
                                                               {"name": "b", "share": 0.5, "weights": {"covisit": 2.0}}]})
    step, states = warm_step(experiment)
    users = [f"u{i}" for i in range(8)]
    run(step, [ev for u in users for ev in clicks_of(u, 2)], states)
    bad = [u for u in users if experiment.arm_of(u).name == "b"][-1]
    users.sort(key=lambda u: experiment.arm_of(u).name != "a")  # arm a is ranked first, then b raises
    real = step._rank_arm

    def flaky(arm, rec, scorer, members, *args, **kw):
        if bad in members:
            raise RuntimeError("a ranking bug for one user")
        return real(arm, rec, scorer, members, *args, **kw)

    step._rank_arm = flaky
    before = {u: len(states[u].recs) for u in users}
    result = run(step, [ClickEvent(event_id=f"x{u}", user_id=u, item_id="i1", ts=T0 + 100) for u in users], states)
    published = {r.user_id: r.rec_id for r in result.recommendations}
    assert bad not in published and len(published) == len(users) - 1
    for u in published:
        assert [e[0] for e in result.states[u].recs][-1] == published[u]
        assert len(result.states[u].recs) == before[u] + 1


def test_when_learning_raises_the_attribution_is_worked_out_again():
    step, states = warm_step()
    (first,) = run(step, clicks_of("u1", 1), states).recommendations
    real = step.recommender.learn_one

    def picky(x, user=None):
        if x.item_id == "poison":
            raise ZeroDivisionError("a learner's bug")
        return real(x, user)

    step.recommender.learn_one = picky
    echo = [ClickEvent(event_id="b1", user_id="u1", item_id="poison", ts=T0 + 10, rec_id=first.rec_id),
            ClickEvent(event_id="b2", user_id="u1", item_id="fine", ts=T0 + 11, rec_id=first.rec_id)]
    result = run(step, echo, states)
    assert [f.index for f in result.failures] == [0]
    counts = result.variants["default"]
    assert (counts.clicks, counts.clicked_lists) == (1, 1)  # b2 is the list's first click now that b1 is out


def test_baseline_arms_do_not_teach_the_re_ranker_and_popularity_is_built_when_the_blend_has_no_trending(tmp_path):
    only_popularity = parse_experiment({"experiment": "p", "arms": [{"name": "pop", "share": 1, "baseline": "popularity"}]})
    step, states = warm_step(only_popularity)
    for i in range(5):
        run(step, [ev for u in range(20) for ev in clicks_of(f"u{u}", 2, start=10 * i)], states)
    assert step.recommender.reranker.n_learned == 0  # the baseline's lists are no labels
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"experiment": "p", "arms": [{"name": "pop", "share": 1, "baseline": "popularity"}]}))
    settings = Settings.from_env({"STREAMREC_VARIANTS": str(path), "STREAMREC_BLEND_WEIGHTS": "trending=0"})
    step = RecommendationStep.from_settings(settings)
    assert "trending" in step.recommender.learners
    states = {}
    run(step, [ev for u in range(10) for ev in clicks_of(f"v{u}", 3)], states)
    lists = [decode_recommendation(p) for p in run(step, clicks_of("v1", 1, start=9), states).payloads]
    assert lists and all(r.items for r in lists)


def test_an_experiment_file_that_is_not_text_is_named(tmp_path):
    binary = tmp_path / "v.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_experiment(binary)


@pytest.mark.parametrize("candidates", [0, 100_001, 10**12, True, 2.5])
def test_an_arms_candidates_are_bounded_as_streamrec_candidates_is(candidates):
    data = {**TWO_ARMS, "arms": [TWO_ARMS["arms"][0], {**TWO_ARMS["arms"][1], "candidates": candidates}]}
    with pytest.raises(ConfigError, match=r"`candidates` must be a whole number from 1 to 100,000"):
        parse_experiment(data)


def test_an_arm_may_score_as_many_candidates_as_streamrec_candidates_may():
    data = {**TWO_ARMS, "arms": [TWO_ARMS["arms"][0], {**TWO_ARMS["arms"][1], "candidates": 100_000}]}
    assert parse_experiment(data).arms[1].candidates == 100_000
    with pytest.raises(ConfigError, match="STREAMREC_CANDIDATES=100001: at most 100,000"):
        Settings.from_env({"STREAMREC_CANDIDATES": "100001"})


AB = {"experiment": "ab", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5, "weights": {"covisit": 2.0}}]}
#: the same arms in the other order: about half of the users change arm (the file changed, the workers restarted)
BA = {**AB, "arms": AB["arms"][::-1]}


def moved_user(before: Experiment, after: Experiment) -> str:
    return next(u for u in (f"m{i}" for i in range(1000)) if before.arm_of(u).name == "a" and after.arm_of(u).name == "b")


def test_an_event_counts_under_the_arm_that_served_its_list_not_the_users_arm_when_it_comes():
    """Clicks and purchases were counted under the user's arm when they came: after the experiment
    file changed, a click on a list arm a served counted for arm b, which never showed it."""
    before, after = parse_experiment(AB), parse_experiment(BA)
    user = moved_user(before, after)
    step, states = warm_step(before)
    (listed,) = [decode_recommendation(p) for p in run(step, clicks_of(user, 2), states).payloads]
    assert listed.variant == "a" and listed.rec_id.endswith("-" + rec_tag("a")) and len(listed.rec_id) <= 24
    restarted = RecommendationStep(step.recommender, experiment=after)  # the new file, the same models and states
    window_click = ClickEvent(event_id="k1", user_id=user, item_id=states[user].last_recommended[0], ts=T0 + 50)
    echoed = PurchaseEvent(event_id="k2", user_id=user, item_id="anything", ts=T0 + 51, price=3.0,
                           rec_id=listed.rec_id)
    counts = run(restarted, [window_click, echoed], states).variants
    assert (counts["a"].clicks, counts["a"].clicked_lists, counts["a"].purchases, counts["a"].purchased_lists,
            counts["a"].revenue) == (1, 1, 1, 1, 3.0)
    assert counts["b"].lists == 1 and counts["b"].clicks == counts["b"].purchases == 0  # b served the new list
    # a list remembered from before rec ids named their arm ([rec_id, ts, flags], as the old
    # code wrote it) still loads and counts: under the user's arm when the event comes, as it used to
    old = msgspec.json.encode({"user_id": user, "last_recommended": ["i1"], "recs": [["3f9a1c22d07b1a", T0 + 60, 0]]})
    store = InMemoryUserStateStore()
    asyncio.run(store.save_docs({user: old}))
    loaded = asyncio.run(store.load_many([user]))
    counts = run(restarted, [ClickEvent(event_id="k3", user_id=user, item_id="x", ts=T0 + 61,
                                        rec_id="3f9a1c22d07b1a")], loaded).variants
    assert (counts["b"].clicks, counts["b"].clicked_lists) == (1, 1) and counts.get("a", VariantCounts()).clicks == 0


def test_live_hits_are_judged_under_the_arm_that_served_the_list_a_search_answer_aside():
    """Live hits were counted under the user's arm when the event came: after the experiment file
    changed, an event judged against the list arm a served counted for arm b. A search's answer
    (remembered too) is not the list judged."""
    before, after = parse_experiment(AB), parse_experiment(BA)
    user = moved_user(before, after)
    step, states = warm_step(before)
    (listed,) = run(step, clicks_of(user, 2), states).recommendations
    assert listed.variant == "a"
    states[user].recs = remembered(states[user].recs, "s1-" + rec_tag("b"), T0 + 40, SEARCHED)  # a search b answered
    restarted = RecommendationStep(step.recommender, experiment=after)
    hit = ClickEvent(event_id="k1", user_id=user, item_id=listed.items[0].item_id, ts=T0 + 50)
    counts = run(restarted, [hit], states).variants
    assert (counts["a"].live.judged, counts["a"].live.hits[20]) == (1, 1)
    assert counts["b"].live.judged == 0 and counts["b"].lists == 1  # b served the new list only


def test_a_list_of_an_arm_the_experiment_no_longer_has_counts_under_no_arm():
    """Per-arm counters are labelled by the configured arms only: a click on a list of an arm
    since removed, or echoing a made-up id in the same form, counts under none (and never raises);
    one echoing an id in another form (the site's own), under the user's arm, as it always did."""
    step, states = warm_step(parse_experiment(AB))
    user = next(u for u in (f"r{i}" for i in range(100)) if step.variant_of(u) == "b")
    (listed,) = run(step, clicks_of(user, 2), states).recommendations
    only_a = RecommendationStep(step.recommender, experiment=parse_experiment(
        {"experiment": "ab", "arms": [{"name": "a", "share": 1}]}))
    echoes = [ClickEvent(event_id=f"e{i}", user_id=user, item_id="x", ts=T0 + 50 + i, rec_id=rec_id)
              for i, rec_id in enumerate((listed.rec_id, "made-up-zzzz", "-" * 5, "x" * 128))]
    result = run(only_a, echoes, states)
    assert len(result.applied) == 4 and not result.failures
    # the list it published is a's, and so are the clicks echoing ids in no rec id's form (the user's arm)
    assert set(result.variants) == {"a"} and result.variants["a"].clicks == 2


def test_rec_ids_name_their_arm_and_stay_within_24_characters_for_ever():
    step = RecommendationStep(Recommender.default(), experiment=parse_experiment(AB))
    first = step.new_rec_id("b")
    assert step.served_by(first) == "b" and step.variant_credited(first, "anyone") == "b"
    step._rec_numbers = itertools.count(16 ** 9 - 1)  # the last number under this prefix
    last, fresh = step.new_rec_id("a"), step.new_rec_id("a")
    assert len(last) == 24 and len(fresh) <= 24 and last[:10] == first[:10] != fresh[:10]
    assert step.served_by(last) == step.served_by(fresh) == "a"
    assert RecommendationStep(Recommender.default()).served_by(first) is None  # no experiment: "default" only


def test_two_arms_whose_tags_in_rec_ids_are_the_same_are_refused():
    seen: dict[str, str] = {}
    for i in itertools.count():
        name = f"arm{i}"
        if rec_tag(name) in seen:
            break
        seen[rec_tag(name)] = name
    data = {"experiment": "e", "arms": [{"name": seen[rec_tag(name)], "share": 0.5}, {"name": name, "share": 0.5}]}
    with pytest.raises(ConfigError, match=f"arms '{seen[rec_tag(name)]}' and '{name}' have the same tag in rec ids "
                                          ".*rename one"):
        parse_experiment(data)


@pytest.mark.parametrize(("arm", "said"), [
    ({"learners_off": ["covisit", "reminder", "trending"]}, "arm 'off' leaves every learner at weight 0"),
    ({"weights": {"covisit": 0, "reminder": 0, "trending": 0}}, "arm 'off' leaves every learner at weight 0"),
    ({"candidates": 5}, "arm 'off': candidates = 5 is fewer than STREAMREC_TOP_K=20"),
])
def test_an_arm_whose_lists_would_be_empty_or_cut_stops_the_start(tmp_path, arm, said):
    """An arm with no learner on served every one of its users an empty list, and one with
    fewer candidates than STREAMREC_TOP_K lists cut short, both without a word."""
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"experiment": "e", "arms": [{"name": "base", "share": 0.5},
                                                            {"name": "off", "share": 0.5, **arm}]}))
    with pytest.raises(ConfigError, match="STREAMREC_VARIANTS") as info:
        RecommendationStep.from_settings(Settings.from_env({"STREAMREC_VARIANTS": str(path)}))
    assert said in str(info.value), info.value


def test_names_no_utf8_text_can_carry_and_an_arm_named_default_stop_the_start(tmp_path):
    """A JSON file's "\\ud800" escape made an arm (or experiment) name with a lone surrogate: the
    worker started, then dead-lettered every event of the arm's users (the list could not be
    encoded), and `streamrec report` ended in a UnicodeEncodeError. An arm named "default" took
    the counts of workers without STREAMREC_VARIANTS as its own, and no warning could say so."""
    arms = [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]
    for name, data in (("arm.json", {"experiment": "e", "arms": [{"name": "\ud800", "share": 0.5}, arms[1]]}),
                       ("exp.json", {"experiment": "e-\udfff", "arms": arms})):
        path = tmp_path / name
        path.write_text(json.dumps(data))  # ASCII: the surrogate is written as its escape
        with pytest.raises(ConfigError, match="lone surrogate"):
            load_experiment(path)
    with pytest.raises(ConfigError, match="arms.0.: an arm may not be named 'default'"):
        parse_experiment({"experiment": "e", "arms": [{"name": "default", "share": 0.5}, arms[1]]})
    assert parse_experiment({"experiment": "e", "arms": [{"name": "ünï 名前 🙂", "share": 0.5}, arms[1]]}).names \
        == ["ünï 名前 🙂", "b"]


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "esc\x1b[2J", "del\x7f"])
def test_a_name_with_a_control_character_stops_the_start(name):
    """A newline in an arm's name split its row of the report's table in two (and a log line)."""
    other = {"name": "b", "share": 0.5}
    with pytest.raises(ConfigError, match="control character"):
        parse_experiment({"experiment": "e", "arms": [{"name": name, "share": 0.5}, other]})
    with pytest.raises(ConfigError, match="control character"):
        parse_experiment({"experiment": name, "arms": [{"name": "a", "share": 0.5}, other]})
