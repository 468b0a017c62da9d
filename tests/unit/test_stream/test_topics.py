"""ensure_topics / wait_for_kafka without a broker: refusals are clear and leave nothing behind."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fakes import serving_not_kafka
from typer.testing import CliRunner

from stream import topics as topics_module
from stream.cli import app as cli_app
from stream.errors import ConfigError, ServiceUnavailable
from stream.topics import check_topic_name, ensure_topics, probe, uneven_partitions, wait_for_kafka


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


@pytest.mark.parametrize("command", [["forget", "u1"], ["tail", "--limit", "1"], ["produce", "--limit", "1", "--no-progress"]])
def test_a_broker_that_does_not_answer_is_named_as_the_operator_named_it(command, monkeypatch):
    """Given with -b, the error told the operator to point STREAMREC_KAFKA_BOOTSTRAP, which they had not set."""
    bootstrap = f"127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("STREAMREC_KAFKA_BOOTSTRAP", bootstrap)
    said = str(CliRunner().invoke(cli_app, command).exception)
    assert f"{bootstrap} refused the connection" in said and "point STREAMREC_KAFKA_BOOTSTRAP at a running one" in said, said
    said = str(CliRunner().invoke(cli_app, [command[0], "-b", bootstrap, *command[1:]]).exception)
    assert f"{bootstrap} refused the connection" in said and "point --bootstrap at a running one" in said, said
    assert "STREAMREC_KAFKA_BOOTSTRAP" not in said


def test_a_topic_prefix_no_worker_uses_is_named_as_the_operator_named_it(monkeypatch):
    """Given with --topic-prefix, the error asked whether STREAMREC_TOPIC_PREFIX was the workers'."""
    monkeypatch.setattr(topics_module, "partition_count", lambda kafka, topic: None)  # no such topic
    monkeypatch.setenv("STREAMREC_TOPIC_PREFIX", "typo.")
    said = str(CliRunner().invoke(cli_app, ["forget", "u1"]).exception)
    assert "there is no topic typo.forget" in said and "is STREAMREC_TOPIC_PREFIX ('typo.') the workers'?" in said, said
    said = str(CliRunner().invoke(cli_app, ["forget", "--topic-prefix", "other.", "u1"]).exception)
    assert "there is no topic other.forget" in said and "is --topic-prefix ('other.') the workers'?" in said, said
    assert "STREAMREC_TOPIC_PREFIX" not in said


def test_wait_for_kafka_gives_up_after_its_timeout():
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable, match="refused the connection for 0.6 s"):
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


def test_uneven_partitions_names_the_topics_to_grow_and_the_count():
    """The hint said "add partitions to the smaller ones ..., or recreate the forget topic" whichever
    topic had grown: it now names the topics and the count, and the forget topic only when it alone grew."""
    grown_clicks = uneven_partitions({"s.clicks": 8, "s.purchases": 4, "s.forget": 4})
    assert "Grow s.purchases, s.forget to 8 partitions" in grown_clicks and "recreate" not in grown_clicks
    grown_forget = uneven_partitions({"s.clicks": 4, "s.purchases": 4, "s.forget": 8})
    assert "Grow s.clicks, s.purchases to 8 partitions" in grown_forget
    assert "or recreate s.forget with as many partitions as the input topics" in grown_forget
