"""Consumer lag from a fake Faust consumer, and the /metrics, /healthz, /readyz endpoints."""

from __future__ import annotations

import doctest
import importlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from faust.types import TP
from prometheus_client import CollectorRegistry, Counter

from stream import health as health_module
from stream.health import Health, check_readiness, serve
from stream.lag import LagMetrics, update_lag
from stream.state import RedisUserStateStore


@pytest.mark.parametrize("name", ["stream.lag", "stream.health"])
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0 and result.attempted > 0


class FakeConsumer:
    """The part of faust's Consumer that update_lag reads."""

    def __init__(self, assigned, highwater, committed, positions=None, fetched=None):
        self.assigned = set(assigned)
        self._highwater = highwater  # from the broker (highwaters())
        self._fetched = fetched if fetched is not None else highwater  # from the last fetch (highwater())
        self._committed_offset = dict(committed)
        self.positions = positions or {}
        self.asked_broker_for: list[TP] = []

    def assignment(self):
        return self.assigned

    def highwater(self, tp):
        return self._fetched.get(tp)

    async def highwaters(self, *tps):
        self.asked_broker_for.extend(tps)
        return {tp: self._highwater[tp] for tp in tps}

    async def position(self, tp):
        return self.positions.get(tp)


def app_with(consumer):
    return SimpleNamespace(consumer=consumer, agents={})


def gauge(registry, name, topic, partition):
    return registry.get_sample_value(f"streamrec_{name}", {"topic": topic, "partition": str(partition)})


async def test_lag_is_highwater_minus_committed_for_input_partitions_only():
    c0, c1, p0 = TP("s.clicks", 0), TP("s.clicks", 1), TP("s.purchases", 0)
    internal = TP("s-__assignor-__leader", 0)
    consumer = FakeConsumer([c0, c1, p0, internal], {c0: 120, c1: 50, p0: 7, internal: 3},
                            {c0: 100, c1: 50, p0: 2, internal: 0})
    registry = CollectorRegistry()
    lag = LagMetrics(registry)
    got = await update_lag(app_with(consumer), lag, topics=["s.clicks", "s.purchases"])
    assert got == {("s.clicks", 0): 20, ("s.clicks", 1): 0, ("s.purchases", 0): 5}
    assert gauge(registry, "consumer_lag", "s.clicks", 0) == 20
    assert gauge(registry, "consumer_committed_offset", "s.clicks", 0) == 100
    assert gauge(registry, "consumer_highwater_offset", "s.purchases", 0) == 7
    assert gauge(registry, "consumer_lag", internal.topic, 0) is None
    assert consumer.asked_broker_for == []  # the fetch's high watermarks sufficed


async def test_unfetched_partitions_ask_the_broker_and_uncommitted_use_the_position():
    tp = TP("s.clicks", 3)
    consumer = FakeConsumer([tp], {tp: 40}, {}, positions={tp: 10}, fetched={})
    registry = CollectorRegistry()
    assert await update_lag(app_with(consumer), LagMetrics(registry), topics=["s.clicks"]) == {("s.clicks", 3): 30}
    assert consumer.asked_broker_for == [tp]


async def test_a_revoked_partition_disappears_from_the_gauges():
    a, b = TP("s.clicks", 0), TP("s.clicks", 1)
    consumer = FakeConsumer([a, b], {a: 5, b: 9}, {a: 5, b: 1})
    registry = CollectorRegistry()
    lag = LagMetrics(registry)
    await update_lag(app_with(consumer), lag, topics=["s.clicks"])
    assert gauge(registry, "consumer_lag", "s.clicks", 1) == 8
    consumer.assigned = {a}  # a rebalance gave partition 1 to another worker
    await update_lag(app_with(consumer), lag, topics=["s.clicks"])
    assert gauge(registry, "consumer_lag", "s.clicks", 1) is None
    assert gauge(registry, "consumer_highwater_offset", "s.clicks", 1) is None
    assert gauge(registry, "consumer_lag", "s.clicks", 0) == 0


async def test_a_consumer_not_started_yet_leaves_the_gauges_alone():
    class NotStarted:
        def assignment(self):
            raise RuntimeError("Consumer thread not yet started")

    assert await update_lag(app_with(NotStarted()), LagMetrics(CollectorRegistry()), topics=["s.clicks"]) == {}


def test_model_created_time_comes_from_the_registry_manifest():
    registry = CollectorRegistry()
    lag = LagMetrics(registry)
    manifests = {"v0002": {"created": "2026-11-20T10:00:00+00:00"}}
    reads = []

    def manifest(version):
        reads.append(version)
        return manifests[version]

    scorer = SimpleNamespace(version="v0002", registry=SimpleNamespace(manifest=manifest))
    lag.set_scorer(scorer)
    lag.set_scorer(scorer)  # every timer tick: the manifest is read once per version
    assert reads == ["v0002"]
    assert registry.get_sample_value("streamrec_scorer_model_created_timestamp_seconds", {"version": "v0002"}) == datetime(2026, 11, 20, 10, tzinfo=UTC).timestamp()
    lag.set_scorer(None)
    assert registry.get_sample_value("streamrec_scorer_model_created_timestamp_seconds", {"version": "v0002"}) is None


# ---------------------------------------------------------------------------- health


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_liveness_fails_when_the_heartbeat_goes_stale_and_after_the_startup_grace():
    clock = Clock()
    h = Health(stale_after_s=10, startup_grace_s=60, clock=clock)
    clock.now += 59
    assert h.liveness()[0]
    clock.now += 2
    ok, why = h.liveness()
    assert not ok and "no heartbeat" in why
    h.beat()
    clock.now += 9
    assert h.liveness()[0]
    clock.now += 2
    ok, why = h.liveness()
    assert not ok and "blocked" in why


def test_readiness_needs_every_condition_and_says_which_fails():
    h = Health(clock=Clock())
    h.beat()
    ok, text = h.readiness()
    assert not ok and "kafka: FAIL" in text and "redis: FAIL" in text
    h.set("kafka", True, "2 partitions")
    h.set("redis", True)
    assert h.readiness() == (True, "kafka: ok (2 partitions)\nredis: ok (ok)")


async def test_check_readiness_reads_the_app_and_pings_the_store():
    class Store:
        def __init__(self, fail):
            self.fail = fail

        async def ping(self):
            if self.fail:
                raise ConnectionError("refused")
            return True

    h = Health(clock=Clock())
    h.beat()
    app = SimpleNamespace(rebalancing=False, rebalancing_count=0, consumer=None)
    assert not await check_readiness(app, Store(False), h)
    assert "has not joined" in h.readiness()[1]
    app = SimpleNamespace(rebalancing=False, rebalancing_count=1,
                          consumer=SimpleNamespace(assignment=lambda: {TP("s.clicks", 0)}))
    assert await check_readiness(app, Store(False), h)
    assert not await check_readiness(app, Store(True), h)
    assert "redis: FAIL (PING failed: ConnectionError: refused)" in h.readiness()[1]
    app.rebalancing = True
    await check_readiness(app, Store(False), h)
    assert "kafka: FAIL (consumer group rebalancing)" in h.readiness()[1]


def fetch(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        body = err.read().decode()
        err.close()
        return err.code, body


def test_one_port_serves_metrics_liveness_and_readiness():
    registry = CollectorRegistry()
    Counter("demo_total", "a counter", registry=registry).inc(3)
    h = Health(clock=Clock())
    with serve(0, registry, h, addr="127.0.0.1") as server:
        base = f"http://127.0.0.1:{server.port}"
        status, body = fetch(f"{base}/metrics")
        assert status == 200 and "demo_total 3.0" in body
        assert fetch(f"{base}/healthz")[0] == 200  # within the start-up grace
        status, body = fetch(f"{base}/readyz")
        assert status == 503 and "kafka: FAIL" in body
        h.beat()
        h.set("kafka", True)
        h.set("redis", True)
        assert fetch(f"{base}/readyz/")[0] == 200
        assert fetch(f"{base}/nope")[0] == 404
    assert json.dumps(server.port)  # closed cleanly: no ResourceWarning (an error in this suite)


def test_a_client_that_never_finishes_its_request_is_closed(monkeypatch):
    # socketserver's default let it hold a thread of the worker's for the worker's lifetime
    monkeypatch.setattr(health_module, "REQUEST_TIMEOUT_S", 0.3)
    with serve(0, CollectorRegistry(), Health(clock=Clock()), addr="127.0.0.1") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:
            conn.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
            started = time.monotonic()
            assert conn.recv(100) == b""  # closed, nothing answered
            assert time.monotonic() - started < 3


async def test_a_redis_url_at_a_server_that_closes_the_connection_unanswered_says_what_to_check():
    """Kafka's port (or a TLS-only Redis spoken to in plain text) takes the connection and closes
    it without a word: readiness said only "Connection closed by server.", as for a Redis restarting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def close_each() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:  # reads the client's first command, as Kafka does, and closes without an answer
                conn.settimeout(2)
                try:
                    conn.recv(4096)
                except OSError:
                    pass

    closer = threading.Thread(target=close_each, daemon=True)
    closer.start()
    store = RedisUserStateStore.from_url(f"redis://127.0.0.1:{port}/0")
    try:
        h = Health(clock=Clock())
        h.beat()
        app = SimpleNamespace(rebalancing=False, rebalancing_count=1,
                              consumer=SimpleNamespace(assignment=lambda: {TP("s.clicks", 0)}))
        assert not await check_readiness(app, store, h)
        detail = h.readiness()[1]
        assert "Connection closed by server" in detail and "names a Redis port" in detail and "rediss://" in detail
    finally:
        await store.close()
        stop.set()
        closer.join(5)
        listener.close()
