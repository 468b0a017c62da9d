"""`streamrec produce` and `streamrec tail` against the real broker: what goes in is what comes out."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import typer
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from typer.testing import CliRunner

from online_models.datasets import synthetic_interactions
from stream.decoding import decode_event
from stream.errors import InvalidEvent
from stream.produce import produce
from stream.publisher import murmur2_partition
from stream.records import PurchaseEvent, Recommendation, RecommendedItem, dead_letter, encode
from stream.settings import Settings, TopicNames
from stream.tail import tail
from stream.topics import (
    align_topic_configs,
    check_copartitioned,
    ensure_streamrec_topics,
    ensure_topics,
    partition_count,
    wait_for_kafka,
)

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 4  # Settings' default, which produce uses when it creates the topics


def cli() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command("produce")(produce)
    app.command("tail")(tail)
    return app


def run(*args: str) -> str:
    result = CliRunner().invoke(cli(), list(args), env={"STREAMREC_PARTITIONS": str(PARTITIONS)})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def read_all(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list:
    """Every record on ``topic`` now, partition by partition, in offset order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        end = consumer.end_offsets(partitions)
        records, deadline = [], time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in partitions):
            assert time.monotonic() < deadline, f"could not read {topic} to its end in {timeout_s} s"
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        return sorted(records, key=lambda r: (r.partition, r.offset))
    finally:
        consumer.close(autocommit=False)


def test_ensure_topics_creates_once_and_leaves_existing_topics_alone(kafka_bootstrap, topic_prefix, kafka_admin):
    topics = TopicNames(topic_prefix)
    assert wait_for_kafka(kafka_bootstrap, timeout_s=30) is not None
    assert ensure_topics(kafka_bootstrap, topics.inputs, partitions=3) == list(topics.inputs)
    # the topics read with the inputs get the clicks topic's partitions, whatever STREAMREC_PARTITIONS says
    settings = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "STREAMREC_TOPIC_PREFIX": topic_prefix,
                                  "STREAMREC_PARTITIONS": "5"})
    assert ensure_streamrec_topics(settings) == [topics.forget, topics.impressions, topics.searches,
                                                 topics.recommendations, topics.dlq, topics.items]
    assert ensure_streamrec_topics(settings) == []
    described = {t["name"]: len(t["partitions"]) for t in kafka_admin.describe_topics(list(topics.all))}
    assert described == {topics.clicks: 3, topics.purchases: 3, topics.forget: 3, topics.impressions: 3,
                         topics.searches: 3, topics.recommendations: 5, topics.dlq: 5, topics.items: 5}
    check_copartitioned(kafka_bootstrap, topics.consumed)
    # the inputs, made before, get their configs aligned: raw data kept for the retention, lists compacted
    changed = align_topic_configs(kafka_bootstrap, settings.topic_configs())
    assert changed[topics.clicks]["retention.ms"] == str(168 * 3_600_000)
    assert align_topic_configs(kafka_bootstrap, settings.topic_configs()) == {}
    configs = kafka_admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.recommendations,
                                                           ["cleanup.policy"])])
    assert configs["topic"][topics.recommendations]["cleanup.policy"]["value"] == "compact,delete"
    items = kafka_admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics.items, ["cleanup.policy"])])
    assert items["topic"][topics.items]["cleanup.policy"]["value"] == "compact"


def test_produced_synthetic_events_arrive_on_their_topics_keyed_and_valid(kafka_bootstrap, topic_prefix):
    n = 3_000
    out = run("produce", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--limit", str(n), "--no-progress")
    expected = list(synthetic_interactions(n, seed=42))
    kinds = Counter(x.kind for x in expected)
    assert f"sent {n:,} events ({kinds['click']:,} clicks, {kinds['purchase']:,} purchases)" in out

    topics = TopicNames(topic_prefix)
    seen: dict[str, object] = {}
    partition_of_user: dict[str, set[int]] = defaultdict(set)
    for topic, kind in ((topics.clicks, "click"), (topics.purchases, "purchase")):
        records = read_all(kafka_bootstrap, topic)
        assert len(records) == kinds[kind]
        for r in records:
            event = decode_event(r.value)  # raises on anything off-contract
            assert event.type == kind and r.key == event.user_id.encode()
            assert r.partition == murmur2_partition(r.key, PARTITIONS)
            partition_of_user[event.user_id].add(r.partition)
            seen[event.event_id] = event
    assert all(len(p) == 1 for p in partition_of_user.values())  # co-partitioned: one partition per user

    assert set(seen) == {f"synthetic-s42-{i}" for i in range(n)}
    for i, x in enumerate(expected):
        event = seen[f"synthetic-s42-{i}"]
        assert (event.user_id, event.item_id, event.session_id, event.category_id) == (x.user_id, x.item_id, x.session_id, x.category_id)


def test_id_prefix_makes_a_replay_new_events(kafka_bootstrap, topic_prefix):
    run("produce", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--limit", "50", "--no-progress", "--id-prefix", "run2")
    records = read_all(kafka_bootstrap, TopicNames(topic_prefix).clicks) + read_all(kafka_bootstrap, TopicNames(topic_prefix).purchases)
    assert {decode_event(r.value).event_id for r in records} == {f"run2-{i}" for i in range(50)}


def test_a_replay_in_two_parts_with_skip_puts_in_kafka_what_a_whole_one_does(kafka_bootstrap, topic_prefix):
    """--skip: the second part starts after the first part's events, under the ids (and with the
    events) a whole replay gives them: nothing twice, nothing missing."""
    base = ("produce", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--no-progress")
    run(*base, "--limit", "120")
    out = run(*base, "--limit", "80", "--skip", "120")
    assert "sent 80 events" in out
    topics = TopicNames(topic_prefix)
    events = [decode_event(r.value) for t in (topics.clicks, topics.purchases) for r in read_all(kafka_bootstrap, t)]
    by_id = {e.event_id: e for e in events}
    assert len(events) == len(by_id) == 200
    for i, x in enumerate(synthetic_interactions(200, seed=42)):
        event = by_id[f"synthetic-s42-{i}"]
        assert (event.user_id, event.item_id, event.type) == (x.user_id, x.item_id, x.kind)


def test_each_users_events_keep_their_order(kafka_bootstrap, topic_prefix):
    run("produce", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--limit", "2000", "--no-progress")
    by_user: dict[str, list[int]] = defaultdict(list)
    for r in read_all(kafka_bootstrap, TopicNames(topic_prefix).clicks):
        by_user[r.key.decode()].append(int(decode_event(r.value).event_id.rsplit("-", 1)[1]))
    assert by_user and all(ids == sorted(ids) for ids in by_user.values())


def test_a_taobao_log_replays_with_purchases_apart(kafka_bootstrap, topic_prefix, tmp_path):
    log = tmp_path / "UserBehavior.csv"
    log.write_text("1,10,100,pv,1511544070\n1,10,100,buy,1511544080\n2,11,100,cart,1511544090\n2,12,101,fav,1511544095\n")
    out = run("produce", "--dataset", str(log), "--format", "taobao", "--keep-ts",
              "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--no-progress")
    assert "sent 4 events (3 clicks, 1 purchase)" in out
    topics = TopicNames(topic_prefix)
    (bought,) = [decode_event(r.value) for r in read_all(kafka_bootstrap, topics.purchases)]
    assert isinstance(bought, PurchaseEvent) and (bought.user_id, bought.item_id, bought.ts) == ("1", "10", 1_511_544_080_000)
    clicks = [decode_event(r.value) for r in read_all(kafka_bootstrap, topics.clicks)]
    assert sorted(c.item_id for c in clicks) == ["10", "11", "12"] and all(c.category_id for c in clicks)


def test_the_rate_is_an_upper_bound(kafka_bootstrap, topic_prefix):
    out = run("produce", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
              "--limit", "3000", "--rate", "2000", "--no-progress")
    assert "sent 3,000 events" in out
    seconds = float(out.split(" s: ")[0].rsplit(" ", 1)[1])
    assert seconds >= 3000 / 2000 * 0.99  # the bucket starts empty: no burst to get ahead with


def test_ctrl_c_flushes_what_was_sent_and_prints_the_summary(kafka_bootstrap, topic_prefix):
    code = "import typer, stream.produce as p; typer.run(p.produce)"
    args = ["--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--rate", "500", "--limit", "100000", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "STREAMREC_PARTITIONS": str(PARTITIONS)})
    try:
        topics = TopicNames(topic_prefix)
        deadline = time.monotonic() + 60
        while not _count(kafka_bootstrap, topics.clicks):
            assert proc.poll() is None and time.monotonic() < deadline, "produce never started sending"
            time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    summary = next(line for line in out.splitlines() if line.startswith("interrupted after"))
    sent = int(summary.split()[2].replace(",", ""))
    assert 0 < sent < 100_000
    assert _count(kafka_bootstrap, topics.clicks) + _count(kafka_bootstrap, topics.purchases) == sent


def test_sigterm_stops_a_slow_replay_at_once_and_sends_nothing_more(kafka_bootstrap, topic_prefix):
    """At one event every 20 s the replay mostly waits: SIGTERM (a scheduler, systemd) stops it
    then, not after the wait, and the event it waited to send is not sent after the signal."""
    code = "import typer, stream.produce as p; typer.run(p.produce)"
    args = ["--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--rate", "0.05", "--limit", "5",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "STREAMREC_PARTITIONS": str(PARTITIONS)})
    topics = TopicNames(topic_prefix)
    try:
        deadline = time.monotonic() + 60
        while not _count(kafka_bootstrap, topics.clicks) + _count(kafka_bootstrap, topics.purchases):
            assert proc.poll() is None and time.monotonic() < deadline, "produce never started sending"
            time.sleep(0.3)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert took < 5, f"stopped {took:.1f} s after SIGTERM"
    assert "interrupted after 1 event (1 click, 0 purchases)" in out
    assert _count(kafka_bootstrap, topics.clicks) + _count(kafka_bootstrap, topics.purchases) == 1



def _confirmed(out: str) -> tuple[int, int]:
    """How many events a failed replay said Kafka confirmed, and how many of the first ones all."""
    all_first = re.search(r"Kafka confirmed the first ([\d,]+) events? of the log and none after them", out)
    if all_first:
        n = int(all_first[1].replace(",", ""))
        return n, n
    some = re.search(r"Kafka confirmed ([\d,]+) of the first [\d,]+ events of the log: all of the first ([\d,]+),", out)
    assert some, out
    return int(some[1].replace(",", "")), int(some[2].replace(",", ""))


def test_a_broker_gone_mid_replay_says_how_many_events_kafka_confirmed(private_kafka, topic_prefix):
    """produce ended with `sending events ... failed: KafkaTimeoutError()` alone: an operator
    could not tell what was in Kafka. Each event it says was confirmed is there after the restart."""
    bootstrap = private_kafka.address
    args = ["--bootstrap", bootstrap, "--topic-prefix", topic_prefix, "--rate", "2000", "--limit", "1000000",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "produce", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "STREAMREC_PARTITIONS": str(PARTITIONS)})
    topics = TopicNames(topic_prefix)
    try:
        deadline = time.monotonic() + 60
        while _count(bootstrap, topics.clicks) < 2_000:
            assert proc.poll() is None and time.monotonic() < deadline, "produce never started sending"
            time.sleep(0.3)
        private_kafka.halt()
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2 and "Traceback" not in out, out  # streamrec's error: one sentence
    confirmed, unbroken = _confirmed(out)
    private_kafka.start()
    ids = {decode_event(r.value).event_id for topic in (topics.clicks, topics.purchases) for r in read_all(bootstrap, topic)}
    assert 2_000 <= unbroken <= confirmed <= len(ids), out
    assert {f"synthetic-s42-{i}" for i in range(unbroken)} <= ids


def _count(bootstrap: str, topic: str) -> int:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum(consumer.end_offsets(partitions).values()) if partitions else 0
    finally:
        consumer.close(autocommit=False)


# --- tail -------------------------------------------------------------------------------

def _publish(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()


def _recommendation(user: str, latency_ms: int) -> Recommendation:
    return Recommendation(user_id=user, items=[RecommendedItem(f"i{n}", 1.0 - n / 10) for n in range(7)],
                          trigger_event_id=f"e-{user}", event_ts=1_700_000_000_000,
                          generated_ts=1_700_000_000_000 + latency_ms, model={"scorer": "v1"})


def test_tail_prints_recommendations_and_filters_by_user(kafka_bootstrap, topic_prefix):
    topics = TopicNames(topic_prefix)
    ensure_topics(kafka_bootstrap, topics.all, PARTITIONS)
    recs = [_recommendation(f"u{n}", 10 + n) for n in range(4)]
    _publish(kafka_bootstrap, topics.recommendations, [(r.user_id.encode(), encode(r)) for r in recs])
    common = ["--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix, "--from-beginning", "--timeout", "30"]

    lines = run("tail", *common, "--limit", "4").splitlines()
    assert sorted(lines) == sorted(f"u{n}  i0 1.000, i1 0.900, i2 0.800, i3 0.700, i4 0.600 (and 2 more)  "
                                   f"latency {10 + n} ms  after e-u{n}  scorer=v1" for n in range(4))

    (line,) = run("tail", *common, "--limit", "1", "--user", "u2", "--json").splitlines()
    assert line.encode() == encode(recs[2])


def test_tail_waits_for_new_recommendations_by_default(kafka_bootstrap, topic_prefix):
    topics = TopicNames(topic_prefix)
    ensure_topics(kafka_bootstrap, topics.all, PARTITIONS)
    _publish(kafka_bootstrap, topics.recommendations, [(b"old", encode(_recommendation("old", 1)))])
    result = CliRunner().invoke(cli(), ["tail", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
                                        "--limit", "1", "--timeout", "3"])
    assert result.exit_code == 1 and "old" not in result.stdout  # only what arrives after it starts


def test_tail_dlq_shows_reason_and_where(kafka_bootstrap, topic_prefix):
    topics = TopicNames(topic_prefix)
    ensure_topics(kafka_bootstrap, topics.all, PARTITIONS)
    bad = b'{"event_id":"e1","type":"click","item_id":"i9","ts":1}'
    try:
        decode_event(bad)
    except InvalidEvent as err:
        letter = dead_letter(err, bad, topics.clicks, 2, 41, 1_700_000_000_000)
    _publish(kafka_bootstrap, topics.dlq, [(b"u1", encode(letter))])
    (line,) = run("tail", "--dlq", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
                  "--from-beginning", "--limit", "1", "--timeout", "30").splitlines()
    assert line == f"{topics.clicks}[2]@41  missing_field  field `user_id` is missing (required)  raw: {bad.decode()}"


def test_tail_of_a_prefix_no_worker_uses_says_so_and_creates_nothing(kafka_bootstrap, topic_prefix):
    """A typo in --topic-prefix must not create a set of topics and wait on them forever."""
    result = CliRunner().invoke(cli(), ["tail", "--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
                                        "--timeout", "30"])
    topics = TopicNames(topic_prefix)
    assert result.exit_code == 1 and f"there is no topic {topics.recommendations}" in str(result.exception)
    assert partition_count(kafka_bootstrap, topics.recommendations) is None
    assert partition_count(kafka_bootstrap, topics.clicks) is None


@pytest.mark.parametrize("command", ["produce", "tail"])
def test_a_broker_that_does_not_answer_is_a_clear_error(command):
    result = CliRunner().invoke(cli(), [command, "--bootstrap", "127.0.0.1:1", "--limit", "1"])
    assert result.exit_code != 0 and "127.0.0.1:1 refused the connection" in str(result.exception)
