"""A user's events on two partitions at once, owned by two workers: what partitions added while a
backlog waits leave behind (docs/operations.md, *Adding partitions later*), and records keyed by
something other than the user's id. Both workers save the user's state; the versioned save
(stream/state.py, ``UserState.version``) refuses the one that would overwrite the other's events,
and the worker applies its batch again to what the other saved, so every event reaches the
user's state once. Before versions, one worker's save overwrote the other's events."""

from __future__ import annotations

import time

from kafka import KafkaProducer
from kafka.errors import KafkaError
from workerkit import applied_counts, group_assignment, synthetic_records, wait_for

#: users, and their events sent alternately to the two partitions, in small bursts
USERS = 40
EVENTS = 3000
BURST = 25


def one_partition_each(bootstrap: str, group: str, topic: str) -> bool:
    try:
        assignment = group_assignment(bootstrap, group, [topic])
    except KafkaError:
        return False
    return bool(assignment) and len(assignment) == 2 and all(len(held) == 1 for held in assignment.values())


def test_a_user_whose_events_reach_two_workers_at_once_loses_none_of_them(workers, kafka_bootstrap, redis_client,
                                                                           topic_prefix):
    a, b = workers(metrics=True), workers(metrics=True)
    clicks = f"{topic_prefix}clicks"
    wait_for(lambda: one_partition_each(kafka_bootstrap, f"{topic_prefix}worker", clicks), 120,
             "two workers holding one partition each", a)
    wait_for(lambda: a.http("/readyz")[0] == 200 and b.http("/readyz")[0] == 200, 60, "both workers ready", a)

    records, _ = synthetic_records(EVENTS, seed=38, n_users=USERS)
    records = [r for r in records if r[0] == "clicks"]
    expected: dict[str, int] = {}
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=2)
    try:
        for at in range(0, len(records), BURST):
            for _, key, value in records[at:at + BURST]:
                user = key.decode()
                expected[user] = expected.get(user, 0) + 1
                # keyed by the user, on each partition in turn: both workers hold some of the user's events
                producer.send(clicks, key=key, value=value, partition=expected[user] % 2)
            producer.flush()
            time.sleep(0.02)  # a site's pace, so that the workers' batches interleave (not a wait for a condition)
    finally:
        producer.close()

    def lost() -> dict[str, tuple[int, int]]:
        got = applied_counts(redis_client, topic_prefix, expected)
        return {u: (got[u], n) for u, n in expected.items() if got[u] != n}

    try:
        wait_for(lambda: not lost(), 180, "every event in its user's state once", a)
    except AssertionError:
        missing = lost()
        raise AssertionError(f"{sum(n - got for got, n in missing.values())} of {sum(expected.values())} events of "
                             f"{len(missing)} users missing from their state: {missing}") from None
    conflicts = a.metric_total("streamrec_state_conflicts_total") + b.metric_total("streamrec_state_conflicts_total")
    assert conflicts > 0, "the two workers never saved one user in between each other's load and save: no race was run"
    print(f"\n{conflicts:.0f} saves of a user another worker had saved since their load, merged")
