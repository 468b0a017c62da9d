"""One model across workers (STREAMREC_LEARN_ALL_PARTITIONS, stream/peers.py): with several
workers in one group, each worker's models learn every event of every input partition, each
exactly once, also while partitions move between workers (one leaves, one joins), and a worker
that starts from another's snapshot learns on from where that snapshot stands."""

from __future__ import annotations

import signal

import pytest
from kafka.errors import KafkaError
from workerkit import (
    Feeder,
    exactly_once,
    group_assignment,
    learned,
    learned_all,
    partitioned_env,
    produce,
    synthetic_records,
    wait_for,
)

PARTITIONS = 4


@pytest.fixture
def four_partitions(worker_env, topic_prefix) -> dict[str, str]:
    """The test's worker settings on input topics of four partitions."""
    return partitioned_env(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], f"{topic_prefix}four.", PARTITIONS)




def stable_with(bootstrap: str, group: str, topics: list[str], members: int) -> bool:
    """The group is stable, with ``members`` members that each hold some input partitions."""
    try:
        assignment = group_assignment(bootstrap, group, topics)
    except KafkaError:  # no coordinator for a group that no worker has joined yet
        return False
    return bool(assignment) and len(assignment) == members and all(assignment.values())


def test_each_worker_learns_every_partition_once_across_rebalances(four_partitions, workers, redis_client,
                                                                   kafka_bootstrap):
    env = four_partitions
    prefix, group = env["STREAMREC_TOPIC_PREFIX"], env["STREAMREC_APP_ID"]
    inputs = [f"{prefix}clicks", f"{prefix}purchases"]
    records, expected = synthetic_records(6000, seed=57, n_users=150)
    first, flowing, last = records[:1500], records[1500:4500], records[4500:]

    # two workers in one group, each owning two of the four partitions
    a, b = workers(metrics=True, **env), workers(metrics=True, **env)
    wait_for(lambda: stable_with(kafka_bootstrap, group, inputs, 2), 90, "both workers to hold partitions", a)
    where = produce(kafka_bootstrap, prefix, first)
    assert {(t, p) for t, p, _ in where if t.endswith("clicks")} == {(inputs[0], p) for p in range(PARTITIONS)}, \
        "the events should reach every partition"
    for w in (a, b):
        wait_for(lambda w=w: learned_all(w, len(first)), 90, f"every learner of a worker to learn all {len(first)} events", w)
        # half of them from the partitions the other worker owns (each owns two of four)
        assert 0 < w.metric("streamrec_peer_events_learned_total") < len(first), w.log_tail()
    assert sum(w.metric("streamrec_peer_events_learned_total") for w in (a, b)) == len(first)

    # one leaves while events flow: its partitions become the survivor's own (foreign -> owned)
    feeder = Feeder(kafka_bootstrap, prefix, flowing, rate=600)
    feeder.start()
    try:
        wait_for(lambda: feeder.sent > 600, 60, "events flowing", a)
        assert b.stop(signal.SIGTERM) == 0, b.log_tail()
        feeder.finish()
    finally:
        if feeder.is_alive():
            feeder.stop()
    sent = len(first) + len(flowing)
    wait_for(lambda: learned_all(a, sent), 120, f"the survivor's learners to learn all {sent} events", a)

    # one joins: some of the survivor's partitions become foreign (owned -> foreign); the newcomer
    # starts from the newest snapshot (written by either) and learns on from its watermarks
    c = workers(metrics=True, **env)
    wait_for(lambda: stable_with(kafka_bootstrap, group, inputs, 2), 90, "the newcomer to hold partitions", c)
    produce(kafka_bootstrap, prefix, last)
    wait_for(lambda: exactly_once(redis_client, prefix, expected), 120, "every event applied exactly once", a)
    for w in (a, c):
        wait_for(lambda w=w: learned_all(w, len(records)), 120, f"every learner of a worker to learn all {len(records)} events", w)
    assert c.metric("streamrec_peer_events_learned_total") > 0, c.log_tail()
    for w in (a, c):
        assert w.metric("streamrec_peer_failures_total") == 0, w.log_tail()
        assert w.stop(signal.SIGTERM) == 0, w.log_tail()


def test_without_learning_all_partitions_each_worker_learns_its_own(four_partitions, workers, kafka_bootstrap):
    """STREAMREC_LEARN_ALL_PARTITIONS=false: the behaviour before, each worker's models learn the
    partitions it owns, and together the events once."""
    env = dict(four_partitions, STREAMREC_LEARN_ALL_PARTITIONS="false")
    prefix, group = env["STREAMREC_TOPIC_PREFIX"], env["STREAMREC_APP_ID"]
    inputs = [f"{prefix}clicks", f"{prefix}purchases"]
    records, _ = synthetic_records(1200, seed=58, n_users=150)
    a, b = workers(metrics=True, **env), workers(metrics=True, **env)
    wait_for(lambda: stable_with(kafka_bootstrap, group, inputs, 2), 90, "both workers to hold partitions", a)
    produce(kafka_bootstrap, prefix, records)
    wait_for(lambda: sum(learned(w)["recommender"] for w in (a, b)) == len(records), 90,
             f"the two workers' models to learn the {len(records)} events between them", a)
    for w in (a, b):
        assert 0 < learned(w)["recommender"] < len(records), w.log_tail()
        assert w.metric("streamrec_peer_events_learned_total") == 0
