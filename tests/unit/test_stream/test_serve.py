"""`streamrec serve`'s HTTP API over the in-memory store, through a real HTTP client (aiohttp).

tests/integration/test_search_e2e.py runs the command itself against real Kafka and Redis."""

from __future__ import annotations

import asyncio
import logging
import sys
import time

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from online_models import Interaction, Recommender, RecommenderConfig
from online_models.search import Catalogue, CatalogueItem, TextEmbedder
from stream import serve
from stream.experiments import Arm, Experiment, parse_experiment
from stream.health import Health
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms
from stream.records import ClickEvent
from stream.search_step import SearchConfig, SearchStep
from stream.serve import (
    Api,
    BadRequest,
    ModelRefresher,
    _MalformedRequests,
    check_serving,
    create_web_app,
    parse_k,
)
from stream.snapshots import SNAPSHOT_KEY
from stream.state import InMemoryUserStateStore, UserState, encode_state

TS = 1_700_000_000_000
ITEMS = [
    CatalogueItem(item_id="jacket-zh", title="女士冬季长款羽绒服 连帽 保暖"),
    CatalogueItem(item_id="jacket-en", title="Women's long winter down jacket with hood"),
    CatalogueItem(item_id="shoes", title="Men's lightweight running shoes"),
    CatalogueItem(item_id="tv", title="55 inch 4K LED smart TV"),
]


@pytest.fixture(scope="module")
def catalogue():
    catalogue = Catalogue(TextEmbedder(threads=1), candidates=10)
    catalogue.upsert(ITEMS)
    catalogue.flush()
    return catalogue


def trained_step() -> RecommendationStep:
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=10, n_candidates=50)))
    events = []
    for u in range(40):
        events += [ClickEvent(event_id=f"e{u}a", user_id=f"v{u}", item_id="shoes", ts=TS + u * 10),
                   ClickEvent(event_id=f"e{u}b", user_id=f"v{u}", item_id="tv", ts=TS + u * 10 + 1)]
    step(events, {}, lambda: TS)
    return step


@pytest.fixture
async def client(catalogue):
    store = InMemoryUserStateStore()
    await store.save_docs({"fan": encode_state(UserState("fan", recent_items=["shoes"])),
                           "searcher": encode_state(UserState("searcher", recent_items=["shoes"], recent_queries=["羽绒服"],
                                                              query_ts=int(time.time() * 1000) - 1000))})
    step = trained_step()
    step.catalogue = catalogue
    api = Api(store, step, catalogue, SearchStep(step, catalogue, SearchConfig(k=3)), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        yield client
    api.executor.shutdown()


async def test_search_answers_json_items_with_explanations(client):
    # "winter down jacket": the English jacket ahead of the shoes by 0.03 in cosine. For "down
    # jacket" alone (羽绒服) the two were 0.003 apart, and the int8 kernels of a CPU without
    # AVX-512 VNNI (an AMD EPYC of this project's kind) put the shoes ahead
    resp = await client.get("/v1/search", params={"q": "冬季羽绒服", "k": "2"})
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.json()
    assert [i["item_id"] for i in body["items"]] == ["jacket-zh", "jacket-en"] and body["user_id"] is None
    assert body["items"][0]["explanation"] == {"source": "search", "matched": "both"} and body["query"] == "冬季羽绒服"
    # for "for men and women" the query alone ranks the English jacket, the Chinese one, then the
    # shoes (fused relevance 0.70, 0.58 and 0.51 on an AMD EPYC); the fan viewed the shoes: their
    # models lift the shoes over the Chinese jacket, and say so. Whether over the English jacket
    # too depends on the third decimal of the cosines, which differs between CPUs' int8 kernels
    anyone = await (await client.get("/v1/search", params={"q": "for men and women", "k": "2"})).json()
    assert [i["item_id"] for i in anyone["items"]] == ["jacket-en", "jacket-zh"]
    fan = await (await client.get("/v1/search", params={"q": "for men and women", "user_id": "fan", "k": "2"})).json()
    assert {i["item_id"] for i in fan["items"]} == {"jacket-en", "shoes"}
    assert {i["explanation"]["source"] for i in fan["items"] if i["item_id"] == "shoes"} == {"reminder"}


async def test_recommendations_are_fresh_from_the_models_and_the_users_state(client):
    body = await (await client.get("/v1/users/fan/recommendations")).json()
    assert body["items"][0]["item_id"] == "tv"  # viewed shoes: co-visited with the TV
    assert body["items"][0]["explanation"] == {"source": "covisit", "because": "shoes"}
    stranger = await (await client.get("/v1/users/nobody/recommendations", params={"k": "1"})).json()
    assert len(stranger["items"]) <= 1
    searcher = await (await client.get("/v1/users/searcher/recommendations", params={"k": "10"})).json()
    sources = {i["item_id"]: i.get("explanation", {}).get("source") for i in searcher["items"]}
    assert sources.get("jacket-zh") == "query"  # their latest search, 羽绒服, joined their candidates


async def test_similar_items_come_from_the_catalogue(client):
    body = await (await client.get("/v1/items/jacket-zh/similar", params={"k": "1"})).json()
    assert [i["item_id"] for i in body["items"]] == ["jacket-en"]
    assert body["items"][0]["explanation"] == {"source": "similar", "because": "jacket-zh"}
    missing = await client.get("/v1/items/nope/similar")
    assert missing.status == 404 and "not in the catalogue" in (await missing.json())["error"]


@pytest.mark.parametrize(("path", "params", "said"), [
    ("/v1/search", {}, "q is required"),
    ("/v1/search", {"q": "   "}, "q is required"),
    ("/v1/search", {"q": "x" * 257}, "q: 1 to 256 characters"),
    ("/v1/search", {"q": "tv", "k": "0"}, "k=0: expected a whole number from 1 to 100"),
    ("/v1/search", {"q": "tv", "k": "ten"}, "k=ten"),
    ("/v1/search", {"q": "tv", "k": "101"}, "k=101"),
    ("/v1/search", {"q": "tv", "user_id": "u" * 129}, "user_id: an id of 1 to 128"),
    ("/v1/search", {"q": "a\x01b"}, "without control characters"),
    ("/v1/users/fan/recommendations", {"k": "-3"}, "k=-3"),
    ("/v1/users/fan/recommendations", {"k": ""}, "k is empty: expected a whole number"),  # was the default, silently
    ("/v1/search", {"q": "tv", "k": ""}, "k is empty"),
    ("/v1/items/jacket-zh/similar", {"k": ""}, "k is empty"),
    ("/v1/search", {"q": "tv", "k": "+5"}, "k=+5"),  # int() reads these three; a whole number is digits
    ("/v1/search", {"q": "tv", "k": "1_0"}, "k=1_0"),
    ("/v1/search", {"q": "tv", "k": "\uff15"}, "expected a whole number"),
    ("/v1/search", {"q": "tv", "k": "9" * 5000}, "k=" + "9" * 40 + "…"),
    ("/v1/search", [("q", "tv"), ("k", "2"), ("k", "abc")], "k is given 2 times"),
    ("/v1/search", {"q": "\ufeff"}, "q is required"),
    ("/v1/search", {"q": "\u200b"}, "q is required"),  # invisible alone was searched for: a request for nothing
    ("/v1/search", {"q": " \u202e\u2060\u180e\ufe0f\u3164\U000e0041 "}, "q is required"),
    ("/v1/search", {"q": "tv", "user_id": "\ufeff"}, "user_id: an id of 1 to 128"),
    ("/v1/users/\ufeff/recommendations", {}, "user_id: an id of 1 to 128"),
])
async def test_bad_parameters_are_400s_that_say_what_is_wrong(client, path, params, said):
    resp = await client.get(path, params=params)
    assert resp.status == 400
    assert said in (await resp.json())["error"]


async def test_a_query_of_invisible_characters_alone_is_a_400_and_with_text_is_searched(client):
    """``q=%E2%80%8B`` (U+200B ZERO WIDTH SPACE) was searched for, as if it were text."""
    invisible = await client.get(yarl.URL("/v1/search?q=%E2%80%8B%E2%80%AE", encoded=True))
    assert invisible.status == 400 and "q is required" in (await invisible.json())["error"]
    assert (await client.get("/v1/search", params={"q": "\u200btv\u202e"})).status == 200


def test_k_with_leading_zeros_is_read_as_its_number():
    """"007" was 7 and "0100" a 400: the length was checked before the zeros were dropped."""
    assert (parse_k("007", 20), parse_k("0100", 20)) == (7, 100)
    for raw in ("0101", "0" * 5000 + "1000", "00"):
        with pytest.raises(BadRequest):
            parse_k(raw, 20)


@pytest.mark.parametrize("target", ["/v1/search?k=1&q=%ff%fe", "/v1/search?q=tv&user_id=u%ff",
                                    "/v1/users/u%ff/recommendations", "/v1/search?q=%ED%A0%80"])
async def test_bytes_that_are_not_utf8_are_a_400_not_a_replacement_character(client, target):
    resp = await client.get(yarl.URL(target, encoded=True))
    assert resp.status == 400 and "not UTF-8" in (await resp.json())["error"]


async def test_health_and_an_unknown_path(client):
    assert (await client.get("/healthz")).status == 200
    for path in ("/v2/nothing", "/v1/users//recommendations"):
        missing = await client.get(path)
        assert missing.status == 404 and "404 Not Found" in (await missing.json())["error"]
    wrong = await client.post("/v1/search", params={"q": "tv"})
    assert wrong.status == 405 and "GET" in wrong.headers["Allow"] and "405" in (await wrong.json())["error"]
    # CONNECT's target is host:port, so aiohttp routes it nowhere: it was a 404 naming no path
    rd, wr = await asyncio.open_connection(client.server.host, client.server.port)
    wr.write(b"CONNECT /v1/search?q=tv HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = (await rd.read()).split(b"\r\n\r\n")[0]
    wr.close()
    assert head.startswith(b"HTTP/1.1 405") and b"Allow: GET,HEAD" in head, head


async def test_the_models_follow_the_workers_snapshot():
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=7)))  # serve's own STREAMREC_TOP_K
    refresher = ModelRefresher(store, step)
    assert not await refresher.refresh() and not refresher.loaded
    trained = trained_step().recommender
    await store.set_blob(SNAPSHOT_KEY, trained.snapshot())
    assert await refresher.refresh() and step.recommender.n_learned == trained.n_learned
    assert step.recommender.config.k == 7 != trained.config.k  # the workers' models, serve's settings
    assert not await refresher.refresh()  # the same snapshot: not loaded again


async def test_serve_says_once_that_it_serves_the_snapshots_with_its_own_settings(caplog):
    """serve loads every new snapshot of the workers: a difference of blend settings (or a
    weighted learner the snapshots lack) is said at the first, not every interval."""
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=7, weights={"covisit": 1.0, "mf": 0.2})))
    refresher = ModelRefresher(store, step)
    trained = trained_step().recommender
    with caplog.at_level(logging.INFO, "streamrec.snapshots"):
        for n in range(3):
            trained.learn_one(Interaction(user_id=f"w{n}", item_id="i1", ts=10**12 + n))
            await store.set_blob(SNAPSHOT_KEY, trained.snapshot())
            assert await refresher.refresh()
    assert caplog.text.count("STREAMREC_* settings of this start") == 1
    assert caplog.text.count("has no learner for") == 1


async def test_a_refused_snapshot_keeps_the_models_served_says_so_once_and_does_not_blame_redis(caplog):
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    metrics = Metrics(CollectorRegistry())
    refresher = ModelRefresher(store, step, metrics=metrics)
    trained = trained_step().recommender
    await store.set_blob(SNAPSHOT_KEY, trained.snapshot())
    health = Health(conditions=("redis", "models", "catalogue"))
    await check_serving(health, store, refresher, step, None, None, "streamrec.items")
    assert health.readiness()[0]
    await store.set_blob(SNAPSHOT_KEY, b"garbage-not-a-snapshot")
    for _ in range(3):
        await check_serving(health, store, refresher, step, None, None, "streamrec.items")
    ready, text = health.readiness()
    assert ready and "refused" in text and step.recommender.n_learned == trained.n_learned  # the last good one serves
    assert metrics.model_snapshot_refused._value.get() == 1 and caplog.text.count("refused the workers' snapshot") == 1


async def test_a_snapshot_refused_with_a_megabyte_of_error_text_is_logged_in_one_short_line(caplog, monkeypatch):
    def restore(data, key=None):
        raise ValueError("x" * 1_000_000 + "\nsecond line")

    monkeypatch.setattr(Recommender, "restore", staticmethod(restore))
    store = InMemoryUserStateStore()
    refresher = ModelRefresher(store, RecommendationStep(Recommender.default()))
    await store.set_blob(SNAPSHOT_KEY, b"any")
    with caplog.at_level(logging.ERROR, "streamrec.serve"):
        assert not await refresher.refresh()
    [line] = [r.getMessage() for r in caplog.records if "refused the workers' snapshot" in r.getMessage()]
    assert len(line) < 1_000 and "\n" not in line and "ValueError: xxx" in line

async def test_redis_away_is_said_by_its_condition_alone():
    class Away(InMemoryUserStateStore):
        async def ping(self) -> bool:
            raise ConnectionError("Connection refused")

        async def get_blob(self, name):
            raise ConnectionError("Connection refused")

    step = RecommendationStep(Recommender.default())
    health = Health(conditions=("redis", "models", "catalogue"))
    await check_serving(health, Away(), ModelRefresher(Away(), step), step, None, None, "streamrec.items")
    ready, text = health.readiness()
    assert not ready and "redis: FAIL (ConnectionError: Connection refused)" in text
    assert "catalogue: ok" in text and "not checked yet" not in text


async def test_a_search_that_runs_no_text_model_is_answered_on_the_event_loop(catalogue):
    """A query whose vector is cached needs no computing thread; a new one does (the threads
    shut down here: it fails, as a 500)."""
    step = trained_step()
    api = Api(InMemoryUserStateStore(), step, catalogue, SearchStep(step, catalogue, SearchConfig(k=3)), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        first = await (await client.get("/v1/search", params={"q": "smart tv", "user_id": "v1"})).json()
        api.executor.shutdown()
        again = await client.get("/v1/search", params={"q": "smart tv", "user_id": "v1"})
        assert again.status == 200 and (await again.json())["items"] == first["items"]
        assert (await client.get("/v1/search", params={"q": "a query never seen"})).status == 500


async def test_a_search_answers_as_many_items_as_its_k_asks_beyond_the_configured_depth():
    """``k`` may be up to 100 while the indexes retrieve ``STREAMREC_SEARCH_CANDIDATES`` (50 by
    default) a query: the request's ``k`` deepens the retrieval, as the configured ``k`` does
    (a review found ``k=100`` answered with 50 items, and nothing saying why)."""
    shoes = [CatalogueItem(item_id=f"shoe{i}", title=f"running shoe model {i}") for i in range(12)]
    small = Catalogue(TextEmbedder(threads=1), candidates=5)
    small.upsert(shoes)
    small.flush()
    step = trained_step()
    step.catalogue = small
    api = Api(InMemoryUserStateStore(), step, small, SearchStep(step, small, SearchConfig(k=3, depth=5)), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        for k, user in [("10", None), ("12", "fan"), ("2", None)]:
            params = {"q": "running shoe", "k": k} | ({"user_id": user} if user else {})
            body = await (await client.get("/v1/search", params=params)).json()
            assert len({i["item_id"] for i in body["items"]}) == int(k), (k, user)
    api.executor.shutdown()


async def test_an_overloaded_server_sheds_load_with_503s(catalogue):
    import asyncio

    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    api = Api(store, step, catalogue, SearchStep(step, catalogue), top_k=3)
    release, inside = asyncio.Event(), []

    async def slow(request):  # every search waits: the requests pile up
        inside.append(request)
        await release.wait()
        return await Api.search(api, request)

    api.search = slow
    async with TestClient(TestServer(create_web_app(api, max_in_flight=2))) as client, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as other:
        # one from each of two clients: one client alone may hold only one of 2 (test_serve_clients.py)
        first = [asyncio.create_task(client.get("/v1/search", params={"q": "tv"})),
                 asyncio.create_task(other.get(client.make_url("/v1/search"), params={"q": "tv"}))]
        deadline = time.monotonic() + 10
        while len(inside) < 2:
            assert time.monotonic() < deadline, "two searches in progress"
            await asyncio.sleep(0.01)
        shed = await client.get("/v1/search", params={"q": "tv"})
        assert shed.status == 503 and shed.headers["Retry-After"] == "1"
        assert (await shed.json())["error"] == "overloaded: 2 requests in progress; retry shortly"
        assert (await client.get("/healthz")).status == 200  # probes are never shed
        release.set()
        assert [r.status for r in await asyncio.gather(*first)] == [200, 200]
    api.executor.shutdown()


class RedisDown(InMemoryUserStateStore):
    """A store whose every read fails as redis-py's does when Redis is away."""

    async def load_many(self, user_ids):
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")


async def test_a_store_that_does_not_answer_is_a_503_not_a_500(catalogue):
    step = RecommendationStep(Recommender.default())
    api = Api(RedisDown(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        resp = await client.get("/v1/users/u1/recommendations")
        assert resp.status == 503 and "does not answer" in (await resp.json())["error"]
        assert (await client.get("/v1/search", params={"q": "tv"})).status == 200  # no user: no store needed
    api.executor.shutdown()


async def test_a_store_outage_under_traffic_is_one_warning_not_one_per_request_nor_the_users_ids(catalogue, caplog,
                                                                                            monkeypatch):
    """While Redis was away each request logged a warning of its own, with its path and query:
    at a thousand requests a second, a thousand lines a second, each naming a user id (and what
    they searched for) even with STREAMREC_PSEUDONYM_KEY set."""
    monkeypatch.setattr(serve.store_log, "filters", [])  # the app's own thinning, not an earlier test's
    step = RecommendationStep(Recommender.default())
    api = Api(RedisDown(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        with caplog.at_level(logging.INFO, "streamrec.serve"):
            for i in range(20):
                assert (await client.get(f"/v1/users/secret-{i}/recommendations")).status == 503
                assert (await client.get("/v1/search", params={"q": "tv", "user_id": f"secret-{i}"})).status == 503
    said = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(said) == 2, said  # one per route, the next after the thinning interval saying how many more
    assert "/v1/users/{user_id}/recommendations" in " ".join(said) and "Connection refused" in " ".join(said)
    assert "secret" not in caplog.text
    api.executor.shutdown()


async def test_a_stored_state_that_does_not_decode_is_said_once_not_at_every_request_naming_the_user(catalogue, caplog,
                                                                                                   monkeypatch):
    """serve reads and never saves: a user's document that does not decode stays so until a
    worker saves the user again, and each request naming them logged it again at ERROR (a
    review: 300 requests, 300 lines in 2.6 s), in the worker's words ("starting the user
    afresh"), which serve does not do."""
    monkeypatch.setattr(logging.getLogger("streamrec.state.documents"), "filters", [])  # the app's own thinning, not an earlier test's
    store = InMemoryUserStateStore()
    store._docs["broken"] = b"\xff\xfe not a state"
    step = trained_step()
    api = Api(store, step, catalogue, SearchStep(step, catalogue, SearchConfig(k=3)), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        with caplog.at_level(logging.INFO, "streamrec.state"):
            for _ in range(20):
                assert (await client.get("/v1/users/broken/recommendations")).status == 200
                assert (await client.get("/v1/search", params={"q": "smart tv", "user_id": "broken"})).status == 200
    said = [r.getMessage() for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(said) == 1 and "read as a new user's" in said[0], said
    api.executor.shutdown()


async def test_a_bug_that_fails_every_request_is_one_traceback_an_interval_naming_no_user(catalogue, caplog,
                                                                                          monkeypatch):
    """Each 500 logged its own traceback with the request's path and query: a bug that failed
    every request wrote a traceback a request, each naming a user (and what they searched for)."""
    monkeypatch.setattr(serve.failure_log, "filters", [])  # the app's own thinning, not an earlier test's
    step = RecommendationStep(Recommender.default())

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the ranking")

    monkeypatch.setattr(step, "present_list", broken)
    api = Api(InMemoryUserStateStore(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        with caplog.at_level(logging.INFO, "streamrec.serve"):
            for i in range(20):
                failed = await client.get(f"/v1/users/secret-{i}/recommendations")
                assert failed.status == 500 and "internal error" in (await failed.json())["error"]
    said = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and said[0].exc_info is not None, [r.getMessage() for r in said]
    assert said[0].getMessage().startswith("GET /v1/users/{user_id}/recommendations answered 500: RuntimeError")
    assert "a bug in the ranking" in caplog.text and "secret" not in caplog.text
    api.executor.shutdown()


async def test_a_500_whose_exception_carries_a_megabyte_logs_a_bounded_traceback(catalogue, caplog, monkeypatch):
    """The traceback of a 500 quoted its exception's text whole: a megabyte in, a megabyte logged."""
    monkeypatch.setattr(serve.failure_log, "filters", [])  # the app's own filters, not an earlier test's state
    step = RecommendationStep(Recommender.default())

    def broken(*args, **kwargs):
        raise RuntimeError("a bug " + "x" * 1_000_000)

    monkeypatch.setattr(step, "present_list", broken)
    api = Api(InMemoryUserStateStore(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        with caplog.at_level(logging.INFO, "streamrec.serve"):
            assert (await client.get("/v1/users/u1/recommendations")).status == 500
    api.executor.shutdown()
    [said] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    text = logging.Formatter().format(said)
    assert len(text) < 20_000 and "RuntimeError: a bug xxx" in text and "in broken" in text, len(text)


async def test_a_request_the_store_fails_makes_readyz_say_so_at_once_not_at_the_next_refresh(catalogue):
    """Redis gone, every request naming a user was a 503 while /readyz said 200 for up to 10 s
    (STREAMREC_SNAPSHOT_INTERVAL_S, until the refresher's next PING): serve stayed in rotation."""

    step = RecommendationStep(Recommender.default())
    health = serve.serve_health()
    for condition in ("redis", "models", "catalogue"):
        health.set(condition, True)
    health.checked()
    api = Api(RedisDown(), step, catalogue, SearchStep(step, catalogue), top_k=3, health=health)
    async with TestClient(TestServer(create_web_app(api))) as client:
        assert (await client.get("/readyz")).status == 200
        assert (await client.get("/v1/users/u1/recommendations")).status == 503
        ready = await client.get("/readyz")
        assert ready.status == 503 and "redis: FAIL (a request's read failed: ConnectionError" in (await ready.json())["detail"]
        assert api.store_failed.is_set()  # the refresher checks again now, and says when Redis is back
    api.executor.shutdown()


async def test_while_redis_is_down_a_request_is_a_503_at_once_not_after_the_stores_timeout(catalogue):
    """Redis frozen, each request naming a user waited the socket's 5 s for the 503 the one
    before it got, holding a connection and its client that long. After a failed read, none is
    tried until the refresher finds Redis answering again (``redis`` ok)."""

    class Counting(InMemoryUserStateStore):
        down, reads = True, 0

        async def load_many(self, user_ids):
            self.reads += 1
            if self.down:
                raise TimeoutError("Timeout reading from 127.0.0.1:6379")
            return await super().load_many(user_ids)

    store = Counting()
    step = RecommendationStep(Recommender.default())
    health = serve.serve_health()
    for condition in ("redis", "models", "catalogue"):
        health.set(condition, True)
    api = Api(store, step, catalogue, SearchStep(step, catalogue), top_k=3, health=health)
    async with TestClient(TestServer(create_web_app(api))) as client:
        assert (await client.get("/v1/users/u1/recommendations")).status == 503 and store.reads == 1
        for path in ("/v1/users/u2/recommendations", "/v1/search?q=tv&user_id=u3"):
            later = await client.get(path)
            assert later.status == 503 and later.headers["Retry-After"] == "1", path
        assert store.reads == 1  # not asked: the last read failed and nothing has answered since
        assert (await client.get("/v1/search", params={"q": "tv"})).status == 200  # no user: no store needed
        store.down = False
        health.set("redis", True, "PING answered")  # as the refresher's next round says
        assert (await client.get("/v1/users/u1/recommendations")).status == 200 and store.reads == 2
    api.executor.shutdown()


async def test_under_pseudonyms_the_experiment_arm_is_that_of_the_id_the_site_sends(catalogue):
    pseudonyms = Pseudonyms("k" * 32)
    store = InMemoryUserStateStore()
    step = RecommendationStep(Recommender.default())
    experiment = Experiment("x", (Arm("a", 0.5), Arm("b", 0.5)), "a")
    asked: list[str] = []

    class Recording:  # the experiment, noting whose arm is asked for
        def arm_of(self, uid):
            asked.append(uid)
            return experiment.arm_of(uid)

    step.experiment = Recording()
    api = Api(store, step, catalogue, SearchStep(step, catalogue), top_k=3, pseudonyms=pseudonyms)
    async with TestClient(TestServer(create_web_app(api))) as client:
        assert (await client.get("/v1/users/site-user-7/recommendations")).status == 200
    assert asked == ["site-user-7"]  # as the worker's step asks it, not with the pseudonym
    api.executor.shutdown()


async def test_an_arm_that_pins_a_model_version_ranks_with_that_model_as_in_the_worker(catalogue):
    import numpy as np


    class Scorer:  # a pinned version: it says which users it scored
        version, provider = "pinned-v7", "cpu"

        def __init__(self):
            self.scored: list[list[str]] = []

        def score(self, recent, candidates):
            self.scored += [list(r) for r in recent]
            return [np.linspace(0.0, 1.0, len(c)) for c in candidates]

    store = InMemoryUserStateStore()
    await store.save_docs({"fan": encode_state(UserState("fan", recent_items=["shoes"]))})
    step = trained_step()
    step.catalogue = catalogue
    step.experiment = Experiment("x", (Arm("pinned", 1.0, model="pinned-v7"),), "pinned")
    pinned = Scorer()
    step.arm_scorers = {"pinned": pinned}  # the step's own scorer is None: only the arm's can score
    api = Api(store, step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        assert (await client.get("/v1/users/fan/recommendations")).status == 200
    assert pinned.scored == [["shoes"]]
    # an arm without a model scores with none
    step.experiment = Experiment("x", (Arm("plain", 1.0, model="none"),), "plain")
    async with TestClient(TestServer(create_web_app(api))) as client:
        assert (await client.get("/v1/users/fan/recommendations")).status == 200
    assert pinned.scored == [["shoes"]]
    api.executor.shutdown()


async def test_new_items_nobody_clicked_are_recommended_by_their_text(client):
    # the models know the shoes and the TV (events); the two jackets have none: only their
    # text can recommend them, to a user whose recent items are close in meaning
    body = await (await client.get("/v1/users/fan/recommendations", params={"k": "10"})).json()
    sources = {i["item_id"]: i.get("explanation", {}).get("source") for i in body["items"]}
    assert "content" in sources.values()
    assert {item for item, source in sources.items() if source == "content"} <= {"jacket-zh", "jacket-en"}


async def test_requests_are_counted_and_timed_on_metrics(catalogue):
    metrics = Metrics(CollectorRegistry())
    step = RecommendationStep(Recommender.default())
    api = Api(InMemoryUserStateStore(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    async with TestClient(TestServer(create_web_app(api, metrics=metrics))) as client:
        assert (await client.get("/v1/search", params={"q": "tv"})).status == 200
        assert (await client.get("/v1/search", params={"q": "tv", "k": "0"})).status == 400
        assert (await client.get("/v1/items/nothing/similar")).status == 404
        assert (await client.post("/v1/users/u1/recommendations")).status == 405
        assert (await client.get("/v1/nothing")).status == 404
        assert (await client.get("/healthz")).status == 200  # probes are not API requests
        resp = await client.get("/metrics")
        text = await resp.text()
    api.executor.shutdown()
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    assert 'streamrec_http_requests_total{route="/v1/search",status="200"} 1.0' in text
    assert 'streamrec_http_requests_total{route="/v1/search",status="400"} 1.0' in text
    assert 'streamrec_http_requests_total{route="/v1/items/{item_id}/similar",status="404"} 1.0' in text
    assert 'streamrec_http_request_seconds_count{route="/v1/search"} 2.0' in text
    # a known path asked with another method was "unknown", as a path that is none
    assert 'streamrec_http_requests_total{route="/v1/users/{user_id}/recommendations",status="405"} 1.0' in text
    assert 'streamrec_http_requests_total{route="unknown",status="404"} 1.0' in text
    assert "/healthz" not in text


def test_a_request_the_http_parser_refuses_is_logged_in_one_line_not_a_traceback():
    import logging

    from aiohttp.http_exceptions import BadStatusLine


    try:
        raise BadStatusLine("\x16\x03\x01")
    except BadStatusLine:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s", ("10.0.0.1",),
            sys.exc_info())
    assert _MalformedRequests().filter(record)
    assert any(isinstance(f, _MalformedRequests) for f in logging.getLogger("aiohttp.server").filters)  # create_web_app's
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage() == "Error handling request from 10.0.0.1: a malformed request (BadStatusLine)"


async def test_a_client_that_never_finishes_its_headers_is_closed_after_the_keep_alive_time(monkeypatch):
    # aiohttp's own default let a slow client hold a connection for 3,630 s
    monkeypatch.setattr(serve, "KEEPALIVE_S", 0.5)
    runner = serve.api_runner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server, nothing answered
        assert 0.3 < time.monotonic() - started < 3
        writer.close()
    finally:
        await runner.cleanup()


async def test_a_get_whose_body_does_not_decode_is_logged_in_one_line_not_an_unhandled_exception(client, caplog):
    # aiohttp reads a GET's unread body after the answer; a gzip body of 3 bytes fails only
    # then, and was logged as an "Unhandled exception" at ERROR with three chained tracebacks
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc")
    await writer.drain()
    with caplog.at_level(logging.INFO, "aiohttp.server"):
        answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK")
    records = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)]
    assert records[0].getMessage().endswith("a malformed request (ContentEncodingError)")


SERVE_AT_256_FILES = """
import asyncio, resource, sys
from aiohttp import web
from stream import serve
resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

async def main():
    runner = serve.api_runner(web.Application())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the test closes it, or dies

asyncio.run(main())
"""


async def test_one_client_holding_hundreds_of_idle_connections_does_not_lock_others_out():
    # at a soft limit of 256 open files (1,024 is common), 300 idle connections left serve
    # accepting no one else's, and asyncio logging ERROR tracebacks, until they timed out (75 s)
    import os
    import resource
    from pathlib import Path

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if (hard != resource.RLIM_INFINITY and hard < 2048) or soft < 1024:
        pytest.skip(f"open files limited to {soft} (hard {hard}) here")
    root = str(Path(__file__).resolve().parents[3])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    server = await asyncio.create_subprocess_exec(sys.executable, "-c", SERVE_AT_256_FILES, env=env,
                                                  stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                                  stderr=asyncio.subprocess.PIPE)
    idle = []
    try:
        port = int(await asyncio.wait_for(server.stdout.readline(), 60))
        for _ in range(300):
            idle.append((await asyncio.open_connection("127.0.0.1", port))[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 404")  # an empty app's answer: answered at all
    finally:
        for writer in idle:
            writer.close()
        server.kill()
        _, err = await server.communicate()
    assert b"Too many open files" not in err


def test_what_aiohttp_logs_of_an_exception_past_the_middlewares_quotes_its_text_cut_short():
    step = RecommendationStep(Recommender.default())
    create_web_app(Api(InMemoryUserStateStore(), step, None, SearchStep(step, None), top_k=3))
    try:
        raise RuntimeError("y" * 1_000_000)
    except RuntimeError:
        record = logging.getLogger("aiohttp.server").makeRecord(
            "aiohttp.server", logging.ERROR, __file__, 1, "Unhandled exception", (), sys.exc_info())
    assert logging.getLogger("aiohttp.server").filter(record)
    assert record.exc_text is not None and len(record.exc_text) < 5_000 and "RuntimeError: yyy" in record.exc_text


async def test_lists_carry_a_rec_id_and_variant_and_a_click_echoing_it_counts_under_that_arm(catalogue):
    """serve's lists carried no rec_id: a click on one was credited by the time window to the
    worker's last list, under the user's arm when it came. Now each names its arm, which no
    user state need remember (serve writes none)."""
    ab = parse_experiment({"experiment": "ab", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]})
    ba = parse_experiment({"experiment": "ab", "arms": [{"name": "b", "share": 0.5}, {"name": "a", "share": 0.5}]})
    user = next(u for u in (f"m{i}" for i in range(1000)) if ab.arm_of(u).name == "a" and ba.arm_of(u).name == "b")
    store = InMemoryUserStateStore()
    await store.save_docs({user: encode_state(UserState(user, recent_items=["shoes"]))})
    step = trained_step()
    step.experiment = ab
    api = Api(store, step, catalogue, SearchStep(step, catalogue, SearchConfig(k=3)), top_k=3)
    async with TestClient(TestServer(create_web_app(api))) as client:
        home = [await (await client.get(f"/v1/users/{user}/recommendations")).json() for _ in range(2)]
        searched = await (await client.get("/v1/search", params={"q": "jacket", "user_id": user})).json()
        anonymous = await (await client.get("/v1/search", params={"q": "jacket"})).json()
    api.executor.shutdown()
    for body in (*home, searched):
        assert body["variant"] == "a" and len(body["rec_id"]) <= 24 and step.served_by(body["rec_id"]) == "a"
    assert len({home[0]["rec_id"], home[1]["rec_id"], searched["rec_id"]}) == 3
    assert anonymous["rec_id"] is None and anonymous["variant"] is None  # no user: no arm ranked it
    # the file changed and the worker restarted: the user is in arm b, the list was a's
    worker = RecommendationStep(step.recommender, experiment=ba)
    click = ClickEvent(event_id="c1", user_id=user, item_id=home[0]["items"][0]["item_id"], ts=TS + 5_000,
                       rec_id=home[0]["rec_id"])
    counts = worker([click], {}, lambda: TS).variants
    assert counts["a"].clicks == 1 and counts["a"].clicked_lists == 0  # not remembered: a click, not a clicked list
    assert counts["b"].clicks == 0 and counts["b"].lists == 1
