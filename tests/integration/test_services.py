"""The local Kafka broker and Redis server work with every client stack streamrec uses.

kafka-python (admin, tools), aiokafka (async producers and consumers) and faust-streaming (the
worker, on top of aiokafka) each talk to the real broker; Redis is the real server with the
project's configuration. Kafka 4.x dropped old protocol versions, so these are the tests that
tell whether a client upgrade or a broker upgrade broke the pipeline's plumbing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.partitioner.default import murmur2

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"
REDIS_SH = ROOT / "deploy" / "redis" / "redis.sh"
PARTITIONS = 4


def click_event(i: int, user_id: str) -> dict:
    return {
        "event_id": f"e{i}",
        "type": "click",
        "user_id": user_id,
        "item_id": f"i{i % 7}",
        "ts": 1_700_000_000_000 + i,
    }


EVENTS = [click_event(i, f"u{i % 5}") for i in range(20)]


def create_topics(admin: KafkaAdminClient, partitions: dict[str, int]) -> None:
    admin.create_topics(
        {name: {"num_partitions": n, "replication_factor": 1} for name, n in partitions.items()}
    )
    admin.wait_for_topics(list(partitions), timeout_ms=30_000)


def committed_total(admin: KafkaAdminClient, group: str) -> int:
    offsets = admin.list_group_offsets(group).get(group, {})
    return sum(meta.offset for meta in offsets.values() if meta.offset >= 0)


def check_delivery(received: list[tuple[str, int, dict]]) -> None:
    """(key, partition, value) in consumption order: all events, keyed by user, in order."""
    assert sorted((v for _, _, v in received), key=lambda v: v["ts"]) == EVENTS
    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    ts_of_user: dict[str, list[int]] = defaultdict(list)
    for key, partition, value in received:
        assert key == value["user_id"]
        partitions_of_user[key].add(partition)
        ts_of_user[key].append(value["ts"])
    # one user's events share a partition (the co-partitioning contract) and arrive in order
    assert all(len(p) == 1 for p in partitions_of_user.values()), partitions_of_user
    assert all(ts == sorted(ts) for ts in ts_of_user.values()), ts_of_user
    # the same partition the Java client and every murmur2 producer would choose
    for key, parts in partitions_of_user.items():
        assert parts == {(murmur2(key.encode()) & 0x7FFFFFFF) % PARTITIONS}


# ------------------------------------------------------------------------------ Kafka


def test_admin_creates_topics_with_partitions(kafka_admin, topic_prefix):
    wanted = {
        f"{topic_prefix}clicks": PARTITIONS,
        f"{topic_prefix}purchases": PARTITIONS,
        f"{topic_prefix}dlq": 1,
    }
    create_topics(kafka_admin, wanted)

    assert set(wanted) <= set(kafka_admin.list_topics())
    described = {t["name"]: len(t["partitions"]) for t in kafka_admin.describe_topics(list(wanted))}
    assert described == wanted


def test_click_event_round_trip_with_kafka_python(kafka_bootstrap, kafka_admin, topic_prefix):
    topic, group = f"{topic_prefix}clicks", f"{topic_prefix}readers"
    create_topics(kafka_admin, {topic: PARTITIONS})

    # plain bytes in and out: kafka-python 3 deprecates bare callables as (de)serializers
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for event in EVENTS:
            producer.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=30_000,
    )
    received = []
    try:
        for msg in consumer:
            received.append((msg.key.decode(), msg.partition, json.loads(msg.value)))
            if len(received) == len(EVENTS):
                break
        consumer.commit()
    finally:
        consumer.close()

    check_delivery(received)
    assert committed_total(kafka_admin, group) == len(EVENTS)


async def test_click_event_round_trip_with_aiokafka(kafka_bootstrap, kafka_admin, topic_prefix):
    topic, group = f"{topic_prefix}clicks", f"{topic_prefix}readers"
    create_topics(kafka_admin, {topic: PARTITIONS})

    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap,
        key_serializer=str.encode,
        value_serializer=lambda v: json.dumps(v).encode(),
        acks="all",
        enable_idempotence=True,
    )
    await producer.start()
    try:
        for event in EVENTS:
            await producer.send(topic, key=event["user_id"], value=event)
        await producer.flush()
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        key_deserializer=bytes.decode,
        value_deserializer=json.loads,
    )
    await consumer.start()
    received = []
    try:
        async with asyncio.timeout(30):
            async for msg in consumer:
                received.append((msg.key, msg.partition, msg.value))
                if len(received) == len(EVENTS):
                    break
        await consumer.commit()
    finally:
        await consumer.stop()

    check_delivery(received)
    assert committed_total(kafka_admin, group) == len(EVENTS)


async def test_transactions_commit_and_abort_with_aiokafka(
    kafka_bootstrap, kafka_admin, topic_prefix
):
    """Exactly-once needs the transaction coordinator (replication factor 1 on one node)."""
    topic = f"{topic_prefix}recommendations"
    create_topics(kafka_admin, {topic: PARTITIONS})
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, transactional_id=f"{topic_prefix}tx"
    )
    await producer.start()
    try:
        async with producer.transaction():
            await producer.send(topic, key=b"u1", value=b"committed")
        await producer.begin_transaction()
        await producer.send(topic, key=b"u1", value=b"aborted")
        await producer.abort_transaction()
        async with producer.transaction():
            await producer.send(topic, key=b"u1", value=b"marker")
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
    )
    await consumer.start()
    values = []
    try:
        async with asyncio.timeout(30):
            async for msg in consumer:
                values.append(msg.value)
                if msg.value == b"marker":
                    break
    finally:
        await consumer.stop()
    assert values == [b"committed", b"marker"]


FAUST_APP = textwrap.dedent(
    """
    import json
    import os

    import faust

    app = faust.App(
        os.environ["APP_ID"],
        broker="kafka://" + os.environ["STREAMREC_KAFKA_BOOTSTRAP"],
        store="memory://",
        web_enabled=False,
        topic_replication_factor=1,
        topic_partitions=4,
        broker_commit_every=1,
        broker_commit_interval=0.5,
    )
    source = app.topic(os.environ["IN_TOPIC"], key_serializer="raw", value_serializer="raw")
    sink = app.topic(os.environ["OUT_TOPIC"], key_serializer="raw", value_serializer="raw")


    @app.agent(source)
    async def forward(stream):
        async for key, value in stream.items():
            event = json.loads(value)
            event["seen_by"] = "faust"
            await sink.send(key=key, value=json.dumps(event).encode())


    if __name__ == "__main__":
        app.main()
    """
)


@pytest.mark.timeout(120)
def test_faust_worker_consumes_and_commits(kafka_bootstrap, kafka_admin, topic_prefix, tmp_path):
    app_id, source, sink = f"{topic_prefix}app", f"{topic_prefix}clicks", f"{topic_prefix}seen"
    create_topics(kafka_admin, {source: PARTITIONS, sink: PARTITIONS})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for event in EVENTS:
            producer.send(source, key=event["user_id"].encode(), value=json.dumps(event).encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)

    app_file = tmp_path / "roundtrip_app.py"
    app_file.write_text(FAUST_APP)
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        "STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "APP_ID": app_id,
        "IN_TOPIC": source,
        "OUT_TOPIC": sink,
    }
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, str(app_file), "worker", "--loglevel", "info"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def worker_log() -> str:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])

    consumer = KafkaConsumer(
        sink,
        bootstrap_servers=kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=60_000,
    )
    try:
        seen = []
        for msg in consumer:
            seen.append(json.loads(msg.value))
            if len(seen) == len(EVENTS):
                break
        assert len(seen) == len(EVENTS), f"faust forwarded {len(seen)} events\n{worker_log()}"
        assert all(v.pop("seen_by") == "faust" for v in seen)
        assert sorted(seen, key=lambda v: v["ts"]) == EVENTS

        deadline = time.monotonic() + 30
        while committed_total(kafka_admin, app_id) < len(EVENTS) and time.monotonic() < deadline:
            time.sleep(0.5)
        committed = committed_total(kafka_admin, app_id)
        assert committed == len(EVENTS), f"faust committed {committed}\n{worker_log()}"
    finally:
        consumer.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def test_kafka_script_probe_answers_for_the_broker(kafka_bootstrap):
    host, port = kafka_bootstrap.rsplit(":", 1)
    if host not in {"127.0.0.1", "localhost"}:
        pytest.fail(
            f"kafka.sh probes 127.0.0.1 only; the broker under test is at {kafka_bootstrap}"
        )
    done = subprocess.run(
        ["bash", str(KAFKA_SH), "--port", port, "probe"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_kafka_script_refuses_a_port_in_use_with_one_clear_line(tmp_path):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = subprocess.run(
            ["bash", str(KAFKA_SH), "--port", str(port), "--data-dir", str(tmp_path), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"port {port}" in lines[0] and "already in use" in lines[0]
    assert not (tmp_path / "kafka.pid").exists()


# ------------------------------------------------------------------------------ Redis


def test_redis_hash_and_list_round_trip(redis_client, redis_prefix):
    user = f"{redis_prefix}user:u1"
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(f"{user}:counters", mapping={"clicks": 3, "purchases": 1})
        pipe.hincrby(f"{user}:counters", "clicks", 2)
        pipe.lpush(f"{user}:recent", "i1", "i2", "i3")
        pipe.ltrim(f"{user}:recent", 0, 1)
        pipe.execute()

    assert redis_client.hgetall(f"{user}:counters") == {"clicks": "5", "purchases": "1"}
    assert redis_client.lrange(f"{user}:recent", 0, -1) == ["i3", "i2"]


def test_redis_runs_with_append_only_file(redis_client, redis_url):
    assert redis_client.config_get("appendonly") == {"appendonly": "yes"}, (
        f"the Redis at {redis_url} has AOF off; deploy/redis/redis.conf turns it on"
    )


def test_redis_state_survives_a_restart(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["bash", str(REDIS_SH), "--port", str(port), "--data-dir", str(tmp_path / "redis")]

    def script(command: str) -> None:
        done = subprocess.run(
            [*args, command], capture_output=True, text=True, timeout=120, cwd=ROOT
        )
        assert done.returncode == 0, done.stdout + done.stderr

    script("start")
    try:
        script("start")  # a second start is a no-op
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            client.hset("user:u1", mapping={"clicks": 7})
            client.rpush("user:u1:recent", "i9")
        finally:
            client.close()
        script("stop")
        script("start")
        client = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            assert client.hgetall("user:u1") == {"clicks": "7"}
            assert client.lrange("user:u1:recent", 0, -1) == ["i9"]
        finally:
            client.close()
    finally:
        script("stop")
    script("stop")  # a second stop is a no-op
    assert list(Path(tmp_path / "redis" / "appendonlydir").glob("*.aof")), "no AOF written"
