"""A research contender for issue 15, not the worker: the worker's own handler (decoding, the
step, Redis, publishing) behind librdkafka (confluent-kafka) instead of Faust's consumer and
aiokafka's producer. It measures what the shell around the handler costs; it is not served.

What it keeps of the worker: ``BatchHandler.handle_isolated`` as the worker runs it (the same
step from the same settings, the same Redis store with its cache, the same records and dead
letters), micro-batches as ``take_batches`` makes them (the first event, then at most
``STREAMREC_BATCH_TIMEOUT_MS`` more to fill up to ``STREAMREC_BATCH_SIZE``), fetches of up to
1 MiB or ``STREAMREC_FETCH_MAX_WAIT_MS``, publishing with ``acks=all`` and idempotence,
offsets committed every second after their batch is handled, ``/metrics`` and ``/readyz`` on
``STREAMREC_METRICS_PORT``.

What it leaves out (so it is no worker): claims and fencing on rebalances, the models'
snapshots, replays, the peer reader (``STREAMREC_LEARN_ALL_PARTITIONS``), the catalogue,
the scorer's hot swap, lag metrics, drain on SIGTERM beyond the batch in hand. Run it with
``bench/pipeline_bench.py --worker cshell`` (one consumer group, a fresh prefix per run).

It needs confluent-kafka, which is not a dependency of the project:
``pip install confluent-kafka`` (2.16.1 measured).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

try:
    import confluent_kafka
except ImportError:  # pragma: no cover - a research script's extra
    sys.exit("bench/cshell_worker.py needs confluent-kafka: pip install confluent-kafka")

from prometheus_client import REGISTRY

from stream import gcpolicy, logs
from stream.app import worker_store
from stream.handler import BatchHandler, RawMessage
from stream.health import Health, serve
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.publisher import OutRecord
from stream.settings import Settings
from stream.shell import load_scorer
from stream.threads import one_blas_thread

log = logging.getLogger("streamrec.cshell")


def client_config(settings: Settings) -> dict:
    """librdkafka's settings for the local plaintext stack (the bench's)."""
    return {"bootstrap.servers": settings.kafka_bootstrap}


class Publisher:
    """The handler's ``publish``: produce every record, wait until the broker confirmed them
    all (librdkafka's threads send; ``flush`` waits without the interpreter's lock), return the
    ones it did not confirm."""

    def __init__(self, settings: Settings) -> None:
        self.producer = confluent_kafka.Producer({**client_config(settings), "acks": "all",
                                                  "enable.idempotence": True, "linger.ms": 0})

    async def publish(self, records: list[OutRecord]) -> list[OutRecord]:
        failed: list[OutRecord] = []
        produce = self.producer.produce
        for record in records:
            topic, key, value = record

            def done(err, _msg, record=record) -> None:
                if err is not None:
                    failed.append(record)

            produce(topic, value, key, on_delivery=done)
        self.producer.flush(30)
        return failed


class Shell:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(REGISTRY)
        self.health = Health()
        step = RecommendationStep.from_settings(settings, load_scorer(settings, self.metrics))
        self.store = worker_store(settings)
        self.publisher = Publisher(settings)
        self.handler = BatchHandler(step, self.store, self.publisher.publish, settings.topics, self.metrics,
                                    health=self.health, bounds=settings.bounds)
        self.consumer = confluent_kafka.Consumer({
            **client_config(settings), "group.id": settings.app_id, "auto.offset.reset": "earliest",
            "enable.auto.commit": True, "auto.commit.interval.ms": 1000, "enable.auto.offset.store": False,
            "fetch.min.bytes": 1 << 20, "fetch.wait.max.ms": settings.fetch_max_wait_ms or 1,
            "session.timeout.ms": int(settings.session_timeout_s * 1000)})
        self.stopping = False

    def on_assign(self, consumer, partitions) -> None:
        log.info("assigned %d partition(s)", len(partitions))
        self.health.set("kafka", True, f"{len(partitions)} partition(s) assigned")

    def on_revoke(self, consumer, partitions) -> None:
        self.health.set("kafka", False, "consumer group rebalancing")

    def take(self) -> list:
        """A micro-batch as ``take_batches`` makes it."""
        settings = self.settings
        first = self.consumer.consume(1, 0.2)
        if not first:
            return []
        # from the first event's arrival, as take_batches counts it: librdkafka keeps no arrival
        # time, so the record's timestamp (the producer's clock, on this machine) stands for it
        kind, ts_ms = first[0].timestamp()
        within = settings.batch_timeout_ms / 1000
        deadline = (ts_ms / 1000 if kind != confluent_kafka.TIMESTAMP_NOT_AVAILABLE else time.time()) + within
        batch = list(first)
        while len(batch) < settings.batch_size:
            remaining = deadline - time.time()
            if remaining <= 0:
                batch += self.consumer.consume(settings.batch_size - len(batch), 0)
                break
            batch += self.consumer.consume(settings.batch_size - len(batch), remaining)
        return batch

    async def run(self) -> None:
        await self.store.ping()
        self.health.set("redis", True, "PING answered")
        self.consumer.subscribe(list(self.settings.topics.consumed), on_assign=self.on_assign,
                                on_revoke=self.on_revoke)
        health = self.health
        while not self.stopping:
            health.beat()
            health.checked()
            batch = self.take()
            good = []
            for msg in batch:
                if msg.error() is None:
                    good.append(msg)
                elif not msg.error().code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", msg.error())
            if not good:
                continue
            raw = [RawMessage(m.topic(), m.partition(), m.offset(), m.key(), m.value(), m.timestamp()[1])
                   for m in good]
            await self.handler.handle_isolated(raw)
            highest: dict[tuple[str, int], int] = {}
            for m in good:
                highest[m.topic(), m.partition()] = m.offset()  # in offset order within a partition
            self.consumer.store_offsets(offsets=[confluent_kafka.TopicPartition(t, p, o + 1)
                                                 for (t, p), o in highest.items()])
        self.consumer.close()
        self.publisher.producer.flush(10)


def main() -> None:
    settings = Settings.from_env()
    logs.configure("INFO", settings.log_format)
    gcpolicy.configure(freeze=settings.gc_freeze)
    one_blas_thread()
    shell = Shell(settings)
    if settings.metrics_port:
        serve(settings.metrics_port, REGISTRY, shell.health)

    def stop(*_) -> None:
        shell.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    asyncio.run(shell.run())


if __name__ == "__main__":
    main()
