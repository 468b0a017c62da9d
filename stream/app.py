"""The Faust application: thin agents around :class:`stream.handler.BatchHandler`.

``create_app(settings)`` builds everything and connects to nothing; Faust connects when
the worker starts. One agent consumes the co-partitioned click and purchase topics in
micro-batches; timers hot-reload the Transformer scorer and snapshot the online models.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import faust
import mode

from online_models import Recommender
from stream import consumer, snapshots
from stream.batching import drop_stale, take_batches
from stream.handler import BatchHandler, Claims, RawMessage
from stream.health import Health, check_readiness
from stream.lag import LagMetrics, update_lag
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.publisher import BatchPublisher
from stream.replay import gaps, replay
from stream.retry import Backoff
from stream.settings import Settings
from stream.state import Fenced, RedisUserStateStore, UserStateStore
from stream.topics import committed_offsets

log = logging.getLogger("streamrec.app")

SNAPSHOT_KEY = "models:snapshot"


@dataclass
class Shell:
    """What the agents share: the handler, the scorer holder and the drain lock."""

    settings: Settings
    metrics: Metrics
    step: RecommendationStep
    store: UserStateStore
    health: Health = field(default_factory=Health)
    handler: BatchHandler | None = None
    publisher: BatchPublisher | None = None
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    draining: bool = False
    #: set once the models are restored and have learned again what their snapshot missed
    models_ready: asyncio.Event = field(default_factory=asyncio.Event)
    replayed: bool = False

    async def retry_redis(self, what: str, call, attempts: int | None = None):
        """``call()``, retried with back-off while it fails (``attempts`` times; None: until it
        works, as for what the worker cannot go on without)."""
        delays = Backoff().delays(attempts)
        while True:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - retried, then raised
                delay = next(delays, None)
                if delay is None:
                    raise
                log.warning("could not %s (%r); retrying in %.2fs", what, exc, delay)
                await asyncio.sleep(delay)

    async def replay_once(self, app, restored: asyncio.Event) -> None:
        """Once, at the first assignment: teach the restored models the events between their
        snapshot and the group's committed offsets of the partitions this worker was assigned
        (stream/replay.py), before any batch."""
        try:
            await restored.wait()
            async with self.busy:
                await self._replay(app)
        except Exception as exc:  # noqa: BLE001 - the worker serves on with what the models have
            log.error("could not replay the events the models' snapshot misses (%r); serving with the models as "
                      "restored", exc)
        finally:
            self.health.set("models", True, "restored")
            self.models_ready.set()

    async def _replay(self, app) -> None:
        settings, step = self.settings, self.step
        self.health.set("models", False, "learning again the events the models' snapshot misses")
        learned = step.recommender.learned_offsets
        if not learned:
            return
        committed = await asyncio.to_thread(committed_offsets, settings.kafka_bootstrap, settings.app_id)
        mine = {(tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in settings.topics.inputs}
        todo = gaps(learned, {tp: off for tp, off in committed.items() if tp in mine})
        if not todo:
            return
        total = sum(g.size for g in todo)
        log.info("the models' snapshot misses %d event(s) before the committed offsets (%s); learning them again",
                 total, ", ".join(f"{g.topic}[{g.partition}] {g.start}-{g.end - 1}" for g in todo))
        start = time.monotonic()
        n = await replay(step, settings.kafka_bootstrap, todo, settings.bounds)
        self.metrics.events_relearned.inc(n)
        log.info("learned %d event(s) again in %.1f s", n, time.monotonic() - start)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Stop taking new batches and wait for the batch in hand; False if it did not finish in time."""
        self.draining = True
        return await self.wait_idle(timeout_s)

    async def handle_taken(self, app, events: list) -> None:
        """Handle a batch from :func:`take_batches`, under the lock a rebalance waits on.

        Events taken before a rebalance that has begun or happened since are removed from
        ``events`` first (:func:`drop_stale`): their partitions may belong to another worker
        now, and Kafka delivers them again to whoever owns them. Nothing raised by handling
        the batch leaves this method (Faust would restart the agent, and the batch's offsets
        would stall its partitions' commits unseen): a batch whose partitions another worker
        claimed since (:class:`Fenced`) is left unacknowledged for that worker; a batch that
        raised past every safeguard too, with the worker reporting unready."""
        async with self.busy:
            dropped = drop_stale(app, events)
            if dropped:
                log.info("rebalance: %d event(s) taken before it left unhandled and unacknowledged; "
                         "they are delivered again to their partitions' owner", dropped)
            if not events:
                return
            try:
                await self.handler.handle_isolated([_raw(ev.message) for ev in events])
            except Fenced as exc:
                self.metrics.fenced_batches.inc()
                log.warning("fenced: %s since this batch was taken; its %d event(s) are left unacknowledged for "
                            "their new owner (this worker's writes would overwrite newer state)", exc, len(events))
                events.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the last safeguard: never crash the agent
                self.metrics.batch_failures.inc()
                self.health.set("batches", False, f"a batch of {len(events)} events raised {type(exc).__name__}: {exc}; "
                                                  "it is unacknowledged, so its partitions' commits wait (see the log)")
                log.exception("a batch of %d events raised past every safeguard; it is left unacknowledged", len(events))
                events.clear()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no batch is in hand; False if the one in hand did not finish in time."""
        try:
            await asyncio.wait_for(self.busy.acquire(), timeout_s)
        except TimeoutError:
            return False
        self.busy.release()
        return True


def load_scorer(settings: Settings, metrics: Metrics, refused: set[str] | None = None):
    """The hot-swapping Transformer scorer, or None when no model is registered yet, or none
    of the registered versions loads (each refused version is counted in
    ``scorer_reload_failures_total`` once, logged, and remembered in ``refused``)."""
    from gpu_scorer import HotSwapScorer, ModelRegistry
    from gpu_scorer.errors import ModelLoadError

    registry = ModelRegistry(Path(settings.model_dir))
    if registry.latest() is None:
        log.warning("no Transformer model registered under %s: ranking with the online models alone "
                    "(run `streamrec train` to add one; the worker picks it up without a restart)", settings.model_dir)
        return None
    refused = set() if refused is None else refused
    if set(registry.versions()) <= refused and registry.latest() in refused:
        return None  # nothing new since the last attempt

    def count(version: str, exc: BaseException) -> None:
        if version not in refused:
            refused.add(version)
            metrics.scorer_reload_failures.inc()

    try:
        scorer = HotSwapScorer(registry, device=settings.scorer_device, on_failure=count)
    except ModelLoadError as exc:
        log.error("no registered Transformer model loads (%s): ranking with the online models alone until a "
                  "good version is registered", exc)
        return None
    log.info("Transformer scorer %s runs on %s", scorer.version, scorer.provider)
    metrics.set_scorer(scorer.provider, scorer.version)
    return scorer


def _broker_urls(bootstrap: str) -> list[str]:
    return [f"kafka://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip()]


def create_app(settings: Settings, metrics: Metrics | None = None, recommender: Recommender | None = None,
               scorer=None, load_model: bool = True, health: Health | None = None) -> faust.App:
    metrics = metrics or Metrics()
    health = health or Health()
    lag = LagMetrics(metrics.registry)
    refused_models: set[str] = set()
    if scorer is None and load_model:
        scorer = load_scorer(settings, metrics, refused_models)
    step = RecommendationStep.from_settings(settings, scorer, recommender)
    recommender = step.recommender
    store = RedisUserStateStore.from_url(settings.redis_url, key_prefix=f"{settings.topic_prefix}", ttl_s=settings.state_ttl_s)
    shell = Shell(settings, metrics, step, store, health)
    topics = settings.topics
    health.set("models", False, "restoring the online models' snapshot")

    datadir = Path(".run") / "faust" / settings.app_id
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=_broker_urls(settings.kafka_bootstrap),
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
        # Faust would wait for every buffered event to be acknowledged before a rebalance or
        # shutdown; take_batches leaves an unfinished batch unacknowledged on purpose, and the
        # Worker below drains the batch in hand itself.
        stream_wait_empty=False,
    )
    # before anything asks for app.transport (app.topic does): Faust's aiokafka transport
    # with a cheaper per-message hand-over (stream/consumer.py)
    app.transport = consumer.Transport(app.conf.broker_consumer, app)
    app.streamrec = shell  # for the CLI, tests and timers
    topic_config = {"min.insync.replicas": str(settings.min_insync_replicas)}
    inputs = app.topic(*topics.inputs, key_type=bytes, value_type=bytes, partitions=settings.partitions)
    outputs = [app.topic(name, key_type=bytes, value_type=bytes, partitions=settings.partitions, config=topic_config)
               for name in (topics.recommendations, topics.dlq)]

    # durable output: every in-sync replica has a record before it counts as published, and a
    # resend after a lost acknowledgement is not written twice
    publisher = BatchPublisher(settings.kafka_bootstrap, acks="all", enable_idempotence=True)
    shell.publisher = publisher
    claims = Claims(lambda: app.consumer_generation_id)
    shell.handler = BatchHandler(step, store, publisher.publish, topics, metrics, health=health, bounds=settings.bounds,
                                 claims=claims)
    restored = asyncio.Event()  # on_start has restored the snapshot (or found none)

    @app.agent(inputs, name="recommend", supervisor_strategy=mode.CrashingSupervisor)
    async def recommend(stream):
        # Should anything still escape (handle_taken catches what handling a batch raises),
        # the worker exits rather than Faust restarting the agent behind an unacknowledged
        # batch that would stall its partitions' commits unseen; a restart redelivers it.
        within = settings.batch_timeout_ms / 1000
        async for events in take_batches(stream, settings.batch_size, within):
            if shell.draining:
                await asyncio.Event().wait()  # shutting down: leave this batch unacknowledged
            await shell.models_ready.wait()  # restored, and what the snapshot missed learned again
            await shell.handle_taken(app, events)

    @app.on_partitions_revoked.connect
    async def finish_batch_in_hand(sender, revoked, **_) -> None:
        # Faust has suspended the flow; the batch in hand finishes (its state saved) before the
        # partitions go to their next owner, so that owner never loads a user's state under a
        # write still to come (stream_wait_empty=False: Faust itself waits for nothing)
        if revoked and not await shell.wait_idle(settings.session_timeout_s / 2):
            log.warning("rebalance: the batch in hand did not finish within %.1f s; it is redelivered to "
                        "the partitions' next owner, and its state write is refused (fenced) if it comes later "
                        "than that owner's claim", settings.session_timeout_s / 2)

    @app.on_partitions_assigned.connect
    async def claim_partitions(sender, assigned, **_) -> None:
        # each new owner claims its partitions: a write of a worker that held them before is
        # refused from now on (stream/state.py, fencing). A claim that fails now (Redis down)
        # is taken before the first batch of the partition instead.
        parts = {tp.partition for tp in assigned if tp.topic in topics.inputs}
        generation = app.consumer_generation_id
        claims.release(set(claims.partitions) - parts)
        try:
            claims.hold(await asyncio.wait_for(store.claim(parts), settings.session_timeout_s / 4), generation)
        except Exception as exc:  # noqa: BLE001 - taken lazily instead
            log.warning("could not claim partitions %s on assignment (%r); claiming before their first batch", sorted(parts), exc)
        if not shell.replayed:
            shell.replayed = True
            app.add_future(shell.replay_once(app, restored))

    @app.task
    async def on_start():
        for topic in outputs:
            await topic.maybe_declare()
        metrics.set_models(step.model_versions())
        try:
            # until Redis answers: starting with empty models would later overwrite a good snapshot
            snapshot = await shell.retry_redis("load the models' snapshot", lambda: store.get_blob(SNAPSHOT_KEY))
            if snapshot:
                try:
                    step.recommender = Recommender.restore(snapshot, settings.snapshot_key or None)
                    log.info("online models restored from Redis snapshot (%d bytes, %d events learned)",
                             len(snapshot), step.recommender.n_learned)
                except Exception as exc:  # noqa: BLE001 - an old, foreign or forged snapshot never stops the worker
                    metrics.model_snapshot_refused.inc()
                    log.error("refused the online models' snapshot in Redis (%s); starting with empty models", exc)
        finally:
            restored.set()

    snapshot_every = max(1, settings.snapshot_interval_s)

    @app.timer(interval=snapshot_every)
    async def snapshot_models():
        if not shell.models_ready.is_set():
            return  # never over a good snapshot with models that have not restored it yet
        clock = time.perf_counter
        signing_key = settings.snapshot_key or None
        if settings.snapshot_fork and snapshots.can_fork():
            recommender, key, url = step.recommender, store.blob_key(SNAPSHOT_KEY), settings.redis_url

            def write_snapshot() -> None:  # in the child: the models as they were at the fork
                import redis

                redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=5).set(key, recommender.snapshot(signing_key))

            async with shell.busy:  # no batch in hand: the models are consistent
                start = clock()
                pid = snapshots.fork_call(write_snapshot)
                metrics.model_snapshot_pause.set(clock() - start)
            code = await snapshots.wait_child(pid, timeout_s=max(60.0, snapshot_every))
            if code != 0:
                metrics.model_snapshots.labels("failed").inc()
                log.error("the online models' snapshot failed (child process %d exited with %d; "
                          "its error is in the worker's stderr); the next one is in %d s", pid, code, snapshot_every)
                return
        else:
            async with shell.busy:
                start = clock()
                data = step.recommender.snapshot(signing_key)
                metrics.model_snapshot_pause.set(clock() - start)
            await store.set_blob(SNAPSHOT_KEY, data)
        metrics.model_snapshots.labels("ok").inc()
        metrics.set_models(step.model_versions())

    @app.timer(interval=5.0)
    async def reload_scorer():
        try:
            if step.scorer is None:
                step.scorer = await asyncio.to_thread(load_scorer, settings, metrics, refused_models)
            elif await asyncio.to_thread(step.scorer.maybe_reload):
                log.info("Transformer scorer now %s on %s", step.scorer.version, step.scorer.provider)
                metrics.set_scorer(step.scorer.provider, step.scorer.version)
        except Exception as exc:  # noqa: BLE001 - the current scorer (or none) keeps serving
            metrics.scorer_reload_failures.inc()
            log.error("scorer reload failed, the current one keeps serving: %s", exc)

    @app.timer(interval=1.0)
    async def heartbeat():
        health.beat()

    @app.timer(interval=2.0)
    async def watch_lag_and_readiness():
        await check_readiness(app, store, health, settings.kafka_bootstrap, topics.inputs)
        await update_lag(app, lag, topics.inputs)
        lag.set_scorer(step.scorer)  # reads the manifest only when the scorer or its version changes

    return app


def _raw(message) -> RawMessage:
    ts = message.timestamp
    return RawMessage(message.topic, message.partition, message.offset, message.key, message.value,
                      int(ts * 1000) if ts else None, message.generation_id)


class Worker(faust.Worker):
    """A Faust worker that finishes the batch in hand before it stops on SIGTERM/SIGINT."""

    async def _stop_on_signal(self, sig: signal.Signals) -> None:
        shell: Shell | None = getattr(self.app, "streamrec", None)
        if shell is not None:
            self.log.info("Signal %s: finishing the batch in hand, then committing and stopping", sig.name)
            if not await shell.drain():
                self.log.warning("the batch in hand did not finish in time; it stays uncommitted and will be redelivered")
        await super()._stop_on_signal(sig)
        if shell is not None:
            if shell.publisher is not None:
                await shell.publisher.stop()
            await shell.store.close()
