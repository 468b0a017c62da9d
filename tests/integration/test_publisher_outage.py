"""The worker's publisher after a batch the broker refused: the producer is idempotent, and a
batch that fails after it was sent has taken its sequence numbers, so the broker refused every
later batch of that partition with OutOfOrderSequenceNumber, also records it would take. Seen
after a broker outage longer than the request timeout (aiokafka gives up on a batch whose
partition has no leader), where the worker stood still until it was restarted; a record over
the topic's max.message.bytes does the same at once."""

from __future__ import annotations

import asyncio
import uuid

from kafka.admin import NewTopic
from workerkit import read_all

from stream.publisher import BatchPublisher


def test_a_refused_batch_does_not_block_the_partition_for_the_records_after_it(kafka_bootstrap, kafka_admin):
    topic = f"t{uuid.uuid4().hex[:12]}.recommendations"
    kafka_admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"max.message.bytes": "2048"})])

    async def main() -> None:
        publisher = BatchPublisher(kafka_bootstrap)
        try:
            assert await publisher.publish([(topic, b"u1", b"before")]) == []
            big = (topic, b"u1", b"x" * 5000)
            assert await publisher.publish([big]) == [big]
            for n in range(3):  # the worker publishes again what failed, after a pause
                assert await publisher.publish([(topic, b"u1", f"after-{n}".encode())]) == []
        finally:
            await publisher.stop()

    asyncio.run(main())
    assert [r.value for r in read_all(kafka_bootstrap, topic)] == [b"before", b"after-0", b"after-1", b"after-2"]
