"""Readiness while the worker makes no progress, though its loop beats and Redis and Kafka answer."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import redis
from faust.types import TP
from prometheus_client import CollectorRegistry

from stream.app import create_app
from stream.consumer import ConsumerThread
from stream.handler import BatchHandler
from stream.health import Health, check_readiness
from stream.prometheus import Metrics
from stream.retry import Backoff
from stream.settings import Settings, TopicNames
from stream.state import Fenced, InMemoryUserStateStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def ready_shell(clock: Clock):
    """A worker's shell whose health says ready (its loop beats, Redis and Kafka answer)."""
    health = Health(clock=clock)
    shell = create_app(Settings.from_env({}), load_model=False, health=health, store=InMemoryUserStateStore()).streamrec
    for condition in ("kafka", "redis", "models"):
        health.set(condition, True)
    health.beat()
    assert health.readiness()[0]
    return shell, health


class FakeApp:
    """What handle_taken reads of a Faust app."""

    def __init__(self) -> None:
        self.flow_control = SimpleNamespace(is_active=lambda: True)
        self.consumer_generation_id = 1
        self.consumer = SimpleNamespace(held=set())


def taken(*offsets: int) -> list:
    return [SimpleNamespace(message=SimpleNamespace(topic="streamrec.clicks", partition=0, offset=o, key=b"u",
                                                    value=b"{}", timestamp=None, generation_id=1))
            for o in offsets]


class HangingHandler:
    """A batch whose handling awaits something that does not come (an acknowledgement, a thread)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def handle_isolated(self, messages) -> None:
        await self.release.wait()


async def test_a_batch_that_never_finishes_makes_the_worker_unready_until_it_does():
    clock = Clock()
    shell, health = ready_shell(clock)
    shell.handler = HangingHandler()
    batch = asyncio.ensure_future(shell.handle_taken(FakeApp(), taken(0, 1)))
    await asyncio.sleep(0.01)
    clock.now += 30
    health.beat()  # the loop is fine
    assert health.readiness()[0]  # a slow batch is not yet a stuck one
    clock.now += 31
    health.beat()
    ready, text = health.readiness()
    assert not ready and "progress: FAIL (a batch of 2 event(s) in hand for 61 s" in text
    shell.handler.release.set()
    await asyncio.wait_for(batch, 1.0)
    assert health.readiness()[0]  # progress again: ready at once


async def test_a_batch_waiting_for_a_lock_that_is_never_released_makes_the_worker_unready():
    """The peer reader, a replay or a snapshot holds the models' lock: no batch is handled."""
    clock = Clock()
    shell, health = ready_shell(clock)
    shell.handler = HangingHandler()
    shell.handler.release.set()  # handled at once once it has the lock
    await shell.busy.acquire()  # held by a task that hangs
    batch = asyncio.ensure_future(shell.handle_taken(FakeApp(), taken(0)))
    await asyncio.sleep(0.01)
    clock.now += 61
    health.beat()
    ready, text = health.readiness()
    assert not ready and "progress: FAIL (a batch of 1 event(s) waiting for the models" in text
    shell.busy.release()
    await asyncio.wait_for(batch, 1.0)
    assert health.readiness()[0]


async def test_conditions_no_timer_refreshes_any_more_stop_counting():
    """The timer that refreshes the conditions hangs after a check that found all well (a call
    into the Kafka consumer thread that never returns: update_lag's, while the broker is away):
    its last answer, 200, must not stand for ever."""

    class Store:
        async def ping(self):
            return True

    clock = Clock()
    health = Health(clock=clock)
    health.set("models", True)
    app = SimpleNamespace(rebalancing=False, rebalancing_count=1,
                          consumer=SimpleNamespace(assignment=lambda: {TP("streamrec.clicks", 0)}))
    health.beat()
    assert await check_readiness(app, Store(), health)
    clock.now += 29
    health.beat()  # the loop beats: only the checking timer hangs
    assert health.readiness()[0]
    clock.now += 2
    health.beat()
    ready, text = health.readiness()
    assert not ready and "checks: FAIL (the conditions above were last refreshed 31 s ago" in text
    assert await check_readiness(app, Store(), health)  # the timer goes on: ready again


async def test_a_worker_whose_failed_batch_was_revoked_is_ready_again():
    """A batch raised past every safeguard: its partition's commits are held, and ``batches``
    fails, until the partition is revoked. After the rebalance nothing is held any more (the
    batch is read again from the commit, here or by another worker): the worker must not say
    unready until a restart."""

    class Failing:
        async def handle_isolated(self, messages) -> None:
            raise RuntimeError("past every safeguard")

    clock = Clock()
    shell, health = ready_shell(clock)
    consumer = create_app(Settings.from_env({}), load_model=False, store=InMemoryUserStateStore()).consumer
    shell.handler = Failing()
    app = SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True), consumer_generation_id=1,
                          consumer=consumer, add_future=lambda coro: coro.close())
    await shell.handle_taken(app, taken(10))
    ready, text = health.readiness()
    assert not ready and "batches: FAIL" in text
    clicks0 = TP("streamrec.clicks", 0)
    assert consumer.held == {clicks0}
    await consumer.on_partitions_revoked({clicks0})  # a rebalance: Faust revokes, then assigns
    await shell.on_assigned(app, {TP("streamrec.clicks", 1)})
    ready, text = health.readiness()
    assert ready, text
    assert "batches: ok" in text


async def test_a_retry_that_ends_fenced_leaves_an_idle_worker_ready():
    """Redis drops a claim's connection, then answers that the partition moved on (a rebalance
    meanwhile): the retry loop stops (Fenced), and the worker, maybe handed no partition with
    events since, must not say "state: FAIL ... retrying" until its next batch saves."""
    clock = Clock()
    health = Health(clock=clock)
    for condition in ("kafka", "redis"):
        health.set(condition, True)
    health.beat()
    answers = iter([ConnectionError("Connection reset by peer"), Fenced([0])])

    async def claim():
        raise next(answers)

    async def publish(records):
        return []

    handler = BatchHandler(None, InMemoryUserStateStore(), publish, TopicNames(), Metrics(CollectorRegistry()),
                           backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), health=health)
    with pytest.raises(Fenced):
        await handler._retry("claim", claim)
    ready, text = health.readiness()
    assert ready, text


async def test_a_full_redis_is_said_with_what_to_do_while_the_save_is_retried():
    """A Redis at its maxmemory: the worker retried and said only redis-py's text, nothing of
    what an operator can do about it."""
    health = Health(clock=Clock())
    answers = iter([redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), None])

    async def save():
        answer = next(answers)
        if answer is not None:
            raise answer
        texts.append(health.readiness()[1])  # as /readyz said it during the retries

    async def publish(records):
        return []

    texts: list[str] = []
    handler = BatchHandler(None, InMemoryUserStateStore(), publish, TopicNames(), Metrics(CollectorRegistry()),
                           backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), health=health)
    await handler._retry("save", save)
    assert "state: FAIL (save failed: OutOfMemoryError: " in texts[0], texts
    assert "Redis is full (its maxmemory) and refuses writes" in texts[0] and "STREAMREC_STATE_TTL_S" in texts[0]


async def test_commits_that_stop_moving_behind_the_handled_events_make_the_worker_unready():
    """Faust's commit hangs (the group's coordinator unreachable while the partitions' leaders
    answer): the worker handles what it fetched, then nothing, and every other condition holds."""

    class Recording:
        async def handle_isolated(self, messages) -> None:
            pass

    clock = Clock()
    shell, health = ready_shell(clock)
    shell.handler = Recording()
    clicks0, clicks1 = TP("streamrec.clicks", 0), TP("streamrec.clicks", 1)
    consumer = SimpleNamespace(assignment=lambda: {clicks0, clicks1}, _committed_offset={clicks0: 5}, held={clicks1})
    app = SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True), consumer_generation_id=1,
                          consumer=consumer)
    await shell.handle_taken(app, taken(10, 11))
    shell.handled[clicks1] = 7  # its commits are held on purpose (a batch that raised): batches says so
    shell.watch_commits(app, now=0.0)
    assert health.readiness()[0]
    consumer._committed_offset[clicks0] = 8  # committing, under load: never all of it at once
    shell.watch_commits(app, now=30.0)
    shell.watch_commits(app, now=89.0)
    assert health.readiness()[0]
    shell.watch_commits(app, now=91.0)  # not a commit for 61 s
    ready, text = health.readiness()
    assert not ready
    assert "commits: FAIL (1 partition(s) commit nothing: streamrec.clicks[0] handled up to offset 12, committed 8" in text
    consumer._committed_offset[clicks0] = 12
    shell.watch_commits(app, now=92.0)
    ready, text = health.readiness()
    assert ready, text
    assert shell.handled == {}


def test_topics_read_together_with_different_partition_counts_make_the_worker_unready(caplog):
    """Partitions added to the clicks topic alone while the worker runs: its consumer's metadata
    shows the counts differ, and readiness says which and what to do (the log once), until the
    others are grown too. A topic not created yet says nothing."""
    clock = Clock()
    shell, health = ready_shell(clock)
    counts = {t: 2 for t in ("streamrec.clicks", "streamrec.purchases", "streamrec.forget")}
    app = SimpleNamespace(consumer=SimpleNamespace(topic_partitions=counts.get))
    shell.watch_partitions(app)
    ready, text = health.readiness()
    assert ready and "partitions: ok (the topics read together have 2 partitions each)" in text, text
    counts["streamrec.clicks"] = 4
    with caplog.at_level("ERROR", logger="streamrec.app"):
        for _ in range(3):
            shell.watch_partitions(app)
    ready, text = health.readiness()
    assert not ready
    assert "partitions: FAIL (the topics a worker reads together must have as many partitions each (streamrec.clicks " \
           "has 4, streamrec.purchases has 2, streamrec.forget has 2)" in text, text
    assert "Grow streamrec.purchases, streamrec.forget to 4 partitions" in text
    assert len([r for r in caplog.records if "as many partitions" in r.getMessage()]) == 1  # not every 2 s
    counts.update({"streamrec.purchases": 4, "streamrec.forget": 4})
    shell.watch_partitions(app)
    ready, text = health.readiness()
    assert ready and "partitions: ok (the topics read together have 4 partitions each)" in text, text


def test_partitions_are_not_judged_before_the_consumer_starts():
    clock = Clock()
    shell, health = ready_shell(clock)

    def not_started(topic):
        raise RuntimeError("consumer not started")

    shell.watch_partitions(SimpleNamespace(consumer=SimpleNamespace(topic_partitions=not_started)))
    ready, text = health.readiness()
    assert ready and "partitions" not in text, text


def test_the_peer_reader_is_told_of_partitions_added_after_the_assignment():
    """A worker other than the group's leader had the old partition counts at the rebalance the
    leader started: once its metadata shows the new ones, its peer reader reads them too."""
    shell, _ = ready_shell(Clock())
    told = []
    shell.peers = SimpleNamespace(assign=lambda owned, partitions: told.append((owned, dict(partitions))))
    owned = [("streamrec.clicks", 1), ("streamrec.purchases", 1), ("streamrec.forget", 1)]
    shell.peer_assignment = (owned, {t: range(2) for t in ("streamrec.clicks", "streamrec.purchases", "streamrec.forget")})
    counts = {"streamrec.clicks": 2, "streamrec.purchases": 2, "streamrec.forget": 2}
    app = SimpleNamespace(consumer=SimpleNamespace(topic_partitions=counts.get))
    shell.watch_partitions(app)
    assert told == []  # nothing new
    counts.update({"streamrec.clicks": 4, "streamrec.purchases": 4, "streamrec.forget": 4})
    shell.revoking = True  # a rebalance under way: the next assignment says
    shell.watch_partitions(app)
    assert told == []
    shell.revoking = False
    shell.watch_partitions(app)
    shell.watch_partitions(app)  # told once
    assert told == [(owned, {t: range(4) for t in counts})]


def test_every_worker_counts_partitions_from_its_own_metadata():
    """Faust's count is aiokafka's coordinator snapshot, kept by the group's leader alone; the
    worker's consumer thread reads its client's metadata, which every member keeps."""
    thread = ConsumerThread.__new__(ConsumerThread)
    thread._consumer = SimpleNamespace(_coordinator=SimpleNamespace(_metadata_snapshot={}),
                                       _client=SimpleNamespace(cluster=SimpleNamespace(
                                           partitions_for_topic={"streamrec.clicks": {0, 1, 2}}.get)))
    assert thread.topic_partitions("streamrec.clicks") == 3
    assert thread.topic_partitions("streamrec.other") is None
