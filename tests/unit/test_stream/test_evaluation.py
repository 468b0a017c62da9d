"""`streamrec evaluate`: the worker's own step and settings, judged as the live hit rate judges."""

from __future__ import annotations

import json
import os
import re
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from gpu_scorer.train_cli import train
from online_models.datasets import (
    DatasetError,
    load_folder,
    read_interactions,
    read_otto,
    read_reference_lists,
    read_yoochoose,
    score_references,
    sessions_of,
    synthetic_interactions,
)
from online_models.types import Interaction
from stream import evaluate_cli
from stream.errors import StreamrecError
from stream.evaluate_cli import evaluate
from stream.evaluation import (
    SERVED,
    Retraining,
    build_contender,
    prequential,
    session_rec,
    verdict,
)
from stream.pipeline import RecommendationStep
from stream.settings import Settings
from stream.step_inputs import StepConfig, recommender_config, to_event

OTTO = Path(__file__).resolve().parents[2] / "data" / "otto-sample.jsonl"


def events(spec: str) -> list[Interaction]:
    """'u1:a u2:b u1:c' -> interactions one second apart."""
    out = []
    for t, token in enumerate(spec.split()):
        user, item = token.split(":")
        out.append(Interaction(user, item, ts=1000 * t, session_id=user))
    return out


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate)
    app.command("noop")(lambda: None)  # keep the command name as a subcommand
    return app


def test_served_is_the_step_the_worker_builds_from_the_same_settings():
    settings = Settings.from_env({"STREAMREC_CANDIDATES": "30", "STREAMREC_BLEND_WEIGHTS": "trending=0.1",
                                  "STREAMREC_RECENT_ITEMS": "7"})
    served = build_contender(SERVED, settings)
    assert isinstance(served.step, RecommendationStep)
    assert served.step.recommender.config == recommender_config(settings)
    assert served.step.config == StepConfig(max_recent=7, dedupe_window=settings.dedupe_window)
    assert served.step.recommender.config.n_candidates == 30 and served.step.recommender.config.weights["trending"] == 0.1
    # one default per knob: the worker's settings, the recommender's and the step's agree
    default = Settings.from_env({})
    assert recommender_config(default) == type(recommender_config(default))()
    assert StepConfig() == RecommendationStep.from_settings(default).config


def test_a_baseline_is_the_same_step_over_one_learner():
    c = build_contender("covisit", Settings.from_env({}))
    assert list(c.step.recommender.learners) == ["covisit"]
    assert c.step.recommender.config.weights == {"covisit": 1.0} and c.step.recommender.config.reranker_weight == 0
    with pytest.raises(ValueError, match="unknown model 'nope'.*served"):
        build_contender("nope", Settings.from_env({}))


def test_each_event_is_judged_against_the_list_the_step_published_before_it():
    """The evaluator judges exactly what the worker published: the list of the Recommendation
    sent after the user's previous event (one event per batch)."""
    log = list(synthetic_interactions(n_events=600, seed=4))
    c = build_contender(SERVED, Settings.from_env({}))
    published: dict[str, list[str]] = {}
    judged = 0
    for n, x in enumerate(log):
        ev = to_event(x, f"e{n}")
        result, before = c.feed([ev])
        if x.user_id in published:
            assert result.judged == [(0, published[x.user_id])]
            judged += 1
        else:
            assert result.judged == []
        assert result.live.judged == len(result.judged)
        for rec in result.recommendations:
            published[rec.user_id] = [it.item_id for it in rec.items]
    report = prequential(log, [SERVED])
    assert report["models"][SERVED]["predictions"] == judged > 0


def test_prequential_never_peeks_an_item_first_seen_at_its_own_event_is_a_miss():
    log = events("u1:a u2:a u1:b u2:b u1:new")
    report = prequential(log, [SERVED, "popularity"], ks=(20,))
    for name in (SERVED, "popularity"):
        m = report["models"][name]
        assert m["predictions"] == 3  # u2's second event, u1's second and third
    # u2:b is predictable (u1 went a -> b before); u1:new can never be
    assert report["models"][SERVED]["HR@20"] <= 2 / 3


def test_a_larger_batch_judges_several_events_of_a_user_against_the_same_older_list():
    log = events("u1:a u1:b u1:c u1:d u1:e u1:f")
    one = prequential(log, [SERVED], ks=(20,), batch_size=1)["models"][SERVED]
    three = prequential(log, [SERVED], ks=(20,), batch_size=3)["models"][SERVED]
    assert one["predictions"] == three["predictions"] == 5  # every event after the first, whatever the batch


def test_report_has_history_split_diversity_novelty_and_coverage():
    report = prequential(synthetic_interactions(n_events=1500, seed=3), [SERVED, "popularity", "covisit",
                                                                        "recent_popularity"])
    served = report["models"][SERVED]
    assert set(served["history"]) == {"1-2", "3-10", ">10"}
    assert sum(b["predictions"] for b in served["history"].values()) == served["predictions"]
    assert 0.0 <= served["diversity"] <= 1.0  # the synthetic log has categories
    assert served["novelty"] >= 1 and 0 < served["coverage@20"] <= 1
    assert report["models"]["popularity"]["novelty"] < served["novelty"]  # popularity shows the head
    assert report["verdict"][SERVED]["beats_every_baseline"]
    assert report["settings"]["STREAMREC_CANDIDATES"] == "50"
    assert served["dead_lettered"] == 0  # the step handled every event


def test_events_pass_the_worker_door_and_the_refused_are_counted_by_code():
    log = [*events("u1:a u1:b u2:a u2:b"), Interaction("u3", "x" * 300, ts=9000), Interaction("u3", "a\x00", ts=9001)]
    report = prequential(log, [SERVED], ks=(20,))
    assert report["events"] == 4 and report["refused"] == {"too_long": 1, "bad_id": 1}
    assert report["models"][SERVED]["predictions"] == 2


def test_verdict():
    models = {"popularity": {"HR@20": 0.1}, "covisit": {"HR@20": 0.3}, SERVED: {"HR@20": 0.31}}
    models = {name: {**m, "predictions": 10} for name, m in models.items()}
    assert verdict(models, 20)[SERVED] == {"beats_every_baseline": True, "best_baseline": "covisit", "margin": 0.01}
    assert verdict({**models, SERVED: {"HR@20": 0.0, "predictions": 0}}, 20) == {}  # nothing judged, no verdict


def test_cut_offs_longer_than_the_published_list_are_refused():
    with pytest.raises(ValueError, match="STREAMREC_TOP_K"):
        prequential(events("u1:a u1:b"), [SERVED], ks=(50,))


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
    sessions = sessions_of(read_yoochoose(tmp_path / "yoochoose-clicks-100k_test.txt"))
    scored = score_references(refs, sessions, (1, 20))["algo"]
    assert scored["predictions"] == 3 and scored["HR@20"] == round(2 / 3, 4) and scored["MRR@20"] == 0.5
    assert scored["HR@1"] == round(1 / 3, 4)


@pytest.mark.parametrize(("content", "said"), [
    ("a;b\n1;2\n", "recoms_toy_bad.csv:2: expected the columns SessionId;Position;Recommendations"),
    ("SessionId;Position;Recommendations\n9;zz;q\n", "with a whole-number Position"),
    (b"SessionId;Position;Recommendations\n9;0;\xff\n", "recoms_toy_bad.csv: not UTF-8 text"),
])
def test_saved_lists_that_are_not_session_recs_are_a_dataset_error_naming_the_file(tmp_path, content, said):
    """A saved-lists file of another shape ended `evaluate -p session-rec` in a KeyError or a
    ValueError traceback."""
    write_session_rec_folder(tmp_path)
    bad = tmp_path / "recommendations" / "recoms_toy_bad.csv"
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DatasetError, match=re.escape(said)):
        read_reference_lists(tmp_path / "recommendations")


@pytest.mark.parametrize("position", ["2", "-9"])
def test_saved_lists_for_another_test_log_are_a_usage_error_not_a_traceback(tmp_path, position):
    """A saved list at a position with no next click in the test log (session 9 has 3 clicks)
    ended `evaluate -p session-rec` in a ValueError traceback, or an IndexError for a negative one."""
    write_session_rec_folder(tmp_path)
    (tmp_path / "recommendations" / "recoms_toy_other.csv").write_text(
        f"SessionId;Position;Recommendations;Scores\n9;{position};a,b;1,0.5\n")
    result = CliRunner().invoke(cli(), ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "-m", "popularity"],
                                env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (text, result.exception)
    assert (f"Invalid value for --dataset: saved lists 'other': session 9 at position {position} has no next click "
            "in the test log (3 clicks)") in text, text


def test_a_csv_field_over_the_csv_modules_limit_is_a_dataset_error(tmp_path):
    log = tmp_path / "big.csv"
    log.write_text("a" * 200_000 + ",2,3,pv,1\n")
    with pytest.raises(DatasetError, match="big.csv: not a CSV log this reader can take"):
        list(read_interactions(log, "taobao"))


def test_session_rec_frozen_and_learning(tmp_path):
    write_session_rec_folder(tmp_path)
    train, test, refs = load_folder(tmp_path)
    report = session_rec(train, test, models=[SERVED, "session_knn"], ks=(20,), references=refs)
    for name in (SERVED, "session_knn"):
        frozen, learning = report["models"][name]["frozen"], report["models"][name]["learning"]
        assert report["test_predictions"] == frozen["predictions"] == learning["predictions"] == 3
        assert frozen["saved_pairs"]["predictions"] == learning["saved_pairs"]["predictions"] == 3
    assert report["models"]["session_knn"]["frozen"]["HR@20"] == round(2 / 3, 4)  # a->b, b->c; z never seen
    assert report["references"]["algo"]["HR@20"] == round(2 / 3, 4)


def test_frozen_mode_goes_click_by_click_whatever_the_batch_size(tmp_path):
    write_session_rec_folder(tmp_path)
    train, test, refs = load_folder(tmp_path)
    one = session_rec(train, test, models=[SERVED], ks=(20,), modes=("frozen",))
    big = session_rec(train, test, models=[SERVED], ks=(20,), modes=("frozen",), batch_size=50)
    assert big["models"][SERVED]["frozen"]["HR@20"] == one["models"][SERVED]["frozen"]["HR@20"] > 0


def test_frozen_mode_teaches_the_models_nothing(tmp_path):
    write_session_rec_folder(tmp_path)
    train, test, _ = load_folder(tmp_path)
    c = build_contender(SERVED, Settings.from_env({}))
    for n, x in enumerate(train):
        c.feed([to_event(x, f"e{n}")])
    learned = c.step.recommender.n_learned
    for n, x in enumerate(test):
        result, _ = c.feed([to_event(x, f"e{100 + n}")], learn=False)
        assert result.applied  # the user's state moves on
    assert c.step.recommender.n_learned == learned
    assert not c.step.recommender._ranked  # no list waits for a label that never comes


def test_validation_split_reads_train_tr_and_train_valid_without_saved_lists(tmp_path):
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
    with pytest.raises(DatasetError, match="has no yoochoose-clicks-100k_train_full.txt"):
        load_folder(tmp_path / "recommendations")


def test_cli_prequential_json_and_png(tmp_path):
    png, js = tmp_path / "ev.png", tmp_path / "ev.json"
    result = CliRunner().invoke(cli(), ["evaluate", "-d", str(OTTO), "-f", "otto", "-m", "served,popularity",
                                        "--json", "--png-out", str(png), "--json-out", str(js)])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(printed["models"]) == {SERVED, "popularity"} and printed["events"] == 862
    assert json.loads(js.read_text())["models"] == printed["models"]
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("name", ["chart.txt", "chart"])
def test_cli_png_out_writes_a_png_at_the_path_given_whatever_its_suffix(tmp_path, name):
    """matplotlib chose the format by the suffix: chart.txt ended the run, after the replay, in a
    ValueError traceback; chart was written as chart.png (`report --chart` writes a PNG there)."""
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", "-m", "popularity", "--png-out", str(tmp_path / name)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG" and sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_cli_says_a_misspelt_setting_it_evaluated_the_default_of(monkeypatch):
    """STREAMREC_CANDIDATE=30 evaluated the default candidates without a word."""
    for name in [n for n in os.environ if n.startswith("STREAMREC_")]:
        monkeypatch.delenv(name)
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", "-m", "popularity", "--json"],
                                env={"STREAMREC_CANDIDATE": "30"})
    assert result.exit_code == 0, result.output
    assert "ignored: STREAMREC_CANDIDATE (did you mean STREAMREC_CANDIDATES?) names no setting" in result.stderr
    assert json.loads(result.stdout)["settings"]["STREAMREC_CANDIDATES"] == "50"


def test_cli_reads_the_worker_settings_from_the_environment():
    ok = CliRunner().invoke(cli(), ["evaluate", "-n", "300", "-m", SERVED, "--json"],
                            env={"STREAMREC_BLEND_WEIGHTS": "trending=0", "STREAMREC_CANDIDATES": "20"})
    assert ok.exit_code == 0, ok.output
    settings = json.loads(ok.stdout)["settings"]
    assert settings["STREAMREC_BLEND_WEIGHTS"] == "trending=0" and settings["STREAMREC_CANDIDATES"] == "20"
    bad = CliRunner().invoke(cli(), ["evaluate", "-n", "300"], env={"STREAMREC_BLEND_WEIGHTS": "nope=1"})
    assert bad.exit_code == 2 and "STREAMREC_BLEND_WEIGHTS" in bad.output and "Traceback" not in bad.output


def test_cli_session_rec_table_and_help(tmp_path):
    write_session_rec_folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(cli(), ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "-m", "served,session_hybrid",
                                   "--png-out", str(tmp_path / "s.png")], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "served" in result.stdout and "session_hybrid" in result.stdout and "algo" in result.stdout
    assert (tmp_path / "s.png").exists()
    helptext = runner.invoke(cli(), ["evaluate", "--help"]).stdout
    assert "--protocol" in helptext and "session-rec" in helptext and "--scorer-model" in helptext


@pytest.mark.parametrize(("split", "test_file"), [("test", "yoochoose-clicks-100k_test.txt"),
                                                  ("valid", "yoochoose-clicks-100k_train_valid.txt")])
def test_cli_session_rec_on_a_test_log_without_events_is_a_usage_error(tmp_path, split, test_file):
    """A test log with its header only printed a table of zeros and exited 0, as if every
    prediction had missed (the prequential protocol refuses a log without events)."""
    write_session_rec_folder(tmp_path)
    rows = "SessionId\tItemId\tTime\n"
    (tmp_path / "yoochoose-clicks-100k_train_tr.txt").write_text(rows + "1\ta\t1\n1\tb\t2\n")
    (tmp_path / test_file).write_text(rows)
    result = CliRunner().invoke(cli(), ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "--split", split,
                                        "-m", "popularity"], env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"Invalid value for --dataset: {tmp_path / test_file} holds no test events" in text, \
        (text, result.exception)


def test_otto_sample_is_readable():
    assert sum(1 for _ in read_otto(OTTO)) == 862


@pytest.mark.parametrize("args, hint", [
    (["-p", "session-rec", "--split", "train"], "'train' is not one of"),
    (["-p", "session-rec", "--mode", "thawed"], "'thawed' is not one of"),
    (["-m", "blend"], "unknown model 'blend'"),
    (["-k", "50"], "STREAMREC_TOP_K"),
    (["--scorer-model", "/nonexistent/models"], "does not exist"),
    (["--scorer-model", "{tmp}/empty_dir"], "is an empty folder, not a model registry yet"),
    (["-d", "{tmp}"], "is a folder"),
    (["-d", "{tmp}/missing.csv", "-f", "taobao"], "missing.csv"),
    (["-p", "session-rec", "-d", "{tmp}"], "has no yoochoose-clicks-100k_train_full.txt"),
    (["-d", "{tmp}/empty.csv", "-f", "taobao"], "holds no events"),
    (["-d", "{tmp}/binary.csv", "-f", "taobao"], "not UTF-8 text"),
    (["-d", "{tmp}/inf.txt", "-f", "yoochoose"], "Time inf is not a time"),
    (["-d", "{tmp}/header.csv", "-f", "taobao"], "is a header, which a Taobao log has none of"),
    (["-d", "{tmp}/no_ts.jsonl", "-f", "otto"], "needs `aid` and `ts`"),
    (["-d", "{tmp}/not_objects.jsonl", "-f", "otto"], "an event is not an object"),
    (["-d", "{tmp}/deep.jsonl", "-f", "otto"], "nests its JSON too deeply"),
    (["-n", "50", "--json-out", "{tmp}"], "is a folder; give the file to write"),
    (["-n", "50", "--png-out", "{tmp}/missing/chart.png"], "does not exist"),
    (["-n", "50", "-m", "covisit", "--retrain-every", "60"], "retrains 'served''s Transformer: add -m served"),
    (["-n", "50", "--retrain-delay", "60"], "--retrain-delay needs --retrain-every"),
    (["-d", "{tmp}/log.csv"], "--dataset needs --format"),  # was: the synthetic shop, named as the file
    (["-d", "{tmp}/log.csv", "-f", "synthetic"], "--dataset needs --format"),
])
def test_cli_misuse_is_a_clear_error_not_a_traceback(tmp_path, args, hint):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "log.csv").write_text("1,10,100,pv,1511544070\n1,11,100,pv,1511544080\n")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x01garbage")
    (tmp_path / "inf.txt").write_text("SessionId\tItemId\tTime\n1\t2\tinf\n")
    (tmp_path / "header.csv").write_text("user_id,item_id,category_id,behavior,timestamp\n1,10,100,pv,1511544070\n")
    (tmp_path / "no_ts.jsonl").write_text('{"session": 1, "events": [{"type": "clicks", "aid": 1}]}\n')
    (tmp_path / "not_objects.jsonl").write_text('{"session": 1, "events": [1]}\n')
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli(), ["evaluate", *args], env={"COLUMNS": "500"})
    assert result.exit_code == 2, result.output
    assert hint in " ".join(result.output.split()) and "Traceback" not in result.output


def test_train_on_a_folder_names_the_files_in_it(tmp_path):
    from gpu_scorer.train_cli import train

    (tmp_path / "log_a.txt").write_text("SessionId\tItemId\tTime\n")
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output and "log_a.txt" in result.output
    assert "Traceback" not in result.output


def test_train_into_a_file_is_refused_before_it_trains(tmp_path):
    from gpu_scorer.train_cli import train

    (tmp_path / "a_file").write_text("not a registry")
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    for model_dir in (tmp_path / "a_file", tmp_path / "a_file" / "models"):
        result = CliRunner().invoke(app, ["train", "--limit", "300", "--model-dir", str(model_dir)],
                                    env={"COLUMNS": "500"})
        assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output
        assert "read 300 events" not in result.output and "Traceback" not in result.output
    # a version's folder: train made a registry nested in it, which no worker would read
    (tmp_path / "registry" / "v0001").mkdir(parents=True)
    (tmp_path / "registry" / "v0001" / "manifest.json").write_text("{}")
    result = CliRunner().invoke(app, ["train", "--limit", "300", "--model-dir", str(tmp_path / "registry" / "v0001")],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "one registered version" in result.output, result.output
    assert not (tmp_path / "registry" / "v0001" / "CURRENT").exists()


def test_evaluate_refuses_an_output_it_cannot_write_before_the_replay(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate_cli.os, "access", lambda path, mode: not mode & os.W_OK)  # a read-only mount (root ignores modes)
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", "-m", "popularity", "--json-out",
                                        str(tmp_path / "x.json")], env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output
    assert "prequential" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("args", "says"), [
    (["--dataset", "{tmp}/log.csv"], "--dataset needs --format"),
    (["--heads", "3"], "must divide --dim"),
    (["--loss", "hinge"], "'ce' or 'sampled'"),
])
def test_train_refuses_what_it_cannot_train_before_reading_the_log(tmp_path, args, says):
    from gpu_scorer.train_cli import train

    (tmp_path / "log.csv").write_text("1,10,100,pv,1511544070\n1,11,100,pv,1511544080\n")
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(app, ["train", "--limit", "300", "--model-dir", str(tmp_path / "m"), *args],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output
    assert "read " not in result.output and "Traceback" not in result.output


def test_train_into_a_folder_it_cannot_write_is_refused_before_it_trains(tmp_path, monkeypatch):
    from gpu_scorer import train_cli

    monkeypatch.setattr(train_cli.os, "access", lambda path, mode: not mode & os.W_OK)  # a read-only mount (root ignores modes)
    app = typer.Typer()
    app.command("train")(train_cli.train)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["train", "--limit", "300", "--model-dir", str(tmp_path / "models")],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "cannot be written" in result.output, result.output
    assert "read 300 events" not in result.output and "Traceback" not in result.output


def test_train_refuses_a_learning_rate_or_limit_it_cannot_train_with(tmp_path):
    from gpu_scorer.train_cli import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    for args, says in ((["--lr", "inf"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
                       (["--lr", "-0.1"], "--lr"), (["--lr", "11"], "--lr"), (["--limit", "-5"], "--limit"),
                       (["--limit", "0"], "--limit")):
        result = CliRunner().invoke(app, ["train", "--model-dir", str(tmp_path), *args], env={"COLUMNS": "500"})
        assert result.exit_code == 2 and says in result.output, (args, result.output)
        assert "read " not in result.output and "Traceback" not in result.output


def test_train_refuses_an_unknown_device_before_it_reads_the_log(tmp_path):
    from gpu_scorer.train_cli import train

    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    for args, hint in ((["--device", "tpu"], "--device"), (["--serve-device", "tpu"], "--serve-device")):
        result = CliRunner().invoke(app, ["train", "--limit", "300", "--model-dir", str(tmp_path), *args],
                                    env={"COLUMNS": "500"})
        assert result.exit_code == 2 and "expected auto, cuda or cpu" in result.output and hint in result.output
        assert "read 300 events" not in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("with_log", [False, True])
def test_an_unknown_format_is_said_of_format_not_of_the_dataset(tmp_path, command, with_log):
    """`-f parquet` was refused under --dataset: "format 'parquet' needs a dataset path" (train,
    without --dataset, which then said "unknown format" of --dataset), "Invalid value for
    --dataset: unknown format" (evaluate)."""
    (tmp_path / "log.csv").write_text("1,10,100,pv,1511544070\n")
    app = typer.Typer()
    app.command(command)(train if command == "train" else evaluate)
    app.command("noop")(lambda: None)
    args = [command, "-f", "parquet", *(["--dataset", str(tmp_path / "log.csv")] if with_log else [])]
    result = CliRunner().invoke(app, [*args, "--model-dir", str(tmp_path / "m")] if command == "train" else args,
                                env={"COLUMNS": "500"})
    said = " ".join(result.output.split())
    assert result.exit_code == 2 and "Invalid value for --format: unknown format 'parquet'" in said, result.output
    assert "Traceback" not in result.output


def test_train_takes_d_for_the_dataset_as_produce_and_evaluate_do(tmp_path):
    """`streamrec evaluate -d LOG -f taobao` (its help's example) as `streamrec train -d LOG -f
    taobao` was "No such option: -d"."""
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["train", "-d", str(tmp_path), "--model-dir", str(tmp_path / "m")],
                                env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "is a folder" in result.output, result.output


def test_events_the_step_could_not_handle_are_counted_and_said():
    from rich.console import Console

    from stream.evaluate_cli import _print_failures

    console = Console(record=True, width=200)
    _print_failures(console, {"refused": {"too_long": 2}, "models": {SERVED: {"dead_lettered": 3}, "covisit": {"frozen": {"dead_lettered": 0},
                                                                                  "learning": {"dead_lettered": 2}}}})
    text = console.export_text()
    assert "served: the step raised on 3 events" in text and "covisit (learning): the step raised on 2" in text
    assert "frozen" not in text and "refused at the worker's door (dead-lettered, never replayed): too_long 2" in text


class NamedScorer:
    """A stand-in Transformer that says which fit it came from each time it scores."""

    def __init__(self, name: str, calls: list[str]):
        self.version, self.provider, self.name, self.calls = name, "test", name, calls

    def score(self, sequences, candidates):
        self.calls.append(self.name)
        return [np.zeros(len(c), dtype=np.float32) for c in candidates]


def test_retraining_fits_only_what_came_before_each_moment_and_serves_it_after_the_delay(tmp_path):
    write_session_rec_folder(tmp_path)  # training log at 1-8 s, test clicks at 20-24 s
    train, test, _ = load_folder(tmp_path)
    calls: list[str] = []
    fitted: list[list[int]] = []

    def fit(interactions):
        fitted.append(sorted(x.ts // 1000 for x in interactions))
        return NamedScorer(f"fit{len(fitted)}", calls)

    report = session_rec(train, test, models=[SERVED, "popularity"], ks=(20,), scorer=NamedScorer("base", calls),
                         retraining=partial(Retraining, fit, 2, 1))
    # moments at 22 and 24 s (every 2 s from the first test click): each fit saw the training log
    # and the test clicks before its moment, never one at or after it
    assert fitted == [[1, 2, 3, 4, 5, 6, 7, 8, 20, 21], [1, 2, 3, 4, 5, 6, 7, 8, 20, 21, 22, 23]]
    served = report["models"][SERVED]
    assert served["learning"]["retrained"] == {"every_s": 2, "delay_s": 1, "fits": 2}
    assert "retrained" not in served["frozen"] and "retrained" not in report["models"]["popularity"]["learning"]
    # the fit of 22 s serves from 23 s; the one of 24 s would from 25 s, after the last click
    assert calls[0] == "base" and calls[-1] == "fit1" and "fit2" not in calls, calls


def test_cli_retrains_the_served_transformer_as_the_log_goes(tmp_path):
    write_session_rec_folder(tmp_path)
    result = CliRunner().invoke(cli(), ["evaluate", "-p", "session-rec", "-d", str(tmp_path), "--mode", "learning",
                                        "-m", SERVED, "--retrain-every", "2", "--retrain-delay", "0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["models"][SERVED]["learning"]["retrained"] == {"every_s": 2.0, "delay_s": 0.0, "fits": 2}


@pytest.mark.parametrize(("fmt", "text"), [
    ("taobao", "1,10,100,pv,1511544070\r\n1,11,100,pv,1511544080\r\n2,10,100,buy,1511544090\r\n"),
    ("yoochoose", "SessionId\tItemId\tTime\n1\t10\t1511544070\n1\t11\t1511544080\n2\t10\t1511544090\n"),
    ("otto", '{"session": 1, "events": [{"aid": 10, "ts": 1511544070, "type": "clicks"}, '
             '{"aid": 11, "ts": 1511544080, "type": "clicks"}]}\n{"session": 2, "events": [{"aid": 10, '
             '"ts": 1511544090, "type": "orders"}]}\n'),
])
def test_a_log_saved_with_a_byte_order_mark_reads_as_without(tmp_path, fmt, text):
    """Spreadsheet tools save CSV with a UTF-8 BOM: it became part of the first user's id (a
    Taobao user of two events read as two users), or broke the YooChoose header."""
    path = tmp_path / "log.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    users = [x.user_id for x in read_interactions(path, fmt)]
    assert users == ["1", "1", "2"]


@pytest.mark.parametrize(("session", "aid", "said"), [
    ("null", "10", "log.jsonl:2: `session` must be a whole number or a string, saw None"),
    ("2", "true", "log.jsonl:2: `aid` must be a whole number or a string, saw True"),
    ("2", "10.5", "log.jsonl:2: `aid` must be a whole number or a string, saw 10.5"),
    ("{}", "10", "log.jsonl:2: `session` must be a whole number or a string, saw {}"),
])
def test_an_otto_session_or_aid_that_is_no_id_is_a_dataset_error(tmp_path, session, aid, said):
    """A null session was read as the user "None" (every such session one user), an aid of true
    or 10.5 as the items "True" and "10.5", and produce sent them as events."""
    path = tmp_path / "log.jsonl"
    path.write_text('{"session": 1, "events": [{"aid": 10, "ts": 1511544070, "type": "clicks"}]}\n'
                    f'{{"session": {session}, "events": [{{"aid": {aid}, "ts": 1511544080, "type": "clicks"}}]}}\n')
    with pytest.raises(DatasetError, match=re.escape(said)):
        list(read_otto(path))


def test_cli_retraining_with_nothing_to_train_on_says_so(tmp_path):
    """Each user clicks once: the first retraining has no sequence to learn (was a ValueError traceback)."""
    log = tmp_path / "log.csv"
    log.write_text("".join(f"{u},{u % 7},{u % 3},pv,{1511544070 + u * 100}\n" for u in range(40)))
    result = CliRunner().invoke(cli(), ["evaluate", "-d", str(log), "-f", "taobao", "-m", SERVED,
                                        "--retrain-every", "60", "--json"])
    assert isinstance(result.exception, StreamrecError), result.exception
    assert "--retrain-every 60" in str(result.exception) and "nothing to train on" in str(result.exception)


@pytest.mark.parametrize(("args", "env", "hint", "says"), [
    ([], {"STREAMREC_TOP_K": "5"}, "STREAMREC_TOP_K", "the default cut-offs 10 and 20 are longer than the published "
                                                      "list, STREAMREC_TOP_K=5 (set in the environment)"),
    (["-k", "30"], {"STREAMREC_TOP_K": "25"}, "--k", "cut-off 30 is longer than the published list, "
                                                     "STREAMREC_TOP_K=25 (set in the environment)"),
    (["-k", "0"], {}, "--k", "cut-offs start at 1, saw 0"),
])
def test_cli_cut_offs_name_the_setting_that_is_wrong(args, env, hint, says):
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", *args], env={"COLUMNS": "500", **env})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"Invalid value for {hint}: {says}" in text, text


EXPERIMENT = Path(__file__).resolve().parents[3] / "deploy" / "experiments" / "example.toml"


@pytest.mark.parametrize(("args", "hint", "says"), [
    (["--variants", str(EXPERIMENT), "-m", "popularity"], "--variants", "add -m served"),
    (["--scorer-model", "{tmp}", "-m", "popularity,covisit"], "--scorer-model", "add -m served"),
    (["--mode", "frozen"], "--mode", "is for --protocol session-rec"),
    (["--split", "valid"], "--split", "is for --protocol session-rec"),
    (["--split", "test"], "--split", "is for --protocol session-rec"),
    (["-p", "session-rec", "-d", "{tmp}", "--mode", "frozen", "-m", "served", "--retrain-every", "60"],
     "--retrain-every", "retrains in learning mode only"),  # a report without a retraining, exit 0
    (["-p", "session-rec", "-d", "{tmp}", "-f", "taobao"], "--format", "the session-rec folder's logs are YooChoose's"),
    (["-p", "session-rec", "-d", "{tmp}", "-f", "bogus"], "--format", "drop --format"),
    (["-f", "taobao"], "--format", "describes --dataset, which is not given"),  # was: the synthetic shop
    (["-f", "bogus"], "--format", "unknown format 'bogus'; choose one of taobao"),  # not a format at all
])
def test_cli_options_the_run_would_ignore_are_refused(tmp_path, args, hint, says):
    """Each was accepted and silently ignored: the report looked like an answer to the question asked."""
    write_session_rec_folder(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", *args], env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"Invalid value for {hint}:" in text and says in text, text


@pytest.mark.parametrize(("args", "hint", "says"), [
    (["-d", "{tmp}/log.csv", "-f", "taobao", "--json-out", "{tmp}/log.csv"], "--json-out", "is the --dataset input"),
    (["-d", "{tmp}/log.csv", "-f", "taobao", "--png-out", "{tmp}/./log.csv"], "--png-out", "is the --dataset input"),
    (["-p", "session-rec", "-d", "{tmp}", "--json-out", "{tmp}/yoochoose-clicks-100k_test.txt"], "--json-out",
     "is in the --dataset input"),
    (["--variants", "{tmp}/exp.toml", "--json-out", "{tmp}/exp.toml"], "--json-out", "is the --variants input"),
    (["--json-out", "{tmp}/out", "--png-out", "{tmp}/out"], "--png-out", "is --json-out too"),
])
def test_cli_an_output_over_an_input_is_refused(tmp_path, args, hint, says):
    write_session_rec_folder(tmp_path)
    (tmp_path / "log.csv").write_text("1,10,100,pv,1511544070\n1,11,100,pv,1511544080\n")
    (tmp_path / "exp.toml").write_text(EXPERIMENT.read_text())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", *args], env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and f"Invalid value for {hint}:" in text and says in text, text
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


def test_module_entry_point_prints_a_streamrec_error_as_one_line(monkeypatch, capsys):
    """`python -m stream.evaluate_cli` let a StreamrecError out as a traceback."""
    def fails(*args, **kwargs):
        raise StreamrecError("cannot write /x.json: No space left on device")

    monkeypatch.setattr(evaluate_cli, "_run", fails)
    monkeypatch.setattr(sys, "argv", ["evaluate_cli", "evaluate", "-n", "50"])
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "streamrec evaluate: cannot write /x.json: No space left on device" and "Traceback" not in err


@pytest.mark.parametrize(("raised", "code", "said"), [
    (PermissionError(13, "Permission denied", "/data/yoochoose-clicks-100k_test.txt"), 2,
     "streamrec evaluate: /data/yoochoose-clicks-100k_test.txt: permission denied; the user running streamrec"),
    (KeyboardInterrupt(), 130, "streamrec evaluate: interrupted"),
])
def test_module_entry_point_says_a_file_it_may_not_read_or_a_ctrl_c_as_streamrec_does(monkeypatch, capsys, raised,
                                                                                      code, said):
    """`python -m stream.evaluate_cli` let a PermissionError out as a traceback, and exited 130 on
    a Ctrl-C without a word: `streamrec evaluate` says both in one line."""
    def fails(*args, **kwargs):
        raise raised

    monkeypatch.setattr(evaluate_cli, "_run", fails)
    monkeypatch.setattr(sys, "argv", ["evaluate_cli", "evaluate", "-n", "50"])
    with pytest.raises(SystemExit) as exit_:
        evaluate_cli.main()
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert err.strip().startswith(said) and "Traceback" not in err, err


@pytest.mark.parametrize(("given", "says"), [
    ("junk.onnx", "is a file, but not the model.onnx of a registered version (no manifest.json beside it)"),
    ("notes", "is neither a model version (no manifest.json in it) nor a model registry"),
])
def test_cli_a_scorer_model_that_is_not_a_model_says_what_it_is(tmp_path, given, says):
    """Both said `streamrec train --model-dir junk.onnx` would register one there."""
    (tmp_path / "junk.onnx").write_text("not a model")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", "--scorer-model", str(tmp_path / given)],
                                env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and says in text and "streamrec train --model-dir" not in text, text


def test_cli_json_shows_its_progress_on_stderr_and_keeps_stdout_json():
    """--json showed no progress at all: hours of replay without a sign of life."""
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "300", "-m", "popularity", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["models"]["popularity"]["predictions"] > 0
    assert "prequential: 300/300 steps (100%)" in result.stderr


def test_progress_lines_come_every_so_often_and_once_at_the_end(monkeypatch, capsys):
    clock = iter([0.0, 1.0, 31.0, 32.0, 40.0])
    monkeypatch.setattr(evaluate_cli.time, "monotonic", lambda: next(clock))
    with evaluate_cli._progress(True, 4, "prequential") as tick:
        for done in (1, 2, 3, 4, 4):
            tick(done)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["prequential: 2/4 steps (50%) in 31 s", "prequential: 4/4 steps (100%) in 40 s"]


class VocabScorer(NamedScorer):
    """A stand-in Transformer whose vocabulary holds ``known`` items."""

    def __init__(self, known):
        super().__init__("v0001", [])
        self.vocab = frozenset(known)


def test_a_scorer_trained_on_other_items_is_said_with_its_share_of_the_items_judged():
    """The synthetic shop's model on another log scores nothing but out-of-vocabulary rows: the
    report must say so, not look like the Transformer's answer."""
    log = list(synthetic_interactions(n_events=400, seed=5))
    items = sorted({x.item_id for x in log})
    foreign = prequential(log, models=[SERVED], ks=(10,), scorer=VocabScorer(items[: len(items) // 5]))
    said = foreign["scorer_vocabulary"]
    assert 0 < said["in_vocabulary"] < said["items_judged"] <= len(items)
    assert said["share"] == round(said["in_vocabulary"] / said["items_judged"], 4) < 0.5
    assert f"knows only {said['share']:.0%} of the {said['items_judged']:,} distinct items judged" in said["warning"]
    own = prequential(log, models=[SERVED], ks=(10,), scorer=VocabScorer(items))
    assert own["scorer_vocabulary"]["share"] == 1.0 and "warning" not in own["scorer_vocabulary"]
    assert "scorer_vocabulary" not in prequential(log, models=[SERVED], ks=(10,))


def test_session_rec_says_a_foreign_scorer_too(tmp_path):
    write_session_rec_folder(tmp_path)
    train, test, _ = load_folder(tmp_path)
    report = session_rec(train, test, models=[SERVED], ks=(20,), scorer=VocabScorer(()))
    assert report["scorer_vocabulary"]["share"] == 0.0 and "warning" in report["scorer_vocabulary"]


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_evaluate_warns_in_one_line_when_the_scorer_knows_few_items(monkeypatch, tmp_path, as_json):
    monkeypatch.setattr(evaluate_cli, "_load_scorer", lambda path, device: VocabScorer(()))
    result = CliRunner().invoke(
        cli(), ["evaluate", "-n", "200", "-m", "served", "--scorer-model", str(tmp_path), *(["--json"] if as_json else [])],
        env={"COLUMNS": "500"})
    assert result.exit_code == 0, result.output + result.stderr
    lines = [line for line in (result.stderr if as_json else result.stdout).splitlines() if "knows only 0%" in line]
    assert len(lines) == 1 and "distinct items judged" in lines[0], result.output
    if as_json:
        assert json.loads(result.stdout)["scorer_vocabulary"]["warning"] == lines[0]


def test_train_into_a_model_dir_no_shell_expanded_is_refused(tmp_path, monkeypatch):
    """STREAMREC_MODEL_DIR='~/models' (or 'models '): train wrote a folder named '~' in the working
    folder, where the worker (which refuses such a value now) never looks."""
    from gpu_scorer.train_cli import train

    monkeypatch.chdir(tmp_path)
    app = typer.Typer()
    app.command("train")(train)
    app.command("noop")(lambda: None)
    for value, said in (("~/models", "'~' is expanded by a shell only"), ("models ", "starts or ends with a space")):
        result = CliRunner().invoke(app, ["train", "--limit", "300"], env={"COLUMNS": "500", "STREAMREC_MODEL_DIR": value})
        assert result.exit_code == 2 and said in result.output, result.output
        assert not (tmp_path / "~").exists() and not (tmp_path / "models ").exists()
