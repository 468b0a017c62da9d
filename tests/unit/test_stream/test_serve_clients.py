"""``streamrec serve`` against clients that would hold more than their share: one that never
reads its answers, one with many requests at once (stream/serve_clients.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import time

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from online_models import Recommender
from online_models.search import Catalogue, CatalogueItem, TextEmbedder
from stream import serve, serve_clients
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.search_step import SearchStep
from stream.serve import Api, create_web_app
from stream.settings import Settings
from stream.state import InMemoryUserStateStore

#: the second client's address: Linux answers on all of 127.0.0.0/8
OTHER_PEER = "127.0.0.2"


@pytest.fixture(scope="module")
def catalogue():
    catalogue = Catalogue(TextEmbedder(threads=1), candidates=10)
    catalogue.upsert([CatalogueItem(item_id="tv", title="55 inch 4K LED smart TV"),
                      CatalogueItem(item_id="shoes", title="Men's lightweight running shoes")])
    catalogue.flush()
    return catalogue


@pytest.fixture
def api(catalogue):
    step = RecommendationStep(Recommender.default())
    api = Api(InMemoryUserStateStore(), step, catalogue, SearchStep(step, catalogue), top_k=3)
    yield api
    api.executor.shutdown()


async def started(app: web.Application) -> tuple[web.AppRunner, int]:
    """``app`` served as ``streamrec serve`` serves it, on a free port of 127.0.0.1."""
    runner = serve.api_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def until(condition, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {deadline_s} s: {what}"
        await asyncio.sleep(0.01)


async def answer(port: int, target: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_a_client_that_never_reads_its_answers_is_aborted_holding_one_answer_at_most(api, monkeypatch, caplog):
    # aiohttp has no write timeout: the connection was held for ever, with 64 KiB of answers
    # and more unsent, while its handler waited for the client to read
    monkeypatch.setattr(serve_clients, "WRITE_TIMEOUT_S", 1.0)
    monkeypatch.setattr(serve_clients, "_said", serve_clients._Said())
    runner, port = await started(create_web_app(api, metrics=Metrics(CollectorRegistry())))
    stuck = []
    try:
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            _, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 3000)  # never read
            stuck.append(writer)
        seen: set[int] = set()  # serve's connections seen holding bytes the kernel would not take
        most = 0

        def watch(done) -> bool:
            nonlocal most
            for handler in runner.server.connections:
                held = handler.transport.get_write_buffer_size() if handler.transport is not None else 0
                most = max(most, held)
                if held:
                    seen.add(id(handler))
            return done()

        await until(lambda: watch(lambda: len(seen) == 2), 20, "both connections holding answers not read")
        stuck_at = time.monotonic()
        with caplog.at_level(logging.WARNING, "streamrec.serve"):
            ok = await answer(port, "/v1/search?q=tv")  # another client meanwhile
            assert ok.startswith(b"HTTP/1.1 200 OK"), ok[:200]
            await until(lambda: watch(lambda: not runner.server.connections), 10, "the connections closed by serve")
        assert time.monotonic() - stuck_at < 1.0 + 3
        # the answer in hand at most, not 64 KiB and more (the last answer is the largest: the
        # search added its series)
        assert 0 < most <= len(await answer(port, "/metrics"))
        said = [r.getMessage() for r in caplog.records if r.name == "streamrec.serve"]
        assert len(said) == 1, said  # one line for both
        assert said[0].startswith("aborted a connection from 127.0.0.1 whose answers were not read for 1 s")
    finally:
        for writer in stuck:
            writer.transport.abort()
        await runner.cleanup()


async def test_one_client_gets_its_own_503s_and_another_is_still_answered(api):
    # the shedding was global alone: one client with many requests in progress got everyone 503s
    inside, release = [], asyncio.Event()

    async def search(request):  # "slow" waits: the requests pile up
        if request.query.get("q") == "slow":
            inside.append(request.remote)
            await release.wait()
        return await Api.search(api, request)

    api.search = search
    runner, port = await started(create_web_app(api, max_in_flight=4, reserved_slots=2))  # 2 for one client
    url = f"http://127.0.0.1:{port}/v1/search"
    async with aiohttp.ClientSession() as mine, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(OTHER_PEER, 0))) as other:
        try:
            held = [asyncio.create_task(mine.get(url, params={"q": "slow"})) for _ in range(2)]
            await until(lambda: len(inside) == 2, 10, "two slow requests in progress")
            # a third of its own, whatever X-Forwarded-For says: that client's limit
            shed = await asyncio.wait_for(mine.get(url, params={"q": "tv"}, headers={"X-Forwarded-For": "203.0.113.9"}), 5)
            assert shed.status == 503 and shed.headers["Retry-After"] == "1"
            error = (await shed.json())["error"]
            assert "this client already has 2 requests in progress, the most one client may" in error, error
            theirs = asyncio.create_task(other.get(url, params={"q": "slow"}))
            await until(lambda: len(inside) == 3, 10, "the other client's slow request in progress")
            answered = await asyncio.wait_for(other.get(url, params={"q": "tv"}), 5)
            assert answered.status == 200 and (await answered.json())["items"]
            release.set()
            assert [r.status for r in await asyncio.gather(*held, theirs)] == [200, 200, 200]
            assert inside == ["127.0.0.1", "127.0.0.1", OTHER_PEER]
        finally:
            release.set()
            await runner.cleanup()


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_share(api):
    # behind a reverse proxy every request comes from the proxy's address: without believing its
    # X-Forwarded-For, the proxy's clients together held one client's share of the requests in progress
    inside, release = [], asyncio.Event()

    async def search(request):
        if request.query.get("q") == "slow":
            inside.append(request.headers["X-Forwarded-For"])
            await release.wait()
        return await Api.search(api, request)

    api.search = search
    runner, port = await started(create_web_app(api, max_in_flight=4, reserved_slots=2,
                                                trusted_proxies=(ipaddress.ip_network("127.0.0.1"),)))
    url = f"http://127.0.0.1:{port}/v1/search"
    busy, other = {"X-Forwarded-For": "203.0.113.9"}, {"X-Forwarded-For": "203.0.113.9, 198.51.100.4"}
    async with aiohttp.ClientSession() as proxy:
        try:
            held = [asyncio.create_task(proxy.get(url, params={"q": "slow"}, headers=busy)) for _ in range(2)]
            await until(lambda: len(inside) == 2, 10, "two slow requests in progress")
            shed = await asyncio.wait_for(proxy.get(url, params={"q": "tv"}, headers=busy), 5)
            assert shed.status == 503 and "this client already has 2" in (await shed.json())["error"]
            # the nearest address the proxy did not vouch for is the client: 198.51.100.4
            answered = await asyncio.wait_for(proxy.get(url, params={"q": "tv"}, headers=other), 5)
            assert answered.status == 200
            release.set()
            assert [r.status for r in await asyncio.gather(*held)] == [200, 200]
        finally:
            release.set()
            await runner.cleanup()


async def test_a_client_alone_holds_all_but_the_reserved_slots_and_another_still_gets_them(api):
    # one client could hold half (8 of 16): a site's single backend calling from one address was
    # shed at its 9th request while 8 slots stood empty; now it may hold all but the 4 reserved
    inside, release = [], asyncio.Event()

    async def search(request):
        if request.query.get("q") == "slow":
            inside.append(request.remote)
            await release.wait()
        return await Api.search(api, request)

    api.search = search
    runner, port = await started(create_web_app(api))  # as serve runs it: 16, of which 4 reserved
    assert (serve.MAX_IN_FLIGHT, serve_clients.RESERVED_SLOTS) == (16, 4)
    url = f"http://127.0.0.1:{port}/v1/search"
    connector = aiohttp.TCPConnector(limit=0)  # aiohttp's own 100 a host: no client-side queue
    async with aiohttp.ClientSession(connector=connector) as mine, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(OTHER_PEER, 0))) as other:
        try:
            held = [asyncio.create_task(mine.get(url, params={"q": "slow"})) for _ in range(12)]
            await until(lambda: len(inside) == 12, 10, "twelve slow requests of one client in progress")
            shed = await asyncio.wait_for(mine.get(url, params={"q": "tv"}), 5)
            assert shed.status == 503 and shed.headers["Retry-After"] == "1"
            error = (await shed.json())["error"]
            assert "this client already has 12 requests in progress, the most one client may (of 16 in all)" in error, error
            # the four reserved slots are the other client's, all of them
            theirs = [asyncio.create_task(other.get(url, params={"q": "slow"})) for _ in range(4)]
            await until(lambda: len(inside) == 16, 10, "the other client's four slow requests in progress")
            full = await asyncio.wait_for(other.get(url, params={"q": "tv"}), 5)
            assert full.status == 503 and (await full.json())["error"] == "overloaded: 16 requests in progress; retry shortly"
            release.set()
            assert [r.status for r in await asyncio.gather(*held, *theirs)] == [200] * 16
            assert inside.count(OTHER_PEER) == 4
        finally:
            release.set()
            await runner.cleanup()


@pytest.mark.parametrize(("reserved", "most"), [(0, 4), (1, 3), (3, 1), (4, 1)])
async def test_one_client_may_hold_all_but_the_reserved_slots_and_always_one(api, reserved, most):
    inside, release = [], asyncio.Event()

    async def search(request):
        inside.append(request.remote)
        await release.wait()
        return await Api.search(api, request)

    api.search = search
    runner, port = await started(create_web_app(api, max_in_flight=4, reserved_slots=reserved))
    url = f"http://127.0.0.1:{port}/v1/search"
    async with aiohttp.ClientSession() as mine:
        try:
            held = [asyncio.create_task(mine.get(url, params={"q": "tv"})) for _ in range(most)]
            await until(lambda: len(inside) == most, 10, f"{most} requests in progress")
            shed = await asyncio.wait_for(mine.get(url, params={"q": "tv"}), 5)
            assert shed.status == 503
            release.set()
            assert [r.status for r in await asyncio.gather(*held)] == [200] * most
        finally:
            release.set()
            await runner.cleanup()


async def test_run_server_hands_the_reserved_slots_and_trusted_proxies_to_the_limiter(monkeypatch, tmp_path):
    """STREAMREC_SERVE_RESERVED_SLOTS and STREAMREC_SERVE_TRUSTED_PROXIES reach the limiter that
    ``run_server`` builds: the tests above pass them to create_web_app themselves, so a
    run_server that dropped either would serve with the defaults and every test would still pass.
    (The store is the in-memory one: what is tested is the wiring, not Redis.)"""
    handed: list[tuple] = []
    built = asyncio.Event()
    shedding = serve.shedding

    def recorded(max_in_flight, trusted=(), reserved=serve_clients.RESERVED_SLOTS):
        handed.append((max_in_flight, trusted, reserved))
        built.set()
        return shedding(max_in_flight, trusted, reserved)

    monkeypatch.setattr(serve, "shedding", recorded)
    monkeypatch.setattr(serve, "load_scorer", lambda settings, metrics: None)
    monkeypatch.setattr(serve.RedisUserStateStore, "from_url", classmethod(lambda cls, *a, **k: InMemoryUserStateStore()))
    settings = Settings.from_env({"STREAMREC_CATALOGUE": "false", "STREAMREC_MODEL_DIR": str(tmp_path),
                                  "STREAMREC_SERVE_RESERVED_SLOTS": "7",  # not the default, 4
                                  "STREAMREC_SERVE_TRUSTED_PROXIES": "10.0.0.0/8"})
    stop = asyncio.Event()
    task = asyncio.create_task(serve.run_server(settings, 0, "127.0.0.1", stop))
    try:
        await asyncio.wait_for(built.wait(), 10.0)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10.0)
    assert handed == [(serve.MAX_IN_FLIGHT, (ipaddress.ip_network("10.0.0.0/8"),), 7)]


async def test_a_client_that_never_reads_its_answers_does_not_hold_a_stop(api, monkeypatch):
    # aiohttp waits up to 60 s at a stop for the requests in hand; this client's handler waits
    # for the client to read, so every stop of serve took a minute (the write timeout's)
    paused = asyncio.Event()

    class Watched(serve_clients._WriteGuard):
        def pause_writing(self) -> None:
            paused.set()
            super().pause_writing()

    monkeypatch.setattr(serve_clients, "_WriteGuard", Watched)
    runner, port = await started(create_web_app(api, metrics=Metrics(CollectorRegistry())))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 5000)  # megabytes of answers, none read
        await asyncio.wait_for(paused.wait(), 30)  # an answer in hand waits for the client
        # serve.SHUTDOWN_S (5 s), which aiohttp waits twice for a handler that does not end
        await asyncio.wait_for(runner.cleanup(), 12)
    finally:
        writer.close()
        await runner.cleanup()


@pytest.mark.parametrize(("first", "second", "said"), [
    (signal.SIGTERM, signal.SIGTERM, "SIGTERM again"),
    (signal.SIGINT, signal.SIGINT, "Ctrl-C again"),
    (signal.SIGINT, signal.SIGTERM, "SIGTERM after Ctrl-C"),
])
async def test_a_second_stop_signal_exits_serve_at_once(first, second, said, monkeypatch, caplog):
    """As the worker's: the first signal stops serve, which gives the requests in hand up to
    twice SHUTDOWN_S; a second exits now. serve's handler only set the stop event again, so an
    operator's second Ctrl-C did nothing."""
    exits: list[int] = []
    monkeypatch.setattr(serve, "exit_now", exits.append)
    stop = asyncio.Event()
    signals = serve.StopSignals(stop)
    with caplog.at_level(logging.INFO, logger="streamrec.serve"):
        signals(first)
        assert stop.is_set() and exits == []
        signals(second)
    assert exits == [128 + second]
    assert f"{said}: exiting now" in caplog.text


async def test_run_server_stops_on_the_first_signal_and_exits_on_the_second(monkeypatch, tmp_path):
    """The handlers ``run_server`` installs are those above (taken from the loop, not sent: a
    real SIGTERM to the test process would end the whole run were they missing)."""
    installed: dict[int, tuple] = {}
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "add_signal_handler", lambda sig, callback, *args: installed.__setitem__(sig, (callback, args)))
    exits: list[int] = []
    monkeypatch.setattr(serve, "exit_now", exits.append)
    monkeypatch.setattr(serve, "load_scorer", lambda settings, metrics: None)
    monkeypatch.setattr(serve.RedisUserStateStore, "from_url", classmethod(lambda cls, *a, **k: InMemoryUserStateStore()))
    settings = Settings.from_env({"STREAMREC_CATALOGUE": "false", "STREAMREC_MODEL_DIR": str(tmp_path)})
    task = asyncio.create_task(serve.run_server(settings, 0, "127.0.0.1"))  # no stop event of the test's: signals only
    try:
        await until(lambda: len(installed) == 2 or task.done(), 10, "serve's signal handlers installed")
        callback, args = installed[signal.SIGTERM]
        callback(*args)
        await asyncio.wait_for(task, 10.0)  # stopped by the first
        assert exits == []
        callback, args = installed[signal.SIGINT]
        callback(*args)
        assert exits == [128 + signal.SIGINT]
    finally:
        if not task.done():
            task.cancel()
