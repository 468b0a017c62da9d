"""`streamrec retrain` is meant to run for days beside the workers: a broker that stops and
comes back (a restart, an upgrade) must not end it, nor cost it the events it has read, nor
fill its log. kafka-python 3.0's ``poll`` raises nothing while the broker is down (it retries
by itself), but logs every connection attempt and metadata refresh, several lines a second."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from workerkit import interaction_records, produce, wait_for

from online_models.datasets import synthetic_interactions
from stream.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]


def _current(models: Path) -> str | None:
    pointer = models / "CURRENT"
    return pointer.read_text().strip() if pointer.exists() else None


def _events(models: Path) -> int:
    version = _current(models)
    return json.loads((models / version / "manifest.json").read_text())["data"]["events"] if version else 0


def test_retrain_keeps_its_window_through_a_broker_restart(worker_env, topic_prefix, private_kafka, tmp_path):
    bootstrap = private_kafka.address
    # each socket retrain leaves open is said (kafka-python left one a refused attempt: stream/kafka_sockets.py)
    env = {**worker_env, "STREAMREC_KAFKA_BOOTSTRAP": bootstrap, "PYTHONWARNINGS": "always::ResourceWarning"}
    models = tmp_path / "retrained"
    ensure_topics(bootstrap, [f"{topic_prefix}{t}" for t in ("clicks", "purchases", "forget")], 2)
    first = list(synthetic_interactions(n_events=600, n_users=40, n_items=100, seed=7))
    produce(bootstrap, topic_prefix, interaction_records(first, 0))
    log_path = tmp_path / "retrain.log"
    log = log_path.open("w")
    retrain = subprocess.Popen([sys.executable, "-m", "stream.cli", "retrain", "--every", "1", "--no-gate",
                                "--model-dir", str(models), "--device", "cpu"],
                               cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _current(models) == "v0001" or retrain.poll() is not None, 180, "a first registered version")
        assert retrain.poll() is None, log_path.read_text()
        private_kafka.halt()
        wait_for(lambda: "Kafka" in log_path.read_text().split("as CURRENT", 1)[-1] or retrain.poll() is not None,
                 120, "retrain to notice the broker gone")
        private_kafka.start()
        more = list(synthetic_interactions(n_events=200, n_users=40, n_items=100, seed=8,
                                           start_ts=max(x.ts for x in first) + 1000))
        produce(bootstrap, topic_prefix, interaction_records(more, len(first)))
        # a fit after the restart trains on what was read before it too: the window was kept
        wait_for(lambda: _events(models) == len(first) + len(more) or retrain.poll() is not None, 180,
                 "a fit on the events from before and after the restart")
        assert retrain.poll() is None, log_path.read_text()
    finally:
        retrain.send_signal(signal.SIGTERM)
        code = retrain.wait(120)
        log.close()
    output = log_path.read_text()
    assert code == 0 and "Traceback" not in output and "ResourceWarning" not in output, output
    # each of kafka-python's messages once a minute at most (the outage lasted seconds): its old
    # log, at WARNING, had a dozen of each for a few seconds' outage. Each as formatted, as the
    # filter thins them (stream/logs.py Thinned): the broker's going can say "socket disconnected"
    # and then "ECONNREFUSED" after one prefix, two messages once each (a CI run met that)
    lines = [line.split("] ", 1)[-1] for line in output.splitlines()]  # without the time
    for message in ("No node available for metadata refresh", "Connection failed: ", "Metadata refresh: failed"):
        said = [line for line in lines if message in line]
        assert len(said) == len(set(said)), output
