"""One model across workers: each worker's models also learn the partitions other workers own.

With several workers in one consumer group, each worker's agent handles the input partitions
the group assigned to it, and its online models would learn only those events: item-side
statistics (co-visitation, trending, re-consumption's counts, the blend's popularity) would
each see a share of the traffic, and quality drops as workers are added. A
:class:`PeerLearner` in every worker (``STREAMREC_LEARN_ALL_PARTITIONS``, on by default) reads
the input partitions the worker does NOT own with a consumer of its own (no group) and teaches
their events to the models only (:meth:`RecommendationStep.relearn
<stream.pipeline.RecommendationStep.relearn>`: no user state, no context), so that every
worker's models learn every event of every partition, each exactly once.

Exactly once rests on the models' watermark (``Recommender.learned_offsets``: per
``"topic:partition"``, the highest offset learned), the same one that makes learning survive a
restart (stream/replay.py): the reader starts each foreign partition after its watermark and
``relearn`` passes over anything at or below it. When a partition moves between owned and
foreign (a rebalance), its events are learned by whichever path reaches them first and passed
over by the other: the agent's step treats an event at or below the watermark as learned
(applied to the user's state only).

Owned partitions are never read here: that would teach the models a user's next events
before the worker ranks for that user's present (leakage that inflates the live hit rate).
For the same reason the reader stops for the whole of a rebalance (:meth:`PeerLearner.pause`)
and starts again from the watermarks once the new assignment is known
(:meth:`PeerLearner.assign`).

Where a foreign partition has no watermark (these models never learned it: a fresh worker,
or a snapshot written before this reader existed), it starts where the group's owner starts
it: at the group's committed offset, or at the beginning when the group has none (the
worker's ``auto.offset.reset`` is ``earliest``). A worker joining a long-running group thus
learns the others' partitions from now on, without replaying their whole retention.

Forget requests (``streamrec.forget``, co-partitioned with the inputs) are read the same way:
the worker that owns a request's partition erases the user's state and recommendations and
purges its models (stream/handler.py); every other worker's reader purges its own models
(:meth:`RecommendationStep.forget <stream.pipeline.RecommendationStep.forget>`), so that no
worker's models keep a forgotten user. It reads the foreign forget partitions even with
``STREAMREC_LEARN_ALL_PARTITIONS=false``: a worker that owned the user's partition before a
rebalance learned them too.

The reader learns under the lock the batch handler holds while the step runs (the models are
not thread-safe, and a snapshot is taken under it too), a chunk at a time. Should it fail
(the broker unreachable, a bug), it logs, counts (``streamrec_peer_failures_total``) and
starts again after a back-off; the worker serves on, its models learning its own partitions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from aiokafka import AIOKafkaConsumer, TopicPartition

from stream.connections import started_reader
from stream.consumer import adapt_fetches
from stream.decoding import decode_event, decode_forget
from stream.errors import some_of
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms
from stream.records import Bounds, ForgetRequest
from stream.retry import Backoff, run_until_done
from stream.step_inputs import source_of

log = logging.getLogger("streamrec.peers")

#: most records one fetch hands over, and so one stretch under the lock
CHUNK = 1000
#: a chunk this large is learned in a thread (the event loop keeps serving Faust's fetcher)
THREAD_MIN_EVENTS = 64
#: (user, event id) pairs remembered to pass over a producer's duplicate, per generation
RECENT_KEYS = 50_000
#: while the other workers' events flow, a fetch waits for this many bytes or this long, whichever
#: comes first (after a fetch that brought nothing: aiokafka's 1 byte or 500 ms, so an idle
#: worker asks twice a second and the first event after a quiet spell comes at once:
#: stream.consumer.adapt_fetches). aiokafka's 1 byte alone had the broker answer each of the
#: producers' small batches with a fetch of its own: two workers at 2,000 events/s spent 505-507 µs
#: of CPU an event and the broker 1,104-1,109 ticks a run, against 432-451 µs and 872-904 ticks
#: (docs/architecture.md, One model across workers)
PEER_FETCH_WAIT_MS = 50
PEER_FETCH_MIN_BYTES = 64 << 10

Partition = tuple[str, int]


def foreign_partitions(partitions: Mapping[str, Iterable[int]], owned: Iterable[Partition]) -> set[Partition]:
    """Every partition of the input topics that this worker does not own.

    >>> sorted(foreign_partitions({"clicks": range(4), "purchases": range(4)}, {("clicks", 1), ("purchases", 1)}))
    [('clicks', 0), ('clicks', 2), ('clicks', 3), ('purchases', 0), ('purchases', 2), ('purchases', 3)]
    >>> foreign_partitions({"clicks": [0, 1]}, {("clicks", 0), ("clicks", 1), ("other", 0)})
    set()
    """
    owned = set(owned)
    return {(topic, p) for topic, parts in partitions.items() for p in parts if (topic, p) not in owned}


def start_offsets(foreign: Iterable[Partition], learned: Mapping[str, int],
                  committed: Mapping[Partition, int], from_start: Collection[str] = ()) -> dict[Partition, int | None]:
    """Where the reader starts each foreign partition: after the models' watermark; where they
    never learned it, at the group's committed offset; where the group has none either, at the
    beginning (None), as the group's owner does. A partition of a topic in ``from_start`` (the
    forget requests) that the models never learned starts at the beginning: a request the group
    committed long ago may still be news to these models.

    >>> start_offsets([("c", 0), ("c", 1), ("c", 2)], {"c:0": 41}, {("c", 0): 10, ("c", 1): 7})
    {('c', 0): 42, ('c', 1): 7, ('c', 2): None}
    >>> start_offsets([("f", 0)], {}, {("f", 0): 3}, from_start=("f",))
    {('f', 0): None}
    """
    out: dict[Partition, int | None] = {}
    for topic, partition in sorted(foreign):
        mark = learned.get(source_of(topic, partition))
        if mark is not None:
            out[(topic, partition)] = mark + 1
        else:
            out[(topic, partition)] = None if topic in from_start else committed.get((topic, partition))
    return out


class RecentKeys:
    """The ``(user, event id)`` pairs seen lately, for :meth:`RecommendationStep.relearn`'s
    ``seen``: two generations of at most ``size`` each, so memory stays bounded however long
    the reader runs (a producer's duplicate comes soon after the original).

    >>> keys = RecentKeys(size=2)
    >>> for k in ("a", "b", "c"):
    ...     keys.add(k)
    >>> "a" in keys, "c" in keys, len(keys)
    (True, True, 3)
    >>> keys.add("d"); keys.add("e")
    >>> "a" in keys, "c" in keys, "e" in keys
    (False, True, True)
    """

    def __init__(self, size: int = RECENT_KEYS) -> None:
        self.size = size
        self._new: set = set()
        self._old: set = set()

    def __contains__(self, key) -> bool:
        return key in self._new or key in self._old

    def add(self, key) -> None:
        if len(self._new) >= self.size:
            self._old, self._new = self._new, set()
        self._new.add(key)

    def __len__(self) -> int:
        return len(self._new) + len(self._old)


#: a reader that ran this long before failing had recovered: its back-off starts again from the shortest
BACKOFF_RESET_S = 60.0


#: request ids a log line names at most: a fetch may bring thousands of forget requests
LOGGED_IDS = 5


def _request_id(req: ForgetRequest) -> str:
    return repr(req.request_id)


class PeerLearner:
    """Reads the input partitions other workers own and teaches their events to ``step``'s
    models (see the module's docstring). ``kafka`` holds the reader's consumer options (at least
    ``bootstrap_servers``; the worker's security options with them); ``lock`` is the one the
    batch handler holds while the step runs; ``committed`` returns the consumer group's
    committed offsets (blocking: it is called in a thread)."""

    def __init__(self, step: RecommendationStep, kafka: Mapping[str, object], inputs: Sequence[str], bounds: Bounds,
                 lock: asyncio.Lock, metrics: Metrics, committed: Callable[[], Mapping[Partition, int]],
                 chunk: int = CHUNK, poll_ms: int = 200, backoff: Backoff | None = None,
                 pseudonyms: Pseudonyms | None = None, forget_topic: str | None = None) -> None:
        self.step, self.kafka, self.bounds = step, dict(kafka), bounds.rereading()
        #: the topics read: the input topics given, and the forget topic (if any)
        self.inputs = tuple(inputs) + ((forget_topic,) if forget_topic and forget_topic not in inputs else ())
        self.forget_topic = forget_topic
        #: called after the models purged forgotten users (the shell snapshots them soon)
        self.on_forget: Callable[[int], None] | None = None
        #: called between batches with the users (as the models and the state hold them) of the
        #: requests read, so that the worker's store keeps no document of theirs: a request not
        #: keyed by its user's id reaches another worker than the user's owner, which deletes
        #: their state behind the owner's back (the shell: CachedUserStateStore.discard)
        self.on_forget_users: Callable[[list[str]], None] | None = None
        self.lock, self.metrics, self.committed = lock, metrics, committed
        self.chunk, self.poll_ms = chunk, poll_ms
        self.pseudonyms = pseudonyms  # the worker's: the models learn the ids its live step does
        self.backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        #: the partitions this worker owns now; None: a rebalance is under way (read nothing)
        self._owned: frozenset[Partition] | None = None
        self._partitions: dict[str, tuple[int, ...]] = {}
        self._version = 0  # bumped on every assign and pause: what was fetched before is dropped
        self._changed = asyncio.Event()
        #: the foreign partitions being read now
        self.reading: frozenset[Partition] = frozenset()
        self._seen = RecentKeys()
        self._lag: dict[Partition, int] = {}

    # -- from the rebalance hooks ------------------------------------------------------
    def assign(self, owned: Iterable[Partition], partitions: Mapping[str, Iterable[int]]) -> None:
        """The group's new assignment for this worker (``owned``), out of ``partitions`` (the
        partitions of each input topic, as the group's metadata knows them): read every other
        input partition."""
        self._partitions = {t: tuple(partitions.get(t, ())) for t in self.inputs}
        self._owned = frozenset((t, p) for t, p in owned if t in self.inputs)
        self._bump()

    def pause(self) -> None:
        """A rebalance began: read nothing until :meth:`assign` says what is whose."""
        self._owned = None
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()

    # -- the loop ----------------------------------------------------------------------
    async def run(self, ready: asyncio.Event) -> None:
        """Once ``ready`` (the models restored, and what their snapshot missed learned again),
        read and learn until cancelled; a failure is logged, counted and retried after a back-off."""
        await ready.wait()
        await run_until_done(self._read, self.backoff, log, "learning the other workers' partitions",
                             self.metrics.peer_failures.inc, BACKOFF_RESET_S)

    async def _read(self) -> None:
        consumer = await started_reader(self.kafka, self.chunk)
        adapt_fetches(consumer._fetcher, PEER_FETCH_MIN_BYTES, PEER_FETCH_WAIT_MS)
        try:
            version = None
            while True:
                if version != self._version:
                    self._changed.clear()
                    version = self._version
                    await self._apply(consumer, version)
                    continue  # the assignment may have changed again meanwhile
                if not self.reading:
                    await self._changed.wait()
                    continue
                batch = await consumer.getmany(timeout_ms=self.poll_ms, max_records=self.chunk)
                if version != self._version:
                    continue
                await self._measure_lag(consumer)  # as of this fetch, before its events are learned
                if batch:
                    await self._learn(batch, version)
                self.metrics.peer_lag.set(sum(self._lag.values()))
        finally:
            self.reading = frozenset()
            self.metrics.peer_lag.set(0)
            await consumer.stop()

    async def _apply(self, consumer: AIOKafkaConsumer, version: int) -> None:
        """Read the foreign partitions of the assignment ``version``, each from where
        :func:`start_offsets` says."""
        owned = self._owned
        if owned is None:
            consumer.assign([])
            self.reading = frozenset()
            return
        foreign = foreign_partitions(self._partitions, owned)
        # the watermark and the assignment are read together under the lock: no batch moves the
        # watermark of an owned partition meanwhile, and none of a foreign one ever does
        async with self.lock:
            if version != self._version:
                return
            learned = dict(self.step.recommender.learned_offsets)
        unknown = [tp for tp in foreign if source_of(*tp) not in learned]
        committed = await asyncio.to_thread(self.committed) if unknown else {}
        starts = start_offsets(foreign, learned, committed, (self.forget_topic,) if self.forget_topic else ())
        async with self.lock:  # the models know a partition from where the reader starts it (a takeover replays from there)
            if version != self._version:
                return
            self.step.start_reading({source_of(*tp): 0 if offset is None else offset for tp, offset in starts.items()})
        consumer.assign([TopicPartition(t, p) for t, p in starts])
        for (topic, partition), offset in starts.items():
            if offset is not None:
                consumer.seek(TopicPartition(topic, partition), offset)
        if version != self._version:
            return
        self.reading = frozenset(foreign)
        self._lag = {tp: lag for tp, lag in self._lag.items() if tp in foreign}
        if foreign:
            log.info("learning the other workers' partitions too: %s",
                     ", ".join(f"{t}[{p}] from {'the beginning' if o is None else o}" for (t, p), o in starts.items()))

    async def _measure_lag(self, consumer: AIOKafkaConsumer) -> None:
        """Each foreign partition's lag: its high-water mark less the consumer's position, for
        those fetched from at least once (their position is known, so asking for it waits for
        nothing). The position, not the last record's offset: a partition that ends with a
        transaction's commit or abort marker (a site's transactional producer), or with an aborted
        transaction's records, has offsets no record handed over stands behind, which the position
        moves past; measured from the last record, a reader at the end stayed 1 or more behind
        for good, and a fetch of markers alone (no records) measured nothing."""
        for topic, partition in self.reading:
            tp = TopicPartition(topic, partition)
            high = consumer.highwater(tp)
            if high is not None:
                self._lag[(topic, partition)] = max(0, high - await consumer.position(tp))

    async def _learn(self, batch, version: int) -> None:
        now = time.time_ns() // 1_000_000
        events, positions, ends = [], [], []
        forgets, forget_positions = [], []
        for tp, records in batch.items():
            if not records or (tp.topic, tp.partition) not in self.reading:
                continue
            source = source_of(tp.topic, tp.partition)
            if tp.topic == self.forget_topic:
                for rec in records:
                    try:  # the owner's clock window too: a request it dead-letters is refused here as well
                        forgets.append(decode_forget(rec.value, self.bounds, now))
                    except Exception:  # noqa: BLE001 - InvalidEvent, or a decoder's bug: the owner dead-letters both
                        continue
                    forget_positions.append((source, rec.offset))
                ends.append((source, records[-1].offset))
                continue
            for rec in records:
                try:  # what the owner refuses for a ts too far ahead stays refused (Bounds.rereading)
                    events.append(decode_event(rec.value, self.bounds, now))
                except Exception:  # noqa: BLE001 - InvalidEvent, or a decoder's bug: the owner dead-letters both
                    continue  # passed over here (the watermark moves past it below)
                positions.append((source, rec.offset))
            ends.append((source, records[-1].offset))
        if not ends:
            return
        if self.pseudonyms is not None and events:
            events = self.pseudonyms.events(events)[0]
        if self.pseudonyms is not None and forgets:
            forgets = self.pseudonyms.events(forgets)[0]
        async with self.lock:
            if version != self._version:
                return  # a rebalance since the fetch: the next assignment starts from the watermarks
            start = time.perf_counter()
            if forgets:  # before the events: a forgotten user's older events are refused
                for req, exc in self.step.forget(forgets, forget_positions, now):
                    self.metrics.forget_failures.inc()
                    log.error("forget request %r: the models could not purge everything of the user (%s); a model "
                              "may still hold part of them (a bug)", req.request_id, exc)
                if self.on_forget_users is not None:
                    self.on_forget_users([req.user_id for req in forgets])
                self.metrics.forgets_applied.inc(len(forgets))
                log.info("purged %d forgotten user(s) from the models (forget requests %s, read from another "
                         "worker's partitions)", len(forgets), some_of(forgets, LOGGED_IDS, _request_id))
            if len(events) >= THREAD_MIN_EVENTS:
                n = await asyncio.to_thread(self.step.relearn, events, positions, self._seen, now)
            else:
                n = self.step.relearn(events, positions, self._seen, now)
            self.step.advance(ends)  # values that did not decode included
            self.metrics.peer_learn_seconds.inc(time.perf_counter() - start)
        self.metrics.peer_events_learned.inc(n)
        if forgets and self.on_forget is not None:
            self.on_forget(len(forgets))


__all__ = ["CHUNK", "PeerLearner", "RecentKeys", "foreign_partitions", "start_offsets"]
