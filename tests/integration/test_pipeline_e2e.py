"""The whole pipeline end to end: `streamrec worker` processes against the real broker and server.

Events go in through kafka-python as a site would send them; recommendations and dead
letters come out of the real topics; user state is read back from the real Redis.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict

import redis
from workerkit import (
    FlowingFeed,
    consume_until,
    group_assignment,
    produce,
    read_all,
    user_doc,
    wait_all_committed,
    wait_for,
)

from online_models import Recommender
from online_models.datasets import synthetic_interactions
from stream.records import (
    ClickEvent,
    PurchaseEvent,
    decode_dead_letter,
    decode_recommendation,
    encode,
)
from stream.state import fingerprint


def as_record(x, index: int) -> tuple[str, bytes, bytes]:
    cls, topic = (PurchaseEvent, "purchases") if x.kind == "purchase" else (ClickEvent, "clicks")
    ev = cls(event_id=f"ev-{index}", user_id=x.user_id, item_id=x.item_id, ts=x.ts, category_id=x.category_id,
             session_id=x.session_id)
    return topic, x.user_id.encode(), encode(ev)


def test_every_user_gets_recommendations_without_purchased_items(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    events = list(synthetic_interactions(n_events=1500, n_users=60, n_items=300, seed=7))
    per_user = defaultdict(int)
    for x in events:
        per_user[x.user_id] += 1
    assert any(x.kind == "purchase" for x in events)
    produce(bootstrap, topic_prefix, [as_record(x, i) for i, x in enumerate(events)])
    worker = workers()

    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    try:
        deadline = time.monotonic() + 120
        while True:  # state is saved after publication: once every event is applied, every list is out
            docs = {u: user_doc(client, topic_prefix, u) for u in per_user}
            if all(d and d["clicks"] + d["purchases"] == per_user[u] for u, d in docs.items()):
                break
            assert time.monotonic() < deadline, f"not all events applied in time\n{worker.log_tail()}"
            worker.assert_alive()
            time.sleep(0.5)
        # the models' snapshot (every 2 s here, pickled in a forked child) reaches Redis and restores
        deadline = time.monotonic() + 30
        while True:
            blob = client.get(f"{topic_prefix}models:snapshot")
            if blob and Recommender.restore(blob).n_learned == len(events):
                break
            assert time.monotonic() < deadline, f"no snapshot of the models after every event\n{worker.log_tail()}"
            time.sleep(0.5)
    finally:
        client.close()
    values = consume_until(bootstrap, f"{topic_prefix}recommendations",
                           lambda v: {decode_recommendation(x).user_id for x in v} >= set(per_user), 30, worker)
    recs = [decode_recommendation(v) for v in values]
    last = {rec.user_id: rec for rec in recs}  # topic order is publication order for a user (one partition)
    assert set(last) == set(per_user)
    bought = defaultdict(set)
    for x in events:
        if x.kind == "purchase":
            bought[x.user_id].add(x.item_id)
    for rec in recs:
        shown = [it.item_id for it in rec.items]
        assert len(shown) == len(set(shown)) <= 20
        assert [it.score for it in rec.items] == sorted((it.score for it in rec.items), reverse=True)
        assert rec.generated_ts >= rec.event_ts and "transformer" in rec.model
    for user, rec in last.items():
        shown = {it.item_id for it in rec.items}
        assert not bought[user] & shown, f"{user} was recommended items it bought: {bought[user] & shown}"
    assert sum(bool(rec.items) for rec in last.values()) >= 0.9 * len(last)
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_bad_input_goes_to_the_dlq_and_good_events_keep_flowing(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    good = [ClickEvent(event_id=f"g{i}", user_id=f"user{i % 5}", item_id=f"item{i % 7}", ts=1_700_000_000_000 + i) for i in range(20)]
    bad = {
        "malformed_json": b'{"event_id": "x", "type": "click",',
        "missing_field": b'{"event_id":"m1","type":"click","user_id":"u1","ts":1}',
        "wrong_type": b'{"event_id":"w1","type":"click","user_id":"u1","item_id":"i1","ts":"yesterday"}',
        "oversize": b'{"event_id":"o1","type":"click","user_id":"u1","item_id":"i1","ts":1,"pad":"' + b"x" * 70_000 + b'"}',
        "unknown_type": b'{"event_id":"t1","type":"wishlist","user_id":"u1","item_id":"i1","ts":1}',
        "not_utf8": b'{"event_id":"n1","type":"click","user_id":"\xff\xfe","item_id":"i1","ts":1}',
    }
    records = []
    for i, ev in enumerate(good):
        records.append(("clicks", ev.user_id.encode(), encode(ev)))
        if i < len(bad):
            records.append(("clicks", b"user0", list(bad.values())[i]))
    produce(bootstrap, topic_prefix, records)
    worker = workers()
    dead_values = consume_until(bootstrap, f"{topic_prefix}dlq", lambda v: len(v) >= len(bad), 120, worker)
    dead = {d.code: d for d in map(decode_dead_letter, dead_values)}
    assert set(dead) == set(bad)
    assert "`item_id`" in dead["missing_field"].reason and "`ts`" in dead["wrong_type"].reason
    assert dead["not_utf8"].raw_encoding == "base64"
    assert all(d.topic == f"{topic_prefix}clicks" and d.offset >= 0 for d in dead.values())
    recs = consume_until(bootstrap, f"{topic_prefix}recommendations",
                         lambda v: {decode_recommendation(x).trigger_event_id for x in v} >= {"g15", "g16", "g17", "g18", "g19"}, 60, worker)
    assert {decode_recommendation(v).user_id for v in recs} == {f"user{i}" for i in range(5)}
    worker.assert_alive()
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_a_redelivered_event_is_applied_once(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    ev = ClickEvent(event_id="dup-1", user_id="solo", item_id="i1", ts=1_700_000_000_000)
    later = ClickEvent(event_id="dup-2", user_id="solo", item_id="i2", ts=1_700_000_000_500)
    produce(bootstrap, topic_prefix, [("clicks", b"solo", encode(ev))] * 3 + [("clicks", b"solo", encode(later))])
    worker = workers(metrics=True)
    group, inputs = worker_env["STREAMREC_APP_ID"], [f"{topic_prefix}clicks", f"{topic_prefix}purchases"]
    consume_until(bootstrap, f"{topic_prefix}recommendations",
                  lambda v: any(decode_recommendation(x).trigger_event_id == "dup-2" for x in v), 90, worker)
    # and once more after the first copies were applied and committed
    wait_all_committed(bootstrap, group, inputs, 60, "the first four records committed", worker)
    recs_before = [r.value for r in read_all(bootstrap, f"{topic_prefix}recommendations")]
    produce(bootstrap, topic_prefix, [("clicks", b"solo", encode(ev))])
    # The worker is done with the redelivered copy once its offset is committed (after the
    # state is saved and the outputs published) and its batch is in the metrics (recorded
    # once the batch's effects are durable): then whatever it did about it is there to see.
    wait_all_committed(bootstrap, group, inputs, 60, "the redelivered copy committed", worker)
    wait_for(lambda: worker.metric("streamrec_batch_size_events_sum") == 5, 30, "all 5 records in the metrics", worker)
    assert worker.metric("streamrec_duplicates_skipped_total") == 3  # the two copies in the first batch, and this one
    assert worker.metric("streamrec_events_consumed_total", type="click") == 2
    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    doc = user_doc(client, topic_prefix, "solo")
    client.close()
    assert doc["clicks"] == 2 and doc["recent_items"] == ["i1", "i2"] and doc["seen"] == fingerprint("dup-1") + fingerprint("dup-2")
    assert [r.value for r in read_all(bootstrap, f"{topic_prefix}recommendations")] == recs_before, \
        "a recommendation was published for the redelivered copy"
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_sigkill_mid_stream_loses_nothing_and_applies_nothing_twice(worker_env, workers, topic_prefix):
    flow = FlowingFeed(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, seed=11)
    first = workers()
    flow.start(first)  # the worker is up and running: now stream, and kill it mid-way

    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    try:
        # mid-way: the worker has applied some of the flowing events (beyond the first 250)
        # and the feeder still has events to send
        wait_for(lambda: sum(flow.applied(client).values()) >= 1000, 60, "1000 events applied", first)
        assert flow.flowing(), "the feed ended before the kill: it would not land mid-stream"
        first.stop(signal.SIGKILL)
        partial = sum(flow.applied(client).values())
        assert 0 < partial < len(flow.events), "the kill should land mid-stream"
        second = workers()
        flow.wait_until_all_applied(client, second)
    finally:
        client.close()
    assert second.stop(signal.SIGTERM) == 0, second.log_tail()


def test_a_worker_joining_and_one_leaving_mid_stream_loses_nothing_and_applies_nothing_twice(worker_env, workers, topic_prefix):
    """Two rebalances while events flow: a second worker joins (the partitions are split), then
    the first stops with SIGTERM (the second takes them all). The broker's view of the consumer
    group proves each rebalance; every event is applied exactly once."""
    bootstrap, group = worker_env["STREAMREC_KAFKA_BOOTSTRAP"], worker_env["STREAMREC_APP_ID"]
    topics = [f"{topic_prefix}clicks", f"{topic_prefix}purchases"]
    inputs = frozenset((t, p) for t in topics for p in range(2))
    # up to 60,000 events (two minutes of flow), ended once the second worker holds every partition:
    # the join and the leave happen mid-stream however long a worker takes to start. (15,000, about
    # 30 s, was a guess that a slow machine could spend on the second worker's start and join.)
    flow = FlowingFeed(bootstrap, topic_prefix, seed=13, n_events=60_000)
    first = workers(metrics=True)
    flow.start(first)

    def members(count: int | None = None) -> dict | None:
        """The group's members and their input partitions, once Stable (with ``count`` members)."""
        found = group_assignment(bootstrap, group, topics)
        return found if found and (count is None or len(found) == count) else None

    alone = wait_for(lambda: members(1), 60, "the first worker alone in the group", first)
    ((first_id, held),) = alone.items()
    assert held == inputs, f"the first worker alone holds {sorted(held)}"

    second = workers(metrics=True)  # joins: the partitions are split between the two
    split = wait_for(lambda: members(2), 120, "the group to rebalance onto two workers", second)
    assert first_id in split, f"the first worker left the group when the second joined: {split}"
    (second_id,) = set(split) - {first_id}
    assert split[first_id] and split[second_id], f"a worker holds no input partition after the join: {split}"
    assert split[first_id] | split[second_id] == inputs and not split[first_id] & split[second_id], split
    assert flow.flowing(), "the feed ended before the second worker joined: the join was not mid-stream"
    # the second worker does its share before the first leaves
    wait_for(lambda: second.metric_total("streamrec_events_consumed_total") > 0, 60, "the second worker to apply events", second)
    assert flow.flowing(), "the feed ended before the first worker left: the leave would not be mid-stream"

    assert first.stop(signal.SIGTERM) == 0, first.log_tail()  # leaves: the second takes them all
    wait_for(lambda: members() == {second_id: inputs}, 60, "the second worker alone, with every input partition", second)
    flow.end()  # what had to happen mid-stream has: the events sent so far are the ones expected

    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    try:
        flow.wait_until_all_applied(client, second)
    finally:
        client.close()
    assert second.stop(signal.SIGTERM) == 0, second.log_tail()
