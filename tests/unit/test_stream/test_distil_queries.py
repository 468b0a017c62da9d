"""`streamrec distil-queries` and STREAMREC_QUERY_STUDENT: a query student fitted on a
catalogue file, handed to the text model the worker and serve build (stream.shell.text_embedder)."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from online_models.search import QueryStudent
from stream import serve
from stream.cli import app
from stream.errors import ConfigError, StreamrecError
from stream.settings import Settings
from stream.shell import query_student, text_embedder

ITEMS = [{"item_id": "i1", "title": "Men's lightweight running shoes"},
         {"item_id": "i2", "title": "Women's long winter down jacket with hood"},
         {"item_id": "i3", "title": "Ceramic coffee mug with lid", "available": False},
         {"item_id": "i4", "title": "女士冬季长款羽绒服"}]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student")
    catalogue = folder / "items.jsonl"
    catalogue.write_text("\n".join(json.dumps(item, ensure_ascii=False) for item in ITEMS) + "\n", encoding="utf-8")
    out = folder / "sub" / "student.npz"
    result = CliRunner().invoke(app, ["distil-queries", "--catalogue", str(catalogue), "-o", str(out), "--spans", "2"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_it_learns_the_available_titles_and_says_how_to_use_the_file(fitted):
    out, output = fitted
    assert "learning the words of 3 titles" in output  # the unavailable mug is not learned
    assert f"STREAMREC_QUERY_STUDENT={out}" in output and out.is_file()


def test_the_worker_and_serve_read_queries_with_the_student_the_setting_names(fitted):
    out, _ = fitted
    embedder = text_embedder(Settings.from_env({"STREAMREC_QUERY_STUDENT": str(out)}))
    assert embedder.student is not None
    vector = embedder.queries(["running shoes"])[0]
    assert embedder.student_queries == 1 and np.allclose(vector, embedder.student.encode("running shoes"))
    assert embedder.queries(["coffee mug"])[0].shape == (384,) and embedder.student_queries == 1  # not learned: the model
    assert text_embedder(Settings.from_env({})).student is None  # off by default


def test_a_missing_or_foreign_student_file_is_a_clear_setting_error(tmp_path):
    with pytest.raises(ConfigError, match="STREAMREC_QUERY_STUDENT=.*cannot read a query student.*distil-queries"):
        text_embedder(Settings.from_env({"STREAMREC_QUERY_STUDENT": str(tmp_path / "nope.npz")}))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a student")
    with pytest.raises(ConfigError, match="STREAMREC_QUERY_STUDENT"):
        text_embedder(Settings.from_env({"STREAMREC_QUERY_STUDENT": str(junk)}))
    small = tmp_path / "small.npz"
    small.write_bytes(QueryStudent(np.arange(3), np.ones((3, 8))).to_bytes())  # another model's size
    with pytest.raises(ConfigError, match="8 dimensions, the text model's 384"):
        text_embedder(Settings.from_env({"STREAMREC_QUERY_STUDENT": str(small)}))


def test_a_foreign_student_file_is_refused_with_the_catalogue_off_too(tmp_path):
    """STREAMREC_CATALOGUE=false: the setting was never read, so a wrong value was accepted
    silently, and refused only once the catalogue was turned on. serve refuses it at start,
    as the worker does (tests/unit/test_stream/test_cli_start_checks.py)."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a student")
    for path in (junk, tmp_path / "nope.npz"):
        settings = Settings.from_env({"STREAMREC_CATALOGUE": "false", "STREAMREC_QUERY_STUDENT": str(path),
                                      "STREAMREC_MODEL_DIR": str(tmp_path), "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                                      "STREAMREC_REDIS_URL": "redis://127.0.0.1:1/0"})  # nothing of the main stack
        with pytest.raises(ConfigError, match=f"STREAMREC_QUERY_STUDENT={path}: cannot read a query student"):
            asyncio.run(asyncio.wait_for(serve.run_server(settings, 0, "127.0.0.1", asyncio.Event()), 30))


def test_a_good_student_with_the_catalogue_off_is_said_to_be_unused(fitted, caplog):
    out, _ = fitted
    with caplog.at_level(logging.WARNING, logger="streamrec"):
        assert query_student(Settings.from_env({"STREAMREC_CATALOGUE": "false", "STREAMREC_QUERY_STUDENT": str(out)}))
    assert f"STREAMREC_QUERY_STUDENT={out} is not used: STREAMREC_CATALOGUE=false" in caplog.text
    caplog.clear()
    assert query_student(Settings.from_env({"STREAMREC_QUERY_STUDENT": str(out)})) is not None
    assert "not used" not in caplog.text


def test_misuse_gets_a_message_not_a_traceback(tmp_path):
    runner = CliRunner()
    neither = runner.invoke(app, ["distil-queries", "-o", str(tmp_path / "s.npz")])
    assert neither.exit_code == 2 and "give one catalogue" in neither.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n", encoding="utf-8")
    result = runner.invoke(app, ["distil-queries", "--catalogue", str(bad), "-o", str(tmp_path / "s.npz")])
    assert isinstance(result.exception, StreamrecError) and "line 1: not JSON" in str(result.exception)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    result = runner.invoke(app, ["distil-queries", "--catalogue", str(empty), "-o", str(tmp_path / "s.npz")])
    assert isinstance(result.exception, StreamrecError) and "no available item" in str(result.exception)
    (tmp_path / "a_file").write_text("", encoding="utf-8")
    result = runner.invoke(app, ["distil-queries", "--demo-catalogue", "-o", str(tmp_path / "a_file" / "s.npz")])
    assert result.exit_code == 2 and "a_file" in result.output and "--out" in result.output
    assert "learning the words" not in result.output  # refused before minutes of fitting, not after


def test_a_model_dir_that_is_a_file_names_the_setting(tmp_path):
    """It said 'cannot make the folder ... (File exists)' under --out, an option not given."""
    (tmp_path / "a_file").write_text("x")
    for model_dir in (tmp_path / "a_file", tmp_path / "a_file" / "models"):
        result = CliRunner().invoke(app, ["distil-queries", "--demo-catalogue"],
                                    env={"STREAMREC_MODEL_DIR": str(model_dir), "COLUMNS": "500"})
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and "Invalid value for STREAMREC_MODEL_DIR:" in text, text
        assert f"{tmp_path / 'a_file'} is a file, not a folder" in text and "learning the words" not in text


def test_the_student_over_its_catalogue_is_refused(tmp_path):
    catalogue = tmp_path / "items.jsonl"
    text = json.dumps({"item_id": "i1", "title": "red shoes"}) + "\n"
    catalogue.write_text(text)
    result = CliRunner().invoke(app, ["distil-queries", "--catalogue", str(catalogue), "-o",
                                      str(tmp_path / "." / "items.jsonl")], env={"COLUMNS": "500"})
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "Invalid value for --out:" in out and "would overwrite the catalogue" in out, out
    assert catalogue.read_text() == text


def test_an_out_folder_where_no_file_can_be_made_is_said_before_the_fit(tmp_path, monkeypatch):
    """/proc (or a read-only mount, for root) passed os.access: the fit ran for minutes, then the write failed."""
    def no_fit(*args, **kwargs):
        raise AssertionError("fitted before finding the output unwritable")

    monkeypatch.setattr(QueryStudent, "fit", no_fit)
    result = CliRunner().invoke(app, ["distil-queries", "--demo-catalogue", "-o", "/proc/student.npz"])
    assert result.exit_code == 2 and "cannot write a file in /proc" in result.output, result.output


def test_the_student_is_written_whole_and_nothing_else_is_left(fitted):
    out, _ = fitted
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
