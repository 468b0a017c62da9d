"""A partition taken over while the new owner's peer reader is behind the old owner's commits:
the new owner's models learn the events in between from Kafka before its first batch of that
partition (stream/shell.py, Shell.replay_due_gaps), so every learner learns every event once.
Before, those events were never learned, silently (found by a review: 58,016 of 100,600)."""
from __future__ import annotations

import signal

import pytest
from kafka.errors import KafkaError
from workerkit import (
    exactly_once,
    group_assignment,
    produce,
    synthetic_records,
    wait_all_committed,
    wait_for,
)

from stream.topics import ensure_topics

LEARNERS = ("recommender", "covisit", "reminder", "trending")
PARTITIONS = 4


@pytest.fixture
def four(worker_env, topic_prefix):
    prefix = f"{topic_prefix}four."
    ensure_topics(worker_env["STREAMREC_KAFKA_BOOTSTRAP"],
                  [f"{prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], PARTITIONS)
    return {"STREAMREC_TOPIC_PREFIX": prefix, "STREAMREC_APP_ID": f"{prefix}worker",
            "STREAMREC_PARTITIONS": str(PARTITIONS), "STREAMREC_LEARN_ALL_PARTITIONS": "true"}


def learned(w):
    return {name: w.metric("streamrec_model_events_learned", model=name) for name in LEARNERS}


def stable_with(bootstrap, group, topics, members):
    try:
        a = group_assignment(bootstrap, group, topics)
    except KafkaError:
        return False
    return bool(a) and len(a) == members and all(a.values())


def test_a_partition_taken_over_from_behind_the_reader_is_learned_whole(four, workers, redis_client, kafka_bootstrap):
    env = four
    prefix, group = env["STREAMREC_TOPIC_PREFIX"], env["STREAMREC_APP_ID"]
    inputs = [f"{prefix}clicks", f"{prefix}purchases"]
    records, expected = synthetic_records(100600, seed=7, n_users=300)
    first, rest = records[:600], records[600:]

    a1 = workers(metrics=True, **env)  # snapshots every 2 s
    wait_for(lambda: stable_with(kafka_bootstrap, group, inputs, 1), 90, "a1 in the group", a1)
    produce(kafka_bootstrap, prefix, first)
    wait_for(lambda: learned(a1)["recommender"] == len(first), 60, "a1 learns the first events", a1)
    ok0 = a1.metric("streamrec_model_snapshots_total", result="ok")
    wait_for(lambda: a1.metric("streamrec_model_snapshots_total", result="ok") >= ok0 + 2, 30, "a snapshot", a1)
    assert a1.stop(signal.SIGTERM) == 0

    # no more snapshots but a2's first, seconds after it learns past a1's (b restores that one, behind a2's commits)
    a2 = workers(metrics=True, **{**env, "STREAMREC_SNAPSHOT_INTERVAL_S": "3600"})
    produce(kafka_bootstrap, prefix, rest)
    wait_for(lambda: learned(a2)["recommender"] == len(records), 400, "a2 learns everything", a2)
    wait_all_committed(kafka_bootstrap, group, inputs, 60, "all committed", a2)

    b = workers(metrics=True, **{**env, "STREAMREC_SNAPSHOT_INTERVAL_S": "3600"})
    wait_for(lambda: "learning the other workers' partitions too" in b.log_text(), 90, "b's reader starts", b)
    assert a2.stop(signal.SIGTERM) == 0  # a2 leaves: b owns every partition now
    wait_for(lambda: stable_with(kafka_bootstrap, group, inputs, 1), 90, "b alone", b)
    every = dict.fromkeys(LEARNERS, float(len(records)))
    try:
        wait_for(lambda: learned(b) == every, 120, "b's models learn every event", b)
    except AssertionError as exc:
        said = [line for line in b.log_text().splitlines() if "the models miss" in line or "could not learn" in line]
        raise AssertionError(f"b's models learned {learned(b)} of {len(records)} events; {said}") from exc
    assert exactly_once(redis_client, prefix, expected)
    assert learned(b) == every  # and no event twice
