"""Records keyed by something other than their user_id, through a running worker: applied like
any other, counted by topic in /metrics and warned of in the log; records with no key, or keyed
by their user, are not counted."""

from __future__ import annotations

import json
import time

import redis
from workerkit import applied_counts, produce, wait_for

USERS = ["kw0", "kw1", "kw2"]


def _click(user: str, eid: str, now: int) -> bytes:
    return json.dumps({"event_id": eid, "type": "click", "user_id": user, "item_id": "i1", "ts": now}).encode()


def test_records_keyed_by_a_session_are_applied_counted_and_warned_of(worker_env, workers, topic_prefix):
    bootstrap, url = worker_env["STREAMREC_KAFKA_BOOTSTRAP"], worker_env["STREAMREC_REDIS_URL"]
    now = time.time_ns() // 1_000_000
    records = []
    for n in range(3):
        records += [("clicks", b"kw0", _click("kw0", f"a{n}", now)),  # keyed by the user
                    ("clicks", f"session-{n}".encode(), _click("kw1", f"b{n}", now)),  # keyed by a session
                    ("clicks", None, _click("kw2", f"c{n}", now))]  # no key
    produce(bootstrap, topic_prefix, records)
    worker = workers(metrics=True)
    client = redis.Redis.from_url(url)
    wait_for(lambda: applied_counts(client, topic_prefix, USERS) == {u: 3 for u in USERS}, 240,
             "every click to be applied", worker)
    counted = wait_for(lambda: worker.metric("streamrec_events_not_keyed_by_user_total",
                                             topic=f"{topic_prefix}clicks") or None, 30, "the count", worker)
    assert counted == 3
    assert "keyed by something other than their user_id" in worker.log_text()
    assert "session-" not in worker.log_text()
