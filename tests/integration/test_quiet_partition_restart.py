"""A restart learns again what the models learned of a partition after their snapshot, also where
that snapshot was taken before they had learned anything of it.

Found by a tester following docs/operations.md (*Shutting down and deploying*: "a restarted
worker restores the newest snapshot and learns again the events between it and the committed
offsets"): a worker started while the forget topic held a request snapshotted its models within
a second of replaying it, before any click; that snapshot counted as its first, so none followed
its clicks until the interval; and the replay after a restart covered only the partitions a
snapshot knew, so the restarted worker never learned those clicks again. Here a purchase
partition stays quiet until after the worker's first snapshot of its clicks: the purchases
learned after it must be learned again after a SIGTERM (which takes no snapshot)."""

from __future__ import annotations

import signal
import time

import redis
from workerkit import produce, wait_all_committed, wait_for

from online_models import Recommender
from stream.records import ClickEvent, ForgetRequest, PurchaseEvent, encode
from stream.topics import ensure_topics

CLICKS, PURCHASES = 300, 100


def test_a_restart_learns_again_what_a_snapshot_before_the_partitions_first_event_missed(worker_env, workers,
                                                                                         topic_prefix):
    prefix = f"{topic_prefix}one."
    env = {"STREAMREC_PARTITIONS": "1", "STREAMREC_TOPIC_PREFIX": prefix, "STREAMREC_APP_ID": f"{prefix}worker",
           "STREAMREC_SNAPSHOT_INTERVAL_S": "600"}  # no snapshot but the erasure's and the first
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap, [f"{prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq", "forget")], 1)
    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    key = f"{prefix}models:snapshot"

    def snapshot_learned() -> int | None:
        blob = client.get(key)
        return Recommender.restore(blob).n_learned if blob else None

    now = time.time_ns() // 1_000_000
    try:
        produce(bootstrap, prefix, [("forget", b"gone", encode(ForgetRequest(user_id="gone", request_id="r1", ts=now)))])
        first = workers(metrics=True, **env)
        wait_for(lambda: first.metric("streamrec_model_snapshots_total", result="ok") >= 1, 90,
                 "the erasure's snapshot, taken at start", first)
        assert snapshot_learned() == 0

        produce(bootstrap, prefix, [("clicks", f"u{i % 20}".encode(),
                                     encode(ClickEvent(event_id=f"c{i}", user_id=f"u{i % 20}", item_id=f"i{i % 30}",
                                                       ts=now + i))) for i in range(CLICKS)])
        # the worker's first snapshot follows its first lessons, though the erasure's came before
        wait_for(lambda: snapshot_learned() == CLICKS, 60, "a snapshot of the clicks", first)

        produce(bootstrap, prefix, [("purchases", f"u{i % 20}".encode(),
                                     encode(PurchaseEvent(event_id=f"p{i}", user_id=f"u{i % 20}", item_id=f"i{i % 30}",
                                                          ts=now + CLICKS + i))) for i in range(PURCHASES)])
        wait_all_committed(bootstrap, env["STREAMREC_APP_ID"], [f"{prefix}clicks", f"{prefix}purchases"], 60,
                           "every event committed", first)
        assert first.metric("streamrec_model_events_learned", model="recommender") == CLICKS + PURCHASES
        assert first.stop(signal.SIGTERM) == 0, first.log_tail()
        assert snapshot_learned() == CLICKS  # the purchases are in no snapshot

        second = workers(metrics=True, **env)
        # the models' count moves as each event is learned; the replay adds its events to
        # events_relearned_total after it returns (its Kafka reader stopped): a scrape between
        # the two sees 0, so wait for both rather than read the second once the first is there
        wait_for(lambda: second.metric("streamrec_model_events_learned", model="recommender") == CLICKS + PURCHASES
                 and second.metric("streamrec_events_relearned_total") > 0,
                 90, "the restarted worker to learn the purchases again", second)
        assert second.metric("streamrec_events_relearned_total") == PURCHASES, second.log_tail()
        assert second.stop(signal.SIGTERM) == 0, second.log_tail()
    finally:
        client.close()
