"""The worker's I/O shell around the pure step: decode, load, step, publish, save.

:class:`BatchHandler` knows nothing of Faust; the agent in :mod:`stream.app` hands it raw
messages and acknowledges them only after :meth:`BatchHandler.handle` has returned, so
offsets are committed only after an event's effects (state, learning, publication) are
done. Transient Redis and Kafka failures are retried with back-off inside ``handle`` and
never escape it, so a failing call can never let a batch be acknowledged half-done; while
they fail, the worker reports unready (``Health``) and says why.

Order of effects in a batch: publish recommendations and dead letters, wait for Kafka to
confirm them, then save user state (with the applied event ids) in one Redis
transaction. A crash between the two re-delivers the batch: the state does not yet hold
those event ids, so each event is applied exactly once and its recommendation is sent
again (at-least-once output, keyed by ``trigger_event_id``).

**Bad input and bugs are data, not crashes.** A value that breaks the contract, or whose
decoding raises anything at all, is dead-lettered with a code; an event that the step
cannot handle comes back from it as a failure and is dead-lettered as ``processing_error``
(stream/pipeline.py). Should anything else in ``handle`` raise, :meth:`handle_isolated`
splits the batch and handles the halves, down to single messages, which are
dead-lettered: every other event is still applied once, and the models' watermark
(``Recommender.learned_offsets``) keeps a second attempt from teaching them an event twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from stream.decoding import decode_event, decode_forget, decode_impression, decode_search
from stream.errors import InvalidEvent, described, redis_advice
from stream.experiments import GROUP_FIELDS, shown, variance_group
from stream.health import Health
from stream.logs import ClippedTracebacks, Thinned
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms
from stream.publisher import OutRecord
from stream.records import (
    DEFAULT_BOUNDS,
    Bounds,
    DeadLetter,
    Event,
    ForgetRequest,
    dead_letter,
    dead_letter_record,
)
from stream.retry import Backoff
from stream.search_step import SearchStep
from stream.settings import TopicNames
from stream.state import (
    Fenced,
    StateConflict,
    UserState,
    UserStateStore,
    align_incarnation,
    encode_state,
)
from stream.step_inputs import source_of
from stream.step_results import LIVE_CUTOFFS, StepResult, exception_text

log = logging.getLogger("streamrec.worker")
# the tracebacks of what raised while handling events quote each exception's text cut short,
# as its dead letter does: a bug's exception may carry a 1 MB value or a user's text whole
log.addFilter(ClippedTracebacks())
#: the warning about records keyed by something other than their user_id: at most one a minute
#: for each topic (a producer keying them wrong sends such records all the time)
_key_log = logging.getLogger("streamrec.worker.keys")
_key_log.addFilter(Thinned(60.0))

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
    #: the consumer group generation the message was fetched in (fencing)
    generation: int = 0

    @property
    def position(self) -> tuple[str, int]:
        """``(source, offset)``, as the step and the models' watermark name it."""
        return source_of(self.topic, self.partition), self.offset


#: batches of at least this many searches are searched in a thread (the text model runs outside
#: the interpreter's lock, so the event loop goes on meanwhile). The recommendation step runs on
#: the event loop whatever its batch's size: see BatchHandler.handle.
THREAD_MIN_SEARCHES = 64


#: most times a batch's events are applied again to the states another writer saved meanwhile
#: (BatchHandler._save); each is one more load and save of those users only
MERGES = 5

#: a batch slower than this is logged with its stages (at most once per ``SLOW_LOG_EVERY_S``)
SLOW_BATCH_S = 0.1
SLOW_LOG_EVERY_S = 10.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def _decode_each(messages: Sequence[RawMessage], decode: Callable, bounds: Bounds, now: int
                 ) -> tuple[list, list[RawMessage], list[tuple[RawMessage, DeadLetter]]]:
    """``decode(value, bounds, now)`` of every message: the values, the messages they came
    from, and a dead letter for each value that breaks the contract or whose decoding raises
    anything at all (a decoder bug is that value's problem alone)."""
    values: list = []
    kept: list[RawMessage] = []
    dead: list[tuple[RawMessage, DeadLetter]] = []
    for msg in messages:
        try:
            values.append(decode(msg.value, bounds, now))
        except InvalidEvent as exc:
            dead.append((msg, dead_letter(exc, msg.value, msg.topic, msg.partition, msg.offset, now)))
            continue
        except Exception as exc:  # noqa: BLE001 - see the docstring
            dead.append((msg, _failure_letter("processing_error", f"decoding the value raised {type(exc).__name__}: {exception_text(exc)}", msg)))
            continue
        kept.append(msg)
    return values, kept, dead


def _failure_letter(code: str, reason: str, msg: RawMessage) -> DeadLetter:
    return dead_letter(InvalidEvent(code, reason), msg.value, msg.topic, msg.partition, msg.offset, now_ms())


def _marked_shown(stored: dict[str, UserState], marked: dict[str, list[str]]) -> dict[str, bytes]:
    """The documents of the users of ``stored`` (what another writer saved since an impressions
    batch loaded them) with the lists ``marked`` shown by that batch marked again, one save
    more than the stored one. Counted once already: not counted again."""
    out = {}
    for uid, state in stored.items():
        state = state.copy()
        for rec_id in marked.get(uid, ()):
            shown(state.recs, rec_id)
        state.version += 1
        out[uid] = encode_state(state)
    return out


class BatchHandler:
    def __init__(
        self,
        step: RecommendationStep,
        store: UserStateStore,
        publish: Publish,
        topics: TopicNames,
        metrics: Metrics,
        backoff: Backoff | None = None,
        health: Health | None = None,
        bounds: Bounds = DEFAULT_BOUNDS,
        claims: Claims | None = None,
        pseudonyms: Pseudonyms | None = None,
    ) -> None:
        self.step = step
        self.store = store
        self.publish = publish
        self.topics = topics
        self.metrics = metrics
        self.backoff = backoff or Backoff()
        self.health = health
        self._state_failing = False  # the "state" condition is down: the next call that works restores it
        self.bounds = bounds
        self.claims = claims
        self.pseudonyms = pseudonyms  # None: the models and the state keep the site's user ids
        #: called after a batch erased users (the shell snapshots the models soon, so that the
        #: snapshot in the store no longer holds them either)
        self.on_forget: Callable[[int], None] | None = None
        #: answers the searches (the shell gives it the worker's catalogue: stream/search_step.py)
        self.search = SearchStep(step)
        self._side = frozenset((topics.forget, topics.impressions, topics.searches))  # not events: handled apart, first
        #: the :func:`~stream.state.incarnation` of the input topics as the broker names them now
        #: (the shell sets it at each assignment; None: not known, offsets are taken as they are)
        self.incarnation: str | None = None
        self.offsets_reset = 0  # loaded states whose offsets counted in a topic deleted and created again
        self._reset_said: str | None = None
        self.batches = 0
        self.events_applied = 0
        self._rebuilt_seen = 0
        self._reset_seen = 0
        self._slow_logged_at = float("-inf")
        self._slow_since_log = 0
        self._group_children: dict[tuple[str, int, str], Any] = {}  # streamrec_experiment_groups_total, by labels

    async def handle_isolated(self, messages: Sequence[RawMessage]) -> None:
        """:meth:`handle`, and where it raises (a bug: bad input and failing events are dead
        letters already), the two halves of the batch apart, down to single messages, which
        are dead-lettered as ``processing_error``. :class:`Fenced` passes through: the batch
        belongs to another worker now."""
        messages = await self._side_topics(messages)  # once, before the events: never split and done again
        if messages:
            await self._isolated(self.handle, messages)

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        messages = await self._side_topics(messages)
        if not messages:
            return
        clock = time.perf_counter
        t0 = clock()
        now = now_ms()
        events: list[Event]
        events, carriers, dead = _decode_each(messages, decode_event, self.bounds, now)  # carriers: each event's message
        positions = [msg.position for msg in carriers]
        self._distrust_misrouted(events, carriers)
        site_ids: dict[str, str] | None = None  # pseudonym -> the id the site sent
        if self.pseudonyms is not None and events:
            events, site_ids = self.pseudonyms.events(events)
        t1 = clock()

        fence = await self._fence(messages) if self.claims is not None and events else None
        users = list(dict.fromkeys(ev.user_id for ev in events))
        states = await self._load(users) if users else {}
        t2 = clock()

        # on the event loop, whatever the batch's size. In a thread (batches of 64 events or
        # more, until 2026-12-02) the step shared the interpreter's lock with the loop's
        # fetching, so a batch took longer the larger it was, and the next one came larger
        # still: one worker at 2,000 events/s fell into stretches of such batches, with p99 1.6
        # times as high (median of 13 pairs); a preloaded backlog ran no faster (docs/architecture.md)
        # clock_ms: an event accepted from ahead of the clock (STREAMREC_MAX_FUTURE_S) is learned as of it
        result = self.step(events, states, now_ms, positions, site_ids=site_ids, clock_ms=now)
        t3 = clock()

        for f in result.failures:
            msg = carriers[f.index]
            log.error("event at %s[%d]@%d (user %r) dead-lettered: %s", msg.topic, msg.partition, msg.offset,
                      events[f.index].user_id, f.reason, exc_info=f.error)
            dead.append((msg, _failure_letter("processing_error", f.reason, msg)))
        out: list[OutRecord] = [  # keyed by, and naming, the id the site sent (site_ids: under pseudonyms)
            (self.topics.recommendations, rec.user_id.encode(), payload)
            for rec, payload in zip(result.recommendations, result.payloads, strict=True)
        ]
        out += [dead_letter_record(self.topics.dlq, msg.key, letter) for msg, letter in dead]
        await self._publish(out)
        published_ms = now_ms()
        t4 = clock()

        if result.docs:
            await self._save(result.docs, fence, lambda stored: self.step.merged_docs(events, positions, result, stored))
        if dead:  # the models pass over them too (a replay after a restart must not learn them)
            self.step.advance([msg.position for msg, _ in dead], dead=True)
        t5 = clock()

        try:
            self._record(messages, result, [letter.code for _, letter in dead], published_ms,
                         {"decode": t1 - t0, "state_load": t2 - t1, **result.timings, "publish": t4 - t3,
                          "state_save": t5 - t4}, t5 - t0)
        except Exception:  # noqa: BLE001 - the batch's effects are done; a metric must not undo that
            log.exception("recording the batch's metrics failed")

    async def _save(self, docs: dict[str, bytes], fence: dict[int, int] | None,
                    merged: Callable[[dict[str, UserState]], dict[str, bytes]]) -> None:
        """Save a batch's user states, versioned: a user another writer saved since the batch
        loaded them (their events reached two workers: partitions added while a backlog waits,
        records not keyed by user id) is loaded again, and ``merged`` of what that writer saved
        (the batch's changes applied to it: :meth:`RecommendationStep.merged_docs`) is saved
        again, at most :data:`MERGES` times; then as it stands, logged (the other writer's
        changes are then lost from the user's state, as before versions were kept)."""
        for _ in range(MERGES):
            try:
                await self._retry("save", lambda docs=docs: self.store.save_docs(docs, fence, versioned=True))
                return
            except StateConflict as conflict:
                self.metrics.state_conflicts.inc(len(conflict.users))
                docs = merged(await self._load(conflict.users))
        log.error("%d user(s) saved by another worker after each of %d merges of this batch's events: saved as they "
                  "stand, so events the other worker applied since are gone from their state. Their events reach "
                  "two workers at once: see docs/operations.md (Adding partitions later) and "
                  "streamrec_events_not_keyed_by_user_total", len(docs), MERGES)
        await self._retry("save", lambda: self.store.save_docs(docs, fence))

    async def _load(self, users: list[str]) -> dict[str, UserState]:
        """The users' states (retried as :meth:`_retry` does), their offsets counting in the
        input topics the broker has now (:func:`~stream.state.align_incarnation`)."""
        states = await self._retry("load", lambda: self.store.load_many(users))
        reset = align_incarnation(states.values(), self.incarnation)
        if reset:
            if self._reset_said != self.incarnation:  # once for each incarnation of the topics
                self._reset_said = self.incarnation
                log.warning("user states hold offsets of an input topic that was deleted and created again since "
                            "(its offsets started over): those offsets are dropped as each user is loaded, and the "
                            "new topic's events applied (producers' duplicates are still caught by event id)")
            self.offsets_reset += reset
        return states

    async def _side_topics(self, messages: Sequence[RawMessage]) -> Sequence[RawMessage]:
        """Carry out the batch's forget requests (:meth:`_forget`), count its impressions
        (:meth:`_impressions`) and answer its searches (:meth:`_searches`), before its events;
        returns the events' messages."""
        side = self._side
        if not any(msg.topic in side for msg in messages):
            return messages
        topics = self.topics
        forgets = [msg for msg in messages if msg.topic == topics.forget]
        if forgets:  # not isolated: an erasure that raises holds up its batch (redone after a restart), never dropped
            await self._forget(forgets)
        for topic, handle in ((topics.impressions, self._impressions), (topics.searches, self._searches)):
            of_topic = [msg for msg in messages if msg.topic == topic]
            if of_topic:  # isolated like the events: one that raises never holds up the batch
                await self._isolated(handle, of_topic)
        return [msg for msg in messages if msg.topic not in side]

    async def _isolated(self, handle: Callable[[Sequence[RawMessage]], Awaitable[None]],
                        messages: Sequence[RawMessage], traced: set[type] | None = None) -> None:
        """``handle(messages)``, and where it raises (a bug: what a handler can refuse it
        dead-letters itself), its halves apart, down to single messages, dead-lettered as
        ``processing_error``. A half handled again passes over the events it applied and the
        impressions it counted; what it may do twice is publish its own dead letters (and a
        search's list) again, which a reader of those topics sees as a repeat.

        The log gets the traceback of the first failure only (and of a failure of another
        exception type), then one line for each message dead-lettered: a bug that made every
        half raise logged a traceback for each split, a dozen for one bad value in a batch of
        a thousand, and buried the cause. ``traced``: the exception types whose traceback the
        batch being isolated has logged."""
        try:
            await handle(messages)
            return
        except (Fenced, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - isolated below
            first = traced is None
            traced = set() if traced is None else traced
            trace = type(exc) not in traced
            traced.add(type(exc))
            if len(messages) > 1:
                if first:
                    log.error("handling a batch of %d messages raised; handling its halves apart, down to the "
                              "messages that raise alone (dead-lettered, a line each)", len(messages),
                              exc_info=exc)
                elif trace:
                    log.error("handling %d of the batch's messages raised %s, not seen in this batch before",
                              len(messages), type(exc).__name__, exc_info=exc)
                half = len(messages) // 2
                await self._isolated(handle, messages[:half], traced)
                await self._isolated(handle, messages[half:], traced)
                return
            await self._dead_letter_raised(messages[0], exc, trace)

    async def _dead_letter_raised(self, msg: RawMessage, exc: Exception, trace: bool = True) -> None:
        """Dead-letter the one message whose handling raised ``exc`` as ``processing_error``
        (``trace``: log the traceback too); the models pass over an event so dead-lettered as
        over an invalid one."""
        reason = f"handling the message raised {type(exc).__name__}: {exception_text(exc)}"
        if trace:
            log.error("handling the message at %s[%d]@%d raised; it is dead-lettered", msg.topic, msg.partition,
                      msg.offset, exc_info=exc)
        else:
            log.error("the message at %s[%d]@%d is dead-lettered: %s", msg.topic, msg.partition, msg.offset, reason)
        letter = _failure_letter("processing_error", reason, msg)
        await self._publish([dead_letter_record(self.topics.dlq, msg.key, letter)])
        if msg.topic not in (self.topics.impressions, self.topics.searches):  # an event: the models pass over it
            self.step.advance([msg.position], dead=True)
        self._count_dead(["processing_error"])

    def _distrust_misrouted(self, items: Sequence, carriers: Sequence[RawMessage]) -> None:
        """Users of ``items`` (as sent, before pseudonyms) whose message was not keyed by their
        id (a producer that sent it unkeyed, or keyed by something else), so that other workers
        may get their messages too: their state is read from Redis, never from what this worker
        kept of its own saves (stream/state.py, CachedUserStateStore). A message keyed by
        something else is counted (``streamrec_events_not_keyed_by_user_total``) and warned of;
        one with no key is not (docs/events.md). Both are processed as any other."""
        misrouted = [(item, msg) for item, msg in zip(items, carriers, strict=True)
                     if msg.key != item.user_id.encode("utf-8", "surrogatepass")]
        if not misrouted:
            return
        keyed = Counter(msg.topic for _, msg in misrouted if msg.key is not None)
        for topic, n in keyed.items():
            self.metrics.events_not_keyed_by_user.labels(topic).inc(n)
            # the same words for every batch of a topic, so that the filter holds back repeats
            _key_log.warning("records on %s are keyed by something other than their user_id: one user's events "
                             "reach several partitions, so several workers write the user's state (merged, "
                             "streamrec_state_conflicts_total) and "
                             "their lists come from part of their events. They are still processed. Key each "
                             "record by its user_id, UTF-8 encoded (`streamrec produce` does); "
                             "streamrec_events_not_keyed_by_user_total counts them", topic)
        discard = getattr(self.store, "discard", None)
        if discard is None:
            return
        of = self.pseudonyms.of if self.pseudonyms is not None else None
        users = {item.user_id for item, _ in misrouted}
        discard(users if of is None else {of(uid) for uid in users})

    async def _searches(self, messages: Sequence[RawMessage]) -> None:
        """Answer each search with a personalised list (``context.kind = "search"``, published
        keyed by the user like their home-page lists), then save the users' states (the list,
        for attribution, and the query) in one fenced transaction. A value that breaks the
        contract, and a search that raised while it was answered, are dead letters."""
        t0 = time.perf_counter()
        searches, kept, dead = _decode_each(messages, decode_search, self.bounds, now_ms())
        self._distrust_misrouted(searches, kept)
        site_ids: dict[str, str] | None = None
        if self.pseudonyms is not None and searches:
            searches, site_ids = self.pseudonyms.events(searches)
        result = None
        if searches:
            fence = await self._fence(kept) if self.claims is not None else None
            users = list(dict.fromkeys(s.user_id for s in searches))
            states = await self._load(users)
            search = self.search
            if len(searches) >= THREAD_MIN_SEARCHES:
                result = await asyncio.to_thread(search, searches, states, now_ms, [m.position for m in kept], site_ids)
            else:
                result = search(searches, states, now_ms, [m.position for m in kept], site_ids)
            for f in result.failures:
                msg = kept[f.index]
                log.error("search at %s[%d]@%d dead-lettered: %s", msg.topic, msg.partition, msg.offset, f.reason,
                          exc_info=f.error)
                dead.append((msg, _failure_letter("processing_error", f.reason, msg)))
        out: list[OutRecord] = []
        if result is not None:
            out = [(self.topics.recommendations, rec.user_id.encode(), payload)
                   for rec, payload in zip(result.recommendations, result.payloads, strict=True)]
        out += [dead_letter_record(self.topics.dlq, msg.key, letter) for msg, letter in dead]
        if out:
            await self._publish(out)
        published_ms = now_ms()
        if result is not None and result.docs:
            positions = [m.position for m in kept]
            await self._save(result.docs, fence,
                             lambda stored: self.search.merged_docs(searches, positions, result, stored))
        if dead:
            self._count_dead([letter.code for _, letter in dead])
        m = self.metrics
        if result is not None:
            m.searches_answered.inc(len(result.recommendations))
            m.duplicates_skipped.inc(result.duplicates)
            if result.refused:
                m.events_refused_forgotten.inc(result.refused)
            for rec in result.recommendations:
                m.search_end_to_end_seconds.observe(max(0, published_ms - rec.event_ts) / 1000)
                m.experiment_lists.labels(rec.variant).inc()  # attributed like any list (rec_id)
                self._count_groups(rec.variant, {variance_group(rec.user_id): {"lists": 1}})
            for name, seconds in result.timings.items():
                m.stage_seconds.labels(f"search_{name}").observe(seconds)
        m.stage_seconds.labels("search_batch").observe(time.perf_counter() - t0)

    async def _impressions(self, messages: Sequence[RawMessage]) -> None:
        """Count what sites showed, per experiment arm (the denominator of click-through rates
        where sites report it): an impression counts once, for a list the worker published and
        the user's state still remembers (it is marked shown there, in the fenced save, so a
        redelivery or another worker does not count it again), under the arm that served the
        list (``RecommendationStep.variant_credited``); others, and one of a list of an arm the
        experiment no longer has, are counted apart (``streamrec_experiment_impressions_unmatched_total``).
        A value that breaks the contract is a dead letter."""
        impressions, kept, dead = _decode_each(messages, decode_impression, self.bounds, now_ms())
        if dead:
            await self._publish([dead_letter_record(self.topics.dlq, msg.key, letter) for msg, letter in dead])
            self._count_dead([letter.code for _, letter in dead])
        if not impressions:
            return
        fence = await self._fence(kept) if self.claims is not None else None
        of = self.pseudonyms.of if self.pseudonyms is not None else (lambda uid: uid)
        self._distrust_misrouted(impressions, kept)
        ids = list(dict.fromkeys(of(imp.user_id) for imp in impressions))
        states = await self._load(ids)
        counts: Counter[str] = Counter()
        groups: dict[str, Counter[int]] = {}  # variant -> impressions per group of users
        changed: dict[str, list[str]] = {}  # user -> the lists marked shown
        unmatched = 0
        for imp in impressions:
            uid = of(imp.user_id)
            if shown(states[uid].recs, imp.rec_id):
                changed.setdefault(uid, []).append(imp.rec_id)
                variant = self.step.variant_credited(imp.rec_id, imp.user_id)  # the arm that served the list
                if variant is not None:
                    counts[variant] += 1
                    groups.setdefault(variant, Counter())[variance_group(imp.user_id)] += 1
                    continue
            unmatched += 1
        if changed:
            for uid in changed:  # one save more than the loaded document (stream/state.py, versions)
                states[uid].version += 1
            await self._save({uid: encode_state(states[uid]) for uid in changed}, fence,
                             lambda stored: _marked_shown(stored, changed))
        for variant, n in counts.items():
            self.metrics.experiment_impressions.labels(variant).inc(n)
            self._count_groups(variant, {g: {"impressions": k} for g, k in groups[variant].items()})
        if unmatched:
            self.metrics.experiment_impressions_unmatched.inc(unmatched)

    async def _forget(self, messages: Sequence[RawMessage]) -> None:
        """Erase the users of these ForgetRequests (the ``forget`` topic, co-partitioned with
        the inputs, so this worker owns their state): the models first (their tables, and a
        refusal of the user's events up to the request's ``ts``: stream/pipeline.py), then a
        tombstone on the recommendations topic (compacted: their lists go), then their state
        in one fenced Redis transaction. Each step is idempotent, so a request delivered again
        after a crash is carried out again. Events of the batch come after: the user's older
        ones are refused, newer ones start a fresh state. Logged by request id, never by user id."""
        requests: list[ForgetRequest]
        requests, kept, dead = _decode_each(messages, decode_forget, self.bounds, now_ms())
        positions = [msg.position for msg in kept]
        site_ids = [req.user_id for req in requests]
        self._distrust_misrouted(requests, kept)
        if self.pseudonyms is not None:  # the models and the state hold pseudonyms
            requests = self.pseudonyms.events(requests)[0]
        fence = await self._fence(messages) if self.claims is not None and requests else None
        if requests:  # the bound: the request's ts, or the newest event the user's state holds if later
            ids = list(dict.fromkeys(req.user_id for req in requests))  # (a site clock ahead of the requester's)
            held = await self._load(ids)
            requests = [msgspec.structs.replace(req, ts=max(req.ts, held[req.user_id].last_seen_ts,
                                                             held[req.user_id].query_ts)) for req in requests]
        for req, exc in self.step.forget(requests, positions, now_ms()):
            self.metrics.forget_failures.inc()
            log.error("forget request %r: the models could not purge everything of the user (%s raised by %s); "
                      "the user's state and lists are erased and their events refused all the same, but a model may "
                      "still hold part of them until it evicts it: this is a bug (see streamrec_forget_failures_total)",
                      req.request_id, type(exc.__cause__ or exc).__name__, getattr(exc, "learner", "the models"))
        out: list[OutRecord] = [(self.topics.recommendations, uid.encode(), None) for uid in dict.fromkeys(site_ids)]
        out += [dead_letter_record(self.topics.dlq, msg.key, letter) for msg, letter in dead]
        await self._publish(out)
        if requests:
            erased = list(dict.fromkeys(req.user_id for req in requests))
            await self._retry("forget", lambda: self.store.save_docs({}, fence, delete=erased))
        if dead:
            self.step.advance([msg.position for msg, _ in dead], dead=True)
            self._count_dead([letter.code for _, letter in dead])
        for req in requests:
            log.info("erased a user for forget request %r: state deleted, models purged, recommendations "
                     "tombstoned; their events up to ts %d are refused from now on", req.request_id, req.ts)
        self.metrics.users_forgotten.inc(len(requests))
        self.metrics.forgets_applied.inc(len(requests))
        if requests and self.on_forget is not None:
            self.on_forget(len(requests))

    def _record(self, messages: Sequence[RawMessage], result: StepResult, dead_codes: list[str], published_ms: int,
                stages: dict[str, float], seconds: float) -> None:
        """Metrics, once the batch's effects are durable."""
        m = self.metrics
        m.batch_size.observe(len(messages))
        for kind, n in Counter(ev.type for ev in result.applied).items():  # one labels() per type, not per event
            m.events_consumed.labels(kind).inc(n)
        if result.applied:
            newest = max(ev.ts for ev in result.applied)
            m.last_event_ts.set(newest / 1000)
        m.duplicates_skipped.inc(result.duplicates)
        if result.refused:
            m.events_refused_forgotten.inc(result.refused)
        m.events_relearned.inc(result.learned_only)
        m.recommendations_published.inc(len(result.recommendations))
        self._count_dead(dead_codes)
        if self.store.rebuilt != self._rebuilt_seen:
            m.states_rebuilt.inc(self.store.rebuilt - self._rebuilt_seen)
            self._rebuilt_seen = self.store.rebuilt
        if self.offsets_reset != self._reset_seen:
            m.offsets_reset.inc(self.offsets_reset - self._reset_seen)
            self._reset_seen = self.offsets_reset
        for rec in result.recommendations:
            m.end_to_end_seconds.observe(max(0, published_ms - rec.event_ts) / 1000)
        for name, s in stages.items():
            m.stage_seconds.labels(name).observe(s)
        m.stage_seconds.labels("batch").observe(seconds)
        for variant, c in result.variants.items():
            if c.lists:
                m.experiment_lists.labels(variant).inc(c.lists)
            if c.users:
                m.experiment_users.labels(variant).inc(c.users)
            if c.clicks:
                m.experiment_clicks.labels(variant).inc(c.clicks)
                m.experiment_clicked_lists.labels(variant).inc(c.clicked_lists)
            if c.purchases:
                m.experiment_purchases.labels(variant).inc(c.purchases)
                m.experiment_purchased_lists.labels(variant).inc(c.purchased_lists)
                m.experiment_revenue.labels(variant).inc(c.revenue)
            if c.live.judged:
                m.experiment_judged.labels(variant).inc(c.live.judged)
                for k in LIVE_CUTOFFS:
                    m.experiment_hits.labels(variant, str(k)).inc(c.live.hits[k])
            if c.groups:
                self._count_groups(variant, {g: dict(zip(GROUP_FIELDS, counts, strict=True))
                                             for g, counts in c.groups.items()})
        live = result.live
        if live.judged:
            m.live_judged.inc(live.judged)
            for k in LIVE_CUTOFFS:
                m.live_hits.labels(str(k)).inc(live.hits[k])
            m.live_reciprocal_rank.inc(live.reciprocal_rank_sum)
        self.batches += 1
        self.events_applied += len(result.applied)
        if seconds > SLOW_BATCH_S:
            self._log_slow(len(messages), stages, seconds)

    def _count_groups(self, variant: str, groups: Mapping[int, Mapping[str, float]]) -> None:
        """Add an arm's counts per group of users (:func:`~stream.experiments.variance_group`)
        to ``streamrec_experiment_groups_total``; counts of 0 make no series."""
        children = self._group_children  # labels() costs 5 times an inc(): up to 224 series a batch
        for g, fields in groups.items():
            for name, n in fields.items():
                if n:
                    child = children.get((variant, g, name))
                    if child is None:
                        child = children[variant, g, name] = self.metrics.experiment_groups.labels(variant, str(g), name)
                    child.inc(n)

    def _count_dead(self, codes: list[str]) -> None:
        m = self.metrics
        for code, n in Counter(codes).items():
            m.events_invalid.labels(code).inc(n)
        m.dead_letters_published.inc(len(codes))

    def _log_slow(self, n: int, stages: dict[str, float], seconds: float) -> None:
        self._slow_since_log += 1
        now = time.monotonic()
        if now - self._slow_logged_at < SLOW_LOG_EVERY_S:
            return
        parts = ", ".join(f"{name} {s * 1000:.0f}" for name, s in stages.items())
        log.warning("slow batch: %d events in %.0f ms (%s ms); %d batch(es) over %.0f ms since the last such line",
                    n, seconds * 1000, parts, self._slow_since_log, SLOW_BATCH_S * 1000)
        self._slow_logged_at, self._slow_since_log = now, 0

    async def _fence(self, messages: Sequence[RawMessage]) -> dict[int, int]:
        """The claims this batch saves under: those taken when its partitions were assigned
        (or now, for a partition of the current generation not claimed yet)."""
        claims = self.claims
        generation = max(msg.generation for msg in messages)
        partitions = {msg.partition for msg in messages}
        missing = claims.missing(partitions, generation)
        if missing:
            async def claim() -> dict[int, int]:
                # asked again at every attempt: a rebalance during a Redis outage hands the
                # partitions on, and a claim taken after the next owner's would fence it out
                if not claims.is_current(generation):
                    raise Fenced(sorted(missing))  # fetched before a rebalance: the next owner's now
                return await self.store.claim(missing)

            got = await self._retry("claim", claim)
            if not claims.is_current(generation):  # a rebalance while the claim was on its way: this
                raise Fenced(sorted(missing))  # worker writes nothing (its claim may still outrank the next owner's)
            claims.hold(got, generation)
        return claims.fence(partitions)

    def _unready(self, condition: str, detail: str) -> None:
        if condition == "state":
            self._state_failing = True
        if self.health is not None:
            self.health.set(condition, False, detail)

    def _ready(self, condition: str, detail: str) -> None:
        if condition == "state":
            self._state_failing = False
        if self.health is not None:
            self.health.set(condition, True, detail)

    async def _publish(self, records: list[OutRecord]) -> None:
        """Publish every record and return once the broker confirmed all of them; resend what
        failed, for as long as it takes (the batch stays unacknowledged meanwhile)."""
        delays = self.backoff.delays()
        pending = records
        since = None
        while pending:
            problem = None
            try:
                pending = await self.publish(pending)
            except Exception as exc:  # noqa: BLE001 - the producer itself failed (not started, connection lost)
                problem = repr(exc)
                log.warning("publishing %d records failed (%s); will retry", len(pending), described(exc))
            if pending:
                self.metrics.kafka_errors.labels("publish").inc()
                if since is None:
                    since, first = time.monotonic(), time.strftime("%H:%M:%S", time.gmtime())
                topics = ", ".join(sorted({topic for topic, _, _ in pending}))
                self.metrics.output_blocked.set(1)
                # "since" a clock time: /readyz shows this until the next try ends, which can take the
                # producer's request timeout (30 s); "for 0 s" stood there for all of it
                self._unready("output", f"{len(pending)} record(s) to {topics} not accepted by Kafka since {first} "
                                        f"UTC ({problem or 'see the log'}); nothing after them is committed until "
                                        "they are")
                await asyncio.sleep(next(delays))
        if since is not None:
            self.metrics.output_blocked.set(0)
            log.info("publishing works again after %.1f s", time.monotonic() - since)
            self._ready("output", "Kafka accepts what the worker publishes")

    async def _retry(self, op: str, call: Callable[[], Awaitable]) -> object:
        """``call()`` until it succeeds; Redis and connection errors are retried with back-off
        (the worker says unready meanwhile), anything else raises. A call that raises after
        failing (:class:`Fenced`: Redis answered, the partition moved on) ends the retries, and
        with them the ``state`` failure: no later call may come to clear it (a worker handed no
        partition with events said unready, "retrying", for as long as it stayed idle)."""
        errors = self.metrics.redis_errors
        delays = self.backoff.delays()
        failing = False
        while True:
            try:
                out = await call()
            except (ConnectionError, TimeoutError, OSError) as exc:
                pass_on = False
                problem = exc
            except Exception as exc:
                pass_on = not type(exc).__module__.startswith("redis")
                problem = exc
            else:
                if failing or self._state_failing:  # another call's retries may have ended otherwise (Fenced)
                    self._ready("state", f"{op} works again")
                return out
            if pass_on:
                if failing or self._state_failing:
                    self._ready("state", f"{op} answered again ({type(problem).__name__})")
                raise problem
            failing = True
            errors.labels(op).inc()
            delay = next(delays)
            advice = redis_advice(problem)
            self._unready("state", f"{op} failed: {type(problem).__name__}: {exception_text(problem)}{advice}; retrying")
            log.warning("redis %s failed (%s)%s; retrying in %.2fs", op, described(problem), advice, delay)
            await asyncio.sleep(delay)


class Claims:
    """The claims (stream/state.py, fencing) this worker holds on its input partitions, each
    taken in a consumer-group generation."""

    def __init__(self, current_generation: Callable[[], int] = lambda: 0) -> None:
        self._held: dict[int, tuple[int, int]] = {}  # partition -> (generation, claim)
        self._current = current_generation

    def is_current(self, generation: int) -> bool:
        return generation == self._current()

    def hold(self, claims: dict[int, int], generation: int) -> None:
        for p, claim in claims.items():
            self._held[p] = (generation, claim)

    def release(self, partitions) -> None:
        for p in partitions:
            self._held.pop(p, None)

    def missing(self, partitions, generation: int) -> set[int]:
        return {p for p in partitions if self._held.get(p, (None, None))[0] != generation}

    def fence(self, partitions) -> dict[int, int]:
        return {p: self._held[p][1] for p in partitions}

    @property
    def partitions(self) -> list[int]:
        return sorted(self._held)
