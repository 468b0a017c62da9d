"""``streamrec serve``: the HTTP API beside the workers.

    GET /v1/search?q=...&user_id=...&k=...          personalised search
    GET /v1/users/{user_id}/recommendations?k=...   a fresh home-page list for the user
    GET /v1/items/{item_id}/similar?k=...           items close in meaning (the catalogue's vectors)
    GET /healthz, /readyz

Answers are JSON ``{"items": [{"item_id", "score", "explanation"}, ...], ...}``, best first, with
explanations shaped as on the recommendations topic (docs/events.md). A recommendations answer,
and a search answer for a user, also carry a fresh ``rec_id`` and the ``variant`` (the experiment
arm) as the worker's lists do: the site echoes the ``rec_id`` on the clicks and purchases the
list causes, and they count under that arm (stream/experiments.py). A bad parameter is a 400
and an unknown item a 404, each with ``{"error": "..."}`` saying what was wrong.

**Its own process, not the worker's web server.** A worker owns some of the users' partitions
and spends its time on batches; an HTTP request may ask for any user, and its latency must not
wait behind a batch (nor a batch behind a burst of requests). So ``serve`` runs apart, scales
apart (as many as the request rate needs, none at all for a shop that only reads the topic),
and shares what the workers know:

- **users**: their state, read from Redis (never written: the workers own it);
- **models**: the workers' snapshot of the online models in Redis, loaded again when a newer
  one is written (a worker's first about 5 s after it first learned, then every
  ``STREAMREC_SNAPSHOT_INTERVAL_S``: stream/shell.py ``Shell.snapshot_soon``), and the Transformer from the registry
  (``STREAMREC_MODEL_DIR``) as the workers load it;
- **catalogue**: the workers' catalogue snapshot in Redis, then the items topic followed from
  its offsets (stream/catalogue_feed.py), as a worker does.

Search and ranking are the worker's own code (:class:`~stream.search_step.SearchStep`,
``Recommender.rank_many``). A search whose query needs the text model, and every home-page
list, run in :data:`COMPUTE_THREADS` threads beside the event loop (the text model and numpy
release the GIL), while the loop keeps accepting and answering; a search that runs no model (its
query's vector cached, or read by the query student) runs on the loop itself, about a
millisecond of Python that a thread would only add two wake-ups to. The models are only read
(a newer snapshot replaces them whole).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import resource
import signal
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from online_models import Recommender
from online_models.search import Catalogue
from online_models.types import ScoredItem
from stream.catalogue_feed import CatalogueFeed
from stream.errors import ConfigError, clipped, described
from stream.health import Health, export_readiness
from stream.logs import ClippedTracebacks, Thinned, exit_now
from stream.pipeline import RecommendationStep
from stream.prometheus import FROZEN_COUNT_INTERVAL_S, Metrics
from stream.pseudonyms import Pseudonyms, pseudonyms_of
from stream.records import ID_PATTERN, MAX_ID_CHARS, MAX_QUERY_CHARS, SearchEvent
from stream.search_step import SearchConfig, SearchStep
from stream.serve_clients import shedding, write_timeout
from stream.settings import MAX_IN_FLIGHT, RESERVED_SLOTS, IPNetwork, Settings
from stream.shell import load_arm_scorers, load_scorer, query_student, text_embedder
from stream.snapshots import SNAPSHOT_KEY, serving_with
from stream.state import RedisUserStateStore, UserState, UserStateStore, document_log
from stream.step_results import exception_text

log = logging.getLogger("streamrec.serve")
#: the requests answered 503 because the store did not answer: thinned (:func:`create_web_app`),
#: since while Redis is away every request that names a user says the same
store_log = logging.getLogger("streamrec.serve.store")
#: a request that failed (500): one traceback per route and error type every 10 s (Thinned), each
#: exception's text in it cut to one line of 300 characters (ClippedTracebacks: a bug's exception
#: may carry a megabyte, or a user's text)
failure_log = logging.getLogger("streamrec.serve.failures")
#: at most one line per user and problem this often, of a stored document that does not decode
#: (stream/state.py ``document_log``): serve never saves over it, so every request would say it
DOCUMENT_LOG_EVERY_S = 600.0

#: the largest ``k`` a request may ask for
MAX_K = 100

#: requests computed at once, each embedding its query on one engine thread (the text model and
#: numpy release the GIL). With one, at 200 searches/s on 2 cores p99 was 103 ms; with two
#: 21 ms; with four a request whose query is cached seldom waits behind two that embed: beside a
#: worker consuming 1,000 events/s, p99 104 ms at 200/s with 97 of 12,000 shed, against 108 ms
#: and 190 with two (bench/serve_bench.py, docs/search.md)
COMPUTE_THREADS = 4

#: seconds a connection may stay open without a complete request: idle between keep-alive
#: requests, or still sending its first request's headers (aiohttp's timer runs from the
#: connection's start). aiohttp's own default is 3,630 s, so a client that sends its headers a
#: byte at a time held a connection for an hour; 75 s is nginx's keep-alive default, above the
#: 60 s idle timeout of common load balancers (a backend that closes first makes them answer 502)
KEEPALIVE_S = 75.0

#: seconds a stop (SIGTERM, Ctrl-C) waits for the requests in hand before it cuts their
#: connections: an answer takes milliseconds, a search that embeds a few, a read from a Redis that
#: does not answer at most its 5 s socket timeout. aiohttp's own default is 60 s, and a client that
#: sent requests and read no answer held every stop of serve that long (its connection is
#: aborted only by the write timeout, stream/serve_clients.py), past Kubernetes' 30 s grace. aiohttp
#: waits it twice for a handler that does not end (for it to finish, then once cancelled): at most 10 s
SHUTDOWN_S = 5.0

#: seconds the refresher waits for Redis to answer PING (as the worker's check_readiness), and
#: for the models' snapshot to be read (megabytes); past them ``redis`` fails. A Redis that
#: accepts the connection and never answers (a stopped redis-server, a half-open connection)
#: would otherwise hold the refresher, and leave every condition as it was, for ever
PING_TIMEOUT_S = 5.0
SNAPSHOT_TIMEOUT_S = 30.0
#: seconds the refresher waits for the scorer's look at the registry (a few file reads: the load
#: of a new version runs on a thread of its own); past it the version in use keeps serving
SCORER_CHECK_TIMEOUT_S = 10.0
#: how often serve's heartbeat (``loop``) beats: a task of its own, so that a refresh that hangs
#: is said as ``checks``, not as a blocked event loop
BEAT_EVERY_S = 1.0
#: what a failing ``progress`` and ``checks`` add in serve (stream/health.py)
SERVE_STUCK_HINT = (f"a computing thread that does not return (the text model, the scorer); the other requests wait "
                    f"for the {COMPUTE_THREADS} threads and are shed as overloaded: see the log, or restart serve")
SERVE_STALE_HINT = ("serve's refresher hangs (Redis is waited for at most "
                    f"{PING_TIMEOUT_S:g} s for PING and {SNAPSHOT_TIMEOUT_S:g} s for the models' snapshot, so "
                    "something else: a thread restoring the snapshot); see the log, or restart serve")

_encode = msgspec.json.Encoder().encode

#: what the store raises when Redis does not answer (a 503, never the caller's fault)
STORE_ERRORS = (ConnectionError, TimeoutError, OSError, RedisError)


class StoreDown(ConnectionError):
    """A request's read not tried: the last one failed (``said``: how, as :func:`described` put
    it), and Redis has not answered since. Logged in the failed read's words, so that the log's
    thinning counts both as one message."""

    def __init__(self, said: str) -> None:
        super().__init__(f"{said}; not asked again until Redis answers a PING")
        self.said = said


class BadRequest(ValueError):
    """A request parameter that cannot be served; the message says which and why."""


def parse_k(raw: str | None, default: int) -> int:
    """``k``: 1 to :data:`MAX_K` (``default`` when absent; given empty, ``k=``, a 400 as any
    other value that is no such number).

    >>> parse_k(None, 20), parse_k("5", 20), parse_k("007", 20), parse_k("0100", 20)
    (20, 5, 7, 100)
    >>> parse_k("0", 20)
    Traceback (most recent call last):
    ...
    stream.serve.BadRequest: k=0: expected a whole number from 1 to 100
    >>> parse_k("", 20)
    Traceback (most recent call last):
    ...
    stream.serve.BadRequest: k is empty: expected a whole number from 1 to 100 (or no k, for 20)
    """
    if raw is None:
        return default
    if raw == "":
        raise BadRequest(f"k is empty: expected a whole number from 1 to {MAX_K} (or no k, for {default})")
    # ASCII digits only: int() would also read "+5", "1_0" and other scripts' digits
    digits = raw.lstrip("0")  # leading zeros are no size: "0100" is 100, as "007" is 7
    k = int(digits or "0") if raw.isascii() and raw.isdigit() and len(digits) <= 3 else 0
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k={clipped(raw, 40)}: expected a whole number from 1 to {MAX_K}")
    return k


_ID = re.compile(ID_PATTERN)


def one(query: MultiMapping[str], name: str) -> str | None:
    """The parameter ``name`` of a request's ``query``, None when absent; given twice, a 400
    (which of the two is meant is not for the server to guess)."""
    values = query.getall(name, ())
    if len(values) > 1:
        raise BadRequest(f"{name} is given {len(values)} times; give it once")
    return values[0] if values else None


def parse_id(raw: str | None, name: str, required: bool) -> str | None:
    """An id parameter: at most 128 characters, no control characters, not blank."""
    if raw is None or raw == "":
        if required:
            raise BadRequest(f"{name} is required")
        return None
    if len(raw) > MAX_ID_CHARS or _ID.match(raw) is None:  # the events' rule for ids (stream/records.py)
        raise BadRequest(f"{name}: an id of 1 to {MAX_ID_CHARS} characters, without control characters, not blank")
    return raw


#: the default-ignorable code points (Unicode's DerivedCoreProperties) that are not format
#: characters (Cf): the combining grapheme joiner, the Hangul fillers, variation selectors, ...
_IGNORABLE = re.compile("[\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u2065\u3164\ufe00-\ufe0f\uffa0"
                        "\ufff0-\ufff8\U000e0000-\U000e0fff]")


def blank(text: str) -> bool:
    r"""Whether ``text`` shows nothing: only whitespace, format characters (Unicode's Cf: U+200B
    ZERO WIDTH SPACE, U+202E RIGHT-TO-LEFT OVERRIDE, U+FEFF, ...) and the other code points
    Unicode says to render invisibly (variation selectors, the Hangul fillers).

    >>> blank(""), blank(" \t"), blank("\u200b\u202e\ufe0f"), blank("\u200btv"), blank("\u3164 ")
    (True, True, True, False, True)
    """
    if text.isascii():
        return not text.strip()
    return all(ch.isspace() or unicodedata.category(ch) == "Cf" or _IGNORABLE.match(ch) for ch in text)


def parse_query(raw: str | None) -> str:
    """``q``: 1 to :data:`MAX_QUERY_CHARS` characters, no control characters, something visible.
    Stricter than a search event's ``query`` (stream/records.py): a query of only invisible
    characters is an event as sent, but a request for nothing."""
    if raw is None or blank(raw):
        raise BadRequest("q is required: the text to search for, something besides whitespace and invisible characters")
    if len(raw) > MAX_QUERY_CHARS or _ID.match(raw) is None:
        raise BadRequest(f"q: 1 to {MAX_QUERY_CHARS} characters, without control characters")
    return raw


def items_json(items: list[ScoredItem]) -> list[dict[str, Any]]:
    out = []
    for item in items:
        entry: dict[str, Any] = {"item_id": item.item_id, "score": round(float(item.score), 6)}
        if item.explanation is not None:
            entry["explanation"] = msgspec.to_builtins(item.explanation)
        out.append(entry)
    return out


class Api:
    """The requests' logic over the shared state: ``store`` (users), ``step`` (the models, the
    scorer, the experiment) and ``catalogue``. ``pseudonyms``: the workers' keyed hash of user
    ids (``STREAMREC_PSEUDONYM_KEY``), under which the store and the models hold users."""

    def __init__(self, store: UserStateStore, step: RecommendationStep, catalogue: Catalogue | None,
                 search: SearchStep, top_k: int, health: Health | None = None,
                 pseudonyms: Pseudonyms | None = None) -> None:
        self.store = store
        self.step = step
        self.catalogue = catalogue
        self.search_step = search
        self.top_k = top_k
        self.health = health or Health()
        self.pseudonyms = pseudonyms
        #: set when a request's read from the store failed while ``redis`` was ok: the refresher
        #: (:func:`run_server`) checks again at once rather than at its next round, up to 10 s away
        self.store_failed = asyncio.Event()
        #: what the last failed read said, until the refresher finds ``redis`` ok again: meanwhile
        #: a request naming a user is a 503 at once. (Redis frozen, each one waited the socket's
        #: 5 s for the same answer, holding a connection and a client that long.)
        self.store_down: str | None = None
        #: requests are computed off the event loop, COMPUTE_THREADS at a time
        self.executor = ThreadPoolExecutor(max_workers=COMPUTE_THREADS, thread_name_prefix="streamrec-serve")

    def _uid(self, user_id: str) -> str:
        return self.pseudonyms.of(user_id) if self.pseudonyms is not None else user_id

    async def _state(self, user_id: str | None) -> UserState | None:
        if user_id is None:
            return None
        uid = self._uid(user_id)
        if self.store_down is not None:
            if not self.health.is_ok("redis"):
                raise StoreDown(self.store_down)
            self.store_down = None
        try:
            return (await self.store.load_many([uid]))[uid]
        except STORE_ERRORS as exc:
            # said by /readyz now: every request naming a user is a 503 until Redis is back, and
            # a serve that answers so must leave the rotation, not stay in it till the next PING
            self.store_down = described(exc)
            if self.health.is_ok("redis"):
                self.health.set("redis", False, f"a request's read failed: {self.store_down}")
                self.store_failed.set()
            raise

    async def _run(self, what: str, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._computed, what, fn, args)

    def _computed(self, what: str, fn, args: tuple):
        """``fn(*args)`` on a computing thread, in hand for readiness (``progress``) meanwhile:
        threads that never return would otherwise leave every request waiting (and then shed as
        overloaded) while /readyz says 200."""
        key = object()
        self.health.busy(f"a {what} request computing on a thread", key)
        try:
            return fn(*args)
        finally:
            self.health.idle(key)

    # -- endpoints -----------------------------------------------------------------------
    async def search(self, request: web.Request) -> web.Response:
        query = parse_query(one(request.query, "q"))
        user_id = parse_id(one(request.query, "user_id"), "user_id", required=False)
        k = parse_k(one(request.query, "k"), self.top_k)
        state = await self._state(user_id)
        if self._at_once(query):  # no text model to run: here, not after two thread hand-overs
            items = self._search(query, state, k)
        else:
            items = await self._run("search", self._search, query, state, k)
        # a list a click can come from: named as the worker names its search lists (the user's
        # arm); a search for no user has no arm, so no rec_id either
        variant = self.step.variant_of(user_id) if user_id is not None else None
        rec_id = self.step.new_rec_id(variant) if variant is not None else None
        return _json({"items": items_json(items), "query": query, "user_id": user_id,
                      "model": self.step.model_versions(), "rec_id": rec_id, "variant": variant})

    def _at_once(self, query: str) -> bool:
        """Whether a search for ``query`` runs no text model (nothing to search, a cached query
        vector, or one the query student reads): about a millisecond of Python, which a
        computing thread would only add two wake-ups to (measured in docs/search.md)."""
        catalogue = self.catalogue
        if catalogue is None or len(catalogue) == 0:
            return True
        at_once = getattr(catalogue.embedder, "answers_at_once", None)
        return at_once is not None and at_once(query)

    def _search(self, query: str, state: UserState | None, k: int) -> list[ScoredItem]:
        searcher = self.search_step
        event = SearchEvent(event_id="http", type="search", user_id=state.user_id if state else "-", query=query, ts=0)
        ids, relevance, matched = searcher.retrieve(event, k)  # a k above the configured depth is answered whole
        return searcher.personalise(state or UserState("-"), ids, relevance, matched, k)

    async def recommendations(self, request: web.Request) -> web.Response:
        user_id = parse_id(request.match_info.get("user_id"), "user_id", required=True)
        k = parse_k(one(request.query, "k"), self.top_k)
        state = await self._state(user_id)
        items, variant = await self._run("recommendations", self.step.present_list, state, k,
                                         int(time.time() * 1000), user_id)
        # named as the worker's lists are: a click echoing the rec_id counts under the arm that
        # ranked the list, though no user state remembers it (serve writes none)
        return _json({"items": items_json(items), "user_id": user_id, "model": self.step.model_versions(),
                      "rec_id": self.step.new_rec_id(variant), "variant": variant})

    async def similar(self, request: web.Request) -> web.Response:
        item_id = parse_id(request.match_info.get("item_id"), "item_id", required=True)
        k = parse_k(one(request.query, "k"), self.top_k)
        catalogue = self.catalogue
        if catalogue is None or item_id not in catalogue:
            raise web.HTTPNotFound(text=_encode({"error": f"item {item_id!r} is not in the catalogue"}).decode(),
                                   content_type="application/json")
        pairs = await self._run("similar", catalogue.similar, item_id, k)
        items = [{"item_id": i, "score": round(float(s), 6), "explanation": {"source": "similar", "because": item_id}}
                 for i, s in pairs]
        return _json({"items": items, "item_id": item_id})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        ready, detail = self.health.readiness()
        return _json({"ready": ready, "detail": detail}, status=200 if ready else 503)


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


@web.middleware
async def _errors(request: web.Request, handler):
    """A bad parameter is a 400 naming it; the store down a 503; anything unexpected a 500
    (logged), never a traceback."""
    try:
        if not _utf8(request.raw_path):
            raise BadRequest("the path or query is not UTF-8 text once percent-decoded")
        return await handler(request)
    except BadRequest as exc:
        return _json({"error": str(exc)}, status=400)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        if request.method == "CONNECT":  # its target is a host:port, never a path: no route is found
            return web.Response(body=_encode({"error": "405 Method Not Allowed: CONNECT (serve answers GET and HEAD)"}),
                                status=405, content_type="application/json", headers={"Allow": "GET,HEAD"})
        # the router's 404 and 405 (its Allow header kept), as JSON like every other answer
        return web.Response(body=_encode({"error": f"{exc.status} {exc.reason}: {request.method} {clipped(request.path, 40)}"}),
                            status=exc.status, content_type="application/json",
                            headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"})
    except STORE_ERRORS as exc:  # the store: nothing the caller did wrong
        # by route, not path: one line per interval however many requests (Thinned), and no user's id or query
        store_log.warning("%s %s answered 503: the user-state store did not answer (%s)", request.method,
                          _route_of(request) or "?", exc.said if isinstance(exc, StoreDown) else described(exc))
        return web.Response(body=_encode({"error": "the user-state store (Redis) does not answer; retry shortly"}),
                            status=503, content_type="application/json", headers={"Retry-After": "1"})
    except Exception as exc:
        # by route and error type, not path: a bug that fails every request is one traceback per
        # interval (Thinned), not one a request, and no user's id or query is written down
        failure_log.error("%s %s answered 500: %s (a bug; its traceback follows)", request.method,
                          _route_of(request) or "?", type(exc).__name__, exc_info=True)
        return _json({"error": "internal error: the server's log says more"}, status=500)


def _route_of(request: web.Request) -> str | None:
    """The route pattern a request matched (``/v1/users/{user_id}/recommendations``: never the
    client's ids or query), None where it matched none."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


async def _pattern_of(request: web.Request) -> str | None:
    """:func:`_route_of`, and for a 405 (a known path, another method) the pattern of the route
    whose path it is, which the router does not keep."""
    route = _route_of(request)
    if route is not None or not isinstance(request.match_info.http_exception, web.HTTPMethodNotAllowed):
        return route
    for candidate in request.app.router.resources():
        _, allowed = await candidate.resolve(request)  # its methods when the path is its own, and no match
        if allowed:
            return candidate.canonical
    return None


def _utf8(raw_path: str) -> bool:
    """Whether a request's percent-encoded path and query decode as UTF-8 (aiohttp would put
    U+FFFD in place of bytes that do not, so that two different ids read the same)."""
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeError:  # aiohttp's Python parser passes raw bytes on as surrogates: not encodable either
        return False
    return True


class _MalformedRequests(logging.Filter):
    """aiohttp logs each request its parser refuses (a 400 it answers itself: a line too long,
    bytes that are not HTTP) with a traceback at ERROR; that is the client's mistake, so one
    line at INFO. So is a body that does not decode (``Content-Encoding: gzip`` on bytes that
    are not): a GET's, which no handler reads, fails only as aiohttp discards it after the
    answer, logged as an "Unhandled exception"."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, web.RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            exc = exc.__cause__
        if isinstance(exc, HttpProcessingError):
            record.msg, record.args = f"{record.getMessage()}: a malformed request ({type(exc).__name__})", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _observed(metrics: Metrics):
    """Each API request counted by route and status, and timed (``streamrec_http_*``)."""

    @web.middleware
    async def observe(request: web.Request, handler):
        if not request.path.startswith("/v1/"):
            return await handler(request)
        route = await _pattern_of(request) or "unknown"
        t0 = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.http_seconds.labels(route).observe(time.perf_counter() - t0)
            metrics.http_requests.labels(route, str(status)).inc()

    return observe


def api_runner(web_app: web.Application) -> web.AppRunner:
    """The runner serve listens with: no access log, connections closed after
    :data:`KEEPALIVE_S` without a complete request, requests in hand at a stop given
    :data:`SHUTDOWN_S`, and the process's soft limit on open files raised to its hard limit
    (:func:`_open_files_raised`)."""
    _open_files_raised()
    return web.AppRunner(web_app, access_log=None, keepalive_timeout=KEEPALIVE_S, shutdown_timeout=SHUTDOWN_S)


def _open_files_raised() -> None:
    """Each connection is a file. At the soft limit (1,024 where systemd or containerd starts a
    process, under a hard limit of 524,288) one client's idle connections, which cost it
    nothing, used them all: serve then accepted no one else's until those timed out
    (:data:`KEEPALIVE_S`), and asyncio logged about 1,000 ERROR tracebacks a second (seen with
    1,100 connections at 1,024, and 300 at 256). At the hard limit one client address runs out of
    ports (65,535 at most) first. asyncio polls with epoll: descriptors past 1,024 are no trouble."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError) as exc:  # macOS refuses more than kern.maxfilesperproc: keep the limit there is
        log.info("open files stay limited to %d (%s)", soft, exc)


def create_web_app(api: Api, max_in_flight: int = MAX_IN_FLIGHT, metrics: Metrics | None = None,
                   trusted_proxies: tuple[IPNetwork, ...] = (), reserved_slots: int = RESERVED_SLOTS) -> web.Application:
    """The API's routes, and ``/metrics`` (``metrics``' registry) when ``metrics`` is given, with
    ``streamrec_ready{condition}`` from ``api.health`` (stream/health.py, ReadinessCollector).
    ``trusted_proxies``: whose X-Forwarded-For names the client; ``reserved_slots``: of the
    ``max_in_flight``, those no one client may hold (stream/serve_clients.py)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _MalformedRequests) for f in server_log.filters):
        server_log.addFilter(_MalformedRequests())
    for thinned in (store_log, failure_log):
        if not any(isinstance(f, Thinned) for f in thinned.filters):
            thinned.addFilter(Thinned())
    # a user's document that does not decode stays so until a worker saves the user again: each
    # request naming them would log it again (any client, one line per request, at ERROR)
    if not any(isinstance(f, Thinned) for f in document_log.filters):
        document_log.addFilter(Thinned(DOCUMENT_LOG_EVERY_S))
    # after Thinned and _MalformedRequests: a traceback held back, or dropped, is not rendered;
    # aiohttp.server logs what escapes the outer middlewares (write_timeout, shedding, metrics)
    for clipped_log in (failure_log, server_log):
        if not any(isinstance(f, ClippedTracebacks) for f in clipped_log.filters):
            clipped_log.addFilter(ClippedTracebacks())
    middlewares = [write_timeout(), shedding(max_in_flight, trusted_proxies, reserved_slots), _errors]
    if metrics is not None:
        middlewares.insert(1, _observed(metrics))
    app = web.Application(middlewares=middlewares)
    app.router.add_get("/v1/search", api.search)
    app.router.add_get("/v1/users/{user_id}/recommendations", api.recommendations)
    app.router.add_get("/v1/items/{item_id}/similar", api.similar)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    if metrics is not None:
        export_readiness(metrics.registry, api.health)  # what /readyz judges, at each scrape

        async def exposition(request: web.Request) -> web.Response:
            return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

        app.router.add_get("/metrics", exposition)
    return app


class ModelRefresher:
    """Loads the workers' newest model snapshot from the store into ``step`` when it changes."""

    def __init__(self, store: UserStateStore, step: RecommendationStep, signing_key: str | None = None,
                 metrics: Metrics | None = None, load_scorer: Callable[[], object | None] | None = None) -> None:
        self.store = store
        self.step = step
        self.signing_key = signing_key or None
        self.metrics = metrics
        #: a scorer from the registry, or None while no version is registered (or none loads):
        #: called while serve has none, so that the first version registered is served
        self.load_scorer = load_scorer
        self._digest: bytes | None = None
        #: the newest snapshot refused, and why (it is not read again until it changes)
        self.refused: tuple[bytes, str] | None = None
        self._scorer_check: asyncio.Future | None = None  # the scorer's look at the registry, in a thread

    @property
    def loaded(self) -> bool:
        return self._digest is not None

    async def refresh(self) -> bool:
        """Whether a new snapshot was loaded. One that is refused (corrupt, unsigned or signed
        with another key) is counted and logged once, and the models served stay as they were.
        Raises what the store raises, and TimeoutError when it does not answer within
        :data:`SNAPSHOT_TIMEOUT_S`."""
        try:
            data = await asyncio.wait_for(self.store.get_blob(SNAPSHOT_KEY), SNAPSHOT_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"reading the models' snapshot was not answered within {SNAPSHOT_TIMEOUT_S:g} s") from None
        if not data:
            return False
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == self._digest or (self.refused is not None and digest == self.refused[0]):
            return False
        try:
            recommender = await asyncio.to_thread(Recommender.restore, data, self.signing_key)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the models served stay
            self.refused = (digest, f"{type(exc).__name__}: {exception_text(exc)}")
            if self.metrics is not None:
                self.metrics.model_snapshot_refused.inc()
            log.error("refused the workers' snapshot of the online models (%s); still serving %s", self.refused[1],
                      "the previous one" if self.loaded else "empty models")
            return False
        self.refused = None
        self.step.recommender = serving_with(recommender, self.step.recommender.config, say=not self.loaded)
        self._digest = digest
        log.info("models loaded from the workers' snapshot (%d bytes, %d events learned)", len(data),
                 recommender.n_learned)
        return True

    async def check_scorer(self) -> None:
        """The scorer's look for a newly registered version (it loads one in a thread of its
        own), waited for at most :data:`SCORER_CHECK_TIMEOUT_S`; one that has not returned is
        not started again until it has (a registry on a file system that hangs)."""
        scorer = self.step.scorer
        if scorer is None and self.load_scorer is None:
            return
        if self._scorer_check is None or self._scorer_check.done():
            # with none yet, the registry is looked at for a first version (serve started before
            # any was trained never served one)
            look = scorer.maybe_reload if scorer is not None else self.load_scorer
            self._scorer_check = asyncio.ensure_future(asyncio.to_thread(look))
        try:
            found = await asyncio.wait_for(asyncio.shield(self._scorer_check), SCORER_CHECK_TIMEOUT_S)
            if scorer is None and found is not None and self.step.scorer is None:
                self.step.scorer = found
                log.info("Transformer scorer %s loaded on %s", found.version, found.provider)
        except TimeoutError:
            log.warning("the scorer's look for a new model version has not returned for %g s (the model registry's "
                        "file system?); the version in use keeps serving", SCORER_CHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the version in use keeps serving
            log.error("scorer reload failed, the current one keeps serving: %s", exception_text(exc))


def model_refresher(store: UserStateStore, step: RecommendationStep, settings: Settings,
                    metrics: Metrics) -> ModelRefresher:
    """serve's :class:`ModelRefresher`: the workers' snapshot, and the registry's Transformer,
    a first version included when serve started with none registered."""
    refused: set[tuple] = set()
    return ModelRefresher(store, step, settings.snapshot_key, metrics,
                          load_scorer=lambda: load_scorer(settings, metrics, refused, False))


def _trouble(feed: CatalogueFeed) -> str:
    """What keeps the feed from reading its topic, for the catalogue's condition ('' if nothing)."""
    trouble = feed.trouble
    if trouble is None:
        return ""
    return (f"; but reading it has failed for {time.monotonic() - trouble[0]:.0f} s ({clipped(trouble[1], 200)}), "
            "retried; the catalogue serves as it is meanwhile")


async def check_serving(health: Health, store: UserStateStore, refresher: ModelRefresher, step: RecommendationStep,
                        feed: CatalogueFeed | None, catalogue: Catalogue | None, items_topic: str) -> None:
    """serve's readiness conditions, each checked on its own (said by /readyz; checked again at
    the next round), and the models and scorer brought up to date. Every wait is bounded
    (:data:`PING_TIMEOUT_S`, :data:`SNAPSHOT_TIMEOUT_S`, :data:`SCORER_CHECK_TIMEOUT_S`), and
    the refresh is marked (:meth:`Health.checked`): should it hang all the same, ``checks``
    fails once the conditions are older than ``stale_after_s``."""
    try:
        answered = await asyncio.wait_for(store.ping(), PING_TIMEOUT_S)
    except TimeoutError:
        health.set("redis", False, f"PING not answered within {PING_TIMEOUT_S:g} s")
    except Exception as exc:  # noqa: BLE001 - the store did not answer
        health.set("redis", False, described(exc))
    else:
        if not answered:
            health.set("redis", False, "PING was not answered with PONG")
        else:
            try:
                await refresher.refresh()
            except Exception as exc:  # noqa: BLE001 - the store did not answer (a refused snapshot is not this)
                health.set("redis", False, described(exc))
            else:
                health.set("redis", True, "PING answered")
    if refresher.refused is not None:
        health.set("models", True, f"the newest snapshot was refused ({clipped(refresher.refused[1], 200)}): serving "
                                   f"{'the previous one' if refresher.loaded else 'empty models'}")
    else:
        health.set("models", True, "the workers' snapshot is loaded" if refresher.loaded
                   else "no snapshot of the workers' models yet: serving empty models")
    if feed is None or catalogue is None:
        health.set("catalogue", True, "off (STREAMREC_CATALOGUE=false)")
    elif feed.topic_exists is False:
        health.set("catalogue", True, f"{items_topic} does not exist yet: an empty catalogue (a worker creates the topic)")
    elif feed.caught_up.is_set():
        health.set("catalogue", True, f"{len(catalogue)} items, following {items_topic}{_trouble(feed)}")
    else:
        health.set("catalogue", False, f"reading {items_topic}: {len(catalogue)} items so far{_trouble(feed)}")
    await refresher.check_scorer()
    health.checked()


def serve_health(clock: Callable[[], float] = time.monotonic) -> Health:
    """serve's readiness: ``redis``, ``models`` and ``catalogue`` (:func:`check_serving`), and
    the judged ``loop``, ``progress`` (a computing thread) and ``checks``, with serve's hints."""
    return Health(conditions=("redis", "models", "catalogue"), clock=clock, stuck_hint=SERVE_STUCK_HINT,
                  stale_hint=SERVE_STALE_HINT)


async def beat(health: Health, stop: asyncio.Event) -> None:
    """serve's heartbeat (``loop``) every :data:`BEAT_EVERY_S` until ``stop``."""
    while not stop.is_set():
        health.beat()
        try:
            await asyncio.wait_for(stop.wait(), BEAT_EVERY_S)
        except TimeoutError:
            pass


async def _next_round(stop: asyncio.Event, store_failed: asyncio.Event, timeout: float) -> None:
    """Until ``stop``, a request's failed read from the store (``store_failed``), or ``timeout``."""
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(store_failed.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


class StopSignals:
    """serve's SIGTERM and Ctrl-C, as the worker's: the first stops it (it stops listening, and the
    requests in hand get :data:`SHUTDOWN_S`, twice at most); a second exits at once, status 128 +
    the signal (an operator who will not wait those seconds had no way to cut them short)."""

    #: what an operator calls each signal in the log
    NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.first: signal.Signals | None = None

    def __call__(self, sig: signal.Signals) -> None:
        if self.first is None:
            self.first = sig
            log.info("%s: stopping; the requests in hand get at most %.0f s (a second Ctrl-C or SIGTERM exits now)",
                     self.NAMES[sig], 2 * SHUTDOWN_S)
            self.stop.set()
            return
        said = (f"{self.NAMES[sig]} again" if sig == self.first
                else f"{self.NAMES[sig]} after {self.NAMES[self.first]}")
        log.warning("%s: exiting now, without the answers in hand", said)
        exit_now(128 + sig)


async def run_server(settings: Settings, port: int, host: str = "0.0.0.0", stop: asyncio.Event | None = None) -> None:
    """Serve the API on ``host:port`` until ``stop`` is set (or SIGTERM / SIGINT)."""
    store = RedisUserStateStore.from_url(settings.redis_url, key_prefix=settings.topic_prefix,
                                         ttl_s=settings.state_ttl_s, **settings.redis.client_options())
    metrics = Metrics()
    step = RecommendationStep.from_settings(settings, await asyncio.to_thread(load_scorer, settings, metrics))
    # arms that pin a model version rank with it, as in the worker (stream/app.py)
    step.arm_scorers = await asyncio.to_thread(load_arm_scorers, step.experiment, settings)
    catalogue = feed = None
    if settings.catalogue:
        catalogue = Catalogue(text_embedder(settings), candidates=settings.search_candidates)
        feed = CatalogueFeed(catalogue, settings.kafka.client_options(), settings.topics.items, settings.bounds, metrics,
                             store=store, write_snapshots=False)
        step.catalogue = catalogue  # a user's latest query joins their candidates, as in the worker
    else:
        query_student(settings)  # not used, but a wrong value is refused as with the catalogue on
    health = serve_health()
    search = SearchStep(step, catalogue, SearchConfig(k=settings.top_k, depth=settings.search_candidates,
                                                      personal_weight=settings.search_personal_weight))
    api = Api(store, step, catalogue, search, settings.top_k, health, pseudonyms_of(settings.pseudonym_key))
    refresher = model_refresher(store, step, settings, metrics)
    runner = api_runner(create_web_app(api, metrics=metrics, trusted_proxies=settings.serve_proxies,
                                       reserved_slots=settings.serve_reserved_slots))
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:  # the port taken, a host that does not resolve or is not this machine's
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    log.info("serving on http://%s:%d (/v1/search, /v1/users/{id}/recommendations, /v1/items/{id}/similar, /metrics)",
             host, port)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = StopSignals(stop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, signals, sig)
        except (NotImplementedError, RuntimeError):  # signals are handled on the main thread only: then `stop` ends it
            pass
    tasks = [asyncio.create_task(beat(health, stop))]
    tasks += [asyncio.create_task(feed.run())] if feed is not None else []
    counted = time.monotonic()  # the frozen objects, by Metrics() just now
    try:
        while not stop.is_set():
            if time.monotonic() - counted >= FROZEN_COUNT_INTERVAL_S:
                metrics.count_frozen()
                counted = time.monotonic()
            api.store_failed.clear()
            await check_serving(health, store, refresher, step, feed, catalogue, settings.topics.items)
            await _next_round(stop, api.store_failed, 1.0 if not health.readiness()[0] else
                              max(1.0, min(10.0, settings.snapshot_interval_s)))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
        api.executor.shutdown(wait=False)
        await store.close()
        log.info("stopped")


__all__ = ["MAX_IN_FLIGHT", "MAX_K", "Api", "BadRequest", "ModelRefresher", "StopSignals", "create_web_app", "parse_id", "parse_k", "parse_query",
           "run_server"]
