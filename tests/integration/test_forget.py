"""Forgetting a user through real workers, Kafka and Redis (issue 16, part 4).

`streamrec forget ID` sends a ForgetRequest; afterwards no Redis key or value (user documents,
the models' snapshot) holds the user's id or session ids, the recommendations topic carries a
tombstone for them (`streamrec tail --user` shows it), an older event of theirs sent again is
refused, their next event starts a fresh state, and every worker's models purged them. The
replay after a restart (stream/replay.py) refuses their older events too."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import msgspec
import redis
from kafka.errors import KafkaError
from workerkit import (
    ROOT,
    exactly_once,
    group_assignment,
    produce,
    read_all,
    synthetic_records,
    user_doc,
    wait_for,
)

from online_models import Recommender
from stream.pipeline import RecommendationStep
from stream.records import DEFAULT_BOUNDS, ClickEvent, Event, ForgetRequest, encode
from stream.replay import Gap, replay
from stream.topics import ensure_topics

VICTIM = "victim-7f3a0c"
VICTIM_SESSION = "vsess-91b2"


def records_with_victim(n: int, seed: int) -> tuple[list[tuple[str, bytes, bytes]], dict[str, int]]:
    """Synthetic events, one user's renamed to :data:`VICTIM` with sessions named after
    :data:`VICTIM_SESSION` (bytes that nothing else holds)."""
    records, expected = synthetic_records(n, seed=seed, n_users=30)
    target = max(expected, key=expected.get)
    out = []
    for topic, key, value in records:
        ev = msgspec.json.decode(value, type=Event)
        if ev.user_id == target:
            ev = msgspec.structs.replace(ev, user_id=VICTIM, session_id=f"{VICTIM_SESSION}-{ev.session_id}")
            key = VICTIM.encode()
        out.append((topic, key, encode(ev)))
    expected[VICTIM] = expected.pop(target)
    return out, expected


def members(bootstrap: str, group: str, topics: list[str]) -> int:
    """Workers holding partitions of ``topics`` in ``group`` (0 while the broker cannot say yet)."""
    try:
        return len(group_assignment(bootstrap, group, topics) or {})
    except KafkaError:  # no group coordinator yet on a broker that just started
        return 0


def keys_holding(client: redis.Redis, prefix: str, needles: list[bytes]) -> list[str]:
    """The keys under ``prefix`` whose name or value holds one of ``needles``."""
    found = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        value = client.get(key) if client.type(key) == b"string" else b""
        if any(n in key or n in (value or b"") for n in needles):
            found.append(key.decode())
    return found


def streamrec(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_forget_erases_state_models_and_lists_and_refuses_old_events(worker_env, workers, topic_prefix):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    records, expected = records_with_victim(1200, seed=23)
    needles = [VICTIM.encode(), VICTIM_SESSION.encode()]
    group, inputs = f"{topic_prefix}worker", [f"{topic_prefix}clicks", f"{topic_prefix}purchases"]
    client = redis.Redis.from_url(worker_env["STREAMREC_REDIS_URL"])
    snapshot_key = f"{topic_prefix}models:snapshot"
    try:
        # two workers, each learning the other's partitions too; snapshots only every 10 minutes
        # (after each one's first, seconds after it first learned, which holds the user), so a
        # snapshot without the user can only come from the erasure itself
        env = {"STREAMREC_SNAPSHOT_INTERVAL_S": "600"}
        first = workers(metrics=True, **env)
        second = workers(metrics=True, **env)
        wait_for(lambda: members(bootstrap, group, inputs) == 2, 90, "two workers in the group", first)
        produce(bootstrap, topic_prefix, records)
        wait_for(lambda: exactly_once(client, topic_prefix, expected), 120, "every event applied once", first)
        wait_for(lambda: first.metric("streamrec_peer_events_learned_total") + second.metric(
            "streamrec_peer_events_learned_total") >= len(records) - 1, 60, "each worker learned the other's events", first)
        assert keys_holding(client, topic_prefix, [VICTIM.encode()]), "the user's state should be in Redis before"

        sent = streamrec(worker_env, "forget", VICTIM)
        assert sent.returncode == 0, sent.stderr
        request_id = sent.stdout.split()[0]
        assert request_id.startswith("forget-") and VICTIM in sent.stdout

        # the owner erased state and lists; both workers' models purged the user
        owners = wait_for(lambda: [w for w in (first, second) if w.metric("streamrec_users_forgotten_total") == 1],
                          60, "the owner's erasure", first)
        assert len(owners) == 1
        wait_for(lambda: all(w.metric("streamrec_forgets_applied_total") == 1 for w in (first, second)), 60,
                 "every worker's models purged the user", first)
        wait_for(lambda: client.get(snapshot_key) and not keys_holding(client, topic_prefix, needles), 60,
                 "no Redis key, value or snapshot holding the user (the snapshot is taken after an erasure)", first)
        assert Recommender.restore(client.get(snapshot_key)).forgotten_users == 1
        for w in (first, second):  # the log names the request, never the user
            assert VICTIM not in w.log_text()
        assert any(request_id in w.log_text() for w in (first, second))

        # the recommendations topic: a tombstone for the user, and tail shows it
        tombstones = [r for r in read_all(bootstrap, f"{topic_prefix}recommendations") if r.value is None]
        assert [r.key for r in tombstones] == [VICTIM.encode()]
        shown = streamrec(worker_env, "tail", "--user", VICTIM, "--from-beginning", "--timeout", "10")
        assert shown.stdout.strip().splitlines()[-1].startswith(f"{VICTIM}  (tombstone"), shown.stdout + shown.stderr

        # a re-read of the topics: the user's older events sent again are refused
        old = [r for r in records if r[1] == VICTIM.encode()]
        produce(bootstrap, topic_prefix, old)
        wait_for(lambda: sum(w.metric("streamrec_events_refused_forgotten_total") for w in (first, second)) >= len(old),
                 60, "the older events refused", first)
        assert user_doc(client, topic_prefix, VICTIM) is None

        # ...and so is an older search of theirs: neither answered (no list after the tombstone)
        # nor remembered (no state with the query)
        refused = sum(w.metric("streamrec_events_refused_forgotten_total") for w in (first, second))
        search = {"event_id": "old-search-1", "type": "search", "user_id": VICTIM, "query": "winter jacket",
                  "ts": max(msgspec.json.decode(value, type=Event).ts for _, _, value in old), "results": ["i1", "i2"]}
        produce(bootstrap, topic_prefix, [("searches", VICTIM.encode(), msgspec.json.encode(search))])
        wait_for(lambda: sum(w.metric("streamrec_events_refused_forgotten_total") for w in (first, second)) > refused,
                 60, "the older search refused", first)
        assert user_doc(client, topic_prefix, VICTIM) is None
        theirs = [r for r in read_all(bootstrap, f"{topic_prefix}recommendations") if r.key == VICTIM.encode()]
        assert theirs[-1].value is None, "a list published for the forgotten user after their tombstone"

        # the user's next event starts afresh
        now = int(time.time() * 1000) + 1000
        fresh = ClickEvent(event_id="after-forget-1", user_id=VICTIM, item_id="i-new", ts=now)
        produce(bootstrap, topic_prefix, [("clicks", VICTIM.encode(), encode(fresh))])
        doc = wait_for(lambda: user_doc(client, topic_prefix, VICTIM), 60, "the user's fresh state", first)
        assert (doc["clicks"], doc["purchases"], doc["recent_items"]) == (1, 0, ["i-new"])
        for w in (first, second):
            assert w.stop(signal.SIGTERM) == 0, w.log_tail()
    finally:
        client.close()


def test_a_replay_after_a_restart_does_not_teach_a_forgotten_user_again(kafka_bootstrap, topic_prefix):
    """The restored models replay the log between their snapshot and the committed offsets
    (stream/replay.py): a forget request in that stretch is applied, and the user's older
    events in it, whether before or after the request in the log, are not learned."""
    topic, forget_topic = f"{topic_prefix}clicks", f"{topic_prefix}forget"
    ensure_topics(kafka_bootstrap, [topic, forget_topic], 1)
    records, expected = records_with_victim(400, seed=5)
    clicks = [(t, k, v) for t, k, v in records if t == "clicks"]
    half = len(clicks) // 2
    request = ForgetRequest(user_id=VICTIM, request_id="r-replay", ts=max(
        msgspec.json.decode(v, type=Event).ts for _, _, v in clicks) + 1)
    produce(kafka_bootstrap, topic_prefix, clicks[:half])
    produce(kafka_bootstrap, topic_prefix, [("forget", VICTIM.encode(), encode(request))])
    produce(kafka_bootstrap, topic_prefix, clicks[half:])  # older than the request, though later in the log

    step = RecommendationStep(Recommender.default())
    gaps = [Gap(topic, 0, 0, len(clicks)), Gap(forget_topic, 0, 0, 1)]
    learned = asyncio.run(replay(step, kafka_bootstrap, gaps, DEFAULT_BOUNDS, forget_topic=forget_topic))
    victim_clicks = sum(1 for _, k, _ in clicks if k == VICTIM.encode())
    assert victim_clicks > 0
    # the user's clicks fetched before the request are learned, then purged with it
    assert len(clicks) - victim_clicks <= learned <= len(clicks)
    assert step.recommender.learned_offsets == {f"{topic}:0": len(clicks) - 1, f"{forget_topic}:0": 0}
    snapshot = step.recommender.snapshot()
    assert VICTIM.encode() not in snapshot and VICTIM_SESSION.encode() not in snapshot
    assert any(u.encode() in snapshot for u in expected if u != VICTIM)
    assert step.recommender.refuses(VICTIM, request.ts) and not step.recommender.refuses(VICTIM, request.ts + 1)
