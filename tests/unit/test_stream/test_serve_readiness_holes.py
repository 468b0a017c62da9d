"""`streamrec serve`'s readiness when something it awaits never answers: a Redis that accepts
the connection but never replies (a SIGSTOPed redis-server), a refresher that hangs, a
computing thread that never returns. Each case is a stub that never resolves and a fake
clock; nothing here needs Kafka or Redis."""

from __future__ import annotations

import asyncio
import threading

from aiohttp.test_utils import TestClient, TestServer
from aiokafka.errors import KafkaConnectionError
from prometheus_client import CollectorRegistry

from online_models import Recommender
from online_models.search import Catalogue, TextEmbedder
from stream import catalogue_feed, serve
from stream.catalogue_feed import CatalogueFeed
from stream.health import Health
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import DEFAULT_BOUNDS
from stream.retry import Backoff
from stream.search_step import SearchConfig, SearchStep
from stream.serve import Api, ModelRefresher, check_serving, create_web_app, run_server
from stream.settings import Settings
from stream.state import InMemoryUserStateStore

CONDITIONS = ("redis", "models", "catalogue")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Unanswering(InMemoryUserStateStore):
    """A store whose calls are sent and never answered (from the ``hang_from``-th PING on, and
    every snapshot read when ``blob_hangs``)."""

    def __init__(self, hang_from: int = 1, blob_hangs: bool = False) -> None:
        super().__init__()
        self.pings = 0
        self.hang_from = hang_from
        self.blob_hangs = blob_hangs
        self.hanging = asyncio.Event()  # a call is waiting for its answer

    async def _never(self):
        self.hanging.set()
        await asyncio.Event().wait()

    async def ping(self) -> bool:
        self.pings += 1
        if self.pings >= self.hang_from:
            await self._never()
        return True

    async def get_blob(self, name):
        if self.blob_hangs:
            await self._never()
        return await super().get_blob(name)


async def until(predicate, what: str, within_s: float = 5.0) -> None:
    """Wait for ``predicate()`` (a condition, polled), failing after ``within_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not predicate():
        assert loop.time() < deadline, f"not within {within_s} s: {what}"
        await asyncio.sleep(0.005)


def failing(health: Health) -> dict[str, str]:
    return {name: detail for name, ok, detail in health.conditions() if not ok}


async def test_a_ping_never_answered_flips_redis_within_the_ping_timeout(monkeypatch):
    """The worker waits 5 s for PING (check_readiness); serve awaited it without a bound, so
    its refresher, and with it every later refresh, hung on a Redis that never answers."""
    monkeypatch.setattr(serve, "PING_TIMEOUT_S", 0.05, raising=False)
    store = Unanswering()
    step = RecommendationStep(Recommender.default())
    health = Health(conditions=CONDITIONS)
    await asyncio.wait_for(check_serving(health, store, ModelRefresher(store, step), step, None, None, "streamrec.items"),
                           5.0)
    assert "PING not answered within" in failing(health)["redis"]


async def test_a_snapshot_read_never_answered_flips_redis(monkeypatch):
    """PING answered, then Redis stops answering while the models' snapshot is read."""
    monkeypatch.setattr(serve, "SNAPSHOT_TIMEOUT_S", 0.05, raising=False)
    store = Unanswering(hang_from=10**9, blob_hangs=True)
    step = RecommendationStep(Recommender.default())
    health = Health(conditions=CONDITIONS)
    await asyncio.wait_for(check_serving(health, store, ModelRefresher(store, step), step, None, None, "streamrec.items"),
                           5.0)
    assert "snapshot" in failing(health)["redis"] and "not answered within" in failing(health)["redis"]
    assert "models" not in failing(health)  # the models served stay


async def test_a_ping_answered_without_pong_fails_redis_and_a_later_one_restores_it():
    """A store's ping may say False rather than raise; redis must not read ok then."""
    class NoPong(InMemoryUserStateStore):
        pong = False

        async def ping(self) -> bool:
            return self.pong

    store = NoPong()
    step = RecommendationStep(Recommender.default())
    health = Health(conditions=CONDITIONS)
    refresher = ModelRefresher(store, step)
    await check_serving(health, store, refresher, step, None, None, "streamrec.items")
    assert "PONG" in failing(health)["redis"]
    store.pong = True
    await check_serving(health, store, refresher, step, None, None, "streamrec.items")
    assert "redis" not in failing(health)


async def test_conditions_not_refreshed_for_stale_after_s_fail_readiness_by_checks():
    """serve never marked its refreshes (Health.checked), so conditions it stopped refreshing
    stood as they were, a 200 included."""
    clock = Clock()
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    health = serve.serve_health(clock)
    await check_serving(health, store, ModelRefresher(store, step), step, None, None, "streamrec.items")
    health.beat()
    assert health.readiness()[0]
    clock.now += health.stale_after_s + 1
    health.beat()  # the event loop is fine: only the refresh stopped
    ready, text = health.readiness()
    assert not ready and list(failing(health)) == ["checks"]
    assert "serve" in failing(health)["checks"] and "Kafka consumer" not in failing(health)["checks"]


async def test_serve_keeps_beating_while_its_refresher_hangs(monkeypatch, tmp_path):
    """run_server beat in the loop that refreshes the conditions: a refresh that hung stopped
    the heartbeat, and /readyz blamed a blocked event loop (``loop``) while the loop answered
    every request, and kept saying redis ok. The heartbeat is a task of its own now, and a hung
    refresh is ``checks``."""
    fake_clock = clock = Clock()
    made: list[Health] = []
    refreshes = 0
    second = asyncio.Event()

    def health_factory(conditions, clock=None, **hints):  # serve.serve_health, with a fake clock
        made.append(Health(conditions=conditions, clock=fake_clock, **hints))
        return made[-1]

    async def refresh_then_hang(health, *args):
        nonlocal refreshes
        refreshes += 1
        if refreshes == 1:
            for name in CONDITIONS:
                health.set(name, True)
            health.checked()
            return
        second.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(serve, "Health", health_factory)
    monkeypatch.setattr(serve, "check_serving", refresh_then_hang)
    monkeypatch.setattr(serve, "load_scorer", lambda settings, metrics: None)
    monkeypatch.setattr(serve.RedisUserStateStore, "from_url", classmethod(lambda cls, *a, **k: InMemoryUserStateStore()))
    monkeypatch.setattr(serve, "BEAT_EVERY_S", 0.01, raising=False)
    settings = Settings.from_env({"STREAMREC_CATALOGUE": "false", "STREAMREC_MODEL_DIR": str(tmp_path),
                                  "STREAMREC_SNAPSHOT_INTERVAL_S": "1"})  # the next refresh 1 s after a ready one
    stop = asyncio.Event()
    task = asyncio.create_task(run_server(settings, 0, "127.0.0.1", stop))
    try:
        await asyncio.wait_for(second.wait(), 5.0)  # the first refresh done (ready), the second hangs
        health = made[0]
        clock.now += health.stale_after_s + 1
        await until(lambda: health.liveness()[0], "a heartbeat while the refresh hangs")
        assert list(failing(health)) == ["checks"]
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_computing_thread_that_never_returns_fails_readiness_by_progress():
    """Requests are computed on COMPUTE_THREADS threads; threads that hang (the text model, a
    lock) made every request wait and then be shed as 'overloaded' while /readyz said 200."""
    clock = Clock()
    health = Health(conditions=("redis",), clock=clock)
    health.set("redis", True)
    step = RecommendationStep(Recommender.default())
    started, release = threading.Event(), threading.Event()
    present_list = step.present_list

    def hanging(*args):
        started.set()
        release.wait(10)
        return present_list(*args)

    step.present_list = hanging
    api = Api(InMemoryUserStateStore(), step, None, SearchStep(step, None, SearchConfig(k=3)), top_k=3, health=health)
    try:
        async with TestClient(TestServer(create_web_app(api))) as client:
            request = asyncio.create_task(client.get("/v1/users/u1/recommendations"))
            assert await asyncio.to_thread(started.wait, 5.0)
            assert health.readiness()[0]  # seconds into a request: nothing wrong yet
            clock.now += health.stuck_after_s + 1
            ready, _ = health.readiness()
            assert not ready and "recommendations" in failing(health)["progress"]
            release.set()
            assert (await request).status == 200
            assert health.readiness()[0]  # the thread returned: ready again
    finally:
        release.set()
        api.executor.shutdown(wait=False)


class BrokerAway:
    """The feed's consumer once the catalogue is read: the broker stops answering (the
    metadata update says False, and getmany returns nothing, as aiokafka's do)."""

    def __init__(self) -> None:
        self.answers = True
        self.unanswered = asyncio.Event()

        class Client:
            async def force_metadata_update(inner):
                if not self.answers:
                    self.unanswered.set()
                return self.answers

        self._client = Client()

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, tps):
        pass

    async def seek_to_beginning(self, tp):
        pass

    async def end_offsets(self, tps):
        return {tp: 0 for tp in tps}

    async def getmany(self, timeout_ms, max_records):
        await asyncio.sleep(0)
        return {}

    async def stop(self):
        pass


def catalogue_condition(health: Health) -> tuple[bool, str]:
    return next((ok, detail) for name, ok, detail in health.conditions() if name == "catalogue")


async def serving_checked(feed: CatalogueFeed) -> Health:
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    health = Health(conditions=CONDITIONS)
    await check_serving(health, store, ModelRefresher(store, step), step, feed, feed.catalogue, feed.topic)
    return health


def new_feed() -> CatalogueFeed:
    return CatalogueFeed(Catalogue(TextEmbedder(threads=1)), {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()),
                         backoff=Backoff(base_s=0.001, cap_s=0.001, jitter=0), write_snapshots=False)


async def test_a_feed_that_cannot_reach_kafka_says_why_the_catalogue_is_not_ready(monkeypatch):
    """serve started while no broker answers: the feed retried for ever, and /readyz said only
    'reading t.items: 0 items so far'."""
    attempts = 0

    async def refused(options, records):
        nonlocal attempts
        attempts += 1
        raise KafkaConnectionError("Unable to bootstrap from [('kafka', 9092)]")

    monkeypatch.setattr(catalogue_feed, "started_reader", refused)
    feed = new_feed()
    task = asyncio.create_task(feed.run())
    try:
        await until(lambda: attempts >= 2, "the feed tried twice")
        ok, detail = catalogue_condition(await serving_checked(feed))
        assert not ok and "KafkaConnectionError" in detail and "Unable to bootstrap" in detail
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_broker_lost_after_the_catalogue_is_read_is_said_while_the_catalogue_serves(monkeypatch):
    """Once read, the catalogue serves as it is while the broker is away (serve stays ready: a
    Kafka outage must not take search away), but /readyz said 'following t.items' all along."""
    consumer = BrokerAway()

    async def reader(options, records):
        return consumer

    monkeypatch.setattr(catalogue_feed, "started_reader", reader)
    monkeypatch.setattr(catalogue_feed, "METADATA_EVERY_S", 0.0)
    feed = new_feed()
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.caught_up.wait(), 5.0)
        ok, detail = catalogue_condition(await serving_checked(feed))
        assert ok and "following t.items" in detail and "broker" not in detail
        consumer.answers = False
        await asyncio.wait_for(consumer.unanswered.wait(), 5.0)
        await until(lambda: getattr(feed, "trouble", None) is not None, "the feed noted the broker away")
        ok, detail = catalogue_condition(await serving_checked(feed))
        assert ok and "no broker answers" in detail
        consumer.answers = True
        await until(lambda: getattr(feed, "trouble", None) is None, "the broker back")
        ok, detail = catalogue_condition(await serving_checked(feed))
        assert ok and "broker" not in detail
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_scorer_registry_look_that_hangs_holds_neither_the_refresh_nor_more_threads(monkeypatch):
    """The scorer's look for a new version ran in a thread the refresh awaited without a bound
    (a model registry on a file system that hangs held every later refresh)."""
    monkeypatch.setattr(serve, "SCORER_CHECK_TIMEOUT_S", 0.05, raising=False)
    release = threading.Event()
    calls = 0

    class HangingScorer:
        def maybe_reload(self):
            nonlocal calls
            calls += 1
            release.wait(10)
            return False

    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    step.scorer = HangingScorer()
    refresher = ModelRefresher(store, step)
    health = Health(conditions=CONDITIONS)
    try:
        for _ in range(3):
            await asyncio.wait_for(check_serving(health, store, refresher, step, None, None, "streamrec.items"), 5.0)
        assert health.readiness()[0] and calls == 1  # one look hangs; none started beside it
        release.set()
        await until(lambda: refresher._scorer_check.done(), "the look returned")
        await check_serving(health, store, refresher, step, None, None, "streamrec.items")
        assert calls == 2
    finally:
        release.set()
