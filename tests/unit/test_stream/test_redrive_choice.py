"""What `streamrec redrive` sends back, what it leaves and says, and what it counts when Kafka
fails part way (the reading and sending on a real broker: tests/integration/test_redrive.py)."""

from __future__ import annotations

import asyncio
import os
import signal
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

from stream import redrive as redrive_module
from stream.records import DeadLetter, encode
from stream.redrive import Choice, Tally, _send, _take, original_value, redrive

TS = 1_700_000_000_000
CHOICE = Choice(codes=frozenset({"processing_error"}), topics=frozenset({"s.clicks", "s.purchases", "s.forget"}),
                items_topic="s.items", since=TS, until=TS + 100)


def letter(**changes) -> DeadLetter:
    fields = dict(reason="raised", topic="s.clicks", partition=0, offset=7, raw='{"e":1}', ts=TS + 50, code="processing_error")
    return DeadLetter(**{**fields, **changes})


@pytest.mark.parametrize(("changes", "key", "why"), [
    ({}, b"u1", None),
    ({"topic": "s.forget"}, b"u1", None),
    ({"ts": TS - 1}, b"u1", "time"),
    ({"ts": TS + 101}, b"u1", "time"),
    ({"code": "malformed_json"}, b"u1", "code"),
    ({"raw_truncated": True}, b"u1", "truncated"),
    ({"topic": "s.items"}, b"i1", "items"),
    ({"topic": "other.clicks"}, b"u1", "topic"),
    ({"topic": "s.dlq"}, b"u1", "topic"),
])
def test_a_letter_goes_back_only_when_every_rule_takes_it(changes, key, why):
    assert CHOICE.refusal(letter(**changes), key) == why


def test_a_user_filter_matches_the_key_exactly():
    one = Choice(codes=frozenset(), topics=frozenset({"s.clicks"}), items_topic="s.items", user="u1")
    assert one.refusal(letter(code="anything"), b"u1") is None  # no codes: every code
    assert one.refusal(letter(), b"u10") == "user" and one.refusal(letter(), None) == "user"


def test_the_same_original_message_dead_lettered_twice_goes_back_once_and_junk_is_counted():
    tally, sent_from = Tally(), set()
    record = SimpleNamespace(key=b"u1", value=encode(letter()))
    assert _take(record, CHOICE, tally, sent_from) is not None
    assert _take(record, CHOICE, tally, sent_from) is None
    for junk in (b"not json", None, encode(letter(raw="***", raw_encoding="base64"))):
        assert _take(SimpleNamespace(key=b"u1", value=junk), CHOICE, tally, sent_from) is None
    assert tally.left == {"duplicate": 1, "not_a_letter": 3}


def test_a_base64_value_goes_back_as_its_bytes():
    assert original_value(letter(raw="AP8=", raw_encoding="base64")) == b"\x00\xff"
    assert original_value(letter(raw="é")) == "é".encode()


class Producer:
    """Confirms the first ``ok`` sends, fails the rest (what aiokafka's futures do on a timeout)."""

    def __init__(self, ok: int) -> None:
        self.ok, self.sent = ok, []

    async def send(self, topic, value, key=None, headers=None):
        self.sent.append((topic, value, key, headers))
        future = asyncio.get_running_loop().create_future()
        if len(self.sent) <= self.ok:
            future.set_result(None)
        else:
            future.set_exception(TimeoutError("no answer"))
        return future


def test_only_what_kafka_confirmed_is_counted_when_a_send_fails():
    chosen = [(letter(offset=i, ts=TS + i), b"v%d" % i, b"u1", f"s.dlq[0]@{i}") for i in range(3)]
    tally, lines, producer = Tally(), [], Producer(ok=1)
    with pytest.raises(TimeoutError):
        asyncio.run(_send(producer, chosen, tally, lines.append))
    assert tally.sent == {"s.clicks": 1} and tally.newest_sent_ts == TS and len(lines) == 1
    assert producer.sent[0][3] == [("streamrec-redriven-from", b"s.dlq[0]@0")]


def test_a_run_stopped_part_way_gives_no_since_that_would_skip_letters():
    tally = Tally(read=3, newest_sent_ts=TS)
    tally.sent.update({"s.clicks": 1})
    assert "--since" in tally.summary(False, "s.dlq") and "--since" not in tally.summary(False, "s.dlq", complete=False)


def test_a_since_past_the_year_9999_is_refused_before_connecting():
    """--since 99999999999999999999 reached Kafka's offset lookup by time, which takes 64 bits:
    a struct.error traceback."""
    app = typer.Typer(add_completion=False)
    app.command()(redrive)
    result = CliRunner().invoke(app, ["--bootstrap", "127.0.0.1:1", "--since", "9" * 20], env={"COLUMNS": "500"})
    assert result.exit_code == 2 and "past the year 9999" in result.output and "--since" in result.output, result.output


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_redrive_stopped_by_a_signal_exits_128_plus_it(monkeypatch, sig, status):
    """A scheduler's SIGTERM exited 130, as a Ctrl-C does (produce exits 143 for it)."""
    async def stopped_part_way(settings, choice, dry_run=False, progress=None, stop=None):
        os.kill(os.getpid(), sig)  # handled before the next line runs: the stop is set
        assert stop.is_set()
        return Tally(read=3)

    monkeypatch.setattr(redrive_module, "require_topic", lambda *_: 1)
    monkeypatch.setattr(redrive_module, "redrive_letters", stopped_part_way)
    app = typer.Typer(add_completion=False)
    app.command()(redrive)
    result = CliRunner().invoke(app, ["--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == status, result.output
    assert "stopped early" in result.output
