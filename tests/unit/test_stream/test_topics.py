"""ensure_topics / wait_for_kafka without a broker: refusals are clear and leave nothing behind."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fakes import serving_not_kafka

from stream.errors import ConfigError, ServiceUnavailable
from stream.topics import check_topic_name, ensure_topics, probe, wait_for_kafka


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def not_kafka() -> Iterator[str]:
    with serving_not_kafka() as address:
        yield address


def test_a_refused_connection_is_service_unavailable_naming_the_address():
    bootstrap = f"127.0.0.1:{_closed_port()}"
    threads = threading.active_count()
    with pytest.raises(ServiceUnavailable) as info:
        ensure_topics(bootstrap, ["a.clicks"], 1, timeout_s=0.5)
    assert bootstrap in str(info.value) and "make up" in str(info.value)
    assert threading.active_count() == threads  # no client thread left behind


def test_wait_for_kafka_gives_up_after_its_timeout():
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="within 0.6 s"):
        wait_for_kafka(f"127.0.0.1:{_closed_port()}", timeout_s=0.6)
    assert 0.5 <= time.monotonic() - started < 3


def test_something_that_is_not_kafka_does_not_pass_the_probe(not_kafka):
    assert "not as a Kafka broker" in probe(not_kafka, timeout_s=1)
    with pytest.raises(ServiceUnavailable, match="not as a Kafka broker"):
        wait_for_kafka(not_kafka, timeout_s=0.3)


@pytest.mark.parametrize("bootstrap", ["", "no-port", "host:notaport"])
def test_unusable_bootstrap_strings_are_reported_not_raised(bootstrap):
    assert probe(bootstrap, timeout_s=0.2)


def test_the_probe_does_not_read_an_empty_host_as_this_machine(not_kafka):
    # ':PORT' was probed as 127.0.0.1:PORT, while the worker's own check refuses it
    port = not_kafka.rpartition(":")[2]
    assert "is not host:port" in probe(f":{port}", timeout_s=1)


@pytest.mark.parametrize("name", ["", "a/b", "a b", "é", ".", "..", "x" * 250])
def test_illegal_topic_names_are_refused_before_connecting(name):
    with pytest.raises(ConfigError, match="topic name"):
        check_topic_name(name)
    with pytest.raises(ConfigError):
        ensure_topics("127.0.0.1:1", [name], 1)


def test_partitions_and_replication_must_be_positive():
    with pytest.raises(ConfigError, match="at least 1"):
        ensure_topics("127.0.0.1:1", ["a"], 0)


def test_nothing_to_create_needs_no_broker():
    assert ensure_topics("127.0.0.1:1", [], 3) == []
