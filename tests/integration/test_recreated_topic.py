"""A topic deleted and created again (to change its partitions or its retention, or to start a
shop's stream over) begins again at offset 0, while the users' states in Redis and the models'
snapshot still hold the offsets of the topic before. Those positions name records that no
longer exist: the events of the new topic must be applied and learned, not passed over as
redeliveries of the old ones."""

from __future__ import annotations

import signal
import time

import pytest
import redis
from workerkit import WorkerProcess, free_port, produce, read_all, user_doc, wait_for

from online_models import Recommender
from stream.records import ClickEvent, decode_recommendation, encode
from stream.topics import ensure_topics


@pytest.fixture
def redis_bytes(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _snapshot_learned(client: redis.Redis, prefix: str) -> int:
    blob = client.get(f"{prefix}models:snapshot")
    return Recommender.restore(blob).n_learned if blob else 0


def _recreate(kafka_admin, bootstrap: str, topic: str) -> None:
    kafka_admin.delete_topics([topic])
    wait_for(lambda: topic not in set(kafka_admin.list_topics()), 60, f"{topic} deleted")
    deadline = time.monotonic() + 60
    while True:  # the broker may refuse the name for a moment while the deletion completes
        try:
            ensure_topics(bootstrap, [topic], 1)
            return
        except Exception:  # noqa: BLE001 - retried until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.parametrize("while_running", [False, True], ids=["worker-stopped", "worker-running"])
def test_a_recreated_topic_is_applied_and_learned_though_the_old_offsets_were_higher(
        worker_env, topic_prefix, redis_client, redis_bytes, kafka_admin, tmp_path, while_running):
    prefix = f"{topic_prefix}re."
    env = dict(worker_env, STREAMREC_PARTITIONS="1", STREAMREC_SNAPSHOT_INTERVAL_S="1",
               STREAMREC_TOPIC_PREFIX=prefix, STREAMREC_APP_ID=f"{prefix}worker")
    if while_running:  # Faust's consumer sees the new topic at its next metadata refresh (every 5 minutes by default)
        env["CONSUMER_METADATA_MAX_AGE_MS"] = "2000"
    bootstrap = env["STREAMREC_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap, [f"{prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], 1)
    base = time.time_ns() // 1_000_000 - 1_000_000

    def clicks(ids: range, tag: str) -> list[ClickEvent]:
        return [ClickEvent(event_id=f"{tag}{i}", user_id="u1" if i % 2 else "u2", item_id=f"i{i % 7}", ts=base + i)
                for i in ids]

    def applied(n: int) -> bool:
        return all((user_doc(redis_client, prefix, u) or {}).get("clicks") == n for u in ("u1", "u2"))

    worker = WorkerProcess(env, tmp_path / "worker-0.log", free_port()).start()
    try:
        produce(bootstrap, prefix, [("clicks", ev.user_id.encode(), encode(ev)) for ev in clicks(range(40), "a")])
        wait_for(lambda: applied(20), 90, "the first 40 applied", worker)
        wait_for(lambda: _snapshot_learned(redis_bytes, prefix) == 40, 60, "a snapshot that learned them", worker)
        if not while_running:
            assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
        _recreate(kafka_admin, bootstrap, f"{prefix}clicks")
        # offsets 0-59 of the new topic (with the worker stopped, all there before it starts: a
        # backlog): the first 39 at or below the offsets the states and the models hold
        produce(bootstrap, prefix, [("clicks", ev.user_id.encode(), encode(ev)) for ev in clicks(range(40, 100), "b")])
        if not while_running:
            worker = WorkerProcess(env, tmp_path / "worker-1.log", free_port()).start()
        wait_for(lambda: applied(50), 120, "the new topic's 60 events applied", worker)
        wait_for(lambda: _snapshot_learned(redis_bytes, prefix) == 100, 60, "a snapshot that learned them too", worker)
        triggers = {decode_recommendation(r.value).trigger_event_id for r in read_all(bootstrap, f"{prefix}recommendations")}
        assert {"b98", "b99"} <= triggers, sorted(triggers)
        assert "deleted and created again" in worker.log_text(), worker.log_tail()
        assert worker.metric("streamrec_state_offsets_reset_total") >= 2, worker.log_tail()  # u1 and u2
    finally:
        assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
