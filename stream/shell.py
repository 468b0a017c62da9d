"""What a worker's agents and timers share, and what each of them does: the shell around the step.

:class:`Shell` holds the parts (the batch handler, the store, the scorer, the snapshot
service, health and metrics) and carries out every duty the Faust app
(:func:`stream.app.create_app`) schedules: handle a batch, finish it before a rebalance,
claim partitions when assigned, restore and snapshot the models, reload the scorer, watch
lag and readiness. It runs over any :class:`~stream.state.UserStateStore`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.errors import KafkaError as AioKafkaError
from faust.types import TP
from kafka.errors import KafkaError

from gpu_scorer import HotSwapScorer, ModelRegistry
from gpu_scorer.errors import ModelLoadError, ScorerDeviceError
from gpu_scorer.layout import POINTER
from gpu_scorer.runtime import session_factory
from online_models.search import Catalogue, QueryStudent, TextEmbedder, TextModelMissing
from stream.batching import drop_stale, is_stale
from stream.catalogue_feed import CatalogueFeed
from stream.consumer import FetchPacer, cancel_within
from stream.errors import ConfigError, ServiceUnavailable, described, read_named_file, redis_advice
from stream.handler import BatchHandler, Claims, RawMessage, now_ms
from stream.health import Health, check_readiness
from stream.lag import LagMetrics, update_lag
from stream.logs import ClippedTracebacks
from stream.peers import PeerLearner
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms, pseudonyms_of
from stream.publisher import BatchPublisher
from stream.replay import gaps, replay
from stream.retry import Backoff
from stream.search_step import SearchConfig, SearchStep
from stream.settings import Settings
from stream.snapshots import ModelSnapshots, serving_with
from stream.state import Fenced, UserStateStore, incarnation
from stream.step_inputs import source_of
from stream.step_results import exception_text
from stream.topics import committed_offsets, topic_ids, uneven_partitions

log = logging.getLogger("streamrec.app")
log.addFilter(ClippedTracebacks())  # a batch's exception quoted cut short in its traceback (stream/logs.py)

#: how long after a failed replay of the forget requests it is tried again (before a batch or a snapshot)
FORGET_RETRY_S = 30
#: the longest the worker's producer is waited for at a stop (:meth:`Shell.close`)
PUBLISHER_STOP_S = 5.0
#: the waits between tries of a replay that failed before a batch (:meth:`Shell.catch_up`): the
#: batch waits for it, as its publishing would wait for a broker that is away
REPLAY_RETRY = Backoff(base_s=0.5, factor=2.0, cap_s=5.0, jitter=0.1)
#: a partition whose committed offset stays behind the events handled there for longer than this
#: makes the worker unready (``commits``); Faust commits every second
COMMITS_STUCK_S = 60.0
#: how long after the models first learn what no snapshot of this worker holds yet (events since
#: its start, or since the snapshot it restored) its first snapshot is taken, rather than at the
#: first ``STREAMREC_SNAPSHOT_INTERVAL_S``: serve ranks with the snapshot (stream/serve.py)
FIRST_SNAPSHOT_DELAY_S = 5.0


def outage(exc: BaseException) -> bool:
    """Whether a replay's ``exc`` is Kafka away or slow (tried again: it passes), not a bug.

    >>> outage(TimeoutError("no records within 30 s")), outage(ServiceUnavailable("refused")), outage(KeyError("x"))
    (True, True, False)
    """
    return isinstance(exc, (ServiceUnavailable, TimeoutError, ConnectionError, KafkaError, AioKafkaError))


@dataclass
class Shell:
    """What the agents and timers share, and their duties (see the module's docstring).

    ``generation()`` is the consumer group's current generation (Faust's
    ``app.consumer_generation_id``); the claims on partitions are taken under it.
    """

    settings: Settings
    metrics: Metrics
    step: RecommendationStep
    store: UserStateStore
    publisher: BatchPublisher
    generation: Callable[[], int]
    health: Health = field(default_factory=Health)
    busy: asyncio.Lock = field(default_factory=asyncio.Lock)
    draining: bool = False
    #: set once the models are restored and have learned again what their snapshot missed
    models_ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: set once the snapshot is restored (or there was none)
    restored: asyncio.Event = field(default_factory=asyncio.Event)
    replayed: bool = False
    #: the topics whose partitions the models may miss events of, up to the committed offsets
    #: (a rebalance since the last replay, or that replay failed): learned before the next batch
    replay_due: frozenset[str] = frozenset()
    #: set from a revocation to the next assignment: a replay in hand stops where it is, so that
    #: the revocation does not wait for it (what is left is due again after the assignment)
    revoking: bool = False
    #: set once :meth:`on_assigned` has taken in the assignment (the replay it asks for is due),
    #: cleared by a revocation: a batch of the new assignment waits for it (:meth:`_await_assignment`)
    assignment_taken: asyncio.Event = field(default_factory=asyncio.Event)
    #: a snapshot was skipped while the forget requests' replay was due (said once until one is taken)
    snapshot_held: bool = False
    #: this worker has taken a snapshot since it started that holds something its models learned
    #: since (not one taken before: an erasure's within a second of the start)
    snapshotted: bool = False
    #: how many events the models had learned at the snapshot in hand (read as it is taken)
    learned_at_snapshot: int = 0
    #: how many events the models had learned when restored (0: no snapshot, or not restored yet)
    learned_at_restore: int = 0
    #: when the first snapshot is due (``clock()``), once the models learned past ``learned_at_restore``
    first_snapshot_at: float | None = None
    clock: Callable[[], float] = time.monotonic
    #: after a failed replay of the forget requests: per forget partition (its source), the offset
    #: the models had learned then; the retry starts there, however far batches moved it since
    forget_floors: dict[str, int] = field(default_factory=dict)
    #: when a failed replay of the forget requests is tried again (time.monotonic())
    forget_retry_at: float = 0.0
    #: the broker's id of each topic the worker reads, as of the last assignment ({}: not known):
    #: a topic deleted and created again has a new one (:meth:`read_topic_ids`, :meth:`align_models`)
    topic_ids: dict[str, str] = field(default_factory=dict)
    #: the sources (``"topic:partition"``) of the last assignment, and what the peer reader was
    #: told of it (``PeerLearner.assign``'s arguments), for :meth:`align`
    owned_sources: frozenset[str] = frozenset()
    peer_assignment: tuple | None = None
    #: a batch raised past every safeguard, or was fenced with no rebalance since, and its partitions'
    #: commits are held (``batches`` fails)
    batch_failed: bool = False
    #: per input partition, the offset after the last event handled and acknowledged there
    handled: dict[TP, int] = field(default_factory=dict)
    #: per partition whose handled events wait for a commit: (the committed offset seen, since when)
    commit_waits: dict[TP, tuple[int | None, float]] = field(default_factory=dict)
    #: what the ``partitions`` condition last said in the log (None: the counts agree)
    uneven_said: str | None = None
    #: scorer versions that failed to load (with their files' stamp) and what CURRENT said that named none:
    #: counted once, not tried again while they stay as they are (stream.shell.load_scorer)
    refused_models: set[tuple] = field(default_factory=set)
    claims: Claims = field(init=False)
    #: the keyed hash the state and the models hold user ids as (STREAMREC_PSEUDONYM_KEY), or None
    pseudonyms: Pseudonyms | None = field(init=False)
    handler: BatchHandler = field(init=False)
    snapshots: ModelSnapshots = field(init=False)
    lag: LagMetrics = field(init=False)
    #: reads the partitions other workers own: their forget requests always, their events with
    #: STREAMREC_LEARN_ALL_PARTITIONS (stream/peers.py)
    peers: PeerLearner = field(init=False)
    forgets_pending: asyncio.Event = field(init=False)
    peers_started: bool = False
    #: the Faust app of the last assignment (None before the first)
    app: object | None = None
    #: what searches retrieve from, kept from the items topic by ``catalogue_feed``
    #: (None with STREAMREC_CATALOGUE=false)
    catalogue: Catalogue | None = field(init=False, default=None)
    catalogue_feed: CatalogueFeed | None = field(init=False, default=None)
    #: told how long each batch took, so that a saturated worker fetches about once a batch
    #: (stream/consumer.py); None: fetches wait STREAMREC_FETCH_MAX_WAIT_MS whatever the batches take
    fetch_pacer: FetchPacer | None = None

    def __post_init__(self) -> None:
        settings = self.settings
        self.claims = Claims(self.generation)
        self.pseudonyms = pseudonyms_of(settings.pseudonym_key)
        self.handler = BatchHandler(self.step, self.store, self.publisher.publish, settings.topics, self.metrics,
                                    health=self.health, bounds=settings.bounds, claims=self.claims,
                                    pseudonyms=self.pseudonyms)
        self.snapshots = ModelSnapshots(self.store, self.metrics, self.busy, settings.snapshot_key or None,
                                        fork=settings.snapshot_fork,
                                        timeout_s=max(60.0, settings.snapshot_interval_s))
        self.lag = LagMetrics(self.metrics.registry)
        # the other workers' partitions: their events (STREAMREC_LEARN_ALL_PARTITIONS) and, always,
        # their forget requests, so that every worker's models forget a user
        self.peers = PeerLearner(self.step, settings.kafka.client_options(),
                                 settings.topics.inputs if settings.learn_all_partitions else (),
                                 settings.bounds, self.busy, self.metrics,
                                 lambda: committed_offsets(settings.kafka, settings.app_id),
                                 pseudonyms=self.pseudonyms, forget_topic=settings.topics.forget)
        if settings.catalogue:
            self.catalogue = Catalogue(text_embedder(settings), candidates=settings.search_candidates)
            self.catalogue_feed = CatalogueFeed(self.catalogue, settings.kafka.client_options(), settings.topics.items,
                                                settings.bounds, self.metrics, self.publisher.publish,
                                                settings.topics.dlq, store=self.store,
                                                snapshot_interval_s=max(1, settings.snapshot_interval_s))
        else:
            query_student(settings)  # not used, but a wrong value is refused as with the catalogue on
        self.step.catalogue = self.catalogue  # a user's latest query joins their home-page candidates
        self.handler.search = SearchStep(self.step, self.catalogue,
                                         SearchConfig(k=settings.top_k, depth=settings.search_candidates,
                                                      personal_weight=settings.search_personal_weight))
        self.forgets_pending = asyncio.Event()  # set: users were erased since the last snapshot
        self.handler.on_forget = self.peers.on_forget = lambda n: self.forgets_pending.set()
        # a user erased by another worker (a request not keyed by their id): never their old document
        self.peers.on_forget_users = getattr(self.store, "discard", None)
        self.metrics.watch_models(lambda: self.step.recommender)
        if self.step.experiment is not None:
            experiment = self.step.experiment
            log.info("serving %s (users split by a hash of experiment and user id; digest %s)", experiment.describe(),
                     experiment.digest)
            self.metrics.experiment_info.labels(experiment.name, experiment.digest).set(1)

    # -- start and stop ----------------------------------------------------------------
    async def restore_models(self) -> None:
        """At start: the models of the store's snapshot, if there is a good one."""
        try:
            self.metrics.set_models(self.step.model_versions())
            recommender = await self.snapshots.restore(self.retry_redis)
            if recommender is not None:
                self.step.recommender = serving_with(recommender, self.step.recommender.config)
            self.learned_at_restore = self.step.recommender.n_learned
        finally:
            self.restored.set()

    async def close(self) -> None:
        """After the last batch: the producer, then the store's connections. The producer's stop
        waits for what it still holds to be confirmed: with the broker away, up to its request
        timeout, and a worker asked to stop after a batch that waited the drain's 30 s ran past
        Kubernetes' grace period (tests/integration/test_faults.py, seen in CI). It is given up
        after :data:`PUBLISHER_STOP_S`: what it held belongs to batches not committed, which their
        partitions' next owner handles again."""
        stopping = asyncio.ensure_future(self.publisher.stop())
        await asyncio.wait({stopping}, timeout=PUBLISHER_STOP_S)
        if not stopping.done():
            log.warning("the producer did not stop within %g s (Kafka does not confirm what it holds): given up; "
                        "those lists and dead letters belong to batches not committed, handled again by their "
                        "partitions' next owner", PUBLISHER_STOP_S)
            await cancel_within(stopping, 1.0, "the producer's stop")
        elif not stopping.cancelled() and stopping.exception() is not None:
            log.warning("the producer's stop raised %s", described(stopping.exception()))
        await self.store.close()

    # -- rebalances --------------------------------------------------------------------
    async def on_assigned(self, app, assigned) -> None:
        """Claim the input partitions now this worker's (a write of a worker that held them
        before is refused from now on: stream/state.py, fencing); a claim that fails now (the
        store is down) is taken before the partition's first batch instead. At the first
        assignment, start learning again what the models' snapshot misses; at a later one, what
        they miss of a partition taken over (:meth:`replay_due_gaps`, before the next batch).
        The peer reader is
        told which partitions the worker now does not own: the models apply their forget
        requests, and with ``STREAMREC_LEARN_ALL_PARTITIONS`` learn their events too
        (stream/peers.py). A batch that raised past every safeguard, or was fenced (:meth:`_handle_taken`),
        no longer holds anything once its partitions were revoked (they are read again from the commit): ``batches``
        is ready again, else the worker said unready until a restart, however well it went on.
        The topics' ids are read again (:meth:`read_topic_ids`): a topic deleted and created
        again since is learned and applied afresh."""
        settings = self.settings
        self.app = app  # for the timers' replays of failed forget requests (snapshot_models)
        if self.batch_failed and not getattr(app.consumer, "held", ()):
            self.batch_failed = False
            self.health.set("batches", True, "the partitions of the batch that raised or was fenced were revoked, and "
                                             "are read again from the commit (streamrec_batch_failures_total and "
                                             "streamrec_fenced_batches_total count them)")
            log.info("no partition's commits are held any more: the batch that raised or was fenced is delivered "
                     "again from the commit")
        parts = {tp.partition for tp in assigned if tp.topic in settings.topics.consumed}
        generation = self.generation()
        self.claims.release(set(self.claims.partitions) - parts)
        self.owned_sources = frozenset(source_of(tp.topic, tp.partition) for tp in assigned)
        self.peer_assignment = ([(tp.topic, tp.partition) for tp in assigned], input_partitions(app, settings, assigned))
        await asyncio.gather(self._claim(parts, generation), self.read_topic_ids())  # both wait on a server: at once
        if self.restored.is_set():  # before the peer reader starts from the models' watermark below
            try:
                await asyncio.wait_for(self.busy.acquire(), settings.session_timeout_s / 4)
            except TimeoutError:  # the next batch, replay or snapshot timer aligns them (align)
                log.warning("rebalance: the models are busy (a replay or a snapshot); what changed of the topics and of "
                            "failed forget replays is taken into account when they are free")
            else:
                try:  # as align() does, the assignment known (the peer reader is told it below)
                    self.align_models()
                    self.hand_over_floors(self.owned_sources)
                finally:
                    self.busy.release()
        # only now: a replay in hand stopped for the revocation, and a timer's retry of failed
        # forget requests could otherwise start before the models were aligned above
        self.revoking = False
        self.forget_retry_at = 0.0  # a partition taken over: its forget requests now, not after a failure's wait
        if not self.replayed:
            self.replayed = True
            app.add_future(self.replay_once(app, self.restored))
        else:  # the peer reader may have been behind the commits of a partition this worker now owns
            # (without STREAMREC_LEARN_ALL_PARTITIONS it reads the others' forget requests alone)
            read = (*settings.topics.inputs, settings.topics.forget) if settings.learn_all_partitions else (
                settings.topics.forget,)
            self.replay_due |= frozenset(read)
            app.add_future(self.replay_after_rebalance(app))
        self.assignment_taken.set()  # the batches that waited for it go on, the replay first (_handle_taken)
        self.peers.assign(*self.peer_assignment)
        if not self.peers_started:  # it waits for the models to be restored and replayed
            self.peers_started = True
            app.add_future(self.peers.run(self.models_ready))

    async def _claim(self, parts: set[int], generation: int) -> None:
        try:
            self.claims.hold(await asyncio.wait_for(self.store.claim(parts), self.settings.session_timeout_s / 4),
                             generation)
        except Exception as exc:  # noqa: BLE001 - taken lazily instead
            log.warning("could not claim partitions %s on assignment (%s); claiming before their first batch",
                        sorted(parts), described(exc))

    def align(self) -> None:
        """Under the batch lock, before the models learn anything more (a batch, a replay, a
        snapshot): the models forget their positions in topics deleted and created again
        (:meth:`align_models`), and the forget partitions given away with a failed replay go to
        the peer reader from their floor (:meth:`hand_over_floors`). Where either changed the
        models' watermark after the peer reader was told the assignment, it is told again, so
        that it starts from the watermark as it is now. Nothing is handed over during a
        rebalance (the assignment is not known yet)."""
        changed = self.align_models()
        handed = False if self.revoking else self.hand_over_floors(self.owned_sources)
        if (changed or handed) and not self.revoking and self.peer_assignment is not None:
            self.peers.assign(*self.peer_assignment)

    async def read_ids_until_known(self) -> None:
        """A timer: while no topic ids are known (the broker did not answer at the assignment),
        ask again, so that the users' states written meanwhile are tagged soon."""
        if self.app is not None and not self.topic_ids:
            await self.read_topic_ids(quiet=True)

    async def read_topic_ids(self, quiet: bool = False) -> None:
        """Ask the broker for the ids of the topics the worker reads (a topic deleted and
        created again has a new id, and its offsets start over), for the users' states
        (:func:`~stream.state.align_incarnation`, through the handler) and the models
        (:meth:`align_models`). Where the broker does not answer in time, the ids known before
        stay (none at first: offsets are then taken as they are, as before ids were kept).
        ``quiet``: a failure is logged at debug level (the timer that asks again)."""
        settings = self.settings
        try:
            ids = await asyncio.wait_for(asyncio.to_thread(topic_ids, settings.kafka, settings.topics.consumed,
                                                           settings.session_timeout_s / 4),
                                         settings.session_timeout_s / 4)
        except Exception as exc:  # noqa: BLE001 - the ids known before stay
            say = log.debug if quiet else log.warning
            if self.topic_ids:
                say("could not read the input topics' ids (%s); a topic deleted and created again since the last "
                    "rebalance is noticed at the next one", described(exc))
            else:
                say("could not read the input topics' ids (%s); asking again every 10 s (until then a topic deleted "
                    "and created again is not noticed)", described(exc))
            return
        # a topic the broker does not name now (deleted, not created again yet) keeps the id it had:
        # its absence changes nothing, and the topic created again has a new one
        self.topic_ids = ids = {**self.topic_ids, **ids}
        kept = {t: ids[t] for t in (*settings.topics.inputs, settings.topics.searches) if t in ids}
        self.handler.incarnation = incarnation(kept) if kept else None

    def align_models(self) -> list[str]:
        """Drop what the models know of the positions in topics deleted and created again since
        they learned them (:meth:`RecommendationStep.align_topics`): they learn the new topics'
        partitions from where the group reads them. Under the batch lock; returns those topics."""
        if not self.topic_ids:
            return []
        changed = self.step.align_topics(self.topic_ids)
        if changed:
            for source in [s for s in self.forget_floors if s.partition(":")[0] in changed]:
                del self.forget_floors[source]
            log.warning("topic(s) %s were deleted and created again since the models learned them (the broker gives "
                        "them new ids, and their offsets started over): the models learn the recreated topics' events "
                        "afresh, from where the consumer group reads them", ", ".join(changed))
        return changed

    def hand_over_floors(self, owned: frozenset[str]) -> bool:
        """A failed replay's forget requests (``forget_floors``) of a partition this worker no
        longer owns go to the peer reader, which reads every other worker's forget partitions
        from the models' watermark: the watermark goes back to the floor (a request read twice
        changes nothing), else this worker's batches had moved it past requests its models never
        applied, and they would keep the erased users. Under the batch lock, before the reader
        is told the assignment (:meth:`align`). ``owned``: the sources this worker owns; returns
        whether a floor was handed over."""
        learned = self.step.recommender.learned_offsets
        given = [s for s in self.forget_floors if s not in owned]
        for source in given:
            floor = self.forget_floors.pop(source)
            learned[source] = min(learned.get(source, floor), floor)
            log.info("the forget requests of %s after offset %d, whose replay failed, are read again by the reader "
                     "of the partitions other workers own", source, floor)
        return bool(given)

    async def on_revoked(self, revoked) -> None:
        """Faust has suspended the flow: the batch in hand finishes (its state saved) before
        the partitions go to their next owner, so that owner never loads a user's state under
        a write still to come (``stream_wait_empty=False``: Faust itself waits for nothing).
        The models stop learning other workers' partitions until the new assignment is known:
        one of them may be this worker's again."""
        self.peers.pause()
        for tp in revoked or ():  # their next owner commits them (watch_commits)
            self.handled.pop(tp, None)
        self.revoking = True  # a replay in hand stops within a second; the next assignment asks for it again
        self.assignment_taken.clear()  # a batch of the next assignment waits until on_assigned took it in
        wait_s = self.settings.session_timeout_s / 2
        if revoked and not await self.wait_idle(wait_s):
            log.warning("rebalance: the batch in hand did not finish within %.1f s; it is redelivered to the "
                        "partitions' next owner, and its state write is refused (fenced) if it comes later than "
                        "that owner's claim", wait_s)

    # -- timers ------------------------------------------------------------------------
    async def snapshot_models(self) -> None:
        if not self.models_ready.is_set():
            return  # never over a good snapshot with models that have not restored it yet
        forget = self.settings.topics.forget
        if (forget in self.replay_due or self.forget_floors) and self.app is not None:  # an idle worker brings no batch
            async with self.busy:
                self.align()  # floors of partitions given away: to the peer reader
                if forget in self.replay_due:
                    await self.replay_due_gaps(self.app)
        if forget in self.replay_due or self.forget_floors:
            # the replay of the forget requests failed (or is about to run after a rebalance): the
            # models may still hold users erased since the snapshot they were restored from, and
            # the store's snapshot (another worker's, taken after the erasure) may not
            if not self.snapshot_held:
                self.snapshot_held = True
                log.warning("not snapshotting the models: they may still hold users erased since their snapshot "
                            "(the replay of the forget requests is due, after a failure or a rebalance); the "
                            "snapshot follows once it has run")
            return
        self.snapshot_held = False
        erased = self.forgets_pending.is_set()
        self.forgets_pending.clear()
        if await self.snapshots.take(self._models_to_snapshot):
            # one taken before the models learned anything is not the first: that one still
            # follows their first lessons (first_snapshot_due), for serve, which ranks with it
            self.snapshotted = self.snapshotted or self.learned_at_snapshot > self.learned_at_restore
            self.metrics.set_models(self.step.model_versions())
            if erased:
                log.info("the models' snapshot in the store no longer holds the users erased before it")
        elif erased:
            self.forgets_pending.set()  # the snapshot in the store may still hold them: again soon

    def _models_to_snapshot(self):
        """The models, called between batches: first they stop remembering the users forgotten
        long enough ago that Kafka holds none of their older events (``Settings.forgotten_kept_ms``),
        so the forgotten set, and every snapshot, holds the erasures of a bounded window."""
        recommender = self.step.recommender
        self.learned_at_snapshot = recommender.n_learned
        trimmed = recommender.trim_forgotten(now_ms() - self.settings.forgotten_kept_ms)
        if trimmed:
            log.info("the models stopped remembering %d user(s) forgotten more than %d hours ago (Kafka no longer "
                     "holds their older events)", trimmed, self.settings.forgotten_kept_ms // 3_600_000)
        self.metrics.forgotten_remembered.set(recommender.forgotten_users)
        return recommender

    async def snapshot_soon(self) -> None:
        """Every second: a snapshot once users were erased since the last one, so that the
        snapshot in the store stops holding them within seconds, not at the next interval; and
        this worker's first snapshot, ``FIRST_SNAPSHOT_DELAY_S`` after its models first learned
        something no snapshot of it holds (:meth:`first_snapshot_due`), so that serve, which
        ranks with the snapshot, does not wait for the first interval. Either goes through
        :meth:`snapshot_models` and its conditions."""
        if self.forgets_pending.is_set() or self.first_snapshot_due():
            await self.snapshot_models()

    def first_snapshot_due(self) -> bool:
        """Whether this worker's first snapshot is due: none taken since its start that holds
        what its models learned since (an erasure's, taken before they learned anything, does
        not count), the models restored (and what their snapshot missed learned again) and
        learned past what they were restored with, ``FIRST_SNAPSHOT_DELAY_S`` (at most the
        interval) since that was first seen. Once due it is due again that much later, until a
        snapshot is taken (one that failed, or was held while the forget requests' replay is due)."""
        if self.snapshotted or not self.models_ready.is_set() \
                or self.step.recommender.n_learned <= self.learned_at_restore:
            return False
        now, delay = self.clock(), min(FIRST_SNAPSHOT_DELAY_S, max(1, self.settings.snapshot_interval_s))
        if self.first_snapshot_at is None:
            self.first_snapshot_at = now + delay
        if now < self.first_snapshot_at:
            return False
        self.first_snapshot_at = now + delay
        return True

    async def heartbeat(self) -> None:
        self.health.beat()

    async def count_frozen(self) -> None:
        self.metrics.count_frozen()

    async def reload_scorer(self) -> None:
        """Load a scorer when there is none yet, else swap in a newly registered version."""
        step = self.step
        try:
            if step.scorer is None:
                step.scorer = await asyncio.to_thread(load_scorer, self.settings, self.metrics, self.refused_models,
                                                      False)
            elif await asyncio.to_thread(step.scorer.maybe_reload):
                log.info("Transformer scorer now %s on %s", step.scorer.version, step.scorer.provider)
                self.metrics.set_scorer(step.scorer.provider, step.scorer.version)
        except Exception as exc:  # noqa: BLE001 - the current scorer (or none) keeps serving
            self.metrics.scorer_reload_failures.inc()
            log.error("scorer reload failed, the current one keeps serving: %s", exception_text(exc))

    async def watch(self, app) -> None:
        """Readiness (Kafka, the store), consumer lag, and the scorer model's age."""
        inputs = self.settings.topics.inputs
        await check_readiness(app, self.store, self.health, self.settings.kafka_bootstrap, inputs)
        await update_lag(app, self.lag, inputs)
        self.watch_commits(app)
        self.watch_partitions(app)
        self.lag.set_scorer(self.step.scorer)  # reads the manifest only when the scorer or its version changes

    def watch_partitions(self, app) -> None:
        """The ``partitions`` condition: fails while the topics the agent reads together
        (``Topics.consumed``) do not have one partition count, as the consumer's metadata (refreshed
        every ``stream.app.METADATA_MAX_AGE_S``) has them now. The worker checks it at start
        (:func:`~stream.topics.check_copartitioned`); partitions added later to some of them
        only (the clicks topic grown, the forget topic not) would otherwise go unsaid until the
        next start refuses: meanwhile the group assigns each partition count's topics on their
        own, so one user's clicks, purchases and forget requests may go to different workers.
        Said once in the log (an error) each time it starts failing; the worker goes on."""
        consumer = app.consumer
        counts = {}
        for topic in self.settings.topics.consumed:
            try:
                n = consumer.topic_partitions(topic)
            except Exception:  # noqa: BLE001 - not started: nothing known yet
                return
            if n:  # a topic not created yet (the worker creates them at start) says nothing
                counts[topic] = n
        self.widen_peer_partitions(counts)
        uneven = uneven_partitions(counts)
        if uneven is None:
            if counts:
                self.health.set("partitions", True, f"the topics read together have {max(counts.values())} partitions each")
            self.uneven_said = None
            return
        detail = (f"{uneven}; until then one user's events may be handled by two workers at once "
                  "(docs/operations.md, Scaling out)")
        self.health.set("partitions", False, detail)
        if detail != self.uneven_said:
            self.uneven_said = detail
            log.error("%s", detail)

    def widen_peer_partitions(self, counts: dict[str, int]) -> None:
        """Tell the peer reader again, with ``counts``, where the input topics now have more
        partitions than it was told at the last assignment: a worker other than the group's
        leader still had the old counts then (the leader's metadata refresh starts the
        rebalance; the others' comes up to ``stream.app.METADATA_MAX_AGE_S`` later), and its
        models never learned the added partitions that other workers own."""
        if self.revoking or self.peer_assignment is None:
            return
        owned, known = self.peer_assignment
        grown = {t: range(n) for t, n in counts.items() if t in known and n > len(known[t])}
        if not grown:
            return
        self.peer_assignment = (owned, {**known, **grown})
        log.info("the input topics have more partitions than at the last rebalance (%s): the other workers' are "
                 "learned too", ", ".join(f"{t} has {len(r)}" for t, r in grown.items()))
        self.peers.assign(*self.peer_assignment)

    def watch_commits(self, app, now: float | None = None) -> None:
        """The ``commits`` condition: fails while a partition's committed offset has not moved
        for ``COMMITS_STUCK_S`` although events after it were handled and acknowledged. Faust
        commits every second from the event loop, without a timeout: a commit that hangs (the
        group's coordinator unreachable while the partitions' leaders still answer) stops the
        commits, and after ``broker_commit_every`` acknowledgements the fetching too, while
        nothing else fails. A partition whose commits are held on purpose (``batches``), or no
        longer assigned, is not watched."""
        now = time.monotonic() if now is None else now
        consumer = app.consumer
        try:
            assigned = consumer.assignment()
        except Exception:  # noqa: BLE001 - not started: nothing handled yet
            return
        committed = getattr(consumer, "_committed_offset", {})  # faust keeps it per TP
        held = getattr(consumer, "held", ())
        stuck: list[tuple[float, TP, int, int | None]] = []
        for tp, upto in list(self.handled.items()):
            done = committed.get(tp)
            if tp not in assigned or tp in held or (done is not None and done >= upto):
                del self.handled[tp]
                self.commit_waits.pop(tp, None)
                continue
            seen = self.commit_waits.get(tp)
            if seen is None or seen[0] != done:  # committing, if not yet all of it
                self.commit_waits[tp] = (done, now)
            elif now - seen[1] > COMMITS_STUCK_S:
                stuck.append((now - seen[1], tp, upto, done))
        for tp in set(self.commit_waits) - set(self.handled):
            del self.commit_waits[tp]
        if stuck:
            waited, tp, upto, done = max(stuck)
            self.health.set("commits", False, f"{len(stuck)} partition(s) commit nothing: {tp.topic}[{tp.partition}] "
                                              f"handled up to offset {upto}, committed {done} for {waited:.0f} s; "
                                              "see the log for the Kafka consumer's commit errors, or restart the worker")
        else:
            self.health.set("commits", True, "the handled events are committed")

    # -- batches -----------------------------------------------------------------------

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
                log.warning("could not %s (%s%s); retrying in %.2fs", what, described(exc), redis_advice(exc), delay)
                await asyncio.sleep(delay)

    async def replay_once(self, app, restored: asyncio.Event) -> None:
        """Once, at the first assignment: teach the restored models the events between their
        snapshot and the group's committed offsets of the partitions this worker was assigned
        (stream/replay.py), before any batch."""
        try:
            await restored.wait()
            async with self.busy:
                self.align()
                await self._replay(app)
        except Exception as exc:  # noqa: BLE001 - the worker serves on with what the models have
            self.replay_due |= frozenset((*self.settings.topics.inputs, self.settings.topics.forget))
            log.error("could not replay the events the models' snapshot misses (%s); serving with the models as "
                      "restored, and trying again before the next batch", described(exc))
        finally:
            self.health.set("models", True, "restored")
            self.models_ready.set()

    async def replay_after_rebalance(self, app) -> None:
        """:meth:`replay_due_gaps` at once, unless a batch did it first (a partition taken over
        may have no new events to bring a batch), once the models are restored: replayed into
        the start-up models, what it learned (a forget request) would be lost with them."""
        await self.models_ready.wait()
        async with self.busy:
            if self.replay_due:
                await self.replay_due_gaps(app)

    async def catch_up(self, app) -> bool:
        """Under the batch lock, before a batch: :meth:`replay_due_gaps`, tried again with
        back-off while it fails for the input topics (the broker away, a fetch that times out),
        for the batch would move the models past the events they miss, which no later replay
        learns (a partition's learned offset is its highest). The batch waits meanwhile, as its
        publishing would for a broker that is away, with ``models`` unready. False when a
        rebalance or the worker's stop cut the replay short (or came while it was retried): the
        batch is then left unhandled and unacknowledged, and the replay is due again (after the
        assignment, or the restart). Before, a replay that failed twice (at start, then before
        the first batch: a worker started while the broker restarted) was given up, and the
        models, and every worker that restored their next snapshot, never learned those events."""
        inputs = frozenset(self.settings.topics.inputs)
        delays = REPLAY_RETRY.delays()
        await self.replay_due_gaps(app, keep_inputs=True)
        unready = False
        while self.replay_due & inputs:
            if self.draining or self.revoking:
                return False
            unready = True
            self.health.set("models", False, "the replay of the events the models miss before the committed offsets "
                                             "failed; tried again before the batch")
            wait = time.monotonic() + next(delays)
            while time.monotonic() < wait and not (self.draining or self.revoking):
                await asyncio.sleep(0.1)
            if self.draining or self.revoking:
                return False
            await self.replay_due_gaps(app, keep_inputs=True)
        if unready:
            self.health.set("models", True, "restored")
        return True

    async def replay_due_gaps(self, app, keep_inputs: bool = False) -> None:
        """Under the batch lock, before the first batch after a rebalance: the events of the
        partitions now owned that the models have not learned, up to the committed offsets
        where the agent starts (a partition taken over while the peer reader was behind its old
        owner's commits; a replay at start that failed). A failure is logged and the input topics
        stay due: the next batch waits until they are learned (:meth:`catch_up`, which calls this
        with ``keep_inputs``), for a partition's first batch would move the models past what they
        missed. The forget requests among them are tried again before a later batch or
        snapshot, at most every ``FORGET_RETRY_S``, from the offsets the models had learned at
        the failure (``forget_floors``), with no snapshot meanwhile (:meth:`snapshot_models`)."""
        forget = self.settings.topics.forget
        self.align()  # a replay after a rebalance whose callback could not align the models
        if ((self.replay_due == {forget} or not keep_inputs and forget in self.replay_due)
                and time.monotonic() < self.forget_retry_at):
            return  # a failed replay of the forget requests, retried at most every FORGET_RETRY_S (a batch's, at once)
        topics, self.replay_due = self.replay_due, frozenset()
        try:
            await self._replay(app, topics)
        except Exception as exc:  # noqa: BLE001 - the batch goes on (or, before a batch, waits: catch_up)
            # the input topics stay due: before a batch (keep_inputs: catch_up) they are tried again
            # until the models learned them, and a replay with no batch in hand leaves them to the next
            # only an outage is waited out: a bug (what no retry mends) would hold every batch for ever,
            # so the models go on without those events, as before, and the error says so
            inputs_missed = bool(topics & frozenset(self.settings.topics.inputs))
            inputs_due = inputs_missed and outage(exc)
            if inputs_due:
                self.replay_due |= topics - {forget}
            if forget in topics:
                # never without the erasures: they are tried again from where the models stood now,
                # however far this worker's own batches move the forget partitions meanwhile
                learned = self.step.recommender.learned_offsets
                for tp in app.consumer.assignment():
                    if tp.topic == forget:  # one the models never saw: from its beginning, as gaps() would
                        src = source_of(tp.topic, tp.partition)
                        self.forget_floors.setdefault(src, learned.get(src, -1))
                self.replay_due |= {forget}
                self.forget_retry_at = time.monotonic() + FORGET_RETRY_S
            if keep_inputs and inputs_due:
                log.warning("could not learn the events the models miss before the committed offsets of this worker's "
                            "partitions (%s); the batch in hand waits until they are learned, tried again with "
                            "back-off", described(exc))
            elif forget not in topics:
                log.error("could not learn the events the models miss before the committed offsets of this worker's "
                          "partitions (%s); %s", described(exc), "tried again before the next batch" if inputs_due
                          else "not an outage of Kafka, so not tried again: the models go on without those events")
            else:
                log.error("could not learn the events the models miss before the committed offsets of this worker's "
                          "partitions (%s); %sthe forget requests among them are tried again in %d s (no model "
                          "snapshot until then)", described(exc), "tried again before the next batch, and " if inputs_due
                          else "not an outage of Kafka, so the models go on without the events, not tried again; "
                          if inputs_missed else "", FORGET_RETRY_S)

    async def _replay(self, app, topics: frozenset[str] | None = None) -> None:
        """What the models miss of this worker's partitions (of ``topics``; None: all it reads),
        learned from Kafka up to the group's committed offsets."""
        settings, step = self.settings, self.step
        topics = frozenset(settings.topics.consumed) if topics is None else topics
        learned = step.recommender.learned_offsets
        floors = self.forget_floors if settings.topics.forget in topics else {}
        if floors:  # a failed replay's forget requests, from where the models stood then
            learned = {**learned, **{src: min(learned.get(src, floor), floor) for src, floor in floors.items()}}
        committed = await asyncio.to_thread(committed_offsets, settings.kafka, settings.app_id)
        assignment = app.consumer.assignment()
        mine = {(tp.topic, tp.partition) for tp in assignment if tp.topic in topics}
        # every forget request the snapshot may predate: from the beginning where it knows none
        todo = gaps(learned, {tp: off for tp, off in committed.items() if tp in mine}, from_start=(settings.topics.forget,))
        # the models know each input partition of this worker from where its agent starts it (the
        # commit; the beginning where nothing is committed), learned or not: a snapshot taken
        # before its first event (an erasure's, within a second of the start) then says where a
        # restart's replay starts it, instead of leaving out what the models learned of it since
        step.start_reading({source_of(tp.topic, tp.partition): committed.get((tp.topic, tp.partition), 0)
                            for tp in assignment if tp.topic in settings.topics.inputs})
        replayed = {source_of(t, p) for t, p in mine}  # their floors are done with once this succeeds
        if not todo:
            if floors:
                self.forget_floors = {s: f for s, f in floors.items() if s not in replayed}
            return
        self.health.set("models", False, "learning the events the models miss before the committed offsets")
        total = sum(g.size for g in todo)
        log.info("the models miss %d event(s) before the committed offsets (%s); learning them from Kafka",
                 total, ", ".join(f"{g.topic}[{g.partition}] {g.start}-{g.end - 1}" for g in todo))
        start = time.monotonic()
        stopped: list[bool] = []

        def stop() -> bool:  # a rebalance, or the worker stopping (drain): it waits for the lock
            if self.revoking or self.draining:
                stopped.append(True)
                return True
            return False

        try:
            # an erasure the restored snapshot predates: snapshotted within a second, as a live one
            n = await replay(step, settings.kafka, todo, settings.bounds, pseudonyms=self.pseudonyms,
                             forget_topic=settings.topics.forget, stop=stop,
                             on_forget=lambda n: self.forgets_pending.set())
        finally:
            self.health.set("models", True, "restored")
        self.metrics.events_relearned.inc(n)
        if floors and not stopped:
            self.forget_floors = {s: f for s, f in floors.items() if s not in replayed}
        if stopped:
            self.replay_due |= topics
            log.info("learned %d event(s) again in %.1f s, then stopped for %s", n, time.monotonic() - start,
                     "the worker's stop; the rest is learned after its restart" if self.draining
                     else "a rebalance; the rest is learned after the new assignment")
        else:
            log.info("learned %d event(s) again in %.1f s", n, time.monotonic() - start)

    async def drain(self, timeout_s: float = 30.0) -> bool:
        """Stop taking new batches and wait for the batch in hand; False if it did not finish in time.
        A replay in hand stops at its next fetch (:meth:`_replay`), and a batch that waited for the
        lock is left unacknowledged (:meth:`_handle_taken`)."""
        self.draining = True
        self.assignment_taken.set()  # a batch waiting for an assignment stops waiting (left unhandled)
        return await self.wait_idle(timeout_s)

    async def handle_taken(self, app, events: list) -> None:
        """Handle a batch from :func:`take_batches`, under the lock a rebalance waits on.

        Events taken before a rebalance that has begun or happened since are removed from
        ``events`` first (:func:`drop_stale`): their partitions may belong to another worker
        now, and Kafka delivers them again to whoever owns them. Nothing raised by handling
        the batch leaves this method (Faust would restart the agent, and the batch's offsets
        would stall its partitions' commits unseen): a batch whose partitions another worker
        claimed since (:class:`Fenced`) is left unacknowledged for that worker, with the worker
        reporting unready where its own group has not moved them (no rebalance since the batch
        was taken: none may come to release them); a batch that raised past every safeguard
        too, with the worker reporting unready.

        Health is told the batch is in hand (:meth:`Health.busy`) from the moment it waits for
        the lock: readiness fails while it waits or runs longer than ``stuck_after_s``, so that
        an await that never returns (a lock a hung peer reader or replay holds, a thread that
        hangs, an acknowledgement that never comes) is not a worker that says it is ready."""
        self.health.busy(f"a batch of {len(events)} event(s) waiting for the models (a replay, a snapshot or the peer reader "
                         "holds them)")
        try:
            await self._handle_taken(app, events)
        finally:
            self.health.idle()

    async def _handle_taken(self, app, events: list) -> None:
        """:meth:`handle_taken`'s work, once the health is told."""
        await self._await_assignment(app, events)
        async with self.busy:
            if self.draining:  # stopping: this batch waited for the lock (a replay, a snapshot), never in hand
                log.info("shutting down: a batch of %d event(s) that waited for the models is left unhandled and "
                         "unacknowledged; it is delivered again after the restart", len(events))
                events.clear()  # what take_batches acknowledges
                return
            self.health.busy(f"a batch of {len(events)} event(s) in hand")
            dropped = drop_stale(app, events)
            if dropped:
                log.info("%d event(s) taken before a rebalance, or of a partition whose commits are held, left unhandled "
                         "and unacknowledged; they are delivered again to their partitions' owner", dropped)
            if not events:
                return
            self.align()
            if self.replay_due and not await self.catch_up(app):
                log.info("%s: a batch of %d event(s) that waited for the models to learn what they miss is left "
                         "unhandled and unacknowledged; it is delivered again after the %s",
                         "shutting down" if self.draining else "rebalance", len(events),
                         "restart" if self.draining else "assignment")
                events.clear()  # what take_batches acknowledges: learned now, it would move the models past the gap
                return
            started = time.perf_counter()
            try:
                await self.handler.handle_isolated([raw_message(ev.message) for ev in events])
            except Fenced as exc:
                self.metrics.fenced_batches.inc()
                log.warning("fenced: %s since this batch was taken; its %d event(s) are left unacknowledged for "
                            "their new owner (this worker's writes would overwrite newer state)", exc, len(events))
                generation = app.consumer_generation_id
                if any(ev.message.generation_id == generation for ev in events):
                    # no rebalance since: its partitions' commits are held until one revokes them, and
                    # one comes only where this worker's own group moved them on (a pause, a split)
                    self.batch_failed = True
                    self.health.set("batches", False, f"{exc} while this worker's consumer group still assigns them "
                                                      "to it: their commits are held until a rebalance revokes them; "
                                                      "if none comes, a worker of another consumer group (another "
                                                      "STREAMREC_APP_ID) writes the same Redis under the same "
                                                      "STREAMREC_TOPIC_PREFIX")
                leave_unacknowledged(app, events)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the last safeguard: never crash the agent
                self.metrics.batch_failures.inc()
                self.batch_failed = True
                self.health.set("batches", False, f"a batch of {len(events)} events raised {type(exc).__name__}: {exception_text(exc)}; "
                                                  "it is unacknowledged, so its partitions' commits wait (see the log)")
                log.exception("a batch of %d events raised past every safeguard; it is left unacknowledged", len(events))
                leave_unacknowledged(app, events)
            for ev in events:  # what take_batches acknowledges, to be committed (watch_commits)
                tp = TP(ev.message.topic, ev.message.partition)
                self.handled[tp] = max(self.handled.get(tp, 0), ev.message.offset + 1)
            if self.fetch_pacer is not None:
                self.fetch_pacer.observe(time.perf_counter() - started)

    async def _await_assignment(self, app, events: list) -> None:
        """While a rebalance is under way (from :meth:`on_revoked` until :meth:`on_assigned` has
        taken in the new assignment), a batch that would be handled waits for it, outside the
        batch lock (the assignment callback takes it too). Faust resumes the flow as soon as it
        has sought the partitions to their commits, while the callback may still be waiting on
        Redis (the claim) and the broker (the topics' ids): a batch of the new generation handled
        then came before the callback had marked the replay due, and moved the models' watermark
        past the events they miss of a partition now owned (another worker handled them while
        this one was paused past its session timeout, or the peer reader was behind), which the
        replay that followed then found nothing of (a chaos soak: 1,883 of 117,857 events never
        learned). A batch of an older generation goes on at once: it is dropped (:func:`drop_stale`)."""
        while self.revoking and not self.draining and not all(is_stale(app, ev.message) for ev in events):
            self.health.busy(f"a batch of {len(events)} event(s) of the new assignment waiting for the rebalance to be "
                             "taken in (the events the models miss are learned first)")
            await self.assignment_taken.wait()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no batch is in hand; False if the one in hand did not finish in time."""
        try:
            await asyncio.wait_for(self.busy.acquire(), timeout_s)
        except TimeoutError:
            return False
        self.busy.release()
        return True


def leave_unacknowledged(app, events: list) -> None:
    """Empty ``events`` (:func:`~stream.batching.take_batches` acknowledges what is left in the
    list) and, for those of the current generation, commit nothing more for their partitions
    until they are revoked (:meth:`stream.consumer.Consumer.hold`), so that Kafka delivers them
    again from the commit. An older generation's partitions were revoked and read again from the
    commit already."""
    generation = app.consumer_generation_id
    app.consumer.hold({TP(ev.message.topic, ev.message.partition) for ev in events
                       if ev.message.generation_id == generation})
    events.clear()


def text_embedder(settings: Settings) -> TextEmbedder:
    """The worker's and serve's text model: one thread a call (embedding shares the machine
    with the event loop), on the scorer's device (a GPU when there is one and
    STREAMREC_SCORER_DEVICE allows it), with the query student of STREAMREC_QUERY_STUDENT."""
    try:
        embedder = TextEmbedder(threads=1, session_factory=session_factory(settings.scorer_device, threads=1))
    except TextModelMissing as exc:  # an install that left a dependency out: one line, and the way round it
        raise ConfigError(f"{exc}, or set STREAMREC_CATALOGUE=false to run without search and the catalogue") from None
    except ScorerDeviceError as exc:  # STREAMREC_SCORER_DEVICE=cuda where CUDA is not usable: was a traceback
        raise device_refused(settings, exc) from None
    student = query_student(settings)
    if student is not None:
        try:
            embedder.use_student(student)
        except ValueError as exc:  # another model's size
            raise _student_refused(settings, exc) from None
        log.info("query student %s: %d word pieces", settings.query_student, len(student.tokens))
    return embedder


def query_student(settings: Settings) -> QueryStudent | None:
    """The query student STREAMREC_QUERY_STUDENT names (None: empty), or a :class:`ConfigError`
    for a file that is missing, unreadable or no student. The worker and serve read it with the
    catalogue off too, where it is not used (said in a warning): a wrong value was accepted
    silently there, and refused only once the catalogue was turned on."""
    if not settings.query_student:
        return None
    try:
        student = QueryStudent.from_bytes(read_named_file(settings.query_student))  # a device: a ValueError
    except (OSError, ValueError) as exc:  # missing, unreadable, not a student
        raise _student_refused(settings, exc) from None
    if not settings.catalogue:
        log.warning("STREAMREC_QUERY_STUDENT=%s is not used: STREAMREC_CATALOGUE=false (no text model embeds "
                    "queries; searches re-rank only the results they carry)", settings.query_student)
    return student


def _student_refused(settings: Settings, exc: Exception) -> ConfigError:
    return ConfigError(f"STREAMREC_QUERY_STUDENT={settings.query_student}: cannot read a query student there "
                       f"({exc}); make one with `streamrec distil-queries`, or leave the setting empty")


def device_refused(settings: Settings, exc: ScorerDeviceError) -> ConfigError:
    """The one-line error for a device the models cannot run on (``cuda`` without a usable GPU)."""
    return ConfigError(f"STREAMREC_SCORER_DEVICE={settings.scorer_device}: {exc.__cause__ or exc}; set it to auto "
                       "(the GPU where one is usable, else the CPU) or cpu")


#: the least time between two looks at the registry's CURRENT (the worker's timer looks every 5 s; serve's refresh every 1 to 10 s)
SCORER_POLL_S = 0.5


def load_scorer(settings: Settings, metrics: Metrics, refused: set[tuple] | None = None, say_none: bool = True):
    """The hot-swapping Transformer scorer, or None when no model is registered yet, or none
    of the registered versions loads (each refused version is counted in
    ``scorer_reload_failures_total`` once, logged, and remembered in ``refused``).
    ``say_none=False``: no model registered is not logged (the worker looks again every 5 s,
    and said it at its start). A :class:`ConfigError` naming STREAMREC_SCORER_DEVICE when
    the device cannot run any version (``cuda`` without a usable GPU)."""
    registry = ModelRegistry(Path(settings.model_dir))
    if registry.latest() is None:
        if say_none:
            log.warning("no Transformer model registered under %s: ranking with the online models alone (run "
                        "`streamrec train` to add one; workers and serve pick it up without a restart)", settings.model_dir)
        return None
    refused = set() if refused is None else refused

    def key(version: str, exc: BaseException | None = None) -> tuple:
        """A refusal as counted once: a version as its files are (a copy completed later, or another
        model of the same name, is tried and counted again), ``CURRENT`` for each thing it says."""
        return (POINTER, str(exc)) if version == POINTER else (version, registry.version_stamp(version))

    if all(key(version) in refused for version in {*registry.versions(), registry.latest()} - {None}):  # None: emptied meanwhile
        return None  # nothing new since the last attempt

    def count(version: str, exc: BaseException) -> None:
        if key(version, exc) not in refused:
            refused.add(key(version, exc))
            metrics.scorer_reload_failures.inc()

    try:
        # the CUDA graph, fp16 and the batch split apply only where a version runs on CUDA
        # the caller's timer paces the checks (the worker's every 5 s): a poll interval of its own as long as that
        # skipped every other tick (a tick a millisecond early found it too soon), so CURRENT was read every 10 s
        scorer = HotSwapScorer(registry, device=settings.scorer_device, on_failure=count, poll_interval_s=SCORER_POLL_S,
                               cuda_options=settings.scorer_cuda_options, threads=settings.scorer_threads or None)
    except ModelLoadError as exc:
        log.error("no registered Transformer model loads (%s): ranking with the online models alone until a "
                  "good version is registered", exc)
        return None
    except ScorerDeviceError as exc:  # every version would fail on it: said at start, not as a traceback
        raise device_refused(settings, exc) from None
    log.info("Transformer scorer %s runs on %s", scorer.version, scorer.provider)
    metrics.set_scorer(scorer.provider, scorer.version)
    return scorer


def load_arm_scorers(experiment, settings: Settings) -> dict[str, object]:
    """The scorers of the experiment's arms that pin a registered model version (arm name ->
    scorer), loaded and parity-checked as the worker's own; an arm whose version does not load
    is a :class:`ConfigError` (the worker refuses to start rather than serve the arm another model)."""
    if experiment is None:
        return {}
    out: dict[str, object] = {}
    registry = ModelRegistry(Path(settings.model_dir))
    for arm in experiment.arms:
        if arm.model in ("latest", "none") or not arm.uses_model:
            continue
        try:
            out[arm.name] = registry.load(arm.model, settings.scorer_device)
        except Exception as exc:  # noqa: BLE001 - said as a configuration error
            raise ConfigError(f"STREAMREC_VARIANTS: arm {arm.name!r} pins model version {arm.model!r}, which does not "
                              f"load from {settings.model_dir} ({exc}); `streamrec train` registers versions") from None
        log.info("experiment arm %s scores with model version %s on %s", arm.name, arm.model, out[arm.name].provider)
    return out


def input_partitions(app, settings: Settings, assigned) -> dict[str, range]:
    """The partitions of each input topic, as the consumer group's metadata counted them at
    this rebalance (``STREAMREC_PARTITIONS`` where it does not know a topic, or more where
    the assignment holds a higher partition)."""
    counts = {}
    for topic in settings.topics.consumed:
        try:
            n = app.consumer.topic_partitions(topic)
        except Exception:  # noqa: BLE001 - no consumer yet: the configured count
            n = None
        highest = max((tp.partition + 1 for tp in assigned if tp.topic == topic), default=0)
        counts[topic] = range(max(n or settings.partitions, highest))
    return counts


def raw_message(message) -> RawMessage:
    """The handler's view of a Faust message."""
    ts = message.timestamp
    return RawMessage(message.topic, message.partition, message.offset, message.key, message.value,
                      int(ts * 1000) if ts else None, message.generation_id)


__all__ = ["Shell", "input_partitions", "load_arm_scorers", "load_scorer", "raw_message"]
