"""Liveness and readiness of a worker, served beside ``/metrics`` on one port.

``serve(port, registry, health)`` starts a small HTTP server in a daemon thread:

- ``GET /metrics``: the Prometheus exposition of ``registry`` (what prometheus_client's
  own ``start_http_server`` serves);
- ``GET /healthz``: liveness. 200 while the worker's event loop is responsive, i.e. its
  heartbeat (``Health.beat``, a 1 s Faust timer) is younger than ``stale_after_s``; 503
  when the loop has been stuck longer (Kubernetes then restarts the container). Before the
  first beat the worker counts as alive for ``startup_grace_s`` (model loading, joining the
  consumer group), counted again from each try while it waits for Kafka at start
  (``Health.still_starting``).
- ``GET /readyz``: readiness. 200 once every condition holds (by default ``kafka``: the
  consumer joined its group and no rebalance is under way; ``redis``: the last PING was
  answered), 503 with the failing conditions otherwise; 503 too while a batch has been in hand
  (or waiting for the models) longer than ``stuck_after_s`` (``progress``), and while the
  conditions have not been refreshed for ``stale_after_s`` (``checks``): both are judged when
  asked, in the HTTP thread, so a task that hangs cannot leave a stale 200 behind. A condition
  not checked yet because start-up waits for something else first (the worker for Kafka:
  stream/broker_wait.py) says ``waiting`` and why rather than ``FAIL`` (``Health.pending``): it
  still fails readiness, but sends no one to look at it.

``/metrics`` carries the same judgement (:class:`ReadinessCollector`, made at each scrape):
``streamrec_ready{condition="..."}`` (1 ok, 0 failing) for every condition, and
``streamrec_ready_overall``, so an alert can say which condition fails.

The answers are plain text (one line per condition), so ``curl`` shows an operator why.
The HTTP thread only reads what the event loop wrote; it never calls Redis or Kafka.

>>> clock = iter([0.0, 1.0, 5.0, 100.0]).__next__
>>> h = Health(stale_after_s=30, startup_grace_s=60, clock=clock)
>>> h.beat()
>>> h.liveness()[0], h.liveness()[0]
(True, False)
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from http.server import ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import MetricsHandler

from stream.connections import KafkaConnection
from stream.errors import ConfigError, counted, redis_advice
from stream.topics import probe

log = logging.getLogger("streamrec.health")

READY_CONDITIONS = ("kafka", "redis")
#: the conditions judged when asked (Health.conditions), not set
JUDGED_CONDITIONS = ("loop", "progress", "checks")
#: what a failing ``progress`` and ``checks`` add in a worker (serve says its own: stream/serve.py)
WORKER_STUCK_HINT = "no other batch is handled meanwhile: see the other conditions and the log, or restart the worker"
WORKER_STALE_HINT = ("the timer that checks them hangs, likely on a call into the Kafka consumer (a broker away); it goes "
                     "on when the call returns, else restart the worker")


class Health:
    """What the probes answer; written by the event loop, read by the HTTP thread."""

    def __init__(self, conditions: Iterable[str] = READY_CONDITIONS, stale_after_s: float = 30.0,
                 startup_grace_s: float = 120.0, clock: Callable[[], float] = time.monotonic,
                 stuck_after_s: float = 60.0, stuck_hint: str = WORKER_STUCK_HINT,
                 stale_hint: str = WORKER_STALE_HINT) -> None:
        self.stale_after_s = stale_after_s
        self.startup_grace_s = startup_grace_s
        self.stuck_after_s = stuck_after_s
        #: what ``progress`` and ``checks`` add when they fail: what hangs, and what to do
        self.stuck_hint = stuck_hint
        self.stale_hint = stale_hint
        self._clock = clock
        self._started = clock()
        self._last_beat: float | None = None
        self._starting = ""  # what start-up waits for before the first beat (still_starting)
        self._busy: dict[object, tuple[float, str]] = {}  # key -> (since, what) of each work in hand
        self._checked: float | None = None  # when the conditions were last refreshed (check_readiness)
        self._conditions: dict[str, tuple[bool, str]] = {c: (False, "not checked yet") for c in conditions}
        #: the conditions that wait on another (:meth:`pending`), each with what it said before
        self._pending: dict[str, tuple[bool, str]] = {}
        self._lock = threading.Lock()

    def beat(self) -> None:
        """The event loop is alive (call from a short Faust timer)."""
        self._last_beat = self._clock()

    def still_starting(self, what: str) -> None:
        """Start-up goes on, waiting for something outside (the worker for a Kafka broker that
        does not answer yet: stream/broker_wait.py), and is not stuck: the grace before the first
        beat starts again, and ``/healthz`` says ``what``. Called at each try of that wait."""
        self._started = self._clock()
        self._starting = what

    def busy(self, what: str, key: object = None) -> None:
        """Work that should end within seconds began (a batch taken: ``what`` says it). Until
        :meth:`idle`, readiness fails once it is older than ``stuck_after_s``, whatever the
        conditions say: an await that never returns (an acknowledgement that never comes, a
        thread that hangs, a lock never released) stops every batch while the loop beats and
        Redis and Kafka answer. ``what`` may be said again as the work moves on (same start).
        ``key`` tells apart works in hand at once (serve's requests, each computed on a thread;
        callable from any thread): ``progress`` judges the oldest."""
        with self._lock:
            busy = self._busy.get(key)
            self._busy[key] = (busy[0] if busy is not None else self._clock(), what)

    def idle(self, key: object = None) -> None:
        """The work in hand (``key``'s) ended."""
        with self._lock:
            self._busy.pop(key, None)

    def checked(self) -> None:
        """The conditions were refreshed (:func:`check_readiness`). Once they have been, they
        count only while younger than ``stale_after_s``: a check that hangs (a call into a stuck
        consumer thread) would otherwise leave its last answer, maybe 200, standing for ever."""
        self._checked = self._clock()

    def set(self, condition: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            self._conditions[condition] = (bool(ok), detail or ("ok" if ok else "failing"))
            self._pending.pop(condition, None)

    def pending(self, condition: str, detail: str) -> None:
        """``condition`` cannot be checked yet: start-up waits for something else first, and
        ``detail`` says what. It fails readiness (and its gauge) as before, but ``/readyz`` says
        ``waiting (detail)`` rather than ``FAIL``, so an operator is not sent after it. Ends at
        its next :meth:`set`, or at :meth:`resume`.

        >>> h = Health(conditions=("kafka", "redis"), clock=lambda: 0.0)
        >>> h.pending("redis", "checked once Kafka answers")
        >>> print(h.readiness()[1])
        kafka: FAIL (not checked yet)
        redis: waiting (checked once Kafka answers)
        >>> h.resume()
        >>> print(h.readiness()[1].splitlines()[1])
        redis: FAIL (not checked yet)
        """
        with self._lock:
            self._pending.setdefault(condition, self._conditions.get(condition, (False, "not checked yet")))
            self._conditions[condition] = (False, detail)

    def resume(self) -> None:
        """What was waited for came: each condition still :meth:`pending` says again what it said before."""
        with self._lock:
            self._conditions.update(self._pending)
            self._pending.clear()

    def failing(self) -> list[str]:
        """The conditions set (or listed at start) that fail now, sorted."""
        with self._lock:
            return sorted(name for name, (ok, _) in self._conditions.items() if not ok)

    def is_ok(self, condition: str) -> bool:
        """Whether ``condition`` was last set ok (False before it is first set)."""
        with self._lock:
            return self._conditions.get(condition, (False, ""))[0]

    def liveness(self) -> tuple[bool, str]:
        now = self._clock()
        if self._last_beat is None:
            waited = now - self._started
            if waited <= self.startup_grace_s:
                if self._starting:
                    return True, f"starting: {self._starting} (no heartbeat yet)"
                return True, f"starting ({waited:.0f} s, no heartbeat yet)"
            return False, f"no heartbeat {waited:.0f} s after start (grace {self.startup_grace_s:.0f} s)"
        age = now - self._last_beat
        if age <= self.stale_after_s:
            return True, f"event loop heartbeat {age:.1f} s ago"
        return False, f"event loop heartbeat {age:.1f} s ago (stale after {self.stale_after_s:.0f} s): the loop is blocked"

    def conditions(self) -> list[tuple[str, bool, str]]:
        """Every readiness condition judged now, as ``(name, ok, detail)``: those set (sorted by
        name), then ``loop`` (the liveness heartbeat), ``progress`` (no batch in hand longer than
        ``stuck_after_s``) and ``checks`` (the conditions refreshed within ``stale_after_s``).

        The one judgement both :meth:`readiness` (``/readyz``) and the ``streamrec_ready`` gauges
        (:class:`ReadinessCollector`) read; it only reads what the event loop wrote.

        >>> h = Health(conditions=("redis",), clock=lambda: 0.0)
        >>> h.set("redis", True, "PING answered")
        >>> [(name, ok) for name, ok, _ in h.conditions()]
        [('redis', True), ('loop', True), ('progress', True), ('checks', True)]
        """
        return self._judged()[0]

    def _judged(self) -> tuple[list[tuple[str, bool, str]], set[str]]:
        """:meth:`conditions`, and those of them :meth:`pending` then (read at once)."""
        with self._lock:
            judged = [(name, ok, detail) for name, (ok, detail) in sorted(self._conditions.items())]
            pending = set(self._pending)
            busy = min(self._busy.values(), default=None)  # the oldest work in hand
        judged.append(("loop", *self.liveness()))
        now, checked = self._clock(), self._checked
        if busy is None:
            judged.append(("progress", True, "no batch in hand"))
        elif now - busy[0] > self.stuck_after_s:
            judged.append(("progress", False, f"{busy[1]} for {now - busy[0]:.0f} s (stuck after {self.stuck_after_s:.0f} "
                                              f"s); {self.stuck_hint}"))
        else:
            judged.append(("progress", True, f"{busy[1]} for {now - busy[0]:.0f} s"))
        if checked is None:
            judged.append(("checks", True, "not refreshed yet"))
        elif now - checked > self.stale_after_s:
            judged.append(("checks", False, f"the conditions above were last refreshed {now - checked:.0f} s ago (stale "
                                            f"after {self.stale_after_s:.0f} s): {self.stale_hint}"))
        else:
            judged.append(("checks", True, f"refreshed {now - checked:.0f} s ago"))
        return judged, pending

    def readiness(self) -> tuple[bool, str]:
        """Ready or not, and one line per condition: every condition set, and the judged ones
        (``loop``, ``progress``, ``checks``) only while they fail, so a ready answer lists what
        the worker checks. A condition :meth:`pending` says ``waiting`` rather than ``FAIL``."""
        judged, pending = self._judged()
        lines = [f"{name}: {'ok' if ok else 'waiting' if name in pending else 'FAIL'} ({detail})"
                 for name, ok, detail in judged if not ok or name not in JUDGED_CONDITIONS]
        return all(ok for _, ok, _ in judged), "\n".join(lines)


READY_HELP = ("1 while the readiness condition holds, 0 while it fails (/readyz says why), judged at each scrape: "
              "those the process sets (kafka, redis, state, output, models, batches, commits; serve: redis, models, "
              "catalogue) and loop, progress, checks")
READY_OVERALL_HELP = "1 while /readyz answers 200 (every streamrec_ready condition holds), else 0"


class ReadinessCollector:
    """The readiness conditions as Prometheus gauges, judged at every scrape (so never stale,
    and never a call to Redis or Kafka: :meth:`Health.conditions` only reads):

    - ``streamrec_ready{condition}``: 1 while the condition holds, 0 while it fails, for every
      condition ``/readyz`` judges (those set, and ``loop``, ``progress``, ``checks``);
    - ``streamrec_ready_overall``: 1 while ``/readyz`` answers 200, else 0.

    The overall answer is a gauge of its own rather than ``streamrec_ready{condition="all"}``:
    so every series of ``streamrec_ready`` is one condition, and ``streamrec_ready == 0`` or
    ``count(streamrec_ready == 0)`` list or count the failing conditions without a label to
    leave out (with an ``all`` series, each failure would show twice).

    Register it with :func:`export_readiness` (once per registry).
    """

    def __init__(self, health: Health) -> None:
        self.health = health

    def describe(self) -> list:
        return [GaugeMetricFamily("streamrec_ready", READY_HELP, labels=["condition"]),
                GaugeMetricFamily("streamrec_ready_overall", READY_OVERALL_HELP)]

    def collect(self):
        judged = self.health.conditions()
        family = GaugeMetricFamily("streamrec_ready", READY_HELP, labels=["condition"])
        for name, ok, _ in judged:
            family.add_metric([name], 1.0 if ok else 0.0)
        yield family
        yield GaugeMetricFamily("streamrec_ready_overall", READY_OVERALL_HELP,
                                value=1.0 if all(ok for _, ok, _ in judged) else 0.0)


_exported: weakref.WeakKeyDictionary[CollectorRegistry, ReadinessCollector] = weakref.WeakKeyDictionary()
_exported_lock = threading.Lock()


def export_readiness(registry: CollectorRegistry, health: Health) -> ReadinessCollector:
    """Expose ``health``'s conditions on ``registry`` (:class:`ReadinessCollector`).

    Once per registry: called again (another :class:`Health` in the same process: tests, a
    server started again), the collector already registered reads the new ``health`` instead
    of a second one being registered, which would raise "Duplicated timeseries" on the
    process-wide ``REGISTRY`` (and expose each condition twice on another registry).
    """
    with _exported_lock:
        collector = _exported.get(registry)
        if collector is None:
            collector = ReadinessCollector(health)
            registry.register(collector)
            _exported[registry] = collector
        collector.health = health
    return collector


async def check_readiness(app: Any, store: Any, health: Health, bootstrap: KafkaConnection | str | None = None,
                          inputs: tuple[str, ...] | None = None) -> bool:
    """Refresh the ``kafka`` and ``redis`` conditions from a running worker (a Faust timer).

    With ``bootstrap``, ``kafka`` also needs a broker to answer a metadata request (a raw one,
    in a thread, at most 2 s): a consumer that joined its group keeps its assignment while the
    brokers are gone, and cannot make progress meanwhile. With ``inputs`` (topic names), the
    detail counts the partitions of those topics only (Faust assigns a leader topic too).
    Bootstrap servers alone are reached the way the app's own clients reach them (``app.kafka``,
    a :class:`~stream.connections.KafkaConnection`: TLS where they use it), else in plaintext.
    """
    if isinstance(bootstrap, str):
        kafka = getattr(app, "kafka", None)
        bootstrap = kafka if isinstance(kafka, KafkaConnection) and kafka.bootstrap == bootstrap else bootstrap
    try:
        await asyncio.wait_for(store.ping(), 5.0)
        health.set("redis", True, "PING answered")
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        health.set("redis", False, f"PING failed: {type(exc).__name__}: {exc}{redis_advice(exc)}")
    problem = await asyncio.to_thread(probe, bootstrap, 2.0) if bootstrap else None
    if problem is not None:
        health.set("kafka", False, f"no broker answers ({problem})")
    elif getattr(app, "rebalancing", False):
        health.set("kafka", False, "consumer group rebalancing")
    elif not getattr(app, "rebalancing_count", 0):
        health.set("kafka", False, "consumer has not joined its group yet")
    else:
        try:
            assignment = app.consumer.assignment()
        except Exception as exc:  # noqa: BLE001 - consumer not started
            health.set("kafka", False, f"consumer not started: {exc}")
        else:
            if inputs is None:
                health.set("kafka", True, f"in the group, {counted(len(assignment), 'partition')} assigned")
            else:
                n = sum(1 for tp in assignment if tp.topic in inputs)
                health.set("kafka", True, f"in the group, {counted(n, 'input partition')} assigned")
    health.checked()
    return health.readiness()[0]


#: seconds a client of /metrics, /healthz or /readyz has to send its request
REQUEST_TIMEOUT_S = 10.0


def _handler(registry: CollectorRegistry, health: Health) -> type:
    class Handler(MetricsHandler):
        #: seconds a client has to send its request (socketserver's default: forever, so a
        #: client that never finished its headers held a thread for the worker's lifetime)
        timeout = REQUEST_TIMEOUT_S

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.split("?", 1)[0].rstrip("/") or "/"
            if path == "/healthz":
                self._answer(*health.liveness())
            elif path == "/readyz":
                self._answer(*health.readiness())
            elif path in ("/metrics", "/"):
                super().do_GET()
            else:
                self._answer(False, "not found: try /metrics, /healthz or /readyz", status=404)

        def _answer(self, ok: bool, text: str, status: int | None = None) -> None:
            body = (("ok" if ok else "unavailable") + "\n" + text + "\n").encode()
            self.send_response(status or (200 if ok else 503))
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    Handler.registry = registry
    return Handler


class _Server(ThreadingHTTPServer):
    """http.server's threading server, quiet about a client that hung up before its answer."""

    def handle_error(self, request, client_address) -> None:
        # a probe that gave up (Kubernetes' timeoutSeconds, a scraper's timeout) on a worker
        # paused or busy past it: socketserver printed the BrokenPipeError's traceback to stderr,
        # which the worker logs line by line at WARNING (29 tracebacks in a 13-minute chaos soak)
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


class HealthServer:
    """The HTTP server thread; ``close()`` stops it and frees the port."""

    def __init__(self, port: int, registry: CollectorRegistry, health: Health, addr: str = "0.0.0.0") -> None:
        try:
            self.httpd = _Server((addr, port), _handler(registry, health))
        except OSError as exc:  # the port taken, an address this host does not have
            raise ConfigError(f"cannot serve metrics and health on {addr}:{port} (STREAMREC_METRICS_PORT): "
                              f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        export_readiness(registry, health)  # streamrec_ready{condition} beside what /readyz answers
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="streamrec-http", daemon=True)

    def start(self) -> HealthServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)

    def __enter__(self) -> HealthServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def serve(port: int, registry: CollectorRegistry = REGISTRY, health: Health | None = None,
          addr: str = "0.0.0.0") -> HealthServer:
    """Serve /metrics, /healthz and /readyz on ``addr:port`` (0: a free port) in a daemon thread."""
    server = HealthServer(port, registry, health or Health(), addr).start()
    log.info("metrics and health on http://%s:%d/metrics, /healthz, /readyz", addr, server.port)
    return server
