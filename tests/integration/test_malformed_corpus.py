"""More than a thousand malformed values, between valid events of the same users, through a
running worker: every bad value reaches the dead-letter topic with the code it deserves, every
valid event is applied exactly once, the agent never restarts, and the committed offsets reach
the end of every partition."""

from __future__ import annotations

import random
import signal
import time
from collections import defaultdict

import redis
from malformed import corpus
from workerkit import applied_counts, produce, read_all, user_doc, wait_all_committed, wait_for

from stream.records import (
    ClickEvent,
    PurchaseEvent,
    decode_dead_letter,
    decode_recommendation,
    encode,
)
from stream.state import FINGERPRINT_CHARS, fingerprint

N_USERS = 15
VALID_PER_USER = 8


def test_a_thousand_malformed_values_between_valid_events(worker_env, workers, topic_prefix):
    bootstrap, url = worker_env["STREAMREC_KAFKA_BOOTSTRAP"], worker_env["STREAMREC_REDIS_URL"]
    now = time.time_ns() // 1_000_000
    users = [f"user{i}" for i in range(N_USERS)]
    rng = random.Random(5)
    bad = corpus(users, now, n_generated=1000, seed=5)
    assert len(bad) >= 1000
    valid: dict[str, list] = defaultdict(list)
    for u in users:
        for j in range(VALID_PER_USER):
            cls, topic = (PurchaseEvent, "purchases") if j % 4 == 3 else (ClickEvent, "clicks")
            ev = cls(event_id=f"ok-{u}-{j}", user_id=u, item_id=f"i{(j * 7 + len(u)) % 30}", ts=now + j)
            valid[u].append((topic, u.encode(), encode(ev)))
    # each user's valid events in order, the bad values shuffled in between
    records = [("bad", i) for i in range(len(bad))] + [("ok", u) for u in users for _ in range(VALID_PER_USER)]
    rng.shuffle(records)
    taken = defaultdict(int)
    items, kinds = [], []
    for kind, ref in records:
        if kind == "bad":
            b = bad[ref]
            items.append((b.topic, b.key, b.value))
            kinds.append(b)
        else:
            items.append(valid[ref][taken[ref]])
            taken[ref] += 1
            kinds.append(None)
    positions = produce(bootstrap, topic_prefix, items)
    expected = {pos: b for pos, b in zip(positions, kinds, strict=True) if b is not None}

    worker = workers()
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: applied_counts(client, topic_prefix, users) == {u: VALID_PER_USER for u in users}, 240,
                 "every valid event to be applied", worker)
        dlq = f"{topic_prefix}dlq"
        letters = wait_for(lambda: (found := read_all(bootstrap, dlq)) and len(found) >= len(expected) and found,
                           120, f"{len(expected)} dead letters", worker)
        # every bad value is in the DLQ, once, with the code it deserves; nothing else is
        got = {}
        for record in letters:
            letter = decode_dead_letter(record.value)
            got.setdefault((letter.topic, letter.partition, letter.offset), []).append(letter)
        missing = [(pos, b.what) for pos, b in expected.items() if pos not in got]
        assert not missing, missing[:10]
        wrong = [(b.what, b.code, got[pos][0].code, got[pos][0].reason) for pos, b in expected.items()
                 if got[pos][0].code != b.code]
        assert not wrong, wrong[:10]
        assert set(got) == set(expected) and all(len(v) == 1 for v in got.values())
        assert all(letter.reason for v in got.values() for letter in v)
        # every valid event applied exactly once (clicks and purchases are two topics: their
        # relative order is not kept, each topic's is)
        for u in users:
            seen = user_doc(client, topic_prefix, u)["seen"]  # the applied events' ids, fingerprinted
            named = {fingerprint(f"ok-{u}-{j}"): f"ok-{u}-{j}" for j in range(VALID_PER_USER)}
            ids = [named.get(seen[i:i + FINGERPRINT_CHARS], "?-0") for i in range(0, len(seen), FINGERPRINT_CHARS)]
            assert sorted(ids) == sorted(f"ok-{u}-{j}" for j in range(VALID_PER_USER)), u
            clicks_seen = [i for i in ids if int(i.rsplit("-", 1)[1]) % 4 != 3]
            assert clicks_seen == sorted(clicks_seen, key=lambda i: int(i.rsplit("-", 1)[1])), u
        # the agent never restarted, and the committed offsets reach the end of every partition
        assert worker.agent_restarts() == []
        wait_all_committed(bootstrap, worker_env["STREAMREC_APP_ID"], [f"{topic_prefix}clicks", f"{topic_prefix}purchases"],
                           60, "the committed offsets to reach the end of every partition", worker)
        recs = [decode_recommendation(r.value) for r in read_all(bootstrap, f"{topic_prefix}recommendations")]
        assert {r.user_id for r in recs} == set(users)
    finally:
        client.close()
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
    assert "Traceback" not in worker.log_text(), worker.log_tail(80)
