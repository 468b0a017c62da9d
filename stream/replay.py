"""After a restart, teach the models what they lost: the events between their snapshot and the
consumer group's committed offsets.

A snapshot of the online models records, per input partition, the highest offset they had
learned (``Recommender.learned_offsets``). When a worker restarts (after a crash, a kill -9,
a deploy), it restores the newest snapshot, which may be minutes old, while Kafka resumes
from the committed offsets, which are seconds old: the events in between were applied to the
users' state (Redis) but the restored models never learned them, and Kafka does not deliver
them again. :func:`replay` reads them straight from the partitions (a consumer of its own, no
group) and has :meth:`RecommendationStep.relearn <stream.pipeline.RecommendationStep.relearn>`
teach them to the models only. Events at and after the committed offsets come through the
agent as usual; those the state already holds and the models do not are learned there
(``learn only``).

Forget requests of the gaps (the forget topic is consumed with the inputs) are applied again
too, before the events of the same fetch, and the models refuse a forgotten user's older
events (stream/pipeline.py): a restart from a snapshot taken before an erasure does not bring
the user back.

A value that does not decode (a dead letter at the time) is passed over again; the wall-clock
``ts`` window is not applied, since the time of the original decision is gone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from aiokafka import TopicPartition

from stream.connections import KafkaConnection, started_reader
from stream.decoding import decode_event, decode_forget
from stream.pipeline import RecommendationStep
from stream.pseudonyms import Pseudonyms
from stream.records import Bounds
from stream.step_inputs import source_of

log = logging.getLogger("streamrec.replay")

#: records handed to the models per call (in a thread: the event loop keeps serving)
CHUNK = 2000
#: the longest fetch wait, after which the reader's positions are looked at
POLL_S = 1.0


@dataclass(frozen=True)
class Gap:
    """Offsets ``[start, end)`` of one partition that the models have not learned."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def gaps(learned: Mapping[str, int], committed: Mapping[tuple[str, int], int],
         from_start: Collection[str] = ()) -> list[Gap]:
    """The partitions whose committed offset is past what the models learned, and by how much.

    Only partitions the models' snapshot knows are replayed: one it never saw (a new
    partition, or one another worker learned) starts with the models as they are. (A snapshot
    knows every input partition its worker owned, learned from or not: the shell starts each at
    the committed offset, ``Shell._replay``.) Except for
    the topics of ``from_start`` (the forget requests): one of their partitions the snapshot
    never saw is replayed from the beginning, since a request the group committed after the
    snapshot was taken must reach the restored models.

    >>> gaps({"clicks:0": 9, "clicks:1": 40}, {("clicks", 0): 25, ("clicks", 1): 41, ("clicks", 2): 7})
    [Gap(topic='clicks', partition=0, start=10, end=25)]
    >>> gaps({}, {("forget", 0): 3, ("clicks", 0): 5}, from_start=("forget",))
    [Gap(topic='forget', partition=0, start=0, end=3)]
    """
    out = []
    for (topic, partition), end in sorted(committed.items()):
        seen = learned.get(source_of(topic, partition))
        if seen is None and topic in from_start:
            seen = -1
        if seen is not None and end > seen + 1:
            out.append(Gap(topic, partition, seen + 1, end))
    return out


async def replay(step: RecommendationStep, bootstrap: KafkaConnection | str, todo: Sequence[Gap], bounds: Bounds,
                 fetch_timeout_s: float = 30.0, pseudonyms: Pseudonyms | None = None,
                 forget_topic: str | None = None, stop: Callable[[], bool] | None = None,
                 on_forget: Callable[[int], None] | None = None) -> int:
    """Teach the models every event of ``todo``; returns how many they learned. ``bootstrap``:
    ``Settings.kafka`` (or bootstrap servers alone for a plaintext broker); ``pseudonyms``: the
    worker's (``STREAMREC_PSEUDONYM_KEY``), so that the models learn the ids the live step does.
    ``stop``: asked between fetches (at least once a second); once true, the replay ends where it
    is, and the models' learned offsets say where a later one starts. ``on_forget(n)``: called
    after the models applied ``n`` forget requests of the gaps (the worker then snapshots them
    soon: the snapshot in the store, which it restored, may still hold those users)."""
    if not todo:
        return 0
    rereading = bounds.rereading()  # a ts too far ahead stays refused; its age was judged when it arrived
    consumer = await started_reader(KafkaConnection.of(bootstrap).client_options(), CHUNK)
    learned = 0
    seen: set[tuple[str, str]] = set()
    try:
        ends = {TopicPartition(g.topic, g.partition): g.end for g in todo}
        consumer.assign(list(ends))
        for g in todo:
            consumer.seek(TopicPartition(g.topic, g.partition), g.start)
        open_ = set(ends)
        progress_at = time.monotonic()
        while open_:
            if stop is not None and stop():
                return learned
            batch = await consumer.getmany(*open_, timeout_ms=int(min(POLL_S, fetch_timeout_s) * 1000))
            if not batch:
                # offsets with no record behind them (a transactional producer's markers, a
                # truncated stretch) move the position without a record
                for tp in list(open_):
                    if await consumer.position(tp) >= ends[tp]:
                        open_.discard(tp)
                if open_ and time.monotonic() - progress_at > fetch_timeout_s:
                    raise TimeoutError(f"no records from {sorted(map(str, open_))} within {fetch_timeout_s:g} s")
                continue
            progress_at = time.monotonic()
            events, positions = [], []
            forgets, forget_positions = [], []
            for tp, records in batch.items():
                for rec in records:
                    if rec.offset >= ends[tp]:
                        break
                    if tp.topic == forget_topic:
                        try:  # with the clock window: a request the owner dead-lettered stays refused
                            forgets.append(decode_forget(rec.value, rereading, time.time_ns() // 1_000_000))
                        except Exception:  # noqa: BLE001 - InvalidEvent, or a decoder's bug: dead-lettered by the owner
                            continue
                        forget_positions.append((source_of(tp.topic, tp.partition), rec.offset))
                        continue
                    try:  # with the clock window: an event the owner dead-lettered stays refused
                        events.append(decode_event(rec.value, rereading, time.time_ns() // 1_000_000))
                    except Exception:  # noqa: BLE001 - InvalidEvent, or a decoder's bug: dead-lettered by the owner
                        continue
                    positions.append((source_of(tp.topic, tp.partition), rec.offset))
                if records and (records[-1].offset + 1 >= ends[tp] or await consumer.position(tp) >= ends[tp]):
                    open_.discard(tp)
            if forgets:
                if pseudonyms is not None:
                    forgets = pseudonyms.events(forgets)[0]
                for req, exc in step.forget(forgets, forget_positions, time.time_ns() // 1_000_000):
                    log.error("forget request %r, replayed: the models could not purge everything of the user (%s); "
                              "a model may still hold part of them (a bug)", req.request_id, exc)
                if on_forget is not None:
                    on_forget(len(forgets))
            if events:
                if pseudonyms is not None:
                    events = pseudonyms.events(events)[0]
                # as of this worker's clock, as the live step learns an event dated after it
                learned += await asyncio.to_thread(step.relearn, events, positions, seen, time.time_ns() // 1_000_000)
        step.advance([(source_of(g.topic, g.partition), g.end - 1) for g in todo])  # dead letters included
    finally:
        await consumer.stop()
    return learned


__all__ = ["CHUNK", "Gap", "gaps", "replay"]
