"""Every streamrec reader ignores what an aborted Kafka transaction wrote.

A transactional producer (a site's, writing events or items; any writer of the topics the
worker publishes to that is one) leaves the records of an aborted transaction in the log,
marked aborted; a reader whose isolation level is ``read_uncommitted`` (Kafka's default, and
aiokafka's and kafka-python's) hands them over like any other. Each test here writes records in
a transaction that is aborted, then in one that is committed, on a real broker, and checks
that the reader takes only the committed ones: the peer reader (stream/peers.py), the replay
after a restart (stream/replay.py), the catalogue feed of the workers and ``streamrec serve``
(stream/catalogue_feed.py), ``streamrec retrain``, ``streamrec tail`` and the demo's reader.
The aborted records come first in each partition, so a reader that took them would have taken
them by the time it reaches the committed ones.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import typer
from aiokafka import AIOKafkaProducer
from fakes import ConstantEmbedder
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner
from workerkit import until

from online_models import Recommender
from online_models.datasets import synthetic_interactions
from online_models.search import Catalogue
from stream.catalogue_feed import CatalogueFeed
from stream.demo import Watcher
from stream.peers import PeerLearner
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import (
    DEFAULT_BOUNDS,
    ClickEvent,
    PurchaseEvent,
    Recommendation,
    RecommendedItem,
    encode,
)
from stream.replay import Gap, replay
from stream.tail import tail
from stream.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
#: how long a reader may take to reach the committed records
DEADLINE_S = 60.0

Record = tuple[str, bytes | None, bytes | None]  # topic, key, value


async def _transaction(bootstrap: str, records: list[Record], commit: bool, partition: int | None = None) -> list[int]:
    """Write ``records`` in one transaction, then commit or abort it; their offsets."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=f"aborted-tests-{uuid.uuid4().hex}")
    await producer.start()
    try:
        await producer.begin_transaction()
        offsets = [(await producer.send_and_wait(topic, value, key=key, partition=partition)).offset
                   for topic, key, value in records]
        await (producer.commit_transaction() if commit else producer.abort_transaction())
    finally:
        await producer.stop()
    return offsets


async def _aborted_then_committed(bootstrap: str, aborted: list[Record], committed: list[Record],
                                  partition: int | None = None) -> list[int]:
    """``aborted`` written in a transaction that is aborted, then ``committed`` in one that is
    committed; the committed records' offsets."""
    await _transaction(bootstrap, aborted, commit=False, partition=partition)
    return await _transaction(bootstrap, committed, commit=True, partition=partition)


def _end_offset(bootstrap: str, topic: str, partition: int = 0) -> int:
    """The partition's high-water mark: past the last transaction's marker."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, partition)
        return consumer.end_offsets([tp])[tp]
    finally:
        consumer.close(autocommit=False)


def _clicks(topic: str, user: str, n: int) -> list[Record]:
    now = time.time_ns() // 1_000_000
    return [(topic, user.encode(), encode(ClickEvent(event_id=f"{user}-{i}", user_id=user, item_id=f"{user}-item-{i}",
                                                     ts=now - 1000 + i)))
            for i in range(n)]


def _recommendations(topic: str, user: str, n: int) -> list[Record]:
    now = time.time_ns() // 1_000_000
    return [(topic, user.encode(), encode(Recommendation(user_id=user, items=[RecommendedItem(f"{user}-item", 0.5)],
                                                         trigger_event_id=f"{user}-{i}", event_ts=now - 5,
                                                         generated_ts=now, model={})))
            for i in range(n)]


class _TeachingStep(RecommendationStep):
    """The real step, noting the ids of the events a reader had it learn."""

    def __init__(self) -> None:
        super().__init__(Recommender.default())
        self.taught: list[str] = []

    def relearn(self, events, positions, *args, **kw) -> int:
        self.taught += [e.event_id for e in events]
        return super().relearn(events, positions, *args, **kw)





@asynccontextmanager
async def _reading_partition_1(bootstrap: str, clicks: str, step, metrics: Metrics):
    """A peer reader of a worker that owns ``clicks``'s partition 0, so reads its partition 1,
    running for the block (its task)."""
    peers = PeerLearner(step, {"bootstrap_servers": bootstrap}, [clicks], DEFAULT_BOUNDS, asyncio.Lock(), metrics,
                        committed=dict, poll_ms=100)
    peers.assign({(clicks, 0)}, {clicks: range(2)})
    ready = asyncio.Event()
    ready.set()
    reading = asyncio.create_task(peers.run(ready))
    try:
        yield reading
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)

async def test_the_peer_reader_learns_the_committed_events_of_another_workers_partition_only(kafka_bootstrap,
                                                                                             topic_prefix):
    clicks = f"{topic_prefix}clicks"
    ensure_topics(kafka_bootstrap, [clicks], 2)
    committed = await _aborted_then_committed(kafka_bootstrap, _clicks(clicks, "aborted", 3),
                                              _clicks(clicks, "committed", 3), partition=1)
    step = _TeachingStep()
    async with _reading_partition_1(kafka_bootstrap, clicks, step, Metrics(CollectorRegistry())) as reading:
        await until(lambda: step.recommender.learned_offsets.get(f"{clicks}:1", -1) >= committed[-1],
                     "watermark past the committed events", reading)
    assert step.taught == ["committed-0", "committed-1", "committed-2"]
    assert step.recommender.n_learned == 3


async def test_the_peer_readers_lag_falls_to_zero_on_a_partition_that_ends_with_a_transactions_marker(
        kafka_bootstrap, topic_prefix):
    clicks = f"{topic_prefix}clicks"
    ensure_topics(kafka_bootstrap, [clicks], 2)
    committed = await _transaction(kafka_bootstrap, _clicks(clicks, "committed", 3), commit=True, partition=1)
    assert await asyncio.to_thread(_end_offset, kafka_bootstrap, clicks, 1) == committed[-1] + 2  # the commit marker
    step, metrics = _TeachingStep(), Metrics(CollectorRegistry())
    async with _reading_partition_1(kafka_bootstrap, clicks, step, metrics) as reading:
        await until(lambda: step.recommender.learned_offsets.get(f"{clicks}:1", -1) >= committed[-1],
                     "watermark past the committed events", reading)
        # the marker is an offset no record stands behind: measured from the last record, the
        # reader stayed one event behind for good
        await until(lambda: metrics.peer_lag._value.get() == 0, "peer lag of 0", reading)
    assert step.taught == ["committed-0", "committed-1", "committed-2"]


async def test_the_replay_after_a_restart_learns_the_committed_events_only(kafka_bootstrap, topic_prefix):
    clicks = f"{topic_prefix}clicks"
    ensure_topics(kafka_bootstrap, [clicks], 1)
    await _aborted_then_committed(kafka_bootstrap, _clicks(clicks, "aborted", 3), _clicks(clicks, "committed", 3))
    end = await asyncio.to_thread(_end_offset, kafka_bootstrap, clicks)  # the group's commit, past the marker
    step = _TeachingStep()
    learned = await asyncio.wait_for(replay(step, kafka_bootstrap, [Gap(clicks, 0, 0, end)], DEFAULT_BOUNDS,
                                            fetch_timeout_s=DEADLINE_S), DEADLINE_S)
    assert step.taught == ["committed-0", "committed-1", "committed-2"]
    assert learned == 3 and step.recommender.n_learned == 3
    assert step.recommender.learned_offsets[f"{clicks}:0"] == end - 1


def _item(topic: str, item_id: str) -> Record:
    return topic, item_id.encode(), json.dumps({"item_id": item_id, "title": f"{item_id} title",
                                                "ts": time.time_ns() // 1_000_000}).encode()


async def test_the_catalogue_feed_of_workers_and_serve_keeps_the_committed_items_only(kafka_bootstrap, topic_prefix):
    items = f"{topic_prefix}items"
    ensure_topics(kafka_bootstrap, [items], 1)
    await _transaction(kafka_bootstrap, [_item(items, "kept")], commit=True)
    # the aborted transaction removed "kept" (a tombstone) and added an item; the committed one adds another
    await _aborted_then_committed(kafka_bootstrap, [(items, b"kept", None), _item(items, "aborted-item")],
                                  [_item(items, "committed-item")])
    feed = CatalogueFeed(Catalogue(ConstantEmbedder()), {"bootstrap_servers": kafka_bootstrap}, items, DEFAULT_BOUNDS,
                         Metrics(CollectorRegistry()), poll_ms=100)
    reading = asyncio.create_task(feed.run())
    try:
        # the topic ends with a transaction's marker, which no record stands behind: the feed
        # must still say it has read the topic to its end
        await until(feed.caught_up.is_set, "catalogue read to the end of the topic", reading)
        await until(lambda: not feed.catalogue.pending, "catalogue indexed", reading)
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
    assert "committed-item" in feed.catalogue and "kept" in feed.catalogue
    assert "aborted-item" not in feed.catalogue and len(feed.catalogue) == 2


def _manifest_events(models: Path) -> int:
    version = (models / "CURRENT").read_text().strip()
    return json.loads((models / version / "manifest.json").read_text())["data"]["events"]


def _interaction_records(prefix: str, interactions, users_as: str) -> list[Record]:
    out = []
    for n, x in enumerate(interactions):
        cls, topic = (PurchaseEvent, "purchases") if x.kind == "purchase" else (ClickEvent, "clicks")
        user = f"{users_as}-{x.user_id}"
        out.append((f"{prefix}{topic}", user.encode(), encode(cls(event_id=f"{users_as}-{n}", user_id=user,
                                                                  item_id=x.item_id, ts=x.ts))))
    return out


def test_retrain_fits_the_committed_events_only(worker_env, topic_prefix, tmp_path):
    bootstrap = worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap, [f"{topic_prefix}forget"], 2)  # co-partitioned with the inputs (worker_env's 2)
    committed = list(synthetic_interactions(n_events=300, n_users=30, n_items=60, seed=11))
    aborted = list(synthetic_interactions(n_events=200, n_users=20, n_items=60, seed=12))
    asyncio.run(_aborted_then_committed(bootstrap, _interaction_records(topic_prefix, aborted, "aborted"),
                                        _interaction_records(topic_prefix, committed, "committed")))
    models = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "stream.cli", "retrain", "--once", "--no-gate", "--model-dir",
                           str(models), "--device", "cpu"], cwd=ROOT, env=worker_env, capture_output=True, text=True,
                          timeout=300)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    assert "read the topics' backlog: 300 events kept" in said, said
    assert _manifest_events(models) == len(committed)


def _tail_app() -> typer.Typer:
    app = typer.Typer(add_completion=False)
    app.command()(tail)
    return app


def test_streamrec_tail_prints_the_committed_recommendations_only(kafka_bootstrap, topic_prefix):
    recommendations = f"{topic_prefix}recommendations"
    ensure_topics(kafka_bootstrap, [recommendations], 1)
    asyncio.run(_aborted_then_committed(kafka_bootstrap, _recommendations(recommendations, "aborted", 3),
                                        _recommendations(recommendations, "committed", 3)))
    result = CliRunner().invoke(_tail_app(), ["--bootstrap", kafka_bootstrap, "--topic-prefix", topic_prefix,
                                              "--from-beginning", "--limit", "3", "--timeout", str(DEADLINE_S)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == ["committed"] * 3, result.output
    assert [line.split("after ")[1].split()[0] for line in lines] == ["committed-0", "committed-1", "committed-2"]


def test_the_demos_reader_counts_the_committed_recommendations_only(kafka_bootstrap, topic_prefix):
    recommendations, dlq = f"{topic_prefix}recommendations", f"{topic_prefix}dlq"
    ensure_topics(kafka_bootstrap, [recommendations, dlq], 1)
    asyncio.run(_aborted_then_committed(kafka_bootstrap, _recommendations(recommendations, "aborted", 3),
                                        _recommendations(recommendations, "committed", 3)))
    watcher = Watcher(kafka_bootstrap, recommendations, dlq, show_every=1000)
    watcher.start()
    try:
        deadline = time.monotonic() + DEADLINE_S
        while "committed" not in watcher.users:
            assert watcher.error is None, watcher.error
            assert time.monotonic() < deadline, f"the demo's reader read no committed recommendation in {DEADLINE_S:g} s"
            time.sleep(0.05)
        while len(watcher.latencies_ms) < 3 and time.monotonic() < deadline:  # the rest of the committed three
            time.sleep(0.05)
    finally:
        watcher.stop_flag.set()
        watcher.join(30)
    assert not watcher.is_alive() and watcher.error is None, watcher.error
    assert watcher.users == {"committed"} and len(watcher.latencies_ms) == 3
