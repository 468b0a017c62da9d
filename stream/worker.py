"""The worker's I/O shell around the pure step: decode, load, step, publish, save.

:class:`BatchHandler` knows nothing of Faust; the agent in :mod:`stream.app` hands it raw
messages and acknowledges them only after :meth:`BatchHandler.handle` has returned, so
offsets are committed only after an event's effects (state, learning, publication) are
done. Transient Redis and Kafka failures are retried with back-off inside ``handle`` and
never escape it, so a failing call can never let a batch be acknowledged half-done.

Order of effects in a batch: publish recommendations and dead letters, wait for Kafka to
confirm them, then save user state (with the applied event ids) in one Redis
transaction. A crash between the two re-delivers the batch: the state does not yet hold
those event ids, so each event is applied exactly once and its recommendation is sent
again (at-least-once output, keyed by ``trigger_event_id``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from stream.errors import InvalidEvent
from stream.metrics import Metrics
from stream.pipeline import LIVE_CUTOFFS, RecommendationStep
from stream.records import DeadLetter, Event, dead_letter, decode_event, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import UserStateStore

log = logging.getLogger("streamrec.worker")

OutRecord = tuple[str, bytes | None, bytes]  # topic, key, value
# publish(records) -> the records the broker did not confirm (stream.publisher.BatchPublisher.publish)
Publish = Callable[[list[OutRecord]], Awaitable[list[OutRecord]]]


@dataclass(frozen=True, slots=True)
class RawMessage:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None


#: batches at least this big run the step in a thread (see BatchHandler.handle). Measured on
#: 40,000 Taobao events replayed from a backlog: 1,280 events/s with the step on the event
#: loop (batches stayed at ~22 events), 2,123 in a thread (~480).
THREAD_MIN_EVENTS = 64


#: a batch slower than this is logged with its stages (at most once per ``SLOW_LOG_EVERY_S``)
SLOW_BATCH_S = 0.1
SLOW_LOG_EVERY_S = 10.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class BatchHandler:
    def __init__(
        self,
        step: RecommendationStep,
        store: UserStateStore,
        publish: Publish,
        topics: TopicNames,
        metrics: Metrics,
        backoff: Backoff | None = None,
    ) -> None:
        self.step = step
        self.store = store
        self.publish = publish
        self.topics = topics
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.batches = 0
        self.events_applied = 0
        self._slow_logged_at = float("-inf")
        self._slow_since_log = 0

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        m = self.metrics
        clock = time.perf_counter
        t0 = clock()
        events: list[Event] = []
        positions: list[tuple[str, int]] = []
        dead: list[tuple[bytes | None, DeadLetter]] = []
        for msg in messages:
            try:
                events.append(decode_event(msg.value))
                positions.append((f"{msg.topic}:{msg.partition}", msg.offset))
            except InvalidEvent as exc:
                dead.append((msg.key, dead_letter(exc, msg.value, msg.topic, msg.partition, msg.offset, now_ms())))
                m.events_invalid.labels(exc.code).inc()
        t1 = clock()

        users = list(dict.fromkeys(ev.user_id for ev in events))
        states = await self._retry("load", lambda: self.store.load_many(users), m.redis_errors) if users else {}
        t2 = clock()

        if len(events) >= THREAD_MIN_EVENTS:
            # a big batch means a backlog: in a thread, the event loop keeps fetching the next
            # batch (Faust hands each message over in several loop turns) while the models
            # work; the step is not shared meanwhile
            result = await asyncio.to_thread(self.step, events, states, now_ms, positions)
        else:  # a small one: a thread would only add GIL hand-offs to its latency
            result = self.step(events, states, now_ms, positions)
        t3 = clock()

        out: list[OutRecord] = [
            (self.topics.recommendations, rec.user_id.encode(), encode(rec)) for rec in result.recommendations
        ]
        out += [(self.topics.dlq, key, encode(letter)) for key, letter in dead]
        await self._publish(out)
        published_ms = now_ms()
        t4 = clock()

        if result.states:
            await self._retry("save", lambda: self.store.save_many(result.states), m.redis_errors)
        t5 = clock()

        # metrics, once the batch's effects are durable
        m.batch_size.observe(len(messages))
        for kind, n in Counter(ev.type for ev in result.applied).items():  # one labels() per type, not per event
            m.events_consumed.labels(kind).inc(n)
        if result.applied:
            newest = max(ev.ts for ev in result.applied)
            m.last_event_ts.set(newest / 1000)
        m.duplicates_skipped.inc(result.duplicates)
        m.recommendations_published.inc(len(result.recommendations))
        m.dead_letters_published.inc(len(dead))
        for rec in result.recommendations:
            m.end_to_end_seconds.observe(max(0, published_ms - rec.event_ts) / 1000)
        stages = {"decode": t1 - t0, "state_load": t2 - t1, **result.timings, "publish": t4 - t3, "state_save": t5 - t4}
        for name, seconds in stages.items():
            m.stage_seconds.labels(name).observe(seconds)
        m.stage_seconds.labels("batch").observe(t5 - t0)
        live = result.live
        if live.judged:
            m.live_judged.inc(live.judged)
            for k in LIVE_CUTOFFS:
                m.live_hits.labels(str(k)).inc(live.hits[k])
            m.live_reciprocal_rank.inc(live.reciprocal_rank_sum)
        self.batches += 1
        self.events_applied += len(result.applied)
        if t5 - t0 > SLOW_BATCH_S:
            self._log_slow(len(messages), stages, t5 - t0)

    def _log_slow(self, n: int, stages: dict[str, float], seconds: float) -> None:
        self._slow_since_log += 1
        now = time.monotonic()
        if now - self._slow_logged_at < SLOW_LOG_EVERY_S:
            return
        parts = ", ".join(f"{name} {s * 1000:.0f}" for name, s in stages.items())
        log.warning("slow batch: %d events in %.0f ms (%s ms); %d batch(es) over %.0f ms since the last such line",
                    n, seconds * 1000, parts, self._slow_since_log, SLOW_BATCH_S * 1000)
        self._slow_logged_at, self._slow_since_log = now, 0

    async def _publish(self, records: list[OutRecord]) -> None:
        """Publish every record and return once the broker confirmed all of them; resend what failed."""
        delays = self.backoff.delays()
        pending = records
        while pending:
            try:
                pending = await self.publish(pending)
            except Exception as exc:  # the producer itself failed (not started, connection lost)
                log.warning("publishing %d records failed (%r); will retry", len(pending), exc)
            if pending:
                self.metrics.kafka_errors.labels("publish").inc()
                await asyncio.sleep(next(delays))

    async def _retry(self, op: str, call: Callable[[], Awaitable], errors) -> object:
        delays = self.backoff.delays()
        while True:
            try:
                return await call()
            except (ConnectionError, TimeoutError, OSError) as exc:
                errors.labels(op).inc()
                delay = next(delays)
                log.warning("redis %s failed (%r); retrying in %.2fs", op, exc, delay)
                await asyncio.sleep(delay)
            except Exception as exc:
                if type(exc).__module__.startswith("redis"):
                    errors.labels(op).inc()
                    delay = next(delays)
                    log.warning("redis %s failed (%r); retrying in %.2fs", op, exc, delay)
                    await asyncio.sleep(delay)
                else:
                    raise
