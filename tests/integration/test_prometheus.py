"""A real Prometheus scrapes a real worker: the metrics arrive, with values that make sense.

Debian's `prometheus` binary (deploy/tools.sh installs it) runs on a free loopback port
with a generated config that scrapes one `streamrec worker` subprocess every second and
loads the shipped alert rules. Events go in through the real broker with kafka-python; the
assertions go through Prometheus's HTTP query API, as a dashboard or an alert would.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from workerkit import http_get, wait_for

from online_models.datasets import synthetic_interactions
from stream.records import ClickEvent, PurchaseEvent, encode

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "streamrec.json"
N_EVENTS = 1200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


class Process:
    """A subprocess with its output in a log file, stopped by its own pid."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int | None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


class Prometheus:
    def __init__(self, base: str, process: Process) -> None:
        self.base, self.process = base, process

    def query(self, promql: str) -> list[dict]:
        status, body = http_get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body) if body.startswith("{") else {"status": "error", "error": body}
        assert status == 200 and answer["status"] == "success", f"query {promql!r} failed: {answer}"
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        return float(result[0]["value"][1]) if result else None

    def eventually(self, promql: str, timeout: float = 15) -> float:
        """The value once the query has one (rates need two scrapes)."""
        deadline = time.monotonic() + timeout
        while (value := self.value(promql)) is None or math.isnan(value):  # first series only
            assert time.monotonic() < deadline, f"{promql!r} has no value after {timeout} s"
            time.sleep(0.5)
        return value


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
    if found is None:
        done = subprocess.run(["bash", str(ROOT / "deploy" / "prometheus" / "install.sh")], capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)
        found = shutil.which("prometheus")
        if found is None:
            pytest.fail("Debian's prometheus could not be installed for this test (deploy/prometheus/install.sh, "
                        f"exit {done.returncode}):\n{done.stdout}{done.stderr}", pytrace=False)
    return found


@pytest.fixture
def worker(worker_env, tmp_path) -> Iterator[tuple[int, Process]]:
    port = free_port()
    env = dict(worker_env, STREAMREC_METRICS_PORT=str(port))
    process = Process([sys.executable, "-m", "stream.cli", "worker"], tmp_path / "worker.log", env)
    try:
        yield port, process
    finally:
        process.stop()


@pytest.fixture
def prometheus(worker, tmp_path) -> Iterator[Prometheus]:
    worker_port, _ = worker
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {ALERTS}\n"
        "scrape_configs:\n  - job_name: streamrec-worker\n    scrape_timeout: 1s\n"
        f"    static_configs:\n      - targets: ['127.0.0.1:{worker_port}']\n        labels: {{scorer_expected: cpu}}\n")
    process = Process([prometheus_binary(), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                       f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"], tmp_path / "prometheus.log")
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while http_get(f"{base}/-/ready")[0] != 200:
            assert process.alive(), f"prometheus exited:\n{tail(process.log)}"
            assert time.monotonic() < deadline, f"prometheus not ready in 30 s:\n{tail(process.log)}"
            time.sleep(0.2)
        yield Prometheus(base, process)
    finally:
        process.stop()


def produce_events(bootstrap: str, prefix: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    try:
        for i, x in enumerate(synthetic_interactions(n_events=N_EVENTS, n_users=50, n_items=200, seed=3)):
            cls, topic = (PurchaseEvent, "purchases") if x.kind == "purchase" else (ClickEvent, "clicks")
            ev = cls(event_id=f"p-{i}", user_id=x.user_id, item_id=x.item_id, ts=int(time.time() * 1000),
                     category_id=x.category_id, session_id=x.session_id)
            producer.send(f"{prefix}{topic}", key=x.user_id.encode(), value=encode(ev))
        producer.send(f"{prefix}clicks", key=b"u-bad", value=b'{"event_id": "bad", "type": "click"')
        producer.flush()
    finally:
        producer.close()


#: the worker's cumulative series (counters, and histograms' _count and _sum)
CUMULATIVE = ("_total", "_count", "_sum")
#: the labels Prometheus adds to every series of the target
TARGET_LABELS = ("__name__", "instance", "job", "scorer_expected")


def served_cumulative(worker_port: int) -> dict[tuple[str, frozenset], float]:
    """The worker's cumulative series as it serves them now: ``(name, labels) -> value``."""
    status, body = http_get(f"http://127.0.0.1:{worker_port}/metrics")
    assert status == 200, body
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples
            if s.name.startswith("streamrec_") and s.name.endswith(CUMULATIVE)}


def scraped_cumulative(prom: Prometheus) -> dict[tuple[str, frozenset], float]:
    """The same series as Prometheus last scraped them."""
    return {(r["metric"]["__name__"], frozenset((k, v) for k, v in r["metric"].items() if k not in TARGET_LABELS)):
            float(r["value"][1]) for r in prom.query('{__name__=~"streamrec_.+(_total|_count|_sum)"}')}


def dashboard_queries() -> list[tuple[str, str]]:
    """Every dashboard query with Grafana's variables replaced as Grafana would."""
    dash = json.loads(DASHBOARD.read_text())
    subst = {"$__rate_interval": "15s", "$quality_window": "1m", "$instance": ".*"}
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in subst.items():
                expr = expr.replace(var, value)
            out.append((panel["title"], expr))
    return out


def test_prometheus_scrapes_the_worker_and_sees_sensible_values(worker, prometheus, service_env, topic_prefix):
    worker_port, process = worker
    prom = prometheus
    # one scrape before any event, so that rates start from the counters' zeros
    deadline = time.monotonic() + 60
    while prom.value('streamrec_stage_seconds_count{stage="batch"}') is None:
        assert process.alive(), f"worker exited:\n{tail(process.log)}"
        assert time.monotonic() < deadline, f"Prometheus never scraped the worker:\n{tail(process.log)}"
        time.sleep(0.5)
    produce_events(service_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix)

    deadline = time.monotonic() + 90
    consumed = None
    while time.monotonic() < deadline:
        assert process.alive(), f"worker exited:\n{tail(process.log)}"
        consumed = prom.value("sum(streamrec_events_consumed_total)")
        if consumed is not None and consumed >= N_EVENTS and prom.value("streamrec_dead_letters_published_total"):
            break
        time.sleep(1)
    assert consumed == N_EVENTS, f"Prometheus saw {consumed} of {N_EVENTS} events consumed\n{tail(process.log)}"
    # Every record is handled, so the worker is idle: wait for a scrape with every metric of its
    # last batch, i.e. until Prometheus holds each cumulative series at the value the worker serves.
    batch_sum = ("streamrec_batch_size_events_sum", frozenset())

    def scraped_all() -> bool:
        served = served_cumulative(worker_port)
        return served.get(batch_sum) == N_EVENTS + 1 and scraped_cumulative(prom) == served

    try:
        wait_for(scraped_all, 15, "Prometheus to scrape every metric of the worker's last batch")
    except AssertionError as exc:
        served, scraped = served_cumulative(worker_port), scraped_cumulative(prom)
        differ = {key: (value, scraped.get(key)) for key, value in served.items() if scraped.get(key) != value}
        raise AssertionError(f"{exc}\n(served, scraped) where they differ: {differ}\n{tail(process.log)}") from None

    assert prom.value('up{job="streamrec-worker"}') == 1
    assert prom.value('sum by (type) (streamrec_events_consumed_total{type="purchase"})') > 0
    assert prom.value("streamrec_recommendations_published_total") > 0
    assert prom.value("streamrec_dead_letters_published_total") == 1
    assert prom.value('streamrec_events_invalid_total{reason="malformed_json"}') == 1
    batches = prom.value('streamrec_stage_seconds_count{stage="batch"}')
    assert batches and batches == prom.value("streamrec_batch_size_events_count")
    assert prom.value("streamrec_batch_size_events_sum") == N_EVENTS + 1
    stages = {r["metric"]["stage"] for r in prom.query("streamrec_stage_seconds_count > 0")}
    assert {"decode", "state_load", "learn", "publish", "state_save", "batch"} <= stages
    p99 = prom.eventually('histogram_quantile(0.99, sum by (le) (rate(streamrec_stage_seconds_bucket{stage="batch"}[1m])))')
    assert 0 < p99 < 2.5
    e2e = prom.value("streamrec_end_to_end_seconds_count")
    assert e2e == prom.value("streamrec_recommendations_published_total")
    assert prom.value("streamrec_live_judged_total") > 0  # users with several events were judged
    assert prom.value('streamrec_live_hits_total{k="20"}') <= prom.value("streamrec_live_judged_total")
    assert abs(prom.value("streamrec_last_event_timestamp_seconds") - time.time()) < 300

    # the shipped alert rules load and evaluate on real data
    status, body = http_get(f"{prom.base}/api/v1/rules")
    groups = {g["name"]: g for g in json.loads(body)["data"]["groups"]}
    assert {"streamrec", "streamrec-recording"} <= set(groups)
    assert all(r["health"] == "ok" for g in groups.values() for r in g["rules"]), [
        (r["name"], r.get("lastError")) for g in groups.values() for r in g["rules"] if r["health"] != "ok"]
    # every dashboard query is valid PromQL, and the core panels show data
    for title, expr in dashboard_queries():
        prom.query(expr)
        if title in ("Events consumed by type", "Stage latency p99", "End-to-end latency"):
            prom.eventually(expr)  # a rate needs two scrapes of a series born with the first event

    # consumer lag per input partition, and the health endpoints: the lag gauges are set every
    # 2 s, so a scrape may still hold the zeros they start with (lag 0 of high-water 0); wait
    # for a scrape whose high-water marks count every event sent, with no lag left
    deadline = time.monotonic() + 30
    while True:
        lag = {(r["metric"]["topic"], r["metric"]["partition"]): float(r["value"][1])
               for r in prom.query("streamrec_consumer_lag")}
        highwater = prom.value("sum(streamrec_consumer_highwater_offset)")
        if len(lag) == 4 and sum(lag.values()) == 0 and highwater == N_EVENTS + 1:
            break
        assert time.monotonic() < deadline, (f"lag never reached 0 on all 4 input partitions with every event "
                                             f"counted: lag {lag}, high-water sum {highwater} of {N_EVENTS + 1}")
        time.sleep(1)
    assert {t for t, _ in lag} == {f"{topic_prefix}clicks", f"{topic_prefix}purchases"}
    status, body = http_get(f"http://127.0.0.1:{worker_port}/readyz")
    assert status == 200, body
    assert http_get(f"http://127.0.0.1:{worker_port}/healthz")[0] == 200

    assert process.stop() == 0, tail(process.log)
