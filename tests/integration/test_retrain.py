"""`streamrec retrain` beside a worker, on the real broker: it fits what the topics hold (not an
erased user's events, not a broken value), registers the model, and the worker serves it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from workerkit import consume_until, interaction_records, produce, wait_for

from online_models.datasets import synthetic_interactions
from stream.records import ForgetRequest, decode_recommendation, encode
from stream.topics import ensure_topics, partition_count

ROOT = Path(__file__).resolve().parents[2]


def manifest(models: Path, version: str) -> dict:
    return json.loads((models / version / "manifest.json").read_text())


def current(models: Path) -> str | None:
    pointer = models / "CURRENT"
    return pointer.read_text().strip() if pointer.exists() else None


def test_retrain_fits_the_topics_and_the_worker_hot_swaps_to_it(worker_env, workers, topic_prefix, tmp_path):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    models = Path(worker_env["STREAMREC_MODEL_DIR"])
    first = list(synthetic_interactions(n_events=1200, n_users=60, n_items=200, seed=3))
    victim = first[0].user_id
    erased = sum(x.user_id == victim for x in first)
    ensure_topics(bootstrap, [f"{topic_prefix}forget"], 2)  # co-partitioned with the inputs (worker_env's 2)
    produce(bootstrap, topic_prefix, [
        *interaction_records(first),
        ("clicks", b"u-bad", b'{"user_id": "u-bad", "item_id": [[[1]]]}'),  # breaks the contract: skipped
        ("forget", victim.encode(), encode(ForgetRequest(user_id=victim, request_id="r1",
                                                         ts=max(x.ts for x in first)))),
    ])
    worker = workers()  # no model registered yet: it ranks with the online models until one is
    log = (tmp_path / "retrain.log").open("w")
    retrain = subprocess.Popen([sys.executable, "-m", "stream.cli", "retrain", "--every", "1", "--model-dir", str(models),
                                "--device", "cpu"], cwd=ROOT, env=worker_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: current(models) == "v0001" or retrain.poll() is not None, 180, "a first registered version")
        assert retrain.poll() is None, (tmp_path / "retrain.log").read_text()
        fitted = manifest(models, "v0001")
        assert fitted["data"]["events"] == len(first) - erased and fitted["data"]["retrained"]
        assert fitted["parity"]["ok"]

        more = list(synthetic_interactions(n_events=300, n_users=60, n_items=200, seed=4,
                                           start_ts=max(x.ts for x in first) + 1000))
        produce(bootstrap, topic_prefix, interaction_records(more, first=len(first)))
        # a later fit learns them, and the worker serves a retrained version within its reload interval.
        # retrain fits as soon as it has read something new, so a fit may come when it has read only
        # part of the 300 (the producer's batches reach its fetches apart, the more so on a slow
        # machine) and become CURRENT: wait for the version that has all of them
        def fitted_all() -> bool:
            version = current(models)
            return version not in (None, "v0001") and \
                manifest(models, version)["data"]["events"] == len(first) - erased + len(more)

        wait_for(fitted_all, 180, "a fit on every event after the new ones", worker)
        # it passed the gate (on by default): fitted right after v0001, both figures, on 55 held-out
        # events newer than v0001's data, are in its manifest; after a fit on part of the 300, the
        # events newer than that one's data are too few to compare on, and the gate says so
        gate = manifest(models, current(models))["gate"]
        assert gate["passed"] and gate["held_out"] > 0, gate
        if gate["current"] == "v0001":
            assert gate["new_hr@10"] >= gate["current_hr@10"] - 0.01, gate
        else:
            assert manifest(models, gate["current"])["data"]["events"] < len(first) - erased + len(more), gate
            assert gate["undecided"].startswith("only "), gate
        # the worker loads a retrained version within its reload interval (5 s), then serves it
        wait_for(lambda: "Transformer scorer" in worker.log_text(), 60, "the worker loading a retrained version", worker)
        last = list(synthetic_interactions(n_events=100, n_users=60, n_items=200, seed=5,
                                           start_ts=max(x.ts for x in more) + 1000))
        produce(bootstrap, topic_prefix, interaction_records(last, first=len(first) + len(more)))
        consume_until(bootstrap, f"{topic_prefix}recommendations",
                      lambda values: any(decode_recommendation(v).model.get("transformer", "none") != "none"
                                         for v in values if v is not None), 90, worker)
    finally:
        retrain.send_signal(signal.SIGTERM)
        code = retrain.wait(120)
        log.close()
    output = (tmp_path / "retrain.log").read_text()
    assert code == 0, output
    assert "1 value skipped (invalid)" in output and "Traceback" not in output, output


def test_retrain_once_with_nothing_to_fit_exits_1_for_its_scheduler(worker_env, tmp_path):
    """`--once` is for cron: a run that registered no version (here: the topics hold nothing to
    train on) says so in its exit status, not only in its log."""
    done = subprocess.run([sys.executable, "-m", "stream.cli", "retrain", "--once", "--model-dir", str(tmp_path / "m"),
                           "--device", "cpu"], cwd=ROOT, env=worker_env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no fit" in done.stdout + done.stderr and not (tmp_path / "m" / "CURRENT").exists()


def test_retrain_on_a_prefix_no_worker_uses_says_so_and_creates_no_topic(worker_env, tmp_path):
    """A typo in STREAMREC_TOPIC_PREFIX made retrain create a whole set of topics of its own and
    fit nothing, silently; the workers create the topics, so retrain refuses a prefix without them."""
    typo = f"{worker_env['STREAMREC_TOPIC_PREFIX']}typo."
    done = subprocess.run([sys.executable, "-m", "stream.cli", "retrain", "--once", "--model-dir", str(tmp_path / "m"),
                           "--device", "cpu"], cwd=ROOT, env={**worker_env, "STREAMREC_TOPIC_PREFIX": typo},
                          capture_output=True, text=True, timeout=180)
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    assert f"there are no topics {typo}clicks, {typo}purchases" in said and "start one first" in said, said
    assert "Traceback" not in said, said
    for name in ("clicks", "purchases", "forget", "recommendations"):
        assert partition_count(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], f"{typo}{name}") is None, name
