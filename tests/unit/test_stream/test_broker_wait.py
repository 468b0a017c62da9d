"""The worker's wait for Kafka at start (stream/broker_wait.py): a broker that does not answer
is waited for with back-off, said once and then once a minute, and shown in /readyz; what
waiting cannot mend stops it at once; SIGTERM and Ctrl-C stop the wait."""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator

import pytest
from fakes import serving_not_kafka

from stream.app import create_app
from stream.broker_wait import BrokerWait, StopRequested, misconfigured
from stream.connections import AccessDenied, KafkaConnection
from stream.errors import ConfigError, ServiceUnavailable
from stream.health import Health
from stream.retry import Backoff
from stream.settings import Settings
from stream.state import InMemoryUserStateStore

KAFKA = KafkaConnection("kafka-0.example:9092")
REFUSED = "kafka-0.example:9092: [Errno 111] Connection refused"
NO_JITTER = Backoff(base_s=0.5, factor=2.0, cap_s=10.0, jitter=0)


class Outage:
    """A broker that does not answer ``tries`` probes, then does; a clock moved by the sleeps."""

    def __init__(self, tries: int, problem: str = REFUSED) -> None:
        self.left = tries
        self.problem = problem
        self.now = 1000.0
        self.slept: list[float] = []
        self.probed = 0

    def probe(self, kafka: KafkaConnection, timeout_s: float) -> str | None:
        assert kafka is KAFKA
        self.probed += 1
        if self.left > 0:
            self.left -= 1
            return self.problem
        return None

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def waiting(outage: Outage, health: Health | None = None, **options) -> BrokerWait:
    return BrokerWait(KAFKA, health or Health(clock=outage.clock), probe=outage.probe, sleep=outage.sleep,
                      clock=outage.clock, wall_clock=lambda: 1_764_864_000.0, **options)  # 2025-12-04 16:00 UTC


def _waits(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "streamrec.broker_wait" and r.levelno == logging.WARNING]


def test_the_worker_waits_with_back_off_and_starts_once_the_broker_answers(caplog):
    outage = Outage(tries=6)
    steps = []
    with caplog.at_level(logging.INFO, logger="streamrec.broker_wait"):
        assert waiting(outage, backoff=NO_JITTER).run(lambda: steps.append("topics") or "done") == "done"
    assert steps == ["topics"] and outage.probed == 7
    assert outage.slept == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    said = [r.getMessage() for r in caplog.records]
    assert "Kafka at kafka-0.example:9092 answers after 26 s of waiting; starting" in said


def test_readyz_names_the_bootstrap_the_reason_and_since_when_while_healthz_stays_alive():
    outage = Outage(tries=10**6)
    health = Health(clock=outage.clock, startup_grace_s=120)
    seen = []

    def sleep(seconds: float) -> None:
        outage.sleep(seconds)
        seen.append((health.readiness(), health.liveness()))
        if outage.now > 1000 + 600:  # ten minutes: five times the start-up grace
            raise RuntimeError("enough")

    wait = waiting(outage, health)
    wait._sleep = sleep
    with pytest.raises(RuntimeError, match="enough"):
        wait.run(lambda: None)
    (ready, text), (alive, why) = seen[-1]
    assert not ready
    assert ("kafka: FAIL (cannot reach kafka-0.example:9092 since 2025-12-04 16:00:00 UTC (kafka-0.example:9092: "
            "[Errno 111] Connection refused); the worker starts once a broker answers") in text
    assert alive and "waiting for Kafka at kafka-0.example:9092" in why  # not killed for waiting
    assert all(alive for _, (alive, _) in seen)


def test_the_conditions_nothing_checks_before_the_worker_starts_say_waiting_not_fail():
    """/readyz listed ``models: FAIL`` and ``redis: FAIL (not checked yet)`` beside the kafka line
    while the worker waited, sending an operator after Redis and the model folder."""
    outage = Outage(tries=3)
    health = Health(clock=outage.clock)
    create_app(Settings.from_env({}), load_model=False, health=health, store=InMemoryUserStateStore())
    seen = []
    wait = waiting(outage, health)
    wait._sleep = lambda seconds: (outage.sleep(seconds), seen.append(health.readiness()))
    wait.run(lambda: None)
    ready, text = seen[-1]
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert not ready and lines["kafka"].startswith("FAIL (cannot reach kafka-0.example:9092 since "), text
    assert lines["models"] == "waiting (restored from their snapshot once Kafka answers and the worker starts)", text
    assert lines["redis"] == "waiting (not checked yet: the worker starts once Kafka answers)", text
    assert "FAIL" not in lines["models"] + lines["redis"]
    # once Kafka answers, they say again what they said before the wait, until the worker checks them
    ready, text = health.readiness()
    assert not ready and "models: FAIL (restoring the online models' snapshot)" in text
    assert "redis: FAIL (not checked yet)" in text and "waiting" not in text
    health.set("redis", True, "PING answered")
    assert "redis: ok (PING answered)" in health.readiness()[1]


def test_it_says_so_once_then_once_a_minute(caplog):
    outage = Outage(tries=200)  # 10 s apart once the back-off is at its cap: about 33 minutes
    with caplog.at_level(logging.INFO, logger="streamrec.broker_wait"):
        waiting(outage, backoff=NO_JITTER).run(lambda: None)
    said = _waits(caplog)
    waited_min = (outage.now - 1000) / 60
    assert said[0].startswith("Kafka at kafka-0.example:9092 does not answer (kafka-0.example:9092: [Errno 111] "
                              "Connection refused): waiting for a broker before starting")
    assert all(line.startswith("still waiting for Kafka at kafka-0.example:9092: no broker has answered for ")
               for line in said[1:])
    assert int(waited_min) - 1 <= len(said) - 1 <= int(waited_min)  # one reminder a minute, not one a try
    assert said[-1].endswith("tries; the last: kafka-0.example:9092: [Errno 111] Connection refused)")


@pytest.mark.parametrize("problem, error, said", [
    ("kafka-0.example:9092: answered, but not as a Kafka broker", ConfigError, "point it at a Kafka listener"),
    ("kafka-0.example:9092: TLS failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed", AccessDenied,
     "STREAMREC_KAFKA_SSL_CAFILE"),
])
def test_what_waiting_cannot_mend_stops_at_the_first_try(problem, error, said):
    outage = Outage(tries=1, problem=problem)
    with pytest.raises(error, match=said):
        waiting(outage).run(lambda: pytest.fail("started"))
    assert outage.slept == []


@pytest.mark.parametrize("problem", [
    REFUSED, "kafka-0.example:9092: timed out", "kafka-0.example:9092: [Errno -2] Name or service not known",
    "kafka-0.example:9092: closed the connection without answering",
])
def test_an_outage_is_waited_for(problem):
    assert misconfigured(KAFKA, problem) is None


def test_a_broker_gone_again_during_the_start_up_steps_is_waited_for_again():
    outage = Outage(tries=1)
    calls = []

    def steps() -> str:
        calls.append(outage.now)
        if len(calls) == 1:
            outage.left = 2  # and stays away for two more probes
            raise ServiceUnavailable("Kafka at kafka-0.example:9092 did not answer within 30 s (NodeNotReady)")
        return "topics"

    assert waiting(outage, backoff=NO_JITTER).run(steps) == "topics"
    assert len(calls) == 2 and outage.probed == 5


def test_a_start_up_step_that_is_refused_is_not_retried():
    with pytest.raises(AccessDenied):
        waiting(Outage(tries=0)).run(lambda: (_ for _ in ()).throw(AccessDenied("refused the login")))


def _signal_self(sig: signal.Signals):
    def sleep(seconds: float) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(5)  # a bound, not a wait for a condition: the handler cuts it short at once
        pytest.fail(f"slept on after {sig.name}")

    return sleep


@pytest.mark.parametrize("sig, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_sigterm_or_ctrl_c_stops_the_wait_at_once_and_puts_the_handlers_back(sig, name):
    before = signal.getsignal(sig)
    wait = waiting(Outage(tries=10**6))
    wait._sleep = _signal_self(sig)
    with pytest.raises(StopRequested) as stopped, wait.stopped_by_signals():
        wait.run(lambda: pytest.fail("started"))
    assert stopped.value.signum == sig and stopped.value.name == name
    assert signal.getsignal(sig) is before


def test_a_signal_during_a_start_up_step_stops_once_the_step_is_done():
    wait = waiting(Outage(tries=0))
    done = []

    def steps() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        done.append("topics")  # not cut short: a step is bounded by its own timeout

    with pytest.raises(StopRequested), wait.stopped_by_signals():
        wait.run(steps)
    assert done == ["topics"]


@pytest.fixture
def not_kafka() -> Iterator[str]:
    with serving_not_kafka() as address:
        yield address


def test_with_the_real_probe_a_closed_port_is_waited_for_and_a_server_that_is_not_kafka_is_refused(not_kafka):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = KafkaConnection(f"127.0.0.1:{s.getsockname()[1]}")
    tries = []

    def sleep(seconds: float) -> None:
        tries.append(seconds)
        if len(tries) == 2:
            raise RuntimeError("still waiting")

    with pytest.raises(RuntimeError, match="still waiting"):
        BrokerWait(closed, Health(), sleep=sleep).run(lambda: pytest.fail("started"))
    with pytest.raises(ConfigError, match=f"STREAMREC_KAFKA_BOOTSTRAP={not_kafka}: .*not as a Kafka broker"):
        BrokerWait(KafkaConnection(not_kafka), Health(), sleep=sleep).run(lambda: pytest.fail("started"))
