"""The two evaluation protocols and `streamrec evaluate`: no peeking, exact counting, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from online_models.cli import evaluate
from online_models.datasets import read_otto, synthetic_interactions
from online_models.evaluation import ContextTracker, blend_verdict, build_contenders, prequential
from online_models.session_protocol import (
    read_reference_lists,
    score_references,
    session_rec,
    sessions_of,
)
from online_models.types import Interaction, UserContext

OTTO = Path(__file__).resolve().parents[1] / "data" / "otto-sample.jsonl"


class Spy:
    """A contender that recommends the user's last item and logs every call."""

    name = "spy"

    def __init__(self):
        self.calls: list[tuple] = []

    def recommend(self, user: UserContext, k: int) -> list[str]:
        self.calls.append(("recommend", user.user_id, user.recent_items))
        return list(user.recent_items[-1:])

    def learn(self, x: Interaction, user: UserContext) -> None:
        self.calls.append(("learn", x.user_id, x.item_id))


def events(spec: str) -> list[Interaction]:
    """'u1:a u2:b u1:c' -> interactions one second apart."""
    out = []
    for t, token in enumerate(spec.split()):
        user, item = token.split(":")
        out.append(Interaction(user, item, ts=1000 * t, session_id=user))
    return out


def test_prequential_recommends_before_learning_and_skips_first_events():
    spy = Spy()
    report = prequential(events("u1:a u2:b u1:a u1:c u2:b"), contenders=[spy], ks=(1,))
    assert spy.calls == [
        ("learn", "u1", "a"),
        ("learn", "u2", "b"),
        ("recommend", "u1", ("a",)), ("learn", "u1", "a"),
        ("recommend", "u1", ("a", "a")), ("learn", "u1", "c"),
        ("recommend", "u2", ("b",)), ("learn", "u2", "b"),
    ]
    m = report["models"]["spy"]
    assert m["predictions"] == 3 and m["HR@1"] == round(2 / 3, 4)


def test_replay_is_in_time_order_whatever_the_file_order():
    spy = Spy()
    xs = events("u1:a u1:b u1:c")
    prequential(reversed(xs), contenders=[spy], ks=(5,))
    assert [c[2] for c in spy.calls if c[0] == "learn"] == ["a", "b", "c"]


def test_context_tracker_keeps_recent_purchased_and_is_bounded():
    tracker = ContextTracker(max_recent=2, max_users=2)
    for x in [Interaction("u", "a", 1), Interaction("u", "b", 2, "purchase"), Interaction("u", "c", 3, session_id="s")]:
        tracker.update(x)
    ctx = tracker.context("u")
    assert ctx.recent_items == ("b", "c") and ctx.purchased == {"b"} and ctx.session_id == "s" and ctx.ts == 3
    tracker.update(Interaction("v", "a", 4))
    tracker.update(Interaction("w", "a", 5))
    assert tracker.context("u").recent_items == ()


def test_prequential_reports_every_contender_with_latency_and_coverage():
    report = prequential(synthetic_interactions(n_events=800, seed=4), models=["popularity", "covisit", "blend"])
    assert set(report["models"]) == {"popularity", "covisit", "blend"}
    for m in report["models"].values():
        assert 0 < m["predictions"] < 800
        assert 0.0 <= m["HR@10"] <= m["HR@20"] <= 1.0 and 0.0 <= m["MRR@20"] <= m["NDCG@20"] <= m["HR@20"]
        assert 0.0 < m["coverage@20"] <= 1.0
        assert m["latency_ms"]["event_p50"] <= m["latency_ms"]["event_p99"]
    assert report["curves"]["blend"][-1][0] == 800
    assert "blend" in report["verdict"]


def test_external_scorer_is_called_on_the_blends_candidates():
    seen = []

    def scorer(user, candidates):
        seen.append(len(candidates))
        return {c: -float(i) for i, c in enumerate(candidates)}

    report = prequential(synthetic_interactions(n_events=300, seed=1), models=["blend"], scorer=scorer, ks=(20,))
    assert {"blend", "scorer"} == set(report["models"]) and seen and max(seen) > 0
    assert report["models"]["scorer"]["predictions"] == report["models"]["blend"]["predictions"]


def test_unknown_model_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model 'nope'.*covisit"):
        build_contenders(["nope"])


def test_blend_verdict():
    models = {"popularity": {"HR@20": 0.1}, "covisit": {"HR@20": 0.3}, "blend": {"HR@20": 0.31}}
    assert blend_verdict(models, 20)["blend"] == {"beats_every_baseline": True, "best_baseline": "covisit",
                                                  "margin": 0.01}


def write_session_rec_folder(folder: Path) -> None:
    """A tiny folder in the session-rec layout: train, test, one saved list file."""
    rows = "SessionId\tItemId\tTime\n"
    train = [("1", "a", 1), ("1", "b", 2), ("1", "c", 3), ("2", "a", 4), ("2", "b", 5), ("2", "c", 6),
             ("3", "x", 7), ("3", "y", 8)]
    test = [("9", "a", 20), ("9", "b", 21), ("9", "c", 22), ("8", "x", 23), ("8", "z", 24)]
    (folder / "yoochoose-clicks-100k_train_full.txt").write_text(rows + "".join(f"{s}\t{i}\t{t}\n" for s, i, t in train))
    (folder / "yoochoose-clicks-100k_test.txt").write_text(rows + "".join(f"{s}\t{i}\t{t}\n" for s, i, t in test))
    (folder / "recommendations").mkdir()
    (folder / "recommendations" / "recoms_toy_algo.csv").write_text(
        "SessionId;Position;Recommendations;Scores\n9;0;q,b;1,0.5\n9;1;c;1\n8;0;y;1\n")


def test_reference_lists_are_scored_against_the_next_click(tmp_path):
    write_session_rec_folder(tmp_path)
    refs = read_reference_lists(tmp_path / "recommendations")
    from online_models.datasets import read_yoochoose

    sessions = sessions_of(read_yoochoose(tmp_path / "yoochoose-clicks-100k_test.txt"))
    scored = score_references(refs, sessions, (1, 20))["algo"]
    assert scored["predictions"] == 3 and scored["HR@20"] == round(2 / 3, 4) and scored["MRR@20"] == 0.5
    assert scored["HR@1"] == round(1 / 3, 4)


def test_session_rec_frozen_and_learning(tmp_path):
    write_session_rec_folder(tmp_path)
    from online_models.session_protocol import load_folder

    train, test, refs = load_folder(tmp_path)
    report = session_rec(train, test, models=["session_knn"], ks=(20,), references=refs)
    frozen, learning = report["models"]["session_knn"]["frozen"], report["models"]["session_knn"]["learning"]
    assert report["test_predictions"] == frozen["predictions"] == learning["predictions"] == 3
    assert frozen["HR@20"] == round(2 / 3, 4)  # a->b, b->c found; z was never seen after x
    assert frozen["saved_pairs"]["predictions"] == 3
    assert report["references"]["algo"]["HR@20"] == round(2 / 3, 4)


def test_validation_split_reads_train_tr_and_train_valid_without_saved_lists(tmp_path):
    from online_models.session_protocol import load_folder

    write_session_rec_folder(tmp_path)
    rows = "SessionId\tItemId\tTime\n"
    (tmp_path / "yoochoose-clicks-100k_train_tr.txt").write_text(rows + "1\ta\t1\n1\tb\t2\n")
    (tmp_path / "yoochoose-clicks-100k_train_valid.txt").write_text(rows + "2\ta\t4\n2\tb\t5\n2\tc\t6\n")
    train, test, refs = load_folder(tmp_path, split="valid")
    assert [x.item_id for x in train] == ["a", "b"] and [x.item_id for x in test] == ["a", "b", "c"]
    assert refs == {}  # the saved lists belong to the test split
    train, test, refs = load_folder(tmp_path)
    assert len(train) == 8 and len(test) == 5 and set(refs) == {"algo"}
    with pytest.raises(ValueError, match="unknown split"):
        load_folder(tmp_path, split="train")
    report = session_rec(*load_folder(tmp_path, split="valid")[:2], models=["session_knn"], ks=(2,))
    assert report["test_predictions"] == 2 and report["models"]["session_knn"]["frozen"]["HR@2"] == 0.5


def test_cli_prequential_json_and_png(tmp_path):
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)  # keep the command name as a subcommand
    png, js = tmp_path / "ev.png", tmp_path / "ev.json"
    result = CliRunner().invoke(app, ["evaluate", "-d", str(OTTO), "-f", "otto", "-m", "popularity,covisit",
                                      "--json", "--png-out", str(png), "--json-out", str(js)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed["models"]) == {"popularity", "covisit"} and printed["events"] == 862
    assert json.loads(js.read_text())["models"] == printed["models"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_session_rec_table_and_help(tmp_path):
    write_session_rec_folder(tmp_path)
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "-m", "session_hybrid",
                                 "--png-out", str(tmp_path / "s.png")])
    assert result.exit_code == 0, result.output
    assert "session_hybrid" in result.stdout and "algo" in result.stdout
    assert (tmp_path / "s.png").exists()
    helptext = runner.invoke(app, ["evaluate", "--help"]).stdout
    assert "--protocol" in helptext and "session-rec" in helptext and "--json" in helptext


def test_otto_sample_is_readable():
    assert sum(1 for _ in read_otto(OTTO)) == 862


def test_cli_session_rec_validation_split(tmp_path):
    write_session_rec_folder(tmp_path)
    rows = "SessionId\tItemId\tTime\n"
    (tmp_path / "yoochoose-clicks-100k_train_tr.txt").write_text(rows + "1\ta\t1\n1\tb\t2\n")
    (tmp_path / "yoochoose-clicks-100k_train_valid.txt").write_text(rows + "2\ta\t4\n2\tb\t5\n")
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "-m", "session_knn",
                                 "--split", "valid", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["split"] == "valid" and report["test_predictions"] == 1 and report["references"] == {}
    bad = runner.invoke(app, ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "--split", "train"])
    assert bad.exit_code != 0


def test_cli_blend_weights_are_read_by_the_shared_parser():
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)
    bad = CliRunner().invoke(app, ["evaluate", "-d", str(OTTO), "-f", "otto", "-m", "blend", "--blend-weights", "mf"])
    assert bad.exit_code != 0 and "name=weight" in bad.output
    ok = CliRunner().invoke(app, ["evaluate", "-d", str(OTTO), "-f", "otto", "-m", "blend", "--json",
                                 "--blend-weights", "mf=0.2,trending=0"])
    assert ok.exit_code == 0, ok.output
    weights = json.loads(ok.stdout)["config"]["weights"]
    assert weights["mf"] == 0.2 and weights["trending"] == 0.0 and weights["covisit"] == 1.0
