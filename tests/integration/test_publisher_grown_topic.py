"""The worker's publisher after partitions were added to an output topic: it hashed each key
over the partition count it first saw until it was restarted, so a reader partitioned by user
found a user's lists on another partition than Kafka's default partitioner (murmur2 over the
current count) gives. The publisher takes the count from its producer's metadata, which it
refreshes every ``metadata_max_age_s`` (10 s, as the worker's consumer)."""

from __future__ import annotations

import asyncio
import time
import uuid

from kafka.admin import NewPartitions, NewTopic
from workerkit import read_all

from stream.publisher import BatchPublisher, murmur2_partition

USERS = [f"user-{n}".encode() for n in range(40)]
#: the producer's metadata age (10 s), and slack for two shared cores
NOTICED_WITHIN_S = 30


def test_records_published_after_partitions_were_added_land_where_the_new_count_says(kafka_bootstrap, kafka_admin):
    topic = f"t{uuid.uuid4().hex[:12]}.recommendations"
    kafka_admin.create_topics([NewTopic(topic, 2, 1)])
    assert any(murmur2_partition(u, 2) != murmur2_partition(u, 4) for u in USERS)

    def round_of(n: int) -> list[tuple[str, bytes, bytes]]:
        return [(topic, user, str(n).encode()) for user in USERS]

    async def main() -> float:
        publisher = BatchPublisher(kafka_bootstrap)
        try:
            assert await publisher.publish(round_of(0)) == []
            kafka_admin.create_partitions({topic: NewPartitions(total_count=4)})
            grown = time.monotonic()
            n = 0
            while True:  # publish a round at a time until one reaches a new partition
                n += 1
                assert await publisher.publish(round_of(n)) == []
                records = await asyncio.to_thread(read_all, kafka_bootstrap, topic)
                if any(r.partition >= 2 for r in records):
                    break
                assert time.monotonic() - grown < NOTICED_WITHIN_S, \
                    f"{NOTICED_WITHIN_S} s after the topic grew to 4 partitions, the publisher still uses 2"
                await asyncio.sleep(0.5)
            for m in range(n + 1, n + 4):
                assert await publisher.publish(round_of(m)) == []
            return n
        finally:
            await publisher.stop()

    switched = asyncio.run(main())
    records = read_all(kafka_bootstrap, topic)
    assert len(records) == len(USERS) * (switched + 4)
    for r in records:
        n = int(r.value)
        if n == 0:
            assert r.partition == murmur2_partition(r.key, 2), r
        elif n >= switched:  # the round that reached a new partition, and every one after it
            assert r.partition == murmur2_partition(r.key, 4), (n, r.partition, r.key)
