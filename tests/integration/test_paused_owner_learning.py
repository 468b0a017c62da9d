"""A worker paused past its session timeout (SIGSTOP: a long GC pause, a frozen VM) with a batch
in hand loses its partitions to the other worker, which handles their events meanwhile; resumed,
its batch is fenced and the group gives it its partitions back. Its models must still learn every
event of those partitions once: those the other worker handled while it was paused are learned
from Kafka (the replay up to the group's commit) before its first batch of the new assignment,
which would move the models' watermark past them for good.

The paused worker reaches Redis through a proxy that holds its writes (its batch in hand is stuck
saving, as in the chaos soak that found this) and, once it resumes, answers each command 0.4 s
late, its claim at the assignment too: Faust resumes the flow while the assignment callback waits
for that claim, and the first batch of the new assignment came before the replay was due."""

from __future__ import annotations

import re
import signal

import pytest
from kafka.errors import KafkaError
from workerkit import (
    Feeder,
    HoldingProxy,
    exactly_once,
    group_assignment,
    learned_all,
    partitioned_env,
    synthetic_records,
    wait_for,
)

PARTITIONS = 4


@pytest.fixture
def four_partitions_paused(worker_env, topic_prefix) -> dict[str, str]:
    """The test's worker settings on input topics of four partitions, every worker learning all of them."""
    return partitioned_env(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], f"{topic_prefix}paused.", PARTITIONS)



def members(bootstrap: str, group: str, topics: list[str]) -> dict:
    try:
        return group_assignment(bootstrap, group, topics) or {}
    except KafkaError:  # no coordinator yet
        return {}


def one_owns_all(bootstrap: str, group: str, topics: list[str]) -> bool:
    """One member holds every input partition (the paused one was dropped from the group)."""
    assignment = members(bootstrap, group, topics)
    return len(assignment) == 1 and all(len(tps) == PARTITIONS * len(topics) for tps in assignment.values())


def two_hold_some(bootstrap: str, group: str, topics: list[str]) -> bool:
    assignment = members(bootstrap, group, topics)
    return len(assignment) == 2 and all(assignment.values())


def test_a_worker_paused_with_a_batch_in_hand_learns_what_the_other_handled_meanwhile(
        four_partitions_paused, workers, redis_client, kafka_bootstrap, worker_env):
    env = four_partitions_paused
    prefix, group = env["STREAMREC_TOPIC_PREFIX"], env["STREAMREC_APP_ID"]
    inputs = [f"{prefix}clicks", f"{prefix}purchases"]
    host, port = re.match(r"redis://([^:/]+):(\d+)", worker_env["STREAMREC_REDIS_URL"]).groups()
    proxy = HoldingProxy(host, int(port)).start()
    records, expected = synthetic_records(6000, seed=71, n_users=150)
    # the first half flows from before b's pause; the second is sent once a owns every partition,
    # so that a is sent events of b's partitions while b is paused, however long the rebalance
    # takes (one feed of all 6000 at 300/s lasted 20 s: the eviction and the rebalance had some
    # 14 s of it after the pause, and on a slow machine the wait for 900 more found none to come)
    before, meanwhile = records[:3000], records[3000:]
    try:
        a = workers(metrics=True, **env)
        b = workers(metrics=True, **env, STREAMREC_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
        wait_for(lambda: two_hold_some(kafka_bootstrap, group, inputs), 90, "both workers to hold partitions", a)
        feeder = Feeder(kafka_bootstrap, prefix, before, rate=300)
        later = Feeder(kafka_bootstrap, prefix, meanwhile, rate=300)
        feeder.start()
        try:
            wait_for(lambda: feeder.sent > 600, 60, "events flowing", a)
            proxy.hold()  # b's next state write (its batch in hand) is held back
            wait_for(lambda: proxy.held_writes > 0, 30, "b to be stuck writing to Redis", b)
            b.proc.send_signal(signal.SIGSTOP)  # and paused long enough to lose its partitions
            try:
                wait_for(lambda: one_owns_all(kafka_bootstrap, group, inputs), 60, "a to own every partition", a)
                later.start()
                wait_for(lambda: later.sent > 900, 60, "a to be sent events of every partition", a)
                proxy.latency_s = 0.4  # the assignment's claim answered late
                proxy.release()
            finally:
                b.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: two_hold_some(kafka_bootstrap, group, inputs), 90, "b to hold partitions again", b)
            wait_for(lambda: "fenced:" in b.log_text(), 60, "b's batch in hand to be refused", b)
            proxy.latency_s = 0.0
            feeder.finish()
            later.finish()
        finally:
            for f in (feeder, later):
                if f.is_alive():
                    f.stop()
        wait_for(lambda: exactly_once(redis_client, prefix, expected), 120, "every event applied exactly once", a)
        for w in (a, b):
            wait_for(lambda w=w: learned_all(w, len(records)), 120,
                     f"every learner of a worker to learn all {len(records)} events", w)
        a.assert_alive()
        b.assert_alive()
    finally:
        proxy.close()
