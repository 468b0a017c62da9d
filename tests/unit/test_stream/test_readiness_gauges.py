"""streamrec_ready{condition} and streamrec_ready_overall: what /readyz judges, read from /metrics."""

from __future__ import annotations

import urllib.request

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry, generate_latest

from online_models import Recommender
from stream.health import JUDGED_CONDITIONS, Health, ReadinessCollector, export_readiness, serve
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.search_step import SearchStep
from stream.serve import Api, create_web_app
from stream.state import InMemoryUserStateStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauges(registry: CollectorRegistry, health: Health) -> dict[str, float | None]:
    """Each condition's streamrec_ready value, and "overall": as a scrape reads them."""
    values = {name: registry.get_sample_value("streamrec_ready", {"condition": name}) for name, _, _ in health.conditions()}
    values["overall"] = registry.get_sample_value("streamrec_ready_overall")
    return values


def exported(health: Health) -> CollectorRegistry:
    registry = CollectorRegistry()
    export_readiness(registry, health)
    return registry


def test_every_condition_has_a_gauge_that_follows_health_set():
    clock = Clock()
    health = Health(conditions=("kafka", "redis"), clock=clock)
    registry = exported(health)
    # the judged conditions are there from the start, ok until they fail
    assert gauges(registry, health) == {"kafka": 0.0, "redis": 0.0, "loop": 1.0, "progress": 1.0, "checks": 1.0,
                                        "overall": 0.0}
    health.beat()
    health.set("kafka", True, "in the group")
    assert gauges(registry, health)["kafka"] == 1.0 and gauges(registry, health)["overall"] == 0.0
    health.set("redis", True)
    assert gauges(registry, health) == {"kafka": 1.0, "redis": 1.0, "loop": 1.0, "progress": 1.0, "checks": 1.0,
                                        "overall": 1.0}
    health.set("redis", False, "PING failed")
    assert gauges(registry, health)["redis"] == 0.0 and gauges(registry, health)["overall"] == 0.0
    health.set("output", False, "Kafka refuses the DLQ's records")  # a condition set later gets its series
    assert registry.get_sample_value("streamrec_ready", {"condition": "output"}) == 0.0


def ready_health(clock: Clock) -> tuple[Health, CollectorRegistry]:
    health = Health(conditions=("kafka", "redis"), clock=clock, stale_after_s=30, stuck_after_s=60)
    for condition in ("kafka", "redis"):
        health.set(condition, True)
    health.beat()
    health.checked()
    registry = exported(health)
    assert gauges(registry, health)["overall"] == 1.0
    return health, registry


def test_a_stuck_batch_flips_progress_at_the_next_scrape_and_back_when_it_ends():
    clock = Clock()
    health, registry = ready_health(clock)
    health.busy("a batch of 2 event(s) in hand")
    clock.now += 30
    health.beat()
    health.checked()
    assert gauges(registry, health)["progress"] == 1.0  # slow, not yet stuck
    clock.now += 31
    health.beat()
    health.checked()
    assert gauges(registry, health) == {"kafka": 1.0, "redis": 1.0, "loop": 1.0, "progress": 0.0, "checks": 1.0,
                                        "overall": 0.0}
    health.idle()
    assert gauges(registry, health)["progress"] == 1.0 and gauges(registry, health)["overall"] == 1.0


def test_a_blocked_loop_and_stale_checks_show_on_their_own_gauges():
    clock = Clock()
    health, registry = ready_health(clock)
    clock.now += 31  # neither the heartbeat nor the checks since
    values = gauges(registry, health)
    assert values["loop"] == 0.0 and values["checks"] == 0.0 and values["overall"] == 0.0
    assert values["kafka"] == values["redis"] == values["progress"] == 1.0  # their last answers, still standing
    health.beat()
    assert gauges(registry, health)["loop"] == 1.0 and gauges(registry, health)["checks"] == 0.0
    health.checked()
    assert gauges(registry, health)["overall"] == 1.0


def test_the_gauges_and_the_readyz_text_say_the_same():
    clock = Clock()
    health, registry = ready_health(clock)
    health.set("redis", False, "PING failed")
    health.busy("waiting for the models")
    clock.now += 61
    health.beat()
    ready, text = health.readiness()
    failing_in_text = {line.split(":", 1)[0] for line in text.splitlines() if ": FAIL (" in line}
    failing_gauges = {name for name, value in gauges(registry, health).items() if value == 0.0}
    assert not ready and failing_in_text == {"redis", "progress", "checks"}
    assert failing_gauges == failing_in_text | {"overall"}
    # a ready answer lists the conditions set; the judged ones only while they fail
    health.set("redis", True)
    health.idle()
    health.checked()
    ready, text = health.readiness()
    assert ready and not any(line.startswith(JUDGED_CONDITIONS) for line in text.splitlines())


def test_exporting_again_on_one_registry_reads_the_newest_health_and_does_not_duplicate():
    # the process-wide REGISTRY is built with auto_describe=True, as this one: registering a second
    # collector with the same names there raises "Duplicated timeseries"
    registry = CollectorRegistry(auto_describe=True)
    first = export_readiness(registry, Health(conditions=("kafka",), clock=Clock()))
    newest = Health(conditions=("redis",), clock=Clock())
    newest.set("redis", True)
    assert export_readiness(registry, newest) is first
    assert registry.get_sample_value("streamrec_ready", {"condition": "redis"}) == 1.0
    assert registry.get_sample_value("streamrec_ready", {"condition": "kafka"}) is None
    assert generate_latest(registry).decode().count("# TYPE streamrec_ready gauge") == 1
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # what export_readiness spares its callers
        registry.register(ReadinessCollector(newest))


def test_the_workers_metrics_port_serves_the_gauges():
    registry = CollectorRegistry(auto_describe=True)
    health = Health(clock=Clock())
    with serve(0, registry, Health(clock=Clock()), addr="127.0.0.1"):
        pass
    with serve(0, registry, health, addr="127.0.0.1") as server:  # again on one registry: no error
        health.set("kafka", True)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as resp:
            body = resp.read().decode()
    assert 'streamrec_ready{condition="kafka"} 1.0' in body
    assert 'streamrec_ready{condition="redis"} 0.0' in body
    assert "streamrec_ready_overall 0.0" in body


async def test_serves_metrics_carry_the_gauges_of_its_health():
    health = Health(conditions=("redis", "models", "catalogue"), clock=Clock())
    health.set("models", True)
    step = RecommendationStep(Recommender.default())
    api = Api(InMemoryUserStateStore(), step, None, SearchStep(step, None), top_k=3, health=health)
    metrics = Metrics(CollectorRegistry())
    try:
        async with TestClient(TestServer(create_web_app(api, metrics=metrics))) as client:
            text = await (await client.get("/metrics")).text()
    finally:
        api.executor.shutdown()
    assert 'streamrec_ready{condition="models"} 1.0' in text
    assert 'streamrec_ready{condition="catalogue"} 0.0' in text
    assert 'streamrec_ready{condition="loop"} 1.0' in text
