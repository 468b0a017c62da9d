"""Kafka record batches, filled by the project itself: the one producer path of streamrec.

One ``send`` per record costs 50-200 µs of Python in aiokafka and Faust; appending the
records to one batch per (topic, partition) and sending each batch once costs a fraction
of that, and a worker publishes one record per event. :class:`RecordBatches` does that over
a started aiokafka producer; :class:`BatchPublisher` (the worker: publish a micro-batch's
output, say which records the broker did not confirm) and ``streamrec produce`` (replay a
log as fast as it goes, stop at the first delivery error) both send through it. Keys are
hashed with Kafka's default partitioner (murmur2), so a user's records land in the partition
a Java or kafka-python producer would choose:

>>> murmur2_partition(b"u1", 4), murmur2_partition(b"u1", 4) == murmur2_partition(b"u1", 4)
(0, True)
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.partitioner import murmur2

log = logging.getLogger("streamrec.publisher")

OutRecord = tuple[str, bytes | None, bytes | None]  # topic, key, value (None: a tombstone)


def murmur2_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partition for a keyed record (the Java client's rule)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class RecordBatches:
    """One open record batch per topic-partition over a started producer; a full batch goes
    out at once, without waiting for its acknowledgement.

    ``keep``: remember each batch's records, so that :meth:`confirm` can say which ones the
    broker did not confirm (the worker re-publishes them); without it (a replay) nothing is
    kept beyond the open batches.

    Records are numbered in the order they were appended (``appended`` counts them), and
    :meth:`acknowledged` says how many the broker confirmed: a replay that failed says what
    is in Kafka.
    """

    def __init__(self, producer: AIOKafkaProducer, keep: bool = False) -> None:
        self._producer = producer
        self._keep = keep
        #: per topic-partition: the open batch, its records (``keep``) and its first record's number
        self._open: dict[tuple[str, int], tuple[Any, list[OutRecord], int]] = {}
        self._partitions: dict[str, list[int]] = {}
        #: each batch sent: its delivery, its records (``keep``), its first record's number, its size
        self._sent: deque[tuple[asyncio.Future, list[OutRecord], int, int]] = deque()
        #: records appended so far
        self.appended = 0
        #: records of the batches found acknowledged (and forgotten) so far
        self._confirmed = 0
        #: the lowest number of a record in a batch found failed so far
        self._first_failed: int | None = None
        #: whether :meth:`confirm` found a batch the broker did not confirm
        self.refused = False

    async def partitions(self, topic: str) -> list[int]:
        """The topic's partition ids, sorted (asked of the producer's metadata once per topic
        for as long as this object lives; the broker is asked only when that does not know the
        topic yet)."""
        parts = self._partitions.get(topic)
        if parts is None:
            parts = self._partitions[topic] = sorted(await self._producer.partitions_for(topic))
        return parts

    def append(self, topic: str, partition: int, key: bytes | None, value: bytes) -> bool:
        """Add to the open batch without waiting; False when there is none or it is full
        (then ``await add``)."""
        entry = self._open.get((topic, partition))
        if entry is None or entry[0].append(key=key, value=value, timestamp=None) is None:
            return False
        if self._keep:
            entry[1].append((topic, key, value))
        self.appended += 1
        return True

    async def add(self, topic: str, partition: int, key: bytes | None, value: bytes) -> bool:
        """:meth:`append`, sending the full batch first; False when the record does not fit
        even an empty batch (it is not sent)."""
        if self.append(topic, partition, key, value):
            return True
        entry = self._open.pop((topic, partition), None)
        if entry is not None:
            await self._send(topic, partition, *entry)
        self._open[(topic, partition)] = (self._producer.create_batch(), [], self.appended)
        if self.append(topic, partition, key, value):
            return True
        del self._open[(topic, partition)]  # empty: the next record starts a batch of its own (and number)
        return False

    async def send_open(self) -> None:
        """Send every open batch that holds a record."""
        open_batches, self._open = self._open, {}
        for (topic, partition), (batch, records, first) in open_batches.items():
            if batch.record_count():
                await self._send(topic, partition, batch, records, first)

    async def _send(self, topic: str, partition: int, batch, records: list[OutRecord], first: int) -> None:
        try:
            delivery = await self._producer.send_batch(batch, topic, partition=partition)
        except Exception as exc:  # noqa: BLE001 - kept as the batch's outcome
            log.warning("could not send a batch to %s[%d]: %r", topic, partition, exc)
            delivery = asyncio.get_running_loop().create_future()
            delivery.set_exception(exc)
        self._sent.append((delivery, records, first, batch.record_count()))

    def raise_delivered(self) -> None:
        """Forget the batches already acknowledged; raise the first delivery error among them."""
        while self._sent and self._sent[0][0].done():
            delivery, _, first, count = self._sent.popleft()
            self._tally(delivery, first, count)
            delivery.result()

    def _tally(self, delivery: asyncio.Future, first: int, count: int) -> None:
        """Count a settled batch as confirmed, or remember where the records it failed start."""
        if not delivery.cancelled() and delivery.exception() is None:
            self._confirmed += count
        elif self._first_failed is None or first < self._first_failed:
            self._first_failed = first

    def acknowledged(self) -> tuple[int, int]:
        """Of the records appended: how many the broker has confirmed, and how many of the first
        ones it confirmed every one of (records ``0`` to that number, less one, are all in).

        A batch not acknowledged yet counts as unconfirmed: call it once every batch sent has
        settled (after the producer's ``stop``, which waits for them) for the final count.
        """
        confirmed = self._confirmed
        unconfirmed = [self.appended] if self._first_failed is None else [self.appended, self._first_failed]
        for delivery, _, first, count in self._sent:
            if delivery.done() and not delivery.cancelled() and delivery.exception() is None:
                confirmed += count
            else:
                unconfirmed.append(first)
        unconfirmed += [first for batch, _, first in self._open.values() if batch.record_count()]
        return confirmed, min(unconfirmed)

    def abandon(self) -> None:
        """Forget every sent batch, its outcome taken (a failed one, unread, was "Future exception
        was never retrieved" at exit, once per batch, after the error that stopped a replay)."""
        sent, self._sent = self._sent, deque()
        for delivery, *_ in sent:
            if delivery.done():
                delivery.cancelled() or delivery.exception()
            else:
                delivery.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def wait_all(self) -> None:
        """Wait for every sent batch; raise the first delivery error."""
        while self._sent:
            await asyncio.wait([self._sent[0][0]])
            self.raise_delivered()

    async def confirm(self) -> list[OutRecord]:
        """Wait for every sent batch; the records of those the broker did not confirm."""
        sent, self._sent = list(self._sent), deque()
        results = await asyncio.gather(*(delivery for delivery, *_ in sent), return_exceptions=True)
        failed: list[OutRecord] = []
        for (delivery, records, first, count), res in zip(sent, results, strict=True):
            self._tally(delivery, first, count)
            if isinstance(res, BaseException):
                self.refused = True
                if records and isinstance(res, TopicAuthorizationFailedError):  # an ACL taken away, say
                    log.warning("batch of %d records to %s refused: the broker does not let this user write to it "
                                "(%r); grant it Write and Describe on the topic (docs/operations.md, Security). "
                                "Retried until it may", len(records), records[0][0], res)
                elif records:
                    log.warning("batch of %d records to %s not confirmed: %r", len(records), records[0][0], res)
                failed.extend(records)
        return failed


class BatchPublisher:
    """The worker's output: publish a micro-batch's records and wait for the broker's acknowledgements.

    Each micro-batch hashes its keys over the partition counts the producer's metadata has then
    (read without a round trip), and the producer asks the brokers for that metadata again every
    ``metadata_max_age_s`` in the background: partitions added to an output topic are used at
    most that long after they exist, as Kafka's default partitioner would, not only after a restart.
    """

    def __init__(self, bootstrap: str, linger_ms: int = 0, max_batch_bytes: int = 1 << 20, acks: int | str = "all",
                 request_timeout_ms: int = 30_000, enable_idempotence: bool = True,
                 client_options: Mapping[str, Any] | None = None, metadata_max_age_s: float = 10) -> None:
        """``client_options``: how the producer reaches the brokers beyond ``bootstrap``
        (``KafkaConnection.client_options()``: TLS, SASL). ``metadata_max_age_s``: how often the
        producer refreshes the topics' partitions (aiokafka's ``metadata_max_age_ms``, five
        minutes by default)."""
        self.bootstrap = bootstrap
        self._config = dict(
            bootstrap_servers=bootstrap, linger_ms=linger_ms, max_batch_size=max_batch_bytes, acks=acks,
            request_timeout_ms=request_timeout_ms, max_request_size=max(max_batch_bytes, 1 << 20),
            enable_idempotence=enable_idempotence, metadata_max_age_ms=int(metadata_max_age_s * 1000),
        )
        self._config.update(client_options or {})
        self._producer: AIOKafkaProducer | None = None  # made on start: aiokafka needs a running loop
        self._started = False
        self._start_lock = asyncio.Lock()

    async def start(self) -> None:
        async with self._start_lock:
            if not self._started:
                producer = AIOKafkaProducer(**self._config)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()  # closes its client; the next publish makes a new one
                    raise
                self._producer = producer
                self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._producer.stop()

    async def publish(self, records: Sequence[OutRecord]) -> list[OutRecord]:
        """Send all ``records``; return those the broker did not confirm (empty when all went through)."""
        if not records:
            return []
        await self.start()
        # a fresh RecordBatches per micro-batch: it takes each topic's partitions from the
        # producer's metadata as it is now (kept for good, a grown topic went on hashing over
        # its old count until a restart)
        batches = RecordBatches(self._producer, keep=True)
        failed: list[OutRecord] = []
        rr = 0
        parts_of: dict[str, list[int]] = {}
        append = batches.append
        for rec in records:
            topic, key, value = rec
            parts = parts_of.get(topic)
            if parts is None:
                parts = parts_of[topic] = await batches.partitions(topic)
            if key is None:
                partition = parts[rr % len(parts)]
                rr += 1
            else:
                partition = parts[murmur2_partition(key, len(parts))]
            if not append(topic, partition, key, value) and not await batches.add(topic, partition, key, value):
                log.error("a %d-byte record does not fit a batch; it is not published", len(value or b""))
                failed.append(rec)
        await batches.send_open()
        failed += await batches.confirm()
        if batches.refused and self._config["enable_idempotence"]:
            await self._renew()
        return failed

    async def _renew(self) -> None:
        """Stop the producer; the next publish starts a new one, with a new producer id. A batch
        that failed after it was sent took its sequence numbers, and the broker refuses every
        later batch of its partition from this producer with OutOfOrderSequenceNumber (after
        a broker outage longer than the request timeout, or a record over the topic's
        max.message.bytes): a worker stood still until it was restarted."""
        log.warning("renewing the Kafka producer after a batch that failed: with the same producer the "
                    "broker would refuse every later batch of its partition (OutOfOrderSequenceNumber)")
        async with self._start_lock:
            producer, self._started = self._producer, False
        try:  # every batch it sent is settled (confirm waited for them): nothing to flush
            await asyncio.wait_for(producer.stop(), 10)
        except Exception as exc:  # noqa: BLE001 - a producer that cannot stop cleanly is dropped all the same
            log.warning("the old Kafka producer did not stop cleanly: %r", exc)


__all__ = ["BatchPublisher", "OutRecord", "RecordBatches", "murmur2_partition"]
