"""How far behind a worker is: consumer lag per input partition, and the scorer model's age.

``update_lag(app, lag)`` runs inside the worker (a Faust timer every few seconds). For each
input partition assigned to this worker it reads the log-end offset (the *high watermark*)
and the committed offset of the consumer group, and sets::

    streamrec_consumer_lag{topic,partition}               high watermark - committed offset
    streamrec_consumer_committed_offset{topic,partition}  next offset the group will read
    streamrec_consumer_highwater_offset{topic,partition}  offset the next produced event gets

Committed offsets follow Kafka's convention (the next offset to read), so a partition whose
every event is handled and committed has lag 0. Except one written by a transactional
producer (a site's): each transaction ends with a commit marker, an offset that holds no event
and is never handed over, and the group commits the offset after the last event it handled,
which is the marker's; such a partition shows a lag of 1 when every event is handled, until the
next transaction's events come. Before this worker's first commit on a
partition the consumer's fetch position stands in for it. Partitions that a rebalance took
away from this worker are removed from the gauges, so ``sum(streamrec_consumer_lag)`` over
all workers counts each partition once.

The model's age is exported as the creation time of the scorer version in use (from its
registry manifest), ``streamrec_scorer_model_created_timestamp_seconds``; alert rules
compare it with ``time()``. A timestamp rather than an age: it is right whenever scraped.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> lag = LagMetrics(registry)
>>> lag.set_partition("streamrec.clicks", 0, highwater=120, committed=100)
>>> registry.get_sample_value("streamrec_consumer_lag", {"topic": "streamrec.clicks", "partition": "0"})
20.0
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger("streamrec.lag")


class LagMetrics:
    """The lag and model-age gauges, built from an injected registry (see stream/prometheus.py)."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "streamrec") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, namespace
        labels = ["topic", "partition"]
        self.lag = Gauge("consumer_lag", "Events in the partition not yet handled and committed by the group (high watermark - committed offset)", labels, namespace=ns, registry=r)
        self.committed = Gauge("consumer_committed_offset", "The consumer group's committed offset (next offset to read)", labels, namespace=ns, registry=r)
        self.highwater = Gauge("consumer_highwater_offset", "The partition's high watermark (offset of the next event produced)", labels, namespace=ns, registry=r)
        self.model_created = Gauge("scorer_model_created_timestamp_seconds", "Creation time of the Transformer scorer version in use (registry manifest)", ["version"], namespace=ns, registry=r)
        self._partitions: set[tuple[str, str]] = set()
        self._scorer_seen: tuple[int, str | None] | None = None  # (id(scorer), version) last read

    def set_partition(self, topic: str, partition: int, *, highwater: int, committed: int) -> None:
        key = (topic, str(partition))
        self.highwater.labels(*key).set(highwater)
        self.committed.labels(*key).set(committed)
        self.lag.labels(*key).set(max(0, highwater - committed))
        self._partitions.add(key)

    def keep_only(self, partitions: Iterable[tuple[str, int]]) -> None:
        """Drop the series of partitions no longer assigned to this worker."""
        keep = {(topic, str(p)) for topic, p in partitions}
        for key in self._partitions - keep:
            for gauge in (self.lag, self.committed, self.highwater):
                try:
                    gauge.remove(*key)
                except KeyError:
                    pass
        self._partitions &= keep

    def set_model_created(self, version: str | None, created: str | float | None) -> None:
        """The scorer version in use and its creation time (ISO 8601 text or epoch seconds)."""
        self.model_created.clear()
        if version is None or created is None:
            return
        if isinstance(created, int | float):
            ts = float(created)
        else:
            when = datetime.fromisoformat(str(created))
            ts = (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
        self.model_created.labels(version).set(ts)

    def set_scorer(self, scorer: Any) -> None:
        """Read the creation time from a ``HotSwapScorer``'s registry manifest (None: no scorer).

        Cheap to call on every timer tick: the manifest is read only when the version changed.
        """
        version = getattr(scorer, "version", None)
        seen = (id(scorer), version, getattr(scorer, "swaps", 0))  # a swap to another model of the same name too
        if seen == self._scorer_seen:
            return
        self._scorer_seen = seen
        if scorer is None:
            self.set_model_created(None, None)
            return
        try:
            created = scorer.registry.manifest(scorer.version).get("created")
        except Exception as exc:  # noqa: BLE001 - a metric must never take the worker down
            log.warning("scorer %s: no creation time in its manifest (%s)", getattr(scorer, "version", "?"), exc)
            created = None
        self.set_model_created(scorer.version, created)


async def update_lag(app: Any, lag: LagMetrics, topics: Iterable[str] | None = None) -> dict[tuple[str, int], int]:
    """Set the lag gauges for the input partitions assigned to ``app``'s consumer.

    ``topics`` limits the partitions to these topic names (default: every topic the app's
    agents read). Returns ``{(topic, partition): lag}``. A consumer that is not started yet
    or is rebalancing leaves the gauges as they are and returns ``{}``.
    """
    consumer = app.consumer
    wanted = set(topics) if topics is not None else _agent_topics(app)
    try:
        assigned = sorted(tp for tp in consumer.assignment() if not wanted or tp.topic in wanted)
    except Exception as exc:  # noqa: BLE001 - ConsumerNotStarted before the first rebalance
        log.debug("consumer lag: no assignment yet (%s)", exc)
        return {}
    highwaters: dict[Any, int | None] = {}
    for tp in assigned:
        try:
            highwaters[tp] = consumer.highwater(tp)  # from the last fetch response: no request
        except Exception:  # noqa: BLE001
            highwaters[tp] = None
    missing = [tp for tp in assigned if highwaters[tp] is None]
    if missing:  # nothing fetched from them yet: ask the broker for their end offsets
        try:
            highwaters.update(await consumer.highwaters(*missing))
        except Exception as exc:  # noqa: BLE001 - a broker hiccup: try again next time
            log.debug("consumer lag: end offsets unavailable (%s)", exc)
    committed_offsets = getattr(consumer, "_committed_offset", {})  # faust keeps it per TP
    out: dict[tuple[str, int], int] = {}
    for tp in assigned:
        highwater = highwaters.get(tp)
        if highwater is None:
            continue
        committed = committed_offsets.get(tp)
        if committed is None:
            try:
                committed = await consumer.position(tp)
            except Exception:  # noqa: BLE001
                committed = None
        if committed is None:
            continue
        lag.set_partition(tp.topic, tp.partition, highwater=int(highwater), committed=int(committed))
        out[(tp.topic, tp.partition)] = max(0, int(highwater) - int(committed))
    lag.keep_only((tp.topic, tp.partition) for tp in assigned)
    return out


def _agent_topics(app: Any) -> set[str]:
    """Names of the topics the app's agents consume (not Faust's internal ones)."""
    names: set[str] = set()
    try:
        for agent in app.agents.values():
            names.update(getattr(agent.channel, "topics", ()) or ())
    except Exception:  # noqa: BLE001 - unknown app shape: no filter
        return set()
    return names
