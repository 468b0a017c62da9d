"""Forgetting a user who shared a session id with another user, through a real worker, Kafka
and Redis: the models kept both users' items as one session, which the session -> user link
tied to its latest sender only, so forgetting the earlier user left their items in it (in the
models and the snapshot in Redis). Now the session goes whole (docs/operations.md, "What the
models purge, and what stays")."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import redis
from workerkit import ROOT, produce, user_doc, wait_for

from online_models import Recommender
from stream.records import ClickEvent, encode


def test_forgetting_one_of_two_users_of_a_session_id_drops_the_session(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    snapshot_key = f"{topic_prefix}models:snapshot"
    shared, own = f"kiosk-{topic_prefix}", f"own-{topic_prefix}"
    alice = [f"alice-item-{n}" for n in range(3)]
    ts = int(time.time() * 1000) - 60_000
    try:
        worker = workers(metrics=True, STREAMREC_SNAPSHOT_INTERVAL_S="600", STREAMREC_CATALOGUE="false")
        # alice's events learned first, then bob's in the same session id (on another partition,
        # maybe: so each waits for the one before), then carol's in a session of her own
        for n, (user, items, session) in enumerate((("alice", alice, shared), ("bob", ["bob-item-0", "bob-item-1"], shared),
                                                    ("carol", ["carol-item-0", "carol-item-1"], own))):
            clicks = [ClickEvent(event_id=f"{user}-{k}", user_id=user, item_id=item, ts=ts + 10 * n + k, session_id=session)
                      for k, item in enumerate(items)]
            produce(bootstrap, topic_prefix, [("clicks", user.encode(), encode(ev)) for ev in clicks])
            wait_for(lambda user=user, clicks=clicks: (user_doc(client, topic_prefix, user) or {}).get("clicks") == len(clicks),
                     120, f"{user}'s events applied", worker)

        sent = subprocess.run([sys.executable, "-m", "stream.cli", "forget", "alice"], cwd=ROOT, env=worker_env,
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        models = wait_for(lambda: (data := client.get(snapshot_key)) and (
            restored := Recommender.restore(data)).forgotten_users == 1 and restored, 60,
            "a snapshot taken after the erasure", worker)

        assert user_doc(client, topic_prefix, "alice") is None
        held = {key: list(items) for key, items in models.learners["covisit"]._sessions.items()}
        assert not [key for key, items in held.items() if set(items) & set(alice)], \
            f"the forgotten user's items are still in a session of the models' snapshot: {held}"
        assert shared not in models._session_users and shared.encode() not in client.get(snapshot_key)
        assert own in models._session_users and own in held  # nobody else's session goes
        assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
    finally:
        client.close()
