"""A worker whose STREAMREC_KAFKA_SESSION_TIMEOUT_S the brokers would refuse stops at start,
status 2, naming the setting and the brokers' range. It used to start: its consumer's join was
refused once (InvalidSessionTimeoutError, an ERROR line from aiokafka) and it then waited,
unready, for ever."""

from __future__ import annotations

from workerkit import wait_for

from stream.topics import session_timeout_range


def test_the_brokers_range_is_read(kafka_bootstrap):
    assert session_timeout_range(kafka_bootstrap) == (6.0, 1800.0)  # Kafka's defaults, which the test broker keeps


def test_a_worker_asking_for_a_session_the_brokers_refuse_stops_at_start_saying_why(workers, kafka_bootstrap):
    worker = workers(STREAMREC_KAFKA_SESSION_TIMEOUT_S="2")
    # not wait_for(..., worker): it asserts the worker alive after each false look, and this one
    # is to exit, which it can do between the look and that assertion
    try:
        wait_for(lambda: worker.proc.poll() is not None, 90, "the worker to stop")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{worker.log_tail()}") from None
    log = worker.log_text()
    assert worker.proc.returncode == 2, log
    assert (f"streamrec: STREAMREC_KAFKA_SESSION_TIMEOUT_S=2: the brokers at {kafka_bootstrap} take 6 to 1800 s "
            "(group.min.session.timeout.ms, group.max.session.timeout.ms)") in log, log
    assert "Traceback" not in log and "InvalidSessionTimeoutError" not in log, log
