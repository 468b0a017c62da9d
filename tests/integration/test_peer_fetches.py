"""How often the peer reader (stream/peers.py) asks the broker for the other workers' events.

With aiokafka's fetch of 1 byte, the broker answered each of the producers' small batches with a
fetch of its own: at a steady rate, a round trip (about a millisecond of the worker's CPU, and
the broker's) for every few events. While events flow the reader now waits for
``PEER_FETCH_MIN_BYTES`` or ``PEER_FETCH_WAIT_MS``; while nothing comes it asks twice a second and
gets the first event after a quiet spell at once. On a real broker, counting the reader's fetch
requests."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from workerkit import until

from online_models import Recommender
from stream import peers as peers_module
from stream.peers import PEER_FETCH_WAIT_MS, PeerLearner
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import DEFAULT_BOUNDS, ClickEvent, encode
from stream.topics import ensure_topics

#: records sent one at a time, each its own producer request, as a site's trickle
TRICKLE = 300
#: a record every this many seconds
GAP_S = 0.005


async def test_a_steady_trickle_is_fetched_in_few_round_trips_and_an_idle_reader_asks_rarely(
        kafka_bootstrap, topic_prefix, monkeypatch):
    clicks = f"{topic_prefix}clicks"
    ensure_topics(kafka_bootstrap, [clicks], 2)
    fetches: list[float] = []  # when each fetch request of the reader came back
    started = peers_module.started_reader

    async def counted_reader(*args, **kwargs):
        consumer = await started(*args, **kwargs)
        fetcher = consumer._fetcher
        fetch = fetcher._proc_fetch_request

        async def counting(assignment, node_id, request):
            try:
                return await fetch(assignment, node_id, request)
            finally:
                fetches.append(time.monotonic())

        fetcher._proc_fetch_request = counting  # under the reader's own wrapper (adapt_fetches)
        return consumer

    monkeypatch.setattr(peers_module, "started_reader", counted_reader)
    step = RecommendationStep(Recommender.default())
    reader = PeerLearner(step, {"bootstrap_servers": kafka_bootstrap}, [clicks], DEFAULT_BOUNDS, asyncio.Lock(),
                         Metrics(CollectorRegistry()), committed=dict)
    reader.assign({(clicks, 0)}, {clicks: range(2)})  # another worker owns partition 1: read it
    ready = asyncio.Event()
    ready.set()
    reading = asyncio.create_task(reader.run(ready))
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=0)
    await producer.start()
    try:
        learned = lambda n: step.recommender.learned_offsets.get(f"{clicks}:1", -1) >= n - 1  # noqa: E731
        await until(lambda: reader.reading, "the reader reading partition 1", reading)
        # idle: the reader asks about twice a second (1 byte or 500 ms), not every 50 ms
        idle_from = time.monotonic()
        await asyncio.sleep(1.6)
        idle = [t for t in fetches if t > idle_from]
        assert len(idle) <= 6, f"{len(idle)} fetches in 1.6 s with nothing to read"
        # the first event after the quiet spell is fetched at once
        now = time.time_ns() // 1_000_000
        sent_at = time.monotonic()
        await producer.send_and_wait(clicks, encode(ClickEvent(event_id="e-first", user_id="u1", item_id="i0",
                                                               ts=now)), key=b"u1", partition=1)
        await until(lambda: learned(1), "the first event learned", reading)
        assert time.monotonic() - sent_at < 0.4, "the first event after a quiet spell waited for a long poll"
        # a steady trickle: one record every 5 ms, each its own request
        trickle_from = time.monotonic()
        for i in range(1, TRICKLE + 1):
            await producer.send_and_wait(clicks, encode(ClickEvent(event_id=f"e{i}", user_id=f"u{i % 7}",
                                                                   item_id=f"i{i % 11}", ts=now + i)),
                                         key=f"u{i % 7}".encode(), partition=1)
            await asyncio.sleep(GAP_S)
        trickle_s = time.monotonic() - trickle_from
        await until(lambda: learned(TRICKLE + 1), "every event of the trickle learned", reading)
        during = [t for t in fetches if trickle_from <= t <= trickle_from + trickle_s]
        most = trickle_s / (PEER_FETCH_WAIT_MS / 1000) * 1.5 + 5
        assert len(during) <= most, (f"{len(during)} fetches for {TRICKLE} records sent one by one over "
                                     f"{trickle_s:.1f} s (at most {most:.0f}: one per {PEER_FETCH_WAIT_MS} ms)")
        assert step.recommender.n_learned == TRICKLE + 1
    finally:
        await producer.stop()
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
