"""Faults, against the real servers: Redis or the broker gone for 20 s mid-stream, a dead-letter
topic that refuses writes, a registry that holds only a corrupt model, a user document that
does not decode. Each time the worker stays alive, says unready while it cannot make progress,
and in the end every event is applied exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import redis
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from workerkit import (
    Feeder,
    applied_counts,
    committed_and_end,
    exactly_once,
    produce,
    read_all,
    synthetic_records,
    user_doc,
    wait_all_committed,
    wait_for,
)

from stream.kafka_sockets import KafkaNetSocket, closing_on_failure
from stream.records import ClickEvent, decode_dead_letter, decode_recommendation, encode
from stream.topics import ensure_topics

OUTAGE_S = 20


@pytest.fixture
def refused_sockets_closed(monkeypatch):
    """kafka-python 3.0 leaves the socket of each connection attempt that the broker refuses to
    the garbage collector (stream/kafka_sockets.py): a test's producer makes one a second while
    the broker is stopped, and the collector reported them as ResourceWarnings, in whichever
    test it ran during. Here each is closed as its attempt fails, as retrain and tail do."""
    if KafkaNetSocket is not None:
        monkeypatch.setattr(KafkaNetSocket, "sock_connect", closing_on_failure(KafkaNetSocket.sock_connect))


def _ready(worker) -> bool:
    return worker.http("/readyz")[0] == 200


def _unready(worker) -> str | None:
    status, body = worker.http("/readyz")
    return body if status == 503 else None


def _through_an_outage(worker, service, feeder: Feeder, client, prefix: str, expected: dict[str, int],
                       failing: tuple[str, ...], what: str) -> None:
    """Events flowing, then ``service`` stopped for OUTAGE_S: the worker stays alive, says unready
    within 10 s (one of the ``failing`` conditions) and stays so; then the service comes back, and
    in the end every event is applied exactly once and the worker is ready again."""
    feeder.start()
    try:
        wait_for(lambda: sum(applied_counts(client, prefix, expected).values()) > 300, 60, "events to flow", worker)
        service.halt()
        stopped = time.monotonic()
        body = wait_for(lambda: _unready(worker), 10, f"/readyz to answer 503 within 10 s of {what} going", worker)
        assert any(f"{condition}: FAIL" in body for condition in failing), body
        # the outage lasts OUTAGE_S (the scenario itself, not a stand-in for a condition): sample the
        # worker each second throughout, it must stay alive and unready
        while time.monotonic() - stopped < OUTAGE_S:
            worker.assert_alive()
            assert _unready(worker), f"ready while {what} is gone"
            time.sleep(1)
        service.start()
        feeder.finish()
    finally:
        feeder.stop()  # its producer closed, should the test have failed half-way (else done already)
    wait_for(lambda: exactly_once(client, prefix, expected), 240, "every event applied exactly once", worker)
    wait_for(lambda: _ready(worker), 60, "the worker to be ready again", worker)
    assert worker.agent_restarts() == []


def test_redis_gone_for_20_s_mid_stream(worker_env, workers, topic_prefix, private_redis):
    records, expected = synthetic_records(3000, seed=21)
    worker = workers(metrics=True, STREAMREC_REDIS_URL=private_redis.address)
    wait_for(lambda: _ready(worker), 90, "the worker to be ready", worker)
    feeder = Feeder(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, records, rate=100)
    client = redis.Redis.from_url(private_redis.address)
    try:
        _through_an_outage(worker, private_redis, feeder, client, topic_prefix, expected, ("redis", "state"), "Redis")
        assert worker.metric("streamrec_redis_errors_total", op="load") + worker.metric("streamrec_redis_errors_total", op="save") > 0
    finally:
        client.close()
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def _ready_worker_and_feeder(workers, topic_prefix, private_kafka, n_events: int, seed: int, rate: float):
    """A ready worker on ``private_kafka`` (its topics made with 2 partitions), a feeder of
    ``n_events`` synthetic events at ``rate`` (not started), and what they should apply."""
    bootstrap = private_kafka.address
    ensure_topics(bootstrap, [f"{topic_prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], 2)
    records, expected = synthetic_records(n_events, seed=seed)
    worker = workers(metrics=True, STREAMREC_KAFKA_BOOTSTRAP=bootstrap)
    wait_for(lambda: _ready(worker), 90, "the worker to be ready", worker)
    return worker, Feeder(bootstrap, topic_prefix, records, rate=rate), expected


def test_the_broker_gone_for_20_s_mid_stream(worker_env, workers, topic_prefix, private_kafka, redis_client,
                                             refused_sockets_closed):
    worker, feeder, expected = _ready_worker_and_feeder(workers, topic_prefix, private_kafka, 3000, 22, 100)
    _through_an_outage(worker, private_kafka, feeder, redis_client, topic_prefix, expected, ("kafka",), "the broker")
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_sigterm_with_the_broker_away_stops_within_kubernetes_grace(worker_env, workers, topic_prefix, private_kafka):
    """The consumer thread's aiokafka consumer never finishes leaving a group whose broker is
    away: mode waited 60 s for it, and the worker took 62 s to stop, past Kubernetes' default
    grace of 60 s (deploy/k8s/worker.yaml), which then kills it."""
    worker = workers(metrics=True, STREAMREC_KAFKA_BOOTSTRAP=private_kafka.address)
    wait_for(lambda: _ready(worker), 90, "the worker to be ready", worker)
    private_kafka.halt()
    wait_for(lambda: _unready(worker), 10, "/readyz to answer 503 with the broker gone", worker)
    asked = time.monotonic()
    assert worker.stop(signal.SIGTERM, timeout=45) == 0, worker.log_tail()
    assert time.monotonic() - asked < 30, worker.log_tail()
    assert "Error while stopping child" not in worker.log_text(), worker.log_tail()
    # aiokafka's close awaited the fetch it cancelled, retrying the absent broker: the consumer
    # thread died on its CancelledError, a traceback logged line by line, and was waited for 10 s
    assert "Exception in thread" not in worker.log_text() and "CancelledError" not in worker.log_text(), \
        worker.log_tail()
    assert "the consumer thread did not stop within" not in worker.log_text(), worker.log_tail()


#: deploy/k8s/worker.yaml's terminationGracePeriodSeconds: Kubernetes kills a pod still running then
KUBERNETES_GRACE_S = 60


@pytest.mark.parametrize("away", ["stopped", "paused"])
def test_sigterm_with_the_broker_away_while_events_flow_stops_within_kubernetes_grace(
        worker_env, workers, topic_prefix, private_kafka, redis_client, refused_sockets_closed, away):
    """With events flowing, the worker holds acknowledged offsets it has not committed yet, and
    Faust's final commit at its stop (``Consumer.on_stop``) waited for a group coordinator for
    ever: the worker ran on until the broker came back (150 s and more), where Kubernetes kills
    it. Now the final commit is given up too, and said so; nothing is lost: the next worker
    applies every event exactly once. The broker stopped (connections refused), or paused
    (SIGSTOP: nothing answered, the batch in hand waits for it the drain's 30 s)."""
    worker, feeder, expected = _ready_worker_and_feeder(workers, topic_prefix, private_kafka, 8000, 24, 400)
    feeder.start()
    try:
        wait_for(lambda: sum(applied_counts(redis_client, topic_prefix, expected).values()) > 500, 60, "events to flow",
                 worker)
        private_kafka.halt() if away == "stopped" else private_kafka.pause()
        wait_for(lambda: _unready(worker), 30, f"/readyz to answer 503 with the broker {away}", worker)
        asked = time.monotonic()
        assert worker.stop(signal.SIGTERM, timeout=KUBERNETES_GRACE_S + 30) == 0, worker.log_tail()
        took = time.monotonic() - asked
        assert took < KUBERNETES_GRACE_S - 5, f"stopped in {took:.0f} s:\n{worker.log_tail()}"
        assert "the final commit is skipped" in worker.log_text(), worker.log_tail()
        # a stop that loses nothing is not logged as an ERROR with tracebacks
        assert "Error while stopping child" not in worker.log_text(), worker.log_tail()
        private_kafka.start() if away == "stopped" else private_kafka.resume()
        feeder.finish()
    finally:
        feeder.stop()  # its producer closed, should the test have failed half-way (else done already)
    again = workers(metrics=True, STREAMREC_KAFKA_BOOTSTRAP=private_kafka.address)
    wait_for(lambda: exactly_once(redis_client, topic_prefix, expected), 240, "every event applied exactly once", again)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_second_stop_signal_exits_at_once_while_the_batch_in_hand_waits_for_redis(worker_env, workers, topic_prefix,
                                                                                    private_redis, sig):
    """Ctrl-C or SIGTERM finishes the batch in hand first; with Redis not answering that took the
    drain's 30 s, and a second signal did nothing (once a second Ctrl-C exited, a second SIGTERM,
    a supervisor's or an operator's, still did nothing). Now either exits at once (130, 143), and
    nothing is lost: the next worker applies every event exactly once."""
    records, expected = synthetic_records(1500, seed=23)
    worker = workers(metrics=True, STREAMREC_REDIS_URL=private_redis.address)
    wait_for(lambda: _ready(worker), 90, "the worker to be ready", worker)
    feeder = Feeder(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, records, rate=100)
    client = redis.Redis.from_url(private_redis.address)
    feeder.start()
    try:
        wait_for(lambda: sum(applied_counts(client, topic_prefix, expected).values()) > 100, 60, "events to flow", worker)
        private_redis.halt()
        wait_for(lambda: _unready(worker), 10, "/readyz to answer 503 with Redis gone", worker)
        worker.proc.send_signal(sig)
        wait_for(lambda: "finishing the batch in hand" in worker.log_text(), 10, f"the first {sig.name} to be taken", worker)
        asked = time.monotonic()
        worker.proc.send_signal(sig)
        try:
            status = worker.proc.wait(10)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the second {sig.name} did not stop the worker:\n{worker.log_tail()}") from None
        assert status == 128 + sig, worker.log_tail()
        assert time.monotonic() - asked < 5, worker.log_tail()
        said = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}[sig]
        assert f"{said} again: exiting now; the batch in hand is not committed" in worker.log_text()
        private_redis.start()
        feeder.finish()
        again = workers(metrics=True, STREAMREC_REDIS_URL=private_redis.address)
        wait_for(lambda: exactly_once(client, topic_prefix, expected), 240, "every event applied exactly once", again)
    finally:
        feeder.stop()  # its producer closed, should the test have failed half-way (else done already)
        client.close()


def _set_topic_config(bootstrap: str, topic: str, **config: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="streamrec-tests")
    try:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=config)])
    finally:
        admin.close()


def test_a_dead_letter_topic_that_refuses_writes_holds_the_stream_until_it_takes_them(worker_env, workers, topic_prefix,
                                                                                      redis_client):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    dlq = f"{topic_prefix}dlq"
    worker = workers(metrics=True)
    wait_for(lambda: _ready(worker), 90, "the worker to be ready", worker)
    _set_topic_config(bootstrap, dlq, **{"max.message.bytes": "200"})  # no dead letter fits
    now = time.time_ns() // 1_000_000
    before = [ClickEvent(event_id=f"a{i}", user_id="solo", item_id=f"i{i}", ts=now + i) for i in range(5)]
    after = [ClickEvent(event_id=f"b{i}", user_id="solo", item_id=f"j{i}", ts=now + 10 + i) for i in range(5)]
    positions = produce(bootstrap, topic_prefix, [("clicks", b"solo", encode(e)) for e in before])
    wait_for(lambda: (d := user_doc(redis_client, topic_prefix, "solo")) and d["clicks"] == 5, 60, "the first events", worker)
    (bad_at,) = produce(bootstrap, topic_prefix, [("clicks", b"solo", b'{"event_id": "x", "type": "cli')])
    produce(bootstrap, topic_prefix, [("clicks", b"solo", encode(e)) for e in after])
    body = wait_for(lambda: _unready(worker), 30, "/readyz to say why it is stuck", worker)
    assert "output: FAIL" in body and dlq in body, body
    wait_for(lambda: worker.metric("streamrec_output_blocked") == 1, 15, "streamrec_output_blocked to be 1", worker)
    # retried for a while (back-off 50 ms, 100, 200, ...: over several 1 s commit intervals), and
    # nothing after the dead letter was committed meanwhile
    wait_for(lambda: worker.metric("streamrec_kafka_errors_total", op="publish") >= 6, 30, "publishing to be retried", worker)
    committed, _ = committed_and_end(bootstrap, worker_env["STREAMREC_APP_ID"], [f"{topic_prefix}clicks"])
    topic, partition, offset = bad_at
    assert committed.get((topic, partition), 0) <= offset, (committed, bad_at)
    assert user_doc(redis_client, topic_prefix, "solo")["clicks"] == 5  # its batch holds the rest back
    assert positions[-1][2] < offset
    _set_topic_config(bootstrap, dlq, **{"max.message.bytes": "1048588"})
    wait_for(lambda: (d := user_doc(redis_client, topic_prefix, "solo")) and d["clicks"] == 10, 60,
             "the rest once the dead letter is written", worker)
    letters = [decode_dead_letter(r.value) for r in read_all(bootstrap, dlq)]
    assert [(d.code, d.offset) for d in letters] == [("malformed_json", offset)]
    wait_for(lambda: _ready(worker), 30, "the worker to be ready again", worker)
    wait_for(lambda: worker.metric("streamrec_output_blocked") == 0, 15, "streamrec_output_blocked back to 0", worker)
    wait_all_committed(bootstrap, worker_env["STREAMREC_APP_ID"], [f"{topic_prefix}clicks"], 30,
                       "everything committed", worker)
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_a_registry_with_only_a_corrupt_model_ranks_with_the_online_models(worker_env, workers, topic_prefix, tmp_path):
    models = tmp_path / "corrupt-models"
    version = models / "v0001"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(b"this is not an ONNX graph")
    (version / "vocab.json").write_text("{}")
    (version / "manifest.json").write_text(json.dumps({"format": "streamrec-scorer/1", "version": "v0001"}))
    (models / "CURRENT").write_text("v0001\n")
    worker = workers(metrics=True, STREAMREC_MODEL_DIR=str(models))
    wait_for(lambda: _ready(worker), 90, "the worker to start and be ready", worker)
    records, expected = synthetic_records(300, seed=23, n_users=20)
    produce(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, records)
    recs = wait_for(lambda: [decode_recommendation(r.value) for r in read_all(worker_env["STREAMREC_KAFKA_BOOTSTRAP"],
                                                                               f"{topic_prefix}recommendations")]
                    if len(read_all(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], f"{topic_prefix}recommendations")) >= 20 else None,
                    90, "recommendations", worker)
    assert all(r.model["transformer"] == "none" for r in recs) and any(r.items for r in recs)
    assert worker.metric("streamrec_scorer_reload_failures_total") == 1
    assert "refused version v0001" in worker.log_text()
    # more events, and the reload timer runs twice more meanwhile (every 5 s): the refused version is counted once
    reloads = worker.metric("streamrec_timer_runs_total", timer="reload_scorer")
    later, more = synthetic_records(300, seed=24, n_users=20)
    produce(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, later)
    wait_for(lambda: worker.metric("streamrec_events_consumed_total", type="click")
             + worker.metric("streamrec_events_consumed_total", type="purchase") >= 600, 60, "the later events", worker)
    wait_for(lambda: worker.metric("streamrec_timer_runs_total", timer="reload_scorer") >= reloads + 2,
             30, "two more runs of the scorer's reload timer", worker)
    assert worker.metric("streamrec_scorer_reload_failures_total") == 1
    assert worker.metric("streamrec_timer_failures_total", timer="reload_scorer") == 0
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_a_user_document_that_does_not_decode_starts_the_user_afresh(worker_env, workers, topic_prefix, redis_client):
    redis_client.set(f"{topic_prefix}user:broken", b'{"user_id": "broken", "clicks": "many"')
    worker = workers(metrics=True)
    now = time.time_ns() // 1_000_000
    events = [ClickEvent(event_id=f"e{i}", user_id=u, item_id=f"i{i}", ts=now + i)
              for i, u in enumerate(["broken", "fine", "broken", "fine", "broken"])]
    produce(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, [("clicks", e.user_id.encode(), encode(e)) for e in events])
    wait_for(lambda: exactly_once(redis_client, topic_prefix, {"broken": 3, "fine": 2}), 60, "both users' events", worker)
    assert worker.metric("streamrec_states_rebuilt_total") >= 1
    assert "does not decode" in worker.log_text()
    assert worker.agent_restarts() == []
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
