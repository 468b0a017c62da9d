"""Experiment arms and attribution (stream/experiments.py) and the step serving them
(stream/pipeline.py): stable assignment by hash, each arm its own blend over shared models, the
baselines, rec_ids, and per-arm counts of lists, attributed clicks and purchases, and live hits."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from online_models import Recommender
from stream.errors import ConfigError
from stream.experiments import (
    RECS_KEPT,
    Experiment,
    attribute,
    load_experiment,
    parse_experiment,
    remembered,
    shown,
)
from stream.pipeline import RecommendationStep
from stream.records import ClickEvent, PurchaseEvent, decode_recommendation
from stream.settings import Settings
from stream.shell import load_arm_scorers
from stream.state import UserState

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


def run(step, events, states):
    result = step(events, states, lambda: T0)
    for uid, st in result.states.items():
        states[uid] = st
    return result


def warm_step(experiment: Experiment | None = None) -> tuple[RecommendationStep, dict[str, UserState]]:
    step = RecommendationStep(Recommender.default(), experiment=experiment)
    states: dict[str, UserState] = {}
    warm = [ClickEvent(event_id=f"w{i}", user_id=f"w{i % 30}", item_id=f"i{i % 9}", ts=T0 - 10_000 + i)
            for i in range(600)]
    run(step, warm, states)
    return step, states


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
    items = step.present_list(states["u1"], 5, T0 + 10, "u1")
    assert items and {it.reason for it in items} == {"shuffle"}
    assert [it.item_id for it in items] == [it.item_id for it in step.present_list(states["u1"], 5, T0 + 20, "u1")]
    ranked = RecommendationStep(step.recommender).present_list(states["u1"], 5, T0 + 10, "u1")  # no experiment
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
