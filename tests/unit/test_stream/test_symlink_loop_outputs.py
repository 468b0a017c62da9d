"""A loop of symbolic links named as a file (``ln -s loop loop; --json-out loop``) is said in words,
before the run: Python 3.11's ``Path.resolve`` raised ``RuntimeError("Symlink loop ...")``,
which the pre-checks let out as a traceback (``is_dir``/``exists`` answer False for a loop)."""

import sys

import pytest
import typer
from typer.testing import CliRunner

import stream.cli
from stream import evaluate_cli

LOOP_SAID = "too many levels of symbolic links (the links lead round in a loop)"


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command("evaluate")(evaluate_cli.evaluate)
    app.command("noop")(lambda: None)  # keep the command name as a subcommand
    return app


@pytest.mark.parametrize(("args", "hint"), [
    (["--json-out", "{tmp}/loop"], "--json-out"),
    (["--png-out", "{tmp}/loop"], "--png-out"),
    (["--json-out", "{tmp}/out.json", "--png-out", "{tmp}/loop"], "--png-out"),
    (["-d", "{tmp}/loop", "-f", "taobao", "--json-out", "{tmp}/out.json"], "--dataset"),
])
def test_evaluate_says_a_symlink_loop_before_the_replay(tmp_path, monkeypatch, args, hint):
    (tmp_path / "loop").symlink_to("loop")

    def replay(*a, **kw):
        raise AssertionError("the replay ran before the loop was said")

    monkeypatch.setattr(evaluate_cli, "_run", replay)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = CliRunner().invoke(cli(), ["evaluate", "-n", "50", *args], env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2, (result.output, result.exception)
    assert f"Invalid value for {hint}: {tmp_path}/loop: {LOOP_SAID}" in text, text


@pytest.mark.parametrize("args", [
    ["report", "--json", "{tmp}/replay.json", "--chart", "{tmp}/a"],
    ["report", "--json", "{tmp}/a", "--chart", "{tmp}/chart.png"],
    ["distil-queries", "--catalogue", "{tmp}/items.jsonl", "--out", "{tmp}/a"],
])
def test_other_commands_say_a_symlink_loop_in_one_line(tmp_path, monkeypatch, capsys, args):
    """report --chart/--json and distil-queries --out resolve their paths too (to compare them)."""
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "replay.json").write_text("{}")
    (tmp_path / "items.jsonl").write_text('{"item_id": "i1", "title": "Down jacket"}\n')
    monkeypatch.setattr(sys, "argv", ["streamrec", *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    with pytest.raises(SystemExit) as exit_:
        stream.cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip() == f"streamrec: {tmp_path / 'a'}: {LOOP_SAID}", err


@pytest.mark.parametrize(("args", "said"), [
    (["produce", "-d", "{tmp}/loop", "-f", "taobao"], f"Invalid value for '--dataset' / '-d': {{tmp}}/loop: {LOOP_SAID}"),
    (["produce", "--catalogue", "{tmp}/loop"], f"Invalid value for '--catalogue': {{tmp}}/loop: {LOOP_SAID}"),
    (["distil-queries", "--catalogue", "{tmp}/loop"], f"Invalid value for '--catalogue': {{tmp}}/loop: {LOOP_SAID}"),
    (["evaluate", "-n", "50", "-d", "{tmp}/loop", "-f", "taobao"],
     f"Invalid value for --dataset: dataset {{tmp}}/loop cannot be reached: {LOOP_SAID}"),
    (["train", "-d", "{tmp}/loop", "-f", "taobao", "--model-dir", "{tmp}/models"],
     f"Invalid value for --dataset: dataset {{tmp}}/loop cannot be reached: {LOOP_SAID}"),
    (["evaluate", "-n", "50", "-d", "{tmp}/dangling", "-f", "taobao"],
     "Invalid value for --dataset: dataset {tmp}/dangling is a symbolic link to a file that does not exist"),
])
def test_a_log_behind_a_symlink_loop_is_not_said_to_be_missing(tmp_path, monkeypatch, capsys, args, said):
    """The files read (a log, a catalogue) were "does not exist" behind a loop of links, where
    the file was there to be seen: click's exists=True and Path.exists answer alike for both."""
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "dangling").symlink_to("gone.csv")
    monkeypatch.setattr(sys, "argv", ["streamrec", *(a.replace("{tmp}", str(tmp_path)) for a in args)])
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit) as exit_:
        stream.cli.main()
    err = " ".join(capsys.readouterr().err.replace("│", " ").split())
    assert exit_.value.code == 2, err
    assert said.replace("{tmp}", str(tmp_path)) in err, err
