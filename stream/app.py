"""The worker's Faust application: ``create_app`` wires the parts, :class:`Worker` runs them.

``create_app(settings)`` builds everything and connects to nothing; Faust connects when the
worker starts. One agent consumes the co-partitioned click, purchase and forget topics
in micro-batches; timers snapshot the online models, hot-reload the Transformer scorer and
watch lag and readiness. What each of them does is :class:`stream.shell.Shell`'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import faust
import mode

from gpu_scorer.layout import MANIFEST
from online_models import Recommender
from stream import consumer
from stream.batching import take_batches
from stream.connections import KafkaConnection
from stream.errors import ConfigError, clipped, path_problem
from stream.health import Health
from stream.logs import ClippedTracebacks, Thinned, exit_now
from stream.pipeline import RecommendationStep
from stream.prometheus import FROZEN_COUNT_INTERVAL_S, Metrics
from stream.publisher import BatchPublisher
from stream.settings import Settings
from stream.shell import Shell, load_arm_scorers, load_scorer
from stream.state import CachedUserStateStore, RedisUserStateStore, UserStateStore

#: how often the worker's consumer asks the brokers for the topics' partitions (aiokafka's
#: ``metadata_max_age_ms``, five minutes by default): partitions added to the input topics are
#: read (the group rebalances to assign them), and counted by the ``partitions`` readiness
#: condition, at most this long after the producers may write there
METADATA_MAX_AGE_S = 10


def create_app(settings: Settings, metrics: Metrics | None = None, recommender: Recommender | None = None,
               scorer=None, load_model: bool = True, health: Health | None = None,
               store: UserStateStore | None = None) -> faust.App:
    """The worker's Faust app, wired to a :class:`~stream.shell.Shell` (``app.streamrec``)
    that does every duty scheduled here. Builds everything and connects to nothing."""
    metrics = metrics or Metrics()
    refused: set[tuple] = set()  # scorer versions that did not load (stream.shell.load_scorer)
    if scorer is None and load_model:
        scorer = load_scorer(settings, metrics, refused)
    step = RecommendationStep.from_settings(settings, scorer, recommender)
    step.arm_scorers = load_arm_scorers(step.experiment, settings) if load_model else {}
    store = worker_store(settings, store)
    app = _faust_app(settings)
    # a saturated worker fetches about once a batch, not every STREAMREC_FETCH_MAX_WAIT_MS
    pacer = app.transport.fetch_pacer = consumer.FetchPacer(settings.fetch_max_wait_ms) if settings.fetch_max_wait_ms else None
    # durable output: every in-sync replica has a record before it counts as published, and a
    # resend after a lost acknowledgement is not written twice
    publisher = publisher_for(settings, acks="all", enable_idempotence=True)
    shell = Shell(settings, metrics, step, store, publisher, lambda: app.consumer_generation_id,
                  health=health or Health(), refused_models=refused, fetch_pacer=pacer)
    shell.health.set("models", False, "restoring the online models' snapshot")
    app.streamrec = shell  # for the Worker, the CLI and tests
    app.kafka = settings.kafka  # how the readiness probe reaches the brokers (stream/health.py)
    topics = settings.topics
    configs = settings.topic_configs()
    # the inputs and the forget requests, co-partitioned: a user's erasure reaches the worker
    # that owns their state (stream/handler.py)
    inputs = app.topic(*topics.consumed, key_type=bytes, value_type=bytes, partitions=settings.partitions)
    outputs = [app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.partitions, config=configs[name])
               for name in (topics.recommendations, topics.dlq)]

    @app.agent(inputs, name="recommend", supervisor_strategy=mode.CrashingSupervisor)
    async def recommend(stream):
        # Should anything still escape (handle_taken catches what handling a batch raises),
        # the worker exits rather than Faust restarting the agent behind an unacknowledged
        # batch that would stall its partitions' commits unseen; a restart redelivers it.
        async for events in take_batches(stream, settings.batch_size, settings.batch_timeout_ms / 1000):
            if shell.draining:
                await asyncio.Event().wait()  # shutting down: leave this batch unacknowledged
            await shell.models_ready.wait()  # restored, and what the snapshot missed learned again
            await shell.handle_taken(app, events)

    @app.on_partitions_revoked.connect
    async def finish_batch_in_hand(sender, revoked, **_) -> None:
        await shell.on_revoked(revoked)

    @app.on_partitions_assigned.connect
    async def claim_partitions(sender, assigned, **_) -> None:
        await shell.on_assigned(app, assigned)

    @app.task
    async def on_start():
        for topic in outputs:
            await topic.maybe_declare()
        if shell.catalogue_feed is not None:  # the catalogue for search: all of the items topic
            app.add_future(shell.catalogue_feed.run())
        await shell.restore_models()

    for interval, name, duty in (
            (max(1, settings.snapshot_interval_s), "snapshot_models", shell.snapshot_models),
            (1.0, "snapshot_soon", shell.snapshot_soon),  # after an erasure, and the first
            (5.0, "reload_scorer", shell.reload_scorer),
            (1.0, "heartbeat", shell.heartbeat),
            (FROZEN_COUNT_INTERVAL_S, "count_frozen_objects", shell.count_frozen),
            (2.0, "watch_lag_and_readiness", partial(shell.watch, app)),
            (10.0, "read_topic_ids_until_known", shell.read_ids_until_known)):
        app.timer(interval=interval, name=name)(surviving(name, duty, metrics))
    return app


#: the log of a periodic duty that raised: thinned (one a duty run every second would repeat)
_timer_log = logging.getLogger("streamrec.timers")
_timer_log.addFilter(Thinned())
_timer_log.addFilter(ClippedTracebacks())


def surviving(name: str, duty: Callable[[], Awaitable[None]], metrics: Metrics) -> Callable[[], Awaitable[None]]:
    """``duty`` (a timer's), its runs counted (``streamrec_timer_runs_total``, once each has
    ended), with what it raises counted (``streamrec_timer_failures_total``)
    and logged, not passed on: mode crashes a Faust app whose timer raises, so a bug in a
    snapshot, a readiness check or a lag reading stopped the whole worker, events and all. The
    duty runs again at its next interval; what it watches says the rest (a heartbeat that
    stops makes /healthz fail, readiness checks that stop make ``checks`` fail)."""

    runs = metrics.timer_runs.labels(name)

    @functools.wraps(duty)
    async def run() -> None:
        try:
            await duty()
        except Exception:  # noqa: BLE001 - see the docstring (CancelledError, a stop, still goes through)
            metrics.timer_failures.labels(name).inc()
            _timer_log.exception("the worker's periodic %s raised; the worker goes on, and it runs again at its next "
                                 "interval", name)
        runs.inc()

    return run


def check_model_dir(settings: Settings) -> None:
    """A :class:`ConfigError` unless STREAMREC_MODEL_DIR is a folder or can be one (no model
    registered: the worker ranks with the online models and looks again every 5 s), and not one
    version's folder in a registry; said at start, before Kafka, rather than never (a file there
    hid every model the worker looked for). One that cannot be looked at (a name too long for a
    file name, a folder above it this user may not enter) is said with the setting's name, not as
    a bare path."""
    try:
        _check_model_dir(settings)
    except OSError as exc:
        why = path_problem(exc) if isinstance(exc, PermissionError) else (exc.strerror or type(exc).__name__).lower()
        raise ConfigError(f"STREAMREC_MODEL_DIR={clipped(str(settings.model_dir), 200)}: cannot be looked at: "
                          f"{clipped(why, 600)}") from None


def _check_model_dir(settings: Settings) -> None:
    path = Path(settings.model_dir)
    try:  # exists() answers False for a loop of symbolic links, taken for a folder not made yet
        path.stat()
    except (FileNotFoundError, NotADirectoryError):  # not made yet; under a file: said below
        pass
    if path.exists() and not path.is_dir():
        raise ConfigError(f"STREAMREC_MODEL_DIR={settings.model_dir}: a file, not a folder; point it at the model "
                          "registry's folder (`streamrec train` makes one), or at a folder not made yet")
    # a folder not made yet under a file can never be made (`streamrec train` refuses it): the
    # worker looked there every 5 s for ever
    nearest = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise ConfigError(f"STREAMREC_MODEL_DIR={settings.model_dir}: {nearest} is a file, so no folder can be made "
                          "there; point it at the model registry's folder, or at a folder not made yet")
    if (path / MANIFEST).is_file():  # was: "no Transformer model registered", beside the model
        raise ConfigError(f"STREAMREC_MODEL_DIR={settings.model_dir}: one registered version (it holds {MANIFEST}), "
                          f"not the registry; point it at the folder that holds it, {path.absolute().parent} "
                          "(its CURRENT names the version served)")


def _faust_app(settings: Settings) -> faust.App:
    datadir = Path(".run") / "faust" / settings.app_id
    try:
        datadir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a service started in / (systemd without WorkingDirectory=), a read-only image
        raise ConfigError(f"the worker keeps Faust's data folder in {datadir.parent.absolute()}, which cannot be made "
                          f"({exc.strerror or exc}): start it from a folder it can write (systemd: WorkingDirectory=)") from None
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{hp.strip()}" for hp in settings.kafka_bootstrap.split(",") if hp.strip()],
        broker_credentials=faust_credentials(settings.kafka),
        key_serializer="raw",
        value_serializer="raw",
        web_enabled=False,
        datadir=str(datadir),
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 10),
        producer_linger_ms=2,
        producer_max_batch_size=1024 * 1024,
        producer_acks=-1,
        stream_buffer_maxsize=max(4096, settings.batch_size * 4),
        broker_max_poll_records=max(500, settings.batch_size),
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_S * 1000,
        # Faust would wait for every buffered event to be acknowledged before a rebalance or
        # shutdown; take_batches leaves an unfinished batch unacknowledged on purpose, and the
        # Worker below drains the batch in hand itself.
        stream_wait_empty=False,
    )
    # before anything asks for app.transport (app.topic does): Faust's aiokafka transport
    # with a cheaper per-message hand-over (stream/consumer.py)
    app.transport = consumer.Transport(app.conf.broker_consumer, app)
    app.transport.fetch_max_wait_ms = settings.fetch_max_wait_ms or None
    return app


def worker_store(settings: Settings, store: UserStateStore | None = None) -> CachedUserStateStore:
    """The worker's user-state store: ``store`` (default: Redis as ``settings`` say), behind the
    cache of the users this worker saved last, which are not read back while its claims hold
    (stream/state.py)."""
    if store is None:
        store = RedisUserStateStore.from_url(settings.redis_url, key_prefix=settings.topic_prefix,
                                             ttl_s=settings.state_ttl_s, **settings.redis.client_options())
    return CachedUserStateStore(store, max_age_s=min(30.0, settings.state_ttl_s / 2 or 30.0))


def publisher_for(settings: Settings, **options) -> BatchPublisher:
    """A :class:`BatchPublisher` that reaches Kafka as ``settings.kafka`` says (TLS, SASL), and
    finds partitions added to its topics as often as the consumer does; ``options`` are
    BatchPublisher's own."""
    options.setdefault("metadata_max_age_s", METADATA_MAX_AGE_S)
    return BatchPublisher(settings.kafka_bootstrap, client_options=settings.kafka.client_options(), **options)


def faust_credentials(kafka: KafkaConnection) -> faust.SASLCredentials | faust.SSLCredentials | None:
    """Faust's ``broker_credentials`` for ``kafka`` (None: plaintext); its consumer, producer
    and topic creation all log in with them."""
    if kafka.uses_sasl:
        return faust.SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password,
                                     ssl_context=kafka.ssl_context(), mechanism=kafka.sasl_mechanism)
    if kafka.uses_ssl:
        return faust.SSLCredentials(kafka.ssl_context())
    return None


class Worker(faust.Worker):
    """A Faust worker that finishes the batch in hand before it stops on SIGTERM/SIGINT; a
    second Ctrl-C or SIGTERM while it does exits at once (status 130 or 143), as after a
    kill -9 (mode ignored both: a batch stuck on an unanswering Redis kept the worker for the
    drain's 30 s, and a supervisor's second SIGTERM could not cut that short)."""

    #: what an operator calls each signal in the log
    SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
    _first_signal: signal.Signals | None = None

    def _on_sigint(self) -> None:
        self._on_stop_signal(signal.SIGINT)
        super()._on_sigint()

    def _on_sigterm(self) -> None:
        self._on_stop_signal(signal.SIGTERM)
        super()._on_sigterm()

    def _on_stop_signal(self, sig: signal.Signals) -> None:
        if not self._signal_stop_time:
            self._first_signal = sig
        else:
            self._exit_on_second(sig)

    def _exit_on_second(self, sig: signal.Signals) -> None:
        # as a kill -9: the batch in hand's offsets are committed only once it is done, so the
        # partitions' next owner reads it again and skips what was applied (docs/architecture.md)
        first = self._first_signal or sig
        said = (f"{self.SIGNAL_NAMES[sig]} again" if first == sig
                else f"{self.SIGNAL_NAMES[sig]} after {self.SIGNAL_NAMES[first]}")
        self.log.warning("%s: exiting now; the batch in hand is not committed, and its partitions' next "
                         "owner handles it again (each event applied once)", said)
        exit_now(128 + sig)

    async def _stop_on_signal(self, sig: signal.Signals) -> None:
        shell: Shell | None = getattr(self.app, "streamrec", None)
        if shell is not None:
            self.log.info("Signal %s: finishing the batch in hand, then committing and stopping", sig.name)
            if not await shell.drain():
                self.log.warning("the batch in hand did not finish in time; it stays uncommitted and will be redelivered")
        await super()._stop_on_signal(sig)
        if shell is not None:
            await shell.close()
