"""Events from a site that writes with a transactional producer (exactly-once pipelines do):
the worker applies those of committed transactions and never those of aborted ones, which
Kafka keeps in the log, marked aborted, for consumers that read committed data only."""

from __future__ import annotations

import asyncio
import json
import time

import redis
from aiokafka import AIOKafkaProducer
from workerkit import applied_counts, produce, read_all, wait_for

from stream.records import decode_recommendation

#: one key for every record, so that they share a partition and its order (the worker takes
#: the user from the value)
KEY = b"site"


def _click(user: str, n: int, now: int) -> bytes:
    return json.dumps({"event_id": f"{user}-{n}", "type": "click", "user_id": user, "item_id": f"i{n}",
                       "ts": now}).encode()


async def _transaction(bootstrap: str, topic: str, user: str, now: int, commit: bool) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"{topic}-{user}")
    await producer.start()
    try:
        await producer.begin_transaction()
        for n in range(3):
            await producer.send_and_wait(topic, _click(user, n, now), key=KEY)
        await (producer.commit_transaction() if commit else producer.abort_transaction())
    finally:
        await producer.stop()


def test_events_of_an_aborted_transaction_are_never_applied(worker_env, workers, topic_prefix):
    bootstrap, url = worker_env["STREAMREC_KAFKA_BOOTSTRAP"], worker_env["STREAMREC_REDIS_URL"]
    clicks = f"{topic_prefix}clicks"
    now = time.time_ns() // 1_000_000
    produce(bootstrap, topic_prefix, [("clicks", KEY, _click("before", 0, now))])  # creates the topic
    asyncio.run(_transaction(bootstrap, clicks, "aborted", now, commit=False))
    asyncio.run(_transaction(bootstrap, clicks, "committed", now, commit=True))
    produce(bootstrap, topic_prefix, [("clicks", KEY, _click("after", 0, now))])
    worker = workers()
    client = redis.Redis.from_url(url)
    try:
        # the aborted events come before these in the partition: handled by now, or never
        wait_for(lambda: applied_counts(client, topic_prefix, ["before", "committed", "after"])
                 == {"before": 1, "committed": 3, "after": 1}, 120, "the committed events to be applied", worker)
        assert applied_counts(client, topic_prefix, ["aborted"]) == {"aborted": 0}
        published = {decode_recommendation(r.value).user_id for r in read_all(bootstrap, f"{topic_prefix}recommendations")}
        assert "aborted" not in published and "committed" in published
    finally:
        client.close()
