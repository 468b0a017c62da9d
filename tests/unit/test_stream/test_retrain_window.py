"""`streamrec retrain`'s window reads the topics as the peers and replays do: the clock window
for a ``ts`` ahead (an erasure the workers refused for it must not erase here, an event they
refused must not be trained on), and a value whose decoding raises anything is skipped."""

from __future__ import annotations

import logging
import os
import signal
import time
from types import SimpleNamespace

import typer
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError, KafkaTimeoutError
from retrain_consumer import FakeRetrainConsumer
from typer.testing import CliRunner

from stream import retrain_cli
from stream.records import DEFAULT_BOUNDS, Bounds, ClickEvent, ForgetRequest, encode
from stream.retrain_cli import EventWindow
from stream.retry import Backoff
from stream.settings import TopicNames

NOW = 1_700_000_000_000
AHEAD = NOW + 10 * DEFAULT_BOUNDS.max_future_ms


def click(n: int, user: str, ts: int) -> bytes:
    return encode(ClickEvent(event_id=f"e{n}", user_id=user, item_id=f"i{n}", ts=ts))


def test_a_ts_far_ahead_of_the_clock_is_refused_for_events_and_erasures():
    w = EventWindow(clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW - 5))
    w.add_event(click(2, "u1", AHEAD))  # the workers dead-letter it (ts_out_of_window)
    w.add_forget(encode(ForgetRequest(user_id="u1", request_id="r1", ts=AHEAD)))  # refused by the workers too
    assert [x.item_id for x in w.interactions()] == ["i1"] and w.erased == {} and w.invalid == 2


def test_an_old_event_is_kept_whatever_the_age_limit():
    """Its age was the workers' to judge when it arrived (``Bounds.rereading``)."""
    w = EventWindow(bounds=Bounds(max_age_ms=60_000), clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW - 86_400_000))
    assert len(w.events) == 1 and w.invalid == 0


def test_a_value_whose_decoding_raises_anything_is_skipped(monkeypatch):
    def buggy(*args):
        raise RecursionError("a decoder's bug")

    w = EventWindow(clock=lambda: NOW)
    monkeypatch.setattr(retrain_cli, "decode_event", buggy)
    monkeypatch.setattr(retrain_cli, "decode_forget", buggy)
    w.add_event(click(1, "u1", NOW))
    w.add_forget(encode(ForgetRequest(user_id="u1", request_id="r1", ts=NOW)))
    assert w.invalid == 2 and not w.events and not w.erased


def test_a_fit_the_registry_disk_refused_is_one_error_line_and_retrain_goes_on(caplog):
    """A full or read-only registry disk is the operator's to fix: one line each cycle, not a
    traceback (a bug in a fit still gets one)."""

    class Retrainer:
        registry = None  # not read: no forget request was taken

        def __init__(self, error):
            self.error = error

        def fit(self, interactions, data, overrule=None):
            raise self.error

    w = EventWindow(clock=lambda: NOW)
    w.add_event(click(1, "u1", NOW))
    with caplog.at_level("INFO", logger="streamrec.retrain"):
        assert retrain_cli._fit(Retrainer(OSError(28, "No space left on device")), w, []) == (False, False)
        assert retrain_cli._fit(Retrainer(RuntimeError("a bug")), w, []) == (False, False)
    disk, bug = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "No space left on device" in disk.getMessage() and disk.exc_info is None
    assert bug.exc_info is not None


def test_old_versions_the_registry_disk_would_not_delete_are_one_error_line_and_retrain_goes_on(caplog):
    class Registry:
        def prune(self, keep):
            raise PermissionError(13, "Permission denied", "models/v0001")

    with caplog.at_level("INFO", logger="streamrec.retrain"):
        retrain_cli._prune(Registry(), 5)
    [line] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "Permission denied" in line.getMessage() and "next fit tries again" in line.getMessage()
    assert line.exc_info is None


def _run_retrain(monkeypatch, caplog, tmp_path, consumer, fit):
    """``streamrec retrain --every 1`` over ``consumer`` (a KafkaConsumer stand-in) with ``fit``
    for its fits and a back-off of milliseconds; the CLI's result."""
    monkeypatch.setattr(retrain_cli, "KafkaConsumer", consumer)
    monkeypatch.setattr(retrain_cli, "require_topics", lambda settings, names: None)
    monkeypatch.setattr(retrain_cli, "OUTAGE_BACKOFF", Backoff(base_s=0.001, cap_s=0.01, jitter=0), raising=False)
    monkeypatch.setattr(retrain_cli, "_fit", fit)
    app = typer.Typer()
    app.command("retrain")(retrain_cli.retrain)
    app.command("noop")(lambda: None)
    with caplog.at_level("INFO", logger="streamrec.retrain"):
        return CliRunner().invoke(app, ["retrain", "--every", "1", "--model-dir", str(tmp_path / "m"),
                                        "--device", "cpu"])


class _Consumer(FakeRetrainConsumer):
    """kafka-python's KafkaConsumer as `streamrec retrain` uses it: one empty partition of each
    topic; ``poll`` hands out ``script``'s steps, one a call (a record, an exception, nothing)."""

    def __init__(self, script, **kw):
        super().__init__(**kw)
        self.script = list(script)

    def poll(self, timeout_ms, max_records):
        self.polls += 1
        if self.polls == 2000:  # fail-safe: stop a run that never gets where the test waits
            os.kill(os.getpid(), signal.SIGTERM)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, Exception):
            raise step
        time.sleep(0.005)  # as a real poll waits for records
        return {TopicPartition(TopicNames().clicks, 0): [SimpleNamespace(value=step)]} if step else {}


def test_a_kafka_error_while_retrain_runs_keeps_its_window_and_is_logged_once_per_outage(tmp_path, monkeypatch,
                                                                                           caplog):
    """Any KafkaError from ``poll`` (or the partition check, or ``end_offsets``) ended a retrain
    meant to run for days beside the workers, and with it the window it had read. It now keeps
    the window, backs off, logs the outage once and its end once, and reads on."""
    now = time.time_ns() // 1_000_000
    down = [KafkaConnectionError("socket disconnected")] * 6
    script = [None, click(1, "u1", now - 2), *down, None, click(2, "u1", now - 1)]
    fits = []

    def fit(retrainer, events, base):
        fits.append([x.item_id for x in events.interactions()])
        if fits[-1] == ["i1", "i2"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return True, True

    result = _run_retrain(monkeypatch, caplog, tmp_path, lambda **kw: _Consumer(script, **kw), fit)
    assert result.exit_code == 0, (result.output, result.exception)
    assert fits[-1] == ["i1", "i2"], fits  # what was read before the outage is still in the window
    lines = [r.getMessage() for r in caplog.records if r.name == "streamrec.retrain" and "Kafka" in r.getMessage()]
    assert len(lines) == 2 and "socket disconnected" in lines[0] and "keeping the 1 event read" in lines[0], lines
    assert "answers again" in lines[1] and "(6 failed tries)" in lines[1], lines


def test_kafka_pythons_own_lines_are_logged_once_a_minute_each(caplog):
    """With the broker down kafka-python logs several lines a second (each connection attempt,
    each metadata refresh), on a logger per module: a day's outage was tens of thousands of
    lines. Each goes through once a minute, the next saying how many it stands for, in the
    worker's words (stream/logs.py)."""
    clock = [0.0]
    with caplog.at_level(logging.WARNING), retrain_cli._kafka_logs_thinned(60.0, clock=lambda: clock[0]):
        for t in (0.0, 0.2, 0.4, 30.0, 61.0):
            clock[0] = t
            logging.getLogger("kafka.cluster").error("Metadata refresh: failed %s", "ECONNREFUSED")
            logging.getLogger("kafka.net.manager").error("Connection failed: %s", "ECONNREFUSED")
        logging.getLogger("kafka.cluster").warning("No node available")
    assert [r.getMessage() for r in caplog.records] == [
        "Metadata refresh: failed ECONNREFUSED",
        "Connection failed: ECONNREFUSED",
        "Metadata refresh: failed ECONNREFUSED (3 more like it in the last 61 s)",
        "Connection failed: ECONNREFUSED (3 more like it in the last 61 s)",
        "No node available",
    ]
    kafka_log = logging.getLogger("kafka")  # as it was, after the block
    assert kafka_log.propagate and not any(isinstance(h, retrain_cli._ToRoot) for h in kafka_log.handlers)


def test_end_offsets_failing_for_a_partition_added_while_retrain_runs_is_tried_again(tmp_path, monkeypatch, caplog):
    """``end_offsets`` raises KafkaTimeoutError when the broker does not answer in 30 s: it ended
    retrain; and had it been caught after the partition was assigned, its end was never known."""
    added = TopicPartition(TopicNames().clicks, 1)
    value = click(1, "u1", time.time_ns() // 1_000_000 - 60_000)
    fits = []

    class Consumer(_Consumer):  # a second clicks partition shows up after the start, holding one click
        def __init__(self, **kw):
            super().__init__([], **kw)
            self.started, self.assigned, self.read, self.failures = False, [], False, 2

        def partitions_for_topic(self, topic):
            return {0, 1} if self.started and topic == added.topic else {0}

        def assign(self, partitions):
            self.assigned = list(partitions)

        def end_offsets(self, partitions):
            if self.started and added in partitions and self.failures:
                self.failures -= 1
                raise KafkaTimeoutError("Failed to get offsets by timestamps in 30000.0 ms")
            self.started = True
            return {tp: int(tp == added) for tp in partitions}

        def poll(self, timeout_ms, max_records):
            super().poll(timeout_ms, max_records)
            if added in self.assigned and not self.read:
                self.read = True
                return {added: [SimpleNamespace(value=value)]}
            return {}

        def position(self, tp):
            return int(tp == added and self.read)

    def fit(retrainer, events, base):
        fits.append([x.item_id for x in events.interactions()])
        if fits[-1]:
            os.kill(os.getpid(), signal.SIGTERM)
        return True, True

    monkeypatch.setattr(retrain_cli, "LOOK_S", 0.0)
    result = _run_retrain(monkeypatch, caplog, tmp_path, Consumer, fit)
    assert result.exit_code == 0, (result.output, result.exception)
    assert fits[-1] == ["i1"], fits
    lines = [r.getMessage() for r in caplog.records if r.name == "streamrec.retrain" and "Kafka" in r.getMessage()]
    assert len(lines) == 2 and "KafkaTimeoutError" in lines[0] and "(2 failed tries)" in lines[1], lines


def test_retrain_takes_d_for_dataset_as_train_evaluate_and_produce_do(tmp_path):
    app = typer.Typer()
    app.command("retrain")(retrain_cli.retrain)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(app, ["retrain", "-d", str(tmp_path / "log.csv"), "--model-dir", str(tmp_path / "m")])
    assert result.exit_code == 2
    assert "No such option" not in result.output and "give the log's --format" in result.output


def test_retrain_logs_at_the_level_streamrec_log_level_names(monkeypatch, tmp_path):
    """STREAMREC_LOG_LEVEL was checked by retrain's settings, then ignored: INFO lines went on."""
    levels = []
    monkeypatch.setattr(retrain_cli.logs, "configure", lambda level, fmt="text": levels.append(level))
    app = typer.Typer()
    app.command()(retrain_cli.retrain)
    for env, flag, expected in (("error", [], "ERROR"), ("warning", ["--loglevel", "debug"], "DEBUG"),
                                ("", [], "INFO"), ("bogus", [], "INFO")):
        monkeypatch.setenv("STREAMREC_LOG_LEVEL", env)
        result = CliRunner().invoke(app, ["--every", "inf", *flag])  # refused at once, once the logs are set
        assert result.exit_code == 2 and levels[-1] == expected, (env, flag, levels, result.output)
