"""workerkit's wait for a consumer group's commits (tests/integration/workerkit.py) on a real
broker. A partition whose last write was a transaction ends with the transaction's marker, an
offset no reader is handed: a worker's committed offset stops one short of the end for good,
and ``all_committed``, which compared the two, waited until its caller's deadline and then
blamed the worker."""

from __future__ import annotations

import time
import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata
from workerkit import all_committed, produce, unread, wait_all_committed

from stream.topics import ensure_topics


def _transaction(bootstrap: str, topic: str, values: list[bytes]) -> list[int]:
    """``values`` written to partition 0 in one committed transaction; their offsets."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"commits-tests-{uuid.uuid4().hex}")
    try:
        producer.init_transactions()
        producer.begin_transaction()
        futures = [producer.send(topic, value, key=b"u1", partition=0) for value in values]
        producer.commit_transaction()
        return [f.get(30).offset for f in futures]
    finally:
        producer.close()


def _commit(bootstrap: str, group: str, tp: TopicPartition, offset: int) -> None:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([tp])
        consumer.commit({tp: OffsetAndMetadata(offset, "", -1)})
    finally:
        consumer.close()


def test_a_partition_that_ends_with_a_transaction_marker_is_committed_past_once_its_records_are(
        kafka_bootstrap, topic_prefix):
    topic, group = f"{topic_prefix}clicks", f"{topic_prefix}group"
    tp = TopicPartition(topic, 0)
    ensure_topics(kafka_bootstrap, [topic], 1)
    produce(kafka_bootstrap, topic_prefix, [("clicks", b"u1", b"plain")])  # offset 0
    assert _transaction(kafka_bootstrap, topic, [b"t1", b"t2"]) == [1, 2]  # the marker is offset 3, the end 4

    _commit(kafka_bootstrap, group, tp, 3)  # what a worker commits once handed the last record
    started = time.monotonic()
    assert all_committed(kafka_bootstrap, group, [topic])
    assert time.monotonic() - started < 10

    _commit(kafka_bootstrap, group, tp, 2)  # one record still to read
    assert unread(kafka_bootstrap, group, [topic]) == {(topic, 0): (2, 4)}
    assert not all_committed(kafka_bootstrap, group, [topic])
    with pytest.raises(AssertionError, match=r"clicks\[0\] committed 2, end 4.*timed out after 1 s waiting for the test"):
        wait_all_committed(kafka_bootstrap, group, [topic], 1, "the test")
