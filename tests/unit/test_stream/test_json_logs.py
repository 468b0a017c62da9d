"""STREAMREC_LOG_FORMAT=json: one JSON object a line, from the worker's Faust logging too."""

from __future__ import annotations

import json
import logging
import sys
import threading

import pytest
from mode.utils import logging as mode_logging

from stream.errors import ConfigError
from stream.logs import ClippedTracebacks, JsonLines, handler_config, log_thread_deaths
from stream.settings import Settings


@pytest.fixture
def root_logging():
    """The root logger's handlers and level as they were, after a test that sets logging up."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_record_with_a_traceback_is_one_line_of_json():
    logger = logging.getLogger("streamrec.test_json_logs")
    try:
        raise ValueError("bad\nvalue " + "x" * 1_000)
    except ValueError:
        record = logger.makeRecord(logger.name, logging.ERROR, "f", 1, "event %s failed", ("e1",), sys.exc_info())
    ClippedTracebacks().filter(record)  # as on the handler's logger
    line = JsonLines().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["level"] == "ERROR" and out["logger"] == "streamrec.test_json_logs" and out["message"] == "event e1 failed"
    assert out["ts"].endswith("Z") and out["pid"] == record.process
    assert out["exception"].startswith("Traceback (most recent call last):")
    last = out["exception"].splitlines()[-1]  # the exception's own text: clipped, on one line
    assert last.startswith("ValueError: bad value xxx") and last.endswith("x…") and len(last) < 320


def test_faust_setting_logging_up_keeps_json_and_the_loggers_made_before(root_logging, capsys):
    """Faust's worker sets logging up again as it starts (mode's setup_logging), in its own
    format unless given a config: the worker gives it handler_config's."""
    made_before = logging.getLogger("streamrec.made_before_faust")
    mode_logging.setup_logging(loglevel="info", logging_config=handler_config("json", "info"))
    made_before.info("still %s", "on")
    logging.getLogger("faust.worker").debug("below the level")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["still on"]
    assert handler_config("text", "info") is None  # Faust's own format, as before


@pytest.mark.parametrize("value", ["xml", "", "jsonl"])
def test_a_log_format_that_is_not_text_or_json_is_refused_naming_it(value):
    with pytest.raises(ConfigError, match="STREAMREC_LOG_FORMAT=.*expected text or json"):
        Settings.from_env({"STREAMREC_LOG_FORMAT": value})
    assert Settings.from_env({"STREAMREC_LOG_FORMAT": " JSON "}).log_format == "json"  # read as the others are


@pytest.fixture
def python_thread_hook():
    """``threading.excepthook`` as it was, after a test that sets it."""
    hook = threading.excepthook
    yield
    threading.excepthook = hook


def test_a_threads_uncaught_exception_is_one_clipped_record_not_lines_on_stderr(python_thread_hook, caplog, capsys):
    """Python's own hook prints a dying thread's traceback to stderr, which Faust's worker logs
    again line by line (60 WARNING lines, a caret each, for aiokafka's CancelledError at a stop).
    The long-running processes' logging (logs.configure) makes it one ERROR record instead."""
    log_thread_deaths()

    def dies():
        raise RuntimeError("bad " + "x" * 2_000)

    def exits():
        raise SystemExit(3)

    with caplog.at_level(logging.ERROR, logger="streamrec.threads"):
        for target, name in ((dies, "consumer-thread"), (exits, "exits")):
            thread = threading.Thread(target=target, name=name)
            thread.start()
            thread.join()
    records = [r for r in caplog.records if r.name == "streamrec.threads"]
    assert len(records) == 1  # SystemExit is silent, as with Python's hook
    record = records[0]
    assert record.levelno == logging.ERROR and record.exc_info[0] is RuntimeError
    assert record.getMessage().startswith("thread consumer-thread ended by an exception it did not catch: RuntimeError: bad xxx")
    assert len(record.getMessage()) < 400 and len(record.exc_text) < 1_500  # the 2,000 x's clipped
    assert capsys.readouterr().err == ""
