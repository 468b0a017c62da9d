"""The catalogue, kept from the items topic: every worker reads all of it.

``streamrec.items`` is compacted and keyed by ``item_id``: Kafka keeps at least the latest
value per item, and a null value (a tombstone) removes the item. Search must be able to find
any item whichever worker a user's search reaches, so each worker (and ``streamrec serve``)
reads **every** partition of the topic with a consumer of its own, in no consumer group, as a
global table (Kafka Streams' GlobalKTable, Faust's GlobalTable), from the beginning, and then
follows it.

Each value is decoded at the same door as events (:func:`stream.decoding.decode_item`); one
that breaks the contract is dead-lettered, by each reader that meets it, with the usual code
and reason (the reasons, and their sending: stream/catalogue_dlq.py). New and changed items are embedded by the text model in a thread (the model
releases the GIL: the event loop keeps serving) in chunks of :data:`FLUSH_CHUNK`, and become
searchable chunk by chunk (``streamrec_catalogue_items``, ``streamrec_catalogue_pending_items``).

Should reading fail (the broker unreachable, a bug), the feed logs, and starts again after a
back-off from where it was: the catalogue keeps what it has, and the worker serves on. "Where
it was" moves past a fetch only once each of its values is queued for indexing, removed or
dead-lettered (an item the catalogue raises on alone is dead-lettered as ``processing_error``),
so a fetch cut short by a failure is read again, and a snapshot (taken with nothing queued)
never records offsets past an item it neither holds nor dead-lettered. An item whose text the
text model raises on alone (it embeds other texts) is dead-lettered as ``embedding_failed``
when it is indexed, from the record it was read from (kept while the item is queued), and
leaves the queue once Kafka confirmed that. Each process dead-letters what it refuses: every
worker embeds every item with its own model, so each names itself (``reader``) in the reason,
and ``streamrec serve`` (no ``publish``) only counts and logs. A topic
that does not exist (yet) is an empty catalogue, read to its end; the feed looks for it every
:data:`MISSING_TOPIC_EVERY_S` and reads it from its start once it exists.

**Snapshots.** Embedding is the catalogue's cost (about 45 items/s on one core), so a worker
does not pay it again at each start: every ``snapshot_interval_s`` in which the catalogue
changed, once everything read is indexed, the feed writes the catalogue (items and half-precision
vectors, :meth:`Catalogue.to_bytes <online_models.search.Catalogue.to_bytes>`) with the offsets
it covers to the store's blob :data:`SNAPSHOT_KEY`; at start it restores that blob and reads the
topic from those offsets on. Workers write the same content (each reads the whole topic); the
last write wins, and every snapshot is whole. A snapshot of another text model, or one that
does not decode, is ignored (logged): the feed reads the topic from the beginning.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from online_models.search import Catalogue, CatalogueItem
from stream.catalogue_dlq import (
    ItemDeadLetters,
    ItemSource,
    adding_raised,
    decoding_raised,
    embedding_failed,
    key_not_item_id,
)
from stream.connections import started_reader
from stream.decoding import decode_item
from stream.errors import InvalidEvent, clipped, described
from stream.prometheus import Metrics
from stream.records import Bounds, DeadLetter, ItemEvent, dead_letter
from stream.retry import Backoff, run_until_done
from stream.state import UserStateStore
from stream.step_results import exception_text

log = logging.getLogger("streamrec.catalogue")

#: the store's blob that holds the catalogue's snapshot
SNAPSHOT_KEY = "catalogue:snapshot"


class _Envelope(msgspec.Struct, array_like=True):
    topic: str
    #: partition -> the next offset to read
    offsets: dict[int, int]
    catalogue: bytes


#: records read per fetch, and items embedded per thread hand-off
FETCH_RECORDS = 1000
FLUSH_CHUNK = 256
#: what the text model embeds to tell an item it raises on from a model that raises on anything
PROBE_TEXT = "probe"
#: how often the feed looks for partitions added to the items topic
METADATA_EVERY_S = 30.0
#: and how often for the topic itself, while it does not exist
MISSING_TOPIC_EVERY_S = 2.0


def catalogue_item(event: ItemEvent) -> CatalogueItem:
    """What search keeps of an ItemEvent."""
    return CatalogueItem(item_id=event.item_id, title=event.title, description=event.description or "",
                         category_path=tuple(event.category_path or ()), brand=event.brand, price=event.price,
                         available=event.available)


class CatalogueFeed:
    """Follow the items topic into ``catalogue``.

    ``publish(records)`` sends dead letters (the worker's :class:`~stream.publisher.BatchPublisher`;
    None: invalid values are only counted and logged). ``offsets`` (partition -> the next offset
    to read) say where reading starts; a partition not in it is read from the beginning.
    ``reader`` names this process in the dead letters of items its text model raised on
    (default ``host:pid``): each process that reads the topic embeds every item itself.
    """

    def __init__(self, catalogue: Catalogue, kafka_options: dict, topic: str, bounds: Bounds, metrics: Metrics,
                 publish: Callable[[list], Awaitable[list]] | None = None, dlq_topic: str | None = None,
                 offsets: dict[int, int] | None = None, backoff: Backoff | None = None, poll_ms: int = 500,
                 store: UserStateStore | None = None, snapshot_interval_s: float = 60.0,
                 write_snapshots: bool = True, reader: str | None = None) -> None:
        self.catalogue = catalogue
        self.kafka = kafka_options
        self.topic = topic
        self.bounds = bounds
        self.metrics = metrics
        self.offsets: dict[int, int] = dict(offsets or {})
        self.backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self.dead_letters = ItemDeadLetters(metrics, publish, dlq_topic, self.backoff)
        self.poll_ms = poll_ms
        #: set once the feed has read to the end of every partition as it was at its start (at
        #: once if the topic does not exist: an empty catalogue, as an empty topic gives)
        self.caught_up = asyncio.Event()
        #: whether the broker has the items topic (None: not asked yet)
        self.topic_exists: bool | None = None
        self._ends: dict[int, int] | None = None
        self.store = store
        self.snapshot_interval_s = snapshot_interval_s
        #: False: restore the workers' snapshot, never write one (``streamrec serve``)
        self.write_snapshots = write_snapshots
        self._changed = False
        self._snapshot_at = time.monotonic()
        #: since when (monotonic) reading the topic has failed, and the latest reason; None
        #: while it reads (serve's /readyz says it: the catalogue serves as it is meanwhile)
        self.trouble: tuple[float, str] | None = None
        self.reader = reader or f"{socket.gethostname()}:{os.getpid()}"
        #: item_id -> the record of its queued value, until the item is indexed or dead-lettered
        self._sources: dict[str, ItemSource] = {}

    def _troubled(self, reason: str) -> None:
        trouble = self.trouble
        self.trouble = (trouble[0] if trouble is not None else time.monotonic(), reason)

    async def restore(self) -> bool:
        """The catalogue and its offsets from the store's snapshot, if there is a good one."""
        if self.store is None:
            return False
        try:
            data = await self.store.get_blob(SNAPSHOT_KEY)
            if data is None:
                return False
            envelope = msgspec.msgpack.decode(data, type=_Envelope)
            if envelope.topic != self.topic:
                log.warning("the catalogue's snapshot is of topic %s, not %s: ignored", envelope.topic, self.topic)
                return False
            await asyncio.to_thread(self.catalogue.load, envelope.catalogue)
            self._sources.clear()  # the queue is empty after a load
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("the catalogue's snapshot cannot be restored (%s): reading %s from the beginning", exc, self.topic)
            return False
        self.offsets = dict(envelope.offsets)
        self.metrics.catalogue_items.set(len(self.catalogue))
        log.info("catalogue restored from its snapshot: %d items; reading %s from offsets %s", len(self.catalogue),
                 self.topic, dict(sorted(self.offsets.items())))
        return True

    async def snapshot(self) -> bool:
        """Write the catalogue and the offsets it covers (call with nothing pending)."""
        if self.store is None or not self.write_snapshots or self.catalogue.pending:
            return False
        offsets = dict(self.offsets)
        data = await asyncio.to_thread(lambda: msgspec.msgpack.encode(
            _Envelope(self.topic, offsets, self.catalogue.to_bytes())))
        await self.store.set_blob(SNAPSHOT_KEY, data)
        self._changed = False
        self._snapshot_at = time.monotonic()
        log.info("catalogue snapshot written: %d items, %.1f MiB", len(self.catalogue), len(data) / 2**20)
        return True

    async def run(self) -> None:
        """Restore the snapshot, then read until cancelled; a failure is logged and reading
        starts again after a back-off."""
        try:
            await self.restore()
        except Exception as exc:  # noqa: BLE001 - the store is down: read the topic instead
            log.warning("could not read the catalogue's snapshot (%s): reading %s from the beginning", described(exc),
                        self.topic)
        await run_until_done(self._read_noted, self.backoff, log, f"reading the items topic {self.topic}")

    async def _read_noted(self) -> None:
        try:
            await self._read()
        except Exception as exc:
            self._troubled(described(exc))
            raise

    async def _read(self) -> None:
        consumer = await started_reader(self.kafka, FETCH_RECORDS)
        try:
            partitions: set[int] = set()
            looked = float("-inf")
            while True:
                if not partitions or time.monotonic() - looked > METADATA_EVERY_S:
                    looked = time.monotonic()
                    partitions = await self._assign(consumer, partitions)
                if not partitions:  # no topic yet: nothing assigned, and getmany would wait for an assignment
                    await asyncio.sleep(MISSING_TOPIC_EVERY_S)
                    continue
                batch = await consumer.getmany(timeout_ms=self.poll_ms, max_records=FETCH_RECORDS)
                for tp, records in batch.items():
                    await self._apply(tp.partition, records)
                    self._changed = True
                await self._flush()
                if self._ends is not None:
                    await self._past_unread(consumer)
                if self._ends is not None and all(self.offsets.get(p, 0) >= end for p, end in self._ends.items()):
                    self._ends = None
                    self.caught_up.set()
                    log.info("catalogue loaded from %s: %d items", self.topic, len(self.catalogue))
                    self._snapshot_at = float("-inf")  # the whole topic embedded: snapshot it now
                if self._changed and time.monotonic() - self._snapshot_at >= self.snapshot_interval_s:
                    try:
                        await self.snapshot()
                    except Exception as exc:  # noqa: BLE001 - the next interval tries again
                        self._snapshot_at = time.monotonic()
                        log.warning("could not write the catalogue's snapshot (%s); trying again in %.0f s", described(exc),
                                    self.snapshot_interval_s)
        finally:
            await consumer.stop()

    async def _past_unread(self, consumer: AIOKafkaConsumer) -> None:
        """Move each partition still short of its end to where the consumer is: offsets that no
        record it hands over stands behind (a transaction's commit or abort marker, an aborted
        transaction's records, which a reader of committed data never gets) move its position
        and no record's. A topic that ends with a marker (a site's transactional producer) was
        never read "to its end", and ``streamrec serve`` stayed unready for good. Called once the
        records fetched are applied: the position is past nothing still to apply."""
        for partition, end in self._ends.items():
            at = self.offsets.get(partition, 0)
            if at < end:
                self.offsets[partition] = max(at, await consumer.position(TopicPartition(self.topic, partition)))

    async def _assign(self, consumer: AIOKafkaConsumer, known: set[int]) -> set[int]:
        """Every partition of the topic (partitions added since are picked up here)."""
        updated = await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call for it
        if updated is False:  # no broker answered: aiokafka's fetches wait meanwhile, and raise nothing
            self._troubled("no broker answers a metadata request")
        else:
            self.trouble = None
        found = consumer.partitions_for_topic(self.topic) or set()
        if not found and self.topic_exists is not False:
            log.warning("the items topic %s does not exist: the catalogue stays empty until it does (the workers "
                        "create it at their start; `streamrec produce --catalogue FILE` fills it)", self.topic)
        arrived = found and self.topic_exists is False
        self.topic_exists = bool(found)
        if not found:
            self.caught_up.set()  # nothing to read, as in an empty topic
        if found == known:
            return known
        if arrived:  # created since: read to its end, as at a start, before saying the catalogue is whole
            self.caught_up.clear()
        tps = [TopicPartition(self.topic, p) for p in sorted(found)]
        consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.offsets:
                consumer.seek(tp, self.offsets[tp.partition])
            else:
                await consumer.seek_to_beginning(tp)
        if not self.caught_up.is_set():
            ends = await consumer.end_offsets(tps)
            self._ends = {tp.partition: end for tp, end in ends.items()}
        log.info("reading the items topic %s: partitions %s", self.topic, sorted(found))
        return set(found)

    async def _apply(self, partition: int, records) -> None:
        """Apply one fetch of ``partition``. Its offset (what a snapshot records) moves past the
        fetch only at the end, once each value of it is queued for indexing, removed, or
        dead-lettered (Kafka confirmed it): should anything raise before, the feed reads the
        fetch again after its back-off (a value applied twice changes nothing), rather than
        leave out of the catalogue, for good, items a snapshot says it holds."""
        upserts: list[tuple[object, CatalogueItem]] = []  # (record, item)
        dead: list[tuple[bytes | None, DeadLetter]] = []
        failed: list[tuple[bytes | None, DeadLetter]] = []  # valid items the catalogue raised on alone
        changes = self.metrics.catalogue_changes
        now = time.time_ns() // 1_000_000
        end: int | None = None
        for rec in records:
            end = rec.offset + 1
            if rec.value is None:  # a tombstone
                if rec.key:
                    upserts = self._upsert(partition, upserts, failed, now)
                    item_id = rec.key.decode("utf-8", "replace")
                    self._sources.pop(item_id, None)
                    try:
                        self.catalogue.remove(item_id)
                    except Exception as exc:  # noqa: BLE001 - an index's bug: this item's alone (logged, and passed)
                        changes.labels("failed").inc()
                        log.error("removing item %r (a tombstone at %s[%d]@%d) raised %s: %s; it may still be found "
                                  "until a new value for it (a bug; report it)", clipped(item_id, 200), rec.topic, partition,
                                  rec.offset, type(exc).__name__, clipped(exception_text(exc), 300))
                        continue
                    changes.labels("tombstone").inc()
                continue
            try:
                item = decode_item(rec.value, self.bounds)
            except InvalidEvent as exc:
                dead.append((rec.key, dead_letter(exc, rec.value, rec.topic, partition, rec.offset, now)))
                continue
            except Exception as exc:  # noqa: BLE001 - a decoder bug is that value's problem alone
                problem = decoding_raised(exc)
                dead.append((rec.key, dead_letter(problem, rec.value, rec.topic, partition, rec.offset, now)))
                continue
            if rec.key != item.item_id.encode():  # compacted by key: it would outlive its tombstone
                problem = key_not_item_id(rec.key, item.item_id)
                dead.append((rec.key, dead_letter(problem, rec.value, rec.topic, partition, rec.offset, now)))
                continue
            upserts.append((rec, catalogue_item(item)))
        self._upsert(partition, upserts, failed, now)
        if dead:
            changes.labels("invalid").inc(len(dead))
            for _, letter in dead:
                log.warning("item value at %s[%d]@%d refused: %s", letter.topic, letter.partition, letter.offset,
                            letter.reason)
        if failed:
            changes.labels("failed").inc(len(failed))
            for _, letter in failed:
                log.error("item value at %s[%d]@%d is dead-lettered: %s", letter.topic, letter.partition,
                          letter.offset, letter.reason)
        # until Kafka confirms them all: the offsets move past these records once they are sent,
        # and a dead letter not sent then would never be
        await self.dead_letters.send(dead + failed)
        if end is not None:
            self.offsets[partition] = end

    def _upsert(self, partition: int, upserts: list[tuple[object, CatalogueItem]],
                failed: list[tuple[bytes | None, DeadLetter]], now: int) -> list:
        """Queue ``upserts`` (record, item) in the catalogue. When that raises (a bug), each item
        is queued alone: one that raises alone is added to ``failed`` as a ``processing_error``
        dead letter (its value and place; the item to send again once the bug is fixed), and the
        others are queued."""
        if not upserts:
            return []
        changes = self.metrics.catalogue_changes
        try:
            self.catalogue.upsert([item for _, item in upserts])
        except Exception as exc:  # noqa: BLE001 - one item's bug, or a passing one: each item alone
            log.warning("adding %d item(s) to the catalogue raised %s: %s; adding them one at a time", len(upserts),
                        type(exc).__name__, clipped(exception_text(exc), 300))
        else:
            changes.labels("upsert").inc(len(upserts))
            for rec, item in upserts:
                self._keep_source(rec, partition, item)
            return []
        for rec, item in upserts:
            try:
                self.catalogue.upsert([item])
            except Exception as exc:  # noqa: BLE001 - this item's alone: dead-lettered, the others queued
                problem = adding_raised(exc)
                failed.append((rec.key, dead_letter(problem, rec.value, rec.topic, partition, rec.offset, now)))
                continue
            changes.labels("upsert").inc()
            self._keep_source(rec, partition, item)
        return []

    def _keep_source(self, rec, partition: int, item: CatalogueItem) -> None:
        """Remember the record of an item just queued, to dead-letter it should embedding it
        fail: until :meth:`_flush` has emptied the queue (one fetch's worth, or more while the
        text model fails on anything)."""
        self._sources[item.item_id] = ItemSource(rec.key, rec.value, rec.topic, partition, rec.offset)

    async def _flush(self) -> None:
        catalogue = self.catalogue
        while catalogue.pending:
            self.metrics.catalogue_pending.set(catalogue.pending)
            try:
                await asyncio.to_thread(catalogue.flush, FLUSH_CHUNK)
            except Exception:  # noqa: BLE001 - an item the text model or an index cannot take: find it
                await self._flush_singly(min(FLUSH_CHUNK, catalogue.pending))
            self.metrics.catalogue_items.set(len(catalogue))
        self._sources.clear()  # every queued item is indexed or dead-lettered
        self.metrics.catalogue_pending.set(0)
        self.metrics.catalogue_items.set(len(catalogue))

    async def _flush_singly(self, n: int) -> None:
        """Index the next ``n`` queued items one at a time, after a chunk of them raised. An item
        that raises alone while the text model still embeds :data:`PROBE_TEXT` is dead-lettered
        as ``embedding_failed`` (its value, from the record it was read from), then taken out of
        the catalogue (logged at ERROR, counted as ``failed``): without that, the same chunk
        raised at every retry and no later item was ever indexed. It leaves the queue only once
        Kafka confirmed its dead letter, so no snapshot passes it before. When the probe raises
        too, the model fails whatever it is given, and the item's error is raised (the feed
        reads again after a back-off, keeping the queue)."""
        catalogue = self.catalogue
        for _ in range(n):
            item_id = catalogue.next_pending()
            if item_id is None:
                return
            try:
                await asyncio.to_thread(catalogue.flush, 1)
                continue
            except Exception as exc:  # noqa: BLE001 - this item alone, unless the probe below fails too
                failure = exc
            try:
                await asyncio.to_thread(catalogue.embedder.passages, [PROBE_TEXT])
            except Exception:  # noqa: BLE001 - not the item's doing
                raise failure from None
            source = self._sources.get(item_id)
            if source is not None:
                model = getattr(catalogue.embedder, "name", type(catalogue.embedder).__name__)
                problem = embedding_failed(item_id, failure, self.reader, model)
                letter = dead_letter(problem, source.value, source.topic, source.partition, source.offset,
                                     time.time_ns() // 1_000_000)
                await self.dead_letters.send([(source.key, letter)])
            try:
                catalogue.remove(item_id)  # out of the queue first, then whatever of it was indexed
            except Exception as exc:  # noqa: BLE001 - it is out of the queue at least
                log.warning("removing the parts of item %r that were indexed failed: %s", item_id, exception_text(exc))
            self._sources.pop(item_id, None)
            self.metrics.catalogue_changes.labels("failed").inc()
            if source is None:
                where = "it was not read from the items topic: nothing to dead-letter"
            else:
                where = (f"its value at {source.topic}[{source.partition}]@{source.offset} is "
                         + ("dead-lettered" if self.dead_letters.sent
                            else "counted as embedding_failed (this process sends no dead letters)"))
            log.error("item %r is left out of the catalogue: embedding or indexing it raised %s: %s (a bug; report it "
                      "with the item's text, which a new value for the item on the items topic tries again); %s",
                      item_id, type(failure).__name__, clipped(exception_text(failure), 300), where)


__all__ = ["CatalogueFeed", "catalogue_item"]
