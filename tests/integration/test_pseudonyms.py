"""Pseudonymous user ids through real workers: with STREAMREC_PSEUDONYM_KEY, nothing the
workers keep in Redis (user documents, their keys, the models' snapshot) holds an id the site
sent, whichever way the models learned an event: in the live step, again after a kill -9 (the
replay of what the snapshot missed), or from another worker's partitions (the peer reader).
Each recommendation still goes out keyed by, and naming, the site's id."""

from __future__ import annotations

import signal

import msgspec
import redis
from workerkit import (
    all_committed,
    applied_counts,
    consume_until,
    exactly_once,
    group_assignment,
    produce,
    synthetic_records,
    wait_for,
)

from online_models import Recommender
from stream.pseudonyms import Pseudonyms
from stream.records import Event, decode_recommendation, encode

KEY = "test-pseudonym-key"


def site_records(n: int, seed: int) -> tuple[list[tuple[str, bytes, bytes]], dict[str, int]]:
    """Synthetic events whose user ids are ``site-u<n>`` (bytes no pseudonym or number holds)."""
    records, expected = synthetic_records(n, seed=seed, n_users=40)
    renamed = []
    for topic, key, value in records:
        ev = msgspec.json.decode(value, type=Event)
        renamed.append((topic, b"site-" + key, encode(msgspec.structs.replace(ev, user_id=f"site-{ev.user_id}"))))
    return renamed, {f"site-{u}": n for u, n in expected.items()}


def raw_ids_in_redis(client: redis.Redis, prefix: str, ids: set[str]) -> list[str]:
    """The keys under ``prefix`` whose name or value holds one of ``ids``."""
    found = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        value = client.get(key) if client.type(key) == b"string" else b""
        if any(uid.encode() in key or uid.encode() in (value or b"") for uid in ids):
            found.append(key.decode())
    return found


def snapshot_learned(client: redis.Redis, prefix: str) -> int:
    blob = client.get(f"{prefix}models:snapshot")
    return Recommender.restore(blob).n_learned if blob else -1


def test_redis_holds_no_site_id_and_lists_go_out_under_it(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    records, expected = site_records(1500, seed=11)
    first_part, second_part, third_part = records[:600], records[600:1200], records[1200:]
    p = Pseudonyms(KEY)
    by_pseudonym = {p.of(u): n for u, n in expected.items()}

    group, inputs = f"{topic_prefix}worker", [f"{topic_prefix}clicks", f"{topic_prefix}purchases"]

    def applied() -> int:
        return sum(applied_counts(client, topic_prefix, by_pseudonym).values())

    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    try:
        # 1. a snapshot of the first events (the worker's first, seconds after it learned them),
        # then more events applied and committed, then a kill -9 before the interval's (an hour:
        # at 30 s, a slow machine's start, first snapshot, second part and commit could reach it)
        first = workers(STREAMREC_PSEUDONYM_KEY=KEY, STREAMREC_SNAPSHOT_INTERVAL_S="3600")
        produce(bootstrap, topic_prefix, first_part)
        wait_for(lambda: snapshot_learned(client, topic_prefix) == len(first_part), 60, "a snapshot of the first events", first)
        produce(bootstrap, topic_prefix, second_part)
        wait_for(lambda: applied() == 1200 and all_committed(bootstrap, group, inputs), 60,
                 "the second events applied and committed", first)
        first.stop(signal.SIGKILL)
        assert snapshot_learned(client, topic_prefix) == len(first_part), "the kill should come before a second snapshot"

        # 2. the next worker restores that snapshot and replays what it missed, from the log
        second = workers(metrics=True, STREAMREC_PSEUDONYM_KEY=KEY)
        wait_for(lambda: snapshot_learned(client, topic_prefix) == 1200, 90, "a snapshot after the replay", second)
        assert second.metric("streamrec_events_relearned_total") > 0, second.log_tail()

        # 3. a second worker joins: each learns the other's partitions through its peer reader
        third = workers(STREAMREC_PSEUDONYM_KEY=KEY)
        wait_for(lambda: len(group_assignment(bootstrap, group, inputs) or {}) == 2, 90, "two workers in the group", third)
        produce(bootstrap, topic_prefix, third_part)
        wait_for(lambda: exactly_once(client, topic_prefix, by_pseudonym), 120, "every event applied once, by pseudonym", second)
        wait_for(lambda: snapshot_learned(client, topic_prefix) == len(records), 60, "a snapshot of every event", second)

        assert raw_ids_in_redis(client, topic_prefix, set(expected)) == []
        snapshot = client.get(f"{topic_prefix}models:snapshot")
        assert any(pseudonym.encode() in snapshot for pseudonym in by_pseudonym)
    finally:
        client.close()

    values = consume_until(bootstrap, f"{topic_prefix}recommendations",
                           lambda v: {decode_recommendation(x).user_id for x in v} >= set(expected), 60, second)
    assert {decode_recommendation(v).user_id for v in values} == set(expected)  # never a pseudonym
    for w in (second, third):
        assert w.stop(signal.SIGTERM) == 0, w.log_tail()
