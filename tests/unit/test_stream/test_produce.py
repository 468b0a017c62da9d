"""The pure half of `streamrec produce` and `streamrec tail`: events, ids, partitions, pacing, lines."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import random
from pathlib import Path

import pytest
import typer
from aiokafka.errors import KafkaTimeoutError
from typer.testing import CliRunner

from online_models.datasets import DatasetError, synthetic_interactions
from online_models.types import Interaction
from stream import connections as connections_module
from stream import produce as produce_module
from stream import tail as tail_module
from stream.connections import KafkaConnection
from stream.decoding import decode_event
from stream.errors import ConfigError, StreamrecError
from stream.forget import forget
from stream.logs import KAFKA_CLIENT_LOGGERS, Thinned
from stream.produce import (
    ProduceSummary,
    TokenBucket,
    chunk_size,
    event_id,
    produce,
    replay,
    source_tag,
    started_producer,
    topic_for,
)
from stream.publisher import RecordBatches, murmur2_partition
from stream.records import (
    ClickEvent,
    DeadLetter,
    PurchaseEvent,
    Recommendation,
    RecommendedItem,
    encode,
)
from stream.settings import TopicNames
from stream.step_inputs import to_event
from stream.tail import (
    _render,
    dead_letter_line,
    is_for_user,
    recommendation_line,
    tail,
    tombstone_line,
)

CLICK = Interaction("u1", "i2", 1_700_000_000_000, "click", "u1-s1", "c3", "pv")
BUY = Interaction("u1", "i2", 1_700_000_000_500, "purchase", None, "c3", "buy", quantity=3)


def test_interactions_become_valid_events_with_their_fields():
    click = decode_event(encode(to_event(CLICK, "x-0")))
    assert isinstance(click, ClickEvent)
    assert (click.event_id, click.user_id, click.item_id, click.ts) == ("x-0", "u1", "i2", CLICK.ts)
    assert (click.session_id, click.category_id) == ("u1-s1", "c3")
    buy = decode_event(encode(to_event(BUY, "x-1")))
    assert isinstance(buy, PurchaseEvent) and buy.quantity == 3 and buy.category_id == "c3" and buy.session_id is None


def test_timestamp_is_replaced_only_when_given():
    assert to_event(CLICK, "e").ts == CLICK.ts
    assert to_event(CLICK, "e", ts=42).ts == 42


def test_purchases_and_clicks_go_to_their_topics():
    topics = TopicNames("t.")
    assert (topic_for(CLICK, topics), topic_for(BUY, topics)) == ("t.clicks", "t.purchases")


def test_event_ids_repeat_on_replay_and_differ_between_sources():
    first = [event_id(source_tag(None, "synthetic", 42), i) for i, _ in enumerate(synthetic_interactions(50, seed=42))]
    again = [event_id(source_tag(None, "synthetic", 42), i) for i, _ in enumerate(synthetic_interactions(50, seed=42))]
    assert first == again and len(set(first)) == 50
    tags = {source_tag(None, "synthetic", 1), source_tag(None, "synthetic", 2),
            source_tag(Path("a.csv"), "taobao", 0), source_tag(Path("b.csv"), "taobao", 0), source_tag(Path("a.csv"), "otto", 0)}
    assert len(tags) == 5
    assert source_tag(Path("/x/a.csv"), "taobao", 0) == source_tag(Path("a.csv"), "taobao", 9)  # the file's name, not where it lies


def test_known_java_client_partitions():
    # From the Java client's DefaultPartitionerTest/Utils.murmur2 test vectors: murmur2("21") == -973932308.
    from aiokafka.partitioner import murmur2

    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF  # Python keeps the 32 bits unsigned
    assert murmur2_partition(b"21", 1000) == (-973932308 & 0x7FFFFFFF) % 1000


def test_event_ids_fit_the_contract():
    eid = event_id(source_tag(Path("UserBehavior_jason-wang1.csv"), "yoochoose", 0), 10**12)
    assert decode_event(encode(to_event(CLICK, eid))).event_id == eid and len(eid) <= 128


# Kafka's Java client picks murmur2(key) made positive, modulo the partition count; aiokafka (Faust's
# client) and kafka-python port it, and all producers of one topic must agree for co-partitioning.
@pytest.mark.parametrize("key", [b"u1", b"u42", b"user-with-a-longer-id", b"", "ü".encode()])
@pytest.mark.parametrize("partitions", [1, 4, 7])
def test_partition_matches_the_kafka_clients_default_partitioner(key, partitions):
    from aiokafka.partitioner import DefaultPartitioner
    from kafka.partitioner.default import murmur2 as kafka_python_murmur2

    expected = DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))
    assert murmur2_partition(key, partitions) == expected
    assert (kafka_python_murmur2(key) & 0x7FFFFFFF) % partitions == expected


# --- token bucket -----------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def _paced_rate(rate: float, seconds: float, overshoot: float = 0.0, seed: int = 0) -> float:
    """Drive the bucket as `replay` does, with sleeps that overshoot by up to `overshoot` s."""
    clock, rng = FakeClock(), random.Random(seed)
    bucket = TokenBucket(rate, now=clock.now)
    step, sent = chunk_size(rate), 0
    while clock.now < seconds:
        wait = bucket.reserve(step, clock.now)
        if wait > 0:
            clock.sleep(wait + rng.uniform(0, overshoot))
        sent += step
        clock.sleep(step * 2e-6)  # the time it takes to encode and queue them
    return sent / clock.now


@pytest.mark.parametrize("rate", [2_000, 20_000])
@pytest.mark.parametrize("overshoot", [0.0, 0.002, 0.02])
def test_token_bucket_holds_the_rate_within_one_percent(rate, overshoot):
    assert _paced_rate(rate, 10.0, overshoot) == pytest.approx(rate, rel=0.01)



def test_token_bucket_starts_empty_then_bursts_at_most_its_capacity():
    bucket = TokenBucket(rate=100, burst=5, now=0.0)
    assert bucket.reserve(1, 0.0) == pytest.approx(0.01)  # no burst at the start
    assert bucket.reserve(1, 0.0) == pytest.approx(0.02)  # debt accumulates
    assert [bucket.reserve(1, 10.0) for _ in range(5)] == [0.0] * 5  # idle: at most `burst` at once
    assert bucket.reserve(1, 10.0) == pytest.approx(0.01)


def test_a_stall_longer_than_the_burst_is_not_made_up():
    bucket = TokenBucket(rate=1000, now=0.0)  # burst: 100 ms worth
    assert bucket.burst == 100
    assert bucket.reserve(100, 1.0) == 0.0 and bucket.reserve(1, 1.0) == pytest.approx(0.001)


def test_token_bucket_ignores_a_clock_that_goes_back():
    bucket = TokenBucket(rate=10, burst=1, now=5.0)
    bucket.reserve(1, 5.0)
    assert bucket.reserve(1, 4.0) == pytest.approx(0.2)


def test_token_bucket_refuses_a_rate_that_is_not_positive():
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


def test_summary_line():
    s = ProduceSummary(clicks=900, purchases=100, seconds=0.5)
    assert s.events == 1000 and s.rate == 2000
    assert s.line() == "sent 1,000 events (900 clicks, 100 purchases) in 0.50 s: 2,000 events/s"
    assert ProduceSummary(interrupted=True).line().startswith("interrupted after 0 events")


def test_summary_line_says_one_event_not_one_events():
    assert ProduceSummary(clicks=1, seconds=1.0).line().startswith("sent 1 event (1 click, 0 purchases) in ")
    assert ProduceSummary(clicks=1, purchases=1, seconds=1.0).line().startswith("sent 2 events (1 click, 1 purchase) ")


# --- command lines (no broker needed: they refuse before connecting) --------------------

def _app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("produce")(produce)
    app.command("tail")(tail)
    app.command("forget")(forget)
    return app


@pytest.mark.parametrize("command", ["produce", "tail"])
def test_help_describes_every_option(command):
    result = CliRunner().invoke(_app(), [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    options = {"produce": ["--dataset", "--format", "--rate", "--limit", "--skip", "--bootstrap", "--topic-prefix", "--seed",
                           "--keep-ts"],
               "tail": ["--user", "--from-beginning", "--limit", "--json", "--dlq", "--timeout"]}[command]
    for option in options:
        assert option in result.output


@pytest.mark.parametrize(
    ("args", "says"),
    [(["--format", "csv"], "unknown format"), (["--format", "taobao"], "needs --dataset"), (["--rate", "0"], "0.001"),
     (["--id-prefix", "x" * 120], "at most 114 characters"), (["--id-prefix", "a\tb"], "control characters"),
     (["--id-prefix", "\udcff"], "not UTF-8"), (["--id-prefix", " "], "besides whitespace"),
     (["--demo-catalogue", "-n", "5"], "a catalogue is sent whole"),  # were ignored: 2,000 items went
     (["--demo-catalogue", "--rate", "10"], "a catalogue is sent whole"),
     (["--demo-catalogue", "--skip", "10"], "a catalogue is sent whole")],
)
def test_produce_refuses_bad_arguments_before_connecting(args, says, tmp_path):
    result = CliRunner().invoke(_app(), ["produce", "--bootstrap", "127.0.0.1:1", *args])
    assert result.exit_code == 2 and says in result.output


@pytest.mark.parametrize(("user", "says"), [("\udcff", "not UTF-8"), ("", "besides whitespace"),
                                            ("u\n1", "control characters"), ("u" * 129, "at most 128 characters")])
def test_tail_refuses_a_user_id_no_event_can_carry_before_connecting(user, says):
    result = CliRunner().invoke(_app(), ["tail", "--bootstrap", "127.0.0.1:1", "--user", user])
    assert result.exit_code == 2 and says in result.output and "--user" in result.output


def test_produce_refuses_a_dataset_without_its_format(tmp_path):
    log = tmp_path / "log.csv"
    log.write_text("1,2,3,pv,1511544070\n")
    result = CliRunner().invoke(_app(), ["produce", "--dataset", str(log), "--bootstrap", "127.0.0.1:1"])
    assert result.exit_code == 2 and "--format" in result.output


@pytest.mark.parametrize("command", [["produce"], ["produce", "--demo-catalogue"], ["tail"], ["forget", "u1"]])
@pytest.mark.parametrize(("args", "says"), [
    (["--bootstrap", "localhost"], "--bootstrap 'localhost': 'localhost' is not host:port"),
    (["--bootstrap", ""], "--bootstrap is empty"),
    (["--topic-prefix", "my topics"], "--topic-prefix 'my topics': only letters"),
])
def test_a_bad_option_is_said_of_the_option_not_of_its_environment_variable(command, args, says):
    """`produce -b localhost` was refused as "STREAMREC_KAFKA_BOOTSTRAP='localhost': ...", a
    variable the operator had not set."""
    result = CliRunner().invoke(_app(), [*command, *args])
    assert isinstance(result.exception, ConfigError) and str(result.exception).startswith(says), result.exception


def test_a_bad_environment_variable_is_still_said_of_the_variable():
    result = CliRunner().invoke(_app(), ["tail", "--topic-prefix", "ok."], env={"STREAMREC_KAFKA_BOOTSTRAP": "localhost"})
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception).startswith("STREAMREC_KAFKA_BOOTSTRAP='localhost'"), result.exception


class SilentConsumer:
    """A KafkaConsumer of one partition whose broker has gone: every poll is empty."""

    def __init__(self, **options) -> None:
        pass

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, partitions) -> None:
        pass

    def seek_to_end(self, *partitions) -> None:
        pass

    def position(self, tp) -> int:
        return 0

    def poll(self, timeout_ms: int):
        return {}

    def close(self, autocommit: bool = True) -> None:
        pass


def test_tail_says_when_kafka_stops_answering_instead_of_printing_nothing(monkeypatch):
    """The broker gone while tail waited: kafka-python reconnects in silence, and tail printed
    nothing, as for a quiet topic, until the operator gave up."""
    monkeypatch.setattr(tail_module, "require_topic", lambda settings, topic: 1)
    monkeypatch.setattr(connections_module, "KafkaConsumer", SilentConsumer)  # what KafkaConnection.reader builds
    monkeypatch.setattr(tail_module, "probe", lambda kafka, timeout_s: "127.0.0.1:9: [Errno 111] Connection refused",
                        raising=False)
    monkeypatch.setattr(tail_module, "WATCH_EVERY_S", 0.0, raising=False)
    result = CliRunner().invoke(_app(), ["tail", "--bootstrap", "127.0.0.1:9", "--timeout", "0.5"])
    assert result.exit_code == 0, result.output
    said = [line for line in result.output.splitlines() if "does not answer" in line]
    assert said == ["tail: Kafka at 127.0.0.1:9 does not answer (127.0.0.1:9: [Errno 111] Connection refused); "
                    "waiting for it (Ctrl-C stops)"]  # once, not at every check


def test_produce_and_forget_thin_the_kafka_clients_repeated_lines(monkeypatch):
    """A broker gone mid-replay: aiokafka logged "Unable connect to node with id 1" and "Unable
    to update metadata" some 10,000 times a second (680,000 lines before produce gave up);
    thinned as in the worker, one of each per 10 s (stream/logs.py)."""
    for name in KAFKA_CLIENT_LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    with pytest.raises(StreamrecError):  # a closed port: no broker
        asyncio.run(started_producer(KafkaConnection("127.0.0.1:1"), request_timeout_ms=1000))
    assert all(any(isinstance(f, Thinned) for f in logging.getLogger(name).filters) for name in KAFKA_CLIENT_LOGGERS)


def test_batches_abandoned_after_a_failure_leave_no_unretrieved_error():
    """The replay stopped at the first failed batch; every other failed one was "Future
    exception was never retrieved" at exit, with its traceback, after the one-line error."""
    loop = asyncio.new_event_loop()
    complaints = []
    loop.set_exception_handler(lambda loop, context: complaints.append(context["message"]))
    batches = RecordBatches(producer=None)
    failed, later = loop.create_future(), loop.create_future()
    failed.set_exception(ConnectionError("broker gone"))
    batches._sent.extend([(failed, []), (later, [])])
    batches.abandon()
    later.set_exception(ConnectionError("broker gone"))
    loop.run_until_complete(asyncio.sleep(0))  # the done callbacks run
    del failed, later, batches
    gc.collect()
    loop.close()
    assert complaints == []


class FakeBatch:
    """A record batch of at most three records; it keeps the event ids it holds, and their values."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.values: list[bytes] = []

    def append(self, key, value, timestamp):
        if len(self.ids) == 3:
            return None
        self.ids.append(int(json.loads(value)["event_id"].rsplit("-", 1)[1]))
        self.values.append(value)
        return object()

    def record_count(self) -> int:
        return len(self.ids)


class BrokerGoingAway:
    """A producer whose broker acknowledges the batches sent but those numbered in ``fail``
    (failed) or ``pending`` (never answered)."""

    def __init__(self, fail: set[int], pending: set[int]) -> None:
        self.fail, self.pending = fail, pending
        self.sent: list[FakeBatch] = []
        self.acknowledged: list[int] = []  # the event ids the broker confirmed

    async def partitions_for(self, topic):
        return {0, 1}

    def create_batch(self) -> FakeBatch:
        return FakeBatch()

    async def send_batch(self, batch, topic, *, partition):
        delivery = asyncio.get_running_loop().create_future()
        number = len(self.sent)
        self.sent.append(batch)
        if number in self.fail:
            delivery.set_exception(KafkaTimeoutError())
        elif number not in self.pending:
            delivery.set_result(None)
            self.acknowledged += batch.ids
        return delivery

    async def stop(self) -> None:
        pass


async def test_a_replay_kafka_failed_says_how_many_events_kafka_confirmed(monkeypatch):
    """The broker gone mid-replay: produce said `sending events ... failed: KafkaTimeoutError()`
    and nothing of what was in Kafka, which an operator needs to know what to send again."""
    producer = BrokerGoingAway(fail={3}, pending={5})

    async def started_producer(kafka, **options):
        return producer

    monkeypatch.setattr(produce_module, "started_producer", started_producer)
    with pytest.raises(StreamrecError) as info:
        await replay(synthetic_interactions(60, seed=3), "127.0.0.1:9", TopicNames("t."), "tag")
    confirmed = sorted(producer.acknowledged)
    unbroken = next(i for i in range(61) if i not in confirmed)
    assert 0 < unbroken < len(confirmed) < 60  # some confirmed after the first event that was not
    assert str(info.value) == (
        f"sending events to 127.0.0.1:9 failed: KafkaTimeoutError(); Kafka confirmed {len(confirmed)} of the first "
        f"60 events of the log: all of the first {unbroken}, and {len(confirmed) - unbroken} after them; to send "
        f"the rest, run the same command with --skip {unbroken}: it sends the log from its event {unbroken + 1} on, "
        "under the event ids a whole replay gives them (a worker skips an event whose id is among the latest "
        "STREAMREC_DEDUPE_WINDOW of its user, should one go twice)")


async def test_a_bad_line_mid_log_stops_the_replay_after_every_event_before_it_is_in_kafka(monkeypatch):
    """A line that is no event, past the first: produce said only the line, and the events before
    it were partly sent (the full record batches) and partly dropped (the open ones)."""
    producer = BrokerGoingAway(fail=set(), pending=set())

    async def started_producer(kafka, **options):
        return producer

    def log_with_a_bad_line():
        yield from synthetic_interactions(1_001, seed=3)  # more than a chunk: some batches full, some open
        raise DatasetError("shop.csv:1002: expected 5 comma-separated fields, saw 2")

    monkeypatch.setattr(produce_module, "started_producer", started_producer)
    with pytest.raises(DatasetError) as info:
        await replay(log_with_a_bad_line(), "127.0.0.1:9", TopicNames("t."), "tag")
    assert sorted(producer.acknowledged) == list(range(1_001))
    assert str(info.value).startswith("shop.csv:1002: expected 5 comma-separated fields, saw 2; produce stopped "
                                      "there, and Kafka confirmed the 1,001 events of the log before that line; "
                                      "correct or delete the line, then run the same command with --skip 1001")


async def test_a_replay_after_skipped_events_numbers_them_as_a_whole_replay_and_says_where_to_go_on(monkeypatch):
    """--skip: the first event sent is the log's event ``skipped + 1``, under the id a whole
    replay gives it; a failure says the --skip that sends the rest (it said to send the log
    from its first event again, which the workers' dedupe window need not cover)."""
    producer = BrokerGoingAway(fail={3}, pending=set())

    async def started_producer(kafka, **options):
        return producer

    monkeypatch.setattr(produce_module, "started_producer", started_producer)
    with pytest.raises(StreamrecError) as info:
        await replay(synthetic_interactions(30, seed=3), "127.0.0.1:9", TopicNames("t."), "tag", skipped=1_000)
    confirmed = sorted(producer.acknowledged)
    assert confirmed[0] == 1_000 and all(1_000 <= i < 1_030 for i in confirmed)
    unbroken = next(i for i in range(1_000, 1_031) if i not in confirmed)
    assert f"run the same command with --skip {unbroken}: it sends the log from its event {unbroken + 1:,} on" \
        in str(info.value), info.value
    assert "of the log after the first 1,000 (--skip)" in str(info.value)


async def test_a_bad_line_after_skipped_events_says_the_skip_that_goes_on_after_it(monkeypatch):
    producer = BrokerGoingAway(fail=set(), pending=set())

    async def started_producer(kafka, **options):
        return producer

    def log_with_a_bad_line():
        yield from synthetic_interactions(40, seed=3)
        raise DatasetError("shop.csv:541: expected 5 comma-separated fields, saw 2")

    monkeypatch.setattr(produce_module, "started_producer", started_producer)
    with pytest.raises(DatasetError) as info:
        await replay(log_with_a_bad_line(), "127.0.0.1:9", TopicNames("t."), "tag", skipped=500)
    assert sorted(producer.acknowledged) == list(range(500, 540))
    assert "the 40 events of the log before that line after the first 500 (--skip); correct or delete the line, " \
        "then run the same command with --skip 540: it sends the log from its event 541 on" in str(info.value)


TAOBAO_LOG = "".join(f"{n % 3 + 1},{100 + n},7,{'buy' if n == 4 else 'pv'},{1511544070 + n}\n" for n in range(10))


@pytest.fixture
def fake_kafka(monkeypatch):
    """``produce`` sends to a fake producer that confirms every batch (no broker)."""
    producer = BrokerGoingAway(fail=set(), pending=set())

    async def started_producer(kafka, **options):
        return producer

    monkeypatch.setattr(produce_module, "started_producer", started_producer)
    monkeypatch.setattr(produce_module, "ensure_streamrec_topics", lambda settings: [])
    return producer


def test_produce_skip_sends_the_log_after_its_first_n_events_under_their_whole_replay_ids(fake_kafka, tmp_path):
    log = tmp_path / "shop.csv"
    log.write_text(TAOBAO_LOG)
    args = ["produce", "--dataset", str(log), "--format", "taobao", "--bootstrap", "127.0.0.1:9", "--no-progress"]
    result = CliRunner().invoke(_app(), [*args, "--skip", "6"])
    assert result.exit_code == 0, result.output
    assert sorted(fake_kafka.acknowledged) == [6, 7, 8, 9] and "sent 4 events" in result.output
    fake_kafka.acknowledged.clear()
    result = CliRunner().invoke(_app(), [*args, "--skip", "3", "--limit", "2"])  # --limit counts what is sent
    assert result.exit_code == 0, result.output
    assert sorted(fake_kafka.acknowledged) == [3, 4]
    values = [json.loads(v) for batch in fake_kafka.sent for v in batch.values]
    assert [(v["user_id"], v["item_id"]) for v in values[-2:]] == [("1", "103"), ("2", "104")]


@pytest.mark.parametrize(("args", "says"), [
    (["--skip", "10"], "no taobao events after the first 10 (the log has 10 events)"),
    (["--skip", "25"], "no taobao events after the first 10 (the log has 10 events)"),
    (["--skip", "-1"], "Invalid value for '--skip'"),
])
def test_produce_refuses_a_skip_past_the_log_before_kafka(tmp_path, args, says):
    log = tmp_path / "shop.csv"
    log.write_text(TAOBAO_LOG)
    result = CliRunner().invoke(_app(), ["produce", "--dataset", str(log), "--format", "taobao", "--bootstrap",
                                         "127.0.0.1:1", "--no-progress", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and says in " ".join(result.output.split()), result.output


# --- tail's lines -----------------------------------------------------------------------

REC = Recommendation(user_id="u1", items=[RecommendedItem(f"i{n}", 1 / (n + 1)) for n in range(8)],
                     trigger_event_id="e7", event_ts=1_000, generated_ts=1_025, model={"scorer": "v3", "online": "pop@9"})


def test_recommendation_line_is_compact_and_complete():
    line = recommendation_line(REC, items=3)
    assert line == "u1  i0 1.000, i1 0.500, i2 0.333 (and 5 more)  latency 25 ms  after e7  online=pop@9 scorer=v3"
    empty = Recommendation(user_id="u2", items=[], trigger_event_id="e", event_ts=5, generated_ts=5, model={})
    assert recommendation_line(empty) == "u2  (no items)  latency 0 ms  after e"


def test_dead_letter_line_shows_where_why_and_the_start_of_the_value():
    letter = DeadLetter(reason="the value is not UTF-8 text", topic="t.clicks", partition=1, offset=9,
                        raw="//4=", ts=0, code="not_utf8", raw_encoding="base64")
    assert dead_letter_line(letter) == "t.clicks[1]@9  not_utf8  the value is not UTF-8 text  raw (base64): //4="
    long = DeadLetter(reason="r", topic="t", partition=0, offset=0, raw=json.dumps({"x": "y" * 200}), ts=0)
    assert len(dead_letter_line(long, width=40).split("raw: ")[1]) == 40


def test_a_dead_letter_cannot_drive_the_operators_terminal():
    """A producer's value (and a reason quoting its `type`) reach `streamrec tail --dlq`'s screen:
    escape sequences (clear the screen, move the cursor, retitle the window), a carriage return
    that overwrites the line, C1 controls and bidi overrides are printed as escapes, not run."""
    hostile = '{"type": "\x1b]0;owned\x07\x1b[2J", "x": "\rhidden\u202e\x9b"}'
    letter = DeadLetter(reason="field `type`: \x1b[2J is not click or purchase", topic="t.clicks", partition=0,
                        offset=1, raw=hostile, ts=0, code="unknown_type")
    line = dead_letter_line(letter, width=200)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in line), repr(line)
    assert "\\x1b[2J is not click" in line and "\\x1b]0;owned\\x07" in line and "\\rhidden\\u202e\\x9b" in line


def test_a_tombstones_key_cannot_drive_the_operators_terminal():
    """`streamrec tail` printed a tombstone's key as it came: escape sequences in it ran
    (retitle the window, clear the screen) where the dead letters' are printed as escapes."""
    line = tombstone_line(b"\x1b]0;owned\x07\x1b[2J\ru1\xe2\x80\xae")
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c == "\u202e" for c in line), repr(line)
    assert line.startswith("\\x1b]0;owned\\x07\\x1b[2J\\ru1\\u202e  (tombstone")


def test_a_null_value_on_the_dead_letter_topic_is_said_to_be_no_letter_in_words():
    """`tail --dlq` printed "(not a dead letter: a bytes-like object is required, not 'NoneType') b''"
    for a tombstone, and `--dlq --json` an empty line where the recommendations' say null."""
    assert _render(None, dlq=True, as_json=False, items=5, key=b"u1") == "(not a dead letter: a null value, a tombstone) u1"
    assert _render(None, dlq=True, as_json=True, items=5, key=b"u1") == "null"


def test_user_filter_matches_the_key_exactly():
    assert is_for_user(b"u1", None) and is_for_user(b"u1", "u1")
    assert not is_for_user(b"u10", "u1") and not is_for_user(None, "u1")
    assert is_for_user("ü".encode(), "ü")


def test_a_catalogue_line_json_reads_but_no_event_can_hold_is_refused_with_its_line():
    from stream.errors import StreamrecError
    from stream.produce_catalogue import read_catalogue

    good = '{"item_id": "i1", "title": "Down jacket"}'
    for bad, says in (('{"item_id": "i\\ud800", "title": "t"}', "line 2: a string holds a lone surrogate"),
                      ("[" * 100_000, "line 2: nested too deeply")):
        with pytest.raises(StreamrecError, match=says):
            read_catalogue([good, bad], now_ms=5)


def test_a_log_line_refused_while_it_is_sent_is_a_sentence_not_a_traceback(monkeypatch, capsys):
    """`produce --dataset` reads the log as it sends it, after Kafka answered: a DatasetError
    then reaches the command line, which says it like any other refusal."""
    import stream.cli
    from online_models.datasets import DatasetError

    def app() -> None:
        raise DatasetError("bad.csv:2: expected 5 comma-separated fields, saw 3")

    monkeypatch.setattr(stream.cli, "app", app)
    with pytest.raises(SystemExit) as info:
        stream.cli.main()
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == "streamrec: bad.csv:2: expected 5 comma-separated fields, saw 3"
