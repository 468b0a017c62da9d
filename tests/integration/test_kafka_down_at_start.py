"""A worker started while its Kafka broker is down waits for it (stream/broker_wait.py): alive,
unready with the reason in /readyz, said once in the log; it starts and consumes once the broker
answers, and SIGTERM or Ctrl-C meanwhile stops it at once, status 0. It used to exit with
status 2 at once, and its supervisor started it again and again."""

from __future__ import annotations

import signal
import time
import uuid

from ports import free_ports
from workerkit import consume_until, produce, wait_for

from stream.records import ClickEvent, decode_recommendation, encode

WAITING = "waiting for a broker before starting"


def _unready(worker) -> str | None:
    status, body = worker.http("/readyz")
    return body if status == 503 and "kafka: FAIL (cannot reach" in body else None


def test_a_worker_started_before_its_broker_waits_unready_then_starts_and_consumes(workers, unstarted_kafka,
                                                                                  topic_prefix):
    bootstrap = unstarted_kafka.address
    worker = workers(metrics=True, STREAMREC_KAFKA_BOOTSTRAP=bootstrap)
    body = wait_for(lambda: _unready(worker), 60, "/readyz to say the worker waits for Kafka", worker)
    assert f"kafka: FAIL (cannot reach {bootstrap} since " in body and "Connection refused" in body, body
    # what nothing checks before the worker starts is not said to fail (it sent operators after Redis)
    assert "redis: waiting (not checked yet" in body and "models: waiting (" in body, body
    assert body.count("FAIL") == 1, body
    status, alive = worker.http("/healthz")
    assert status == 200 and f"waiting for Kafka at {bootstrap}" in alive, alive

    unstarted_kafka.start()  # returns once the broker answers (tens of seconds: the worker probes on meanwhile)
    worker.assert_alive()
    wait_for(lambda: worker.http("/readyz")[0] == 200, 120, "the worker to be ready once the broker answers", worker)

    user = f"u-{uuid.uuid4().hex[:8]}"
    click = ClickEvent(event_id="ev-late-1", user_id=user, item_id="item-1", ts=int(time.time() * 1000))
    produce(bootstrap, topic_prefix, [("clicks", user.encode(), encode(click))])
    consume_until(bootstrap, f"{topic_prefix}recommendations",
                  lambda values: any(decode_recommendation(v).user_id == user for v in values), 60, worker)

    log = worker.log_text()
    assert log.count(WAITING) == 1, log  # said once, not at every try (a minute's reminder comes later)
    assert f"Kafka at {bootstrap} answers after " in log, log
    assert "Traceback" not in log, log
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()


def test_sigterm_or_ctrl_c_while_it_waits_stops_it_at_once_with_status_0(workers):
    """Nothing listens on the bootstrap: the worker waits until asked to stop."""
    for sig, said in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")):
        worker = workers(metrics=True, STREAMREC_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_ports(1)[0]}")
        wait_for(lambda: WAITING in worker.log_text(), 60, "the worker to wait for Kafka", worker)  # noqa: B023
        asked = time.monotonic()
        assert worker.stop(sig, timeout=30) == 0, worker.log_tail()
        assert time.monotonic() - asked < 5, worker.log_tail()
        assert f"{said} while waiting for Kafka: stopping before the worker started" in worker.log_text()
