"""Faust's aiokafka consumer with a cheaper hand-over of each fetched message.

Faust's ``Consumer._drain_messages`` hands every fetched message to the conductor with
``await self.wait_first(callback(message), self.suspend_flow.wait())``, so that a hand-over
blocked on a full channel queue is abandoned when a rebalance suspends the flow. That call
wraps four awaitables in tasks, waits on them and cancels three: about 23 µs of the event
loop per message (``bench/drain_bench.py``), while the hand-over itself almost never waits
(the conductor puts the event on a queue that has room, and returns).

:class:`Consumer` runs the hand-over coroutine directly up to its first suspension. If it
finishes there, the usual case, that is all. If it suspends (a full queue, a suspended flow,
the producer's buffer), the rest of it runs under ``wait_first`` exactly as in Faust, so a
rebalance still abandons it. Everything else in the loop (gaps, commits, read offsets,
yielding to the loop every 100 messages) is Faust's code, unchanged.

One more change in that loop: when the agent's buffer is full, Faust pauses fetching from
the partitions that filled it and waits up to a second for records of the others, often
none (a topic already read to its end), while the agent empties the buffer and Faust
resumes the paused partitions. A worker catching up a backlog sat idle up to a second each
time. While partitions are paused, :class:`Consumer` waits at most
``PAUSED_FETCH_TIMEOUT_S`` before it looks again.

And the fetch itself: Faust asks aiokafka for records with ``fetch_min_bytes=1``, so the
broker answers a fetch as soon as one record is there. At a steady rate of small producer
batches that is a fetch round trip, decoded in Python on Faust's consumer thread, for every
few records: at 800 events/s it cost that thread 120-145 µs of CPU per event. The worker's
consumer asks instead for ``FETCH_MIN_BYTES`` or ``fetch_max_wait_ms``
(``STREAMREC_FETCH_MAX_WAIT_MS``), whichever comes first: a backlog still fills each fetch
at once, while a trickle is fetched at most every few milliseconds (measured with
bench/paced_bench.py in docs/operations.md).

Fetching by time has a price when nothing comes: an idle worker still asked the broker every
``fetch_max_wait_ms``, a hundred empty round trips a second, each encoded and decoded in
Python (9 % of a core for a worker with no events at all). So the fetches adapt
(:func:`adapt_fetches`): after a fetch that brought no record, the next one asks for 1 byte
and waits up to :data:`IDLE_FETCH_WAIT_MS`, so the broker answers it when the first record
arrives (the first event after a quiet spell is fetched at once instead of after up to
``fetch_max_wait_ms``); after a fetch that brought records, and while fetched records wait
for the agent to take them, fetching by size or time resumes (:func:`adapt_fetches` says why).
A steady stream never leaves that mode; an idle worker asks twice a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import io
import logging
import textwrap
import time
import tokenize
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from aiokafka.errors import CommitFailedError, KafkaConnectionError, TopicAuthorizationFailedError
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from mode.threads import WorkerThread

from stream.connections import ISOLATION_LEVEL, fetches_end_empty_at_close
from stream.logs import ClippedTracebacks, Thinned
from stream.retry import Backoff
from stream.step_results import exception_text


def start(coro: Coroutine) -> tuple[bool, Any]:
    """Run ``coro`` up to its first suspension: ``(True, result)`` when it finished, else
    ``(False, what it yielded)``, to be resumed with :func:`resume`."""
    try:
        yielded = coro.send(None)
    except StopIteration as stop:
        return True, stop.value
    return False, yielded


async def resume(coro: Coroutine, yielded: Any) -> Any:
    """Drive a coroutine that :func:`start` left suspended to its end, as an asyncio task would.

    ``yielded`` is what it is waiting for (an asyncio future, or ``None`` for a bare yield).
    Cancelling this coroutine cancels that future and lets ``coro`` see the cancellation at
    the point where it waits, as ``Task.cancel()`` does.
    """
    while True:
        try:
            if yielded is None:
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False
                await asyncio.wait([yielded])  # done, failed or cancelled: coro reads the result itself
        except asyncio.CancelledError:
            if yielded is not None:
                yielded.cancel()
                try:  # let coro handle the cancellation where it waits
                    yielded = coro.send(None)
                except StopIteration as stop:  # it swallowed the cancellation and finished
                    return stop.value
                coro.close()
            else:
                coro.close()
            raise
        try:
            yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value


#: How long one fetch waits for records while some partitions are paused because the agent's
#: buffer is full (Faust waits up to 1 s; see Consumer._drain_messages).
PAUSED_FETCH_TIMEOUT_S = 0.02


def source_fingerprint(code: Callable | str) -> str:
    r"""sha256 of a function's tokens, comments and layout left out (indentation kept as
    structure), so that reformatting does not change it and any change of code does.

    >>> a = "def f(x):\n    return x + 1  # one more\n"
    >>> b = "def f( x ):\n\n        return x+1\n"
    >>> source_fingerprint(a) == source_fingerprint(b), source_fingerprint(a) == source_fingerprint(a.replace("1", "2"))
    (True, False)
    """
    source = textwrap.dedent(code if isinstance(code, str) else inspect.getsource(code))
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER}
    structure = {tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE}
    words = [tokenize.tok_name[t.type] if t.type in structure else t.string
             for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip]
    return hashlib.sha256("\x00".join(words).encode()).hexdigest()


#: :func:`source_fingerprint` of ``faust.transport.consumer.Consumer._drain_messages``, the
#: function :meth:`Consumer._drain_messages` copies: the same in every faust-streaming release
#: from 0.11.0 to 0.15.3 (pyproject.toml pins that range; tests/unit/test_stream/test_consumer.py checks
#: the installed release against it).
FAUST_DRAIN_MESSAGES_FINGERPRINT = "9d72e57c2b1be5e6fb7cca01aaedfffe7e2781087506126402851317a4d735a7"


#: the consumer's logger: mode gives a Service the logger of its module (``self.log`` wraps it),
#: and an exception's text in a traceback logged here is cut to 300 characters (stream/logs.py)
log = logging.getLogger(__name__)
log.addFilter(ClippedTracebacks())

#: what the broker refusing this user a topic it reads (an ACL taken away: Read is needed to fetch
#: and to commit) is logged on, once every 30 s while it lasts
_access_log = logging.getLogger("streamrec.consumer.access")
_access_log.addFilter(Thinned(30.0))
#: how long the consumer waits before it fetches again from topics the broker refused it
READ_REFUSED_WAIT_S = 2.0
#: what a commit the broker refused for want of Read is made to say to Faust, whose ``_commit``
#: crashes the worker on any commit error but a rebalance's: this text is how it tells one (the
#: commit is not made and ``_commit`` returns False), and the offsets go with a later commit
REFUSED_AS_REBALANCED = "not committed (as when a group has already rebalanced): the broker refused this user Read"

#: the waits between tries of a Faust client's start whose bootstrap found no broker: the worker
#: waited for one before Faust started (stream/broker_wait.py), but it may go again in between
BOOTSTRAP_RETRY = Backoff(base_s=0.5, factor=2.0, cap_s=10.0, jitter=0.1)


async def bootstrapped(start: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
    """``await start()`` (an aiokafka client's), tried again with back-off while its bootstrap
    reaches no broker (KafkaConnectionError: it fails before changing anything, so a second
    ``start`` is safe). The CLI waits for the broker before Faust starts, but a broker that went
    away between that wait and Faust's start made the producer's or the consumer's start raise,
    and the worker exited with status 1 (a chaos soak: a broker killed within a second of a
    worker's start). Cancellation (a stop signal) passes through."""
    delays = BOOTSTRAP_RETRY.delays()
    while True:
        try:
            return await start()
        except KafkaConnectionError as exc:
            delay = next(delays)
            log.warning("%s could not reach Kafka as the worker started (%s); the broker answered just before, so it "
                        "is waited for: trying again in %.1f s", what, exception_text(exc), delay)
            await asyncio.sleep(delay)


class Consumer(faust_aiokafka.Consumer):
    logger = log

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: partitions whose commits wait until they are revoked (:meth:`hold`)
        self.held: set[TP] = set()
        #: what the broker said when it last refused to let this user read a topic (None: reading)
        self._refused_read: str | None = None

    def _read_refused(self, exc: TopicAuthorizationFailedError) -> None:
        """The broker no longer lets this user read a topic (an ACL taken away): the worker says
        so in ``/readyz`` (``input``) and its log, and fetches again every
        :data:`READ_REFUSED_WAIT_S`; it crashed with mode's traceback (exit 1). Nothing is lost:
        nothing it did not handle is committed."""
        said = f"{type(exc).__name__}: {exception_text(exc)}"
        self._refused_read = said
        _access_log.warning("Kafka refuses this user's fetch (%s): grant it Read and Describe on the topics it "
                            "consumes (docs/operations.md, Security); fetching again every %g s", said,
                            READ_REFUSED_WAIT_S)
        self._input_health(False, f"Kafka refuses this user's fetch ({said}): grant it Read (docs/operations.md, "
                                  "Security); retrying")

    def _read_allowed(self) -> None:
        _access_log.info("Kafka lets this user fetch again (it refused: %s)", self._refused_read)
        self._refused_read = None
        self._input_health(True, "the topics are read")

    def _input_health(self, ok: bool, detail: str) -> None:
        health = getattr(getattr(self.app, "streamrec", None), "health", None)
        if health is not None:
            health.set("input", ok, detail)

    def hold(self, partitions: Iterable[TP]) -> None:
        """Commit nothing more for ``partitions`` until they are revoked.

        The worker leaves a batch unacknowledged on purpose when it raised past every
        safeguard, or when another worker has claimed its partitions since (stream/shell.py);
        Kafka delivers those events again only from the committed offset, after a rebalance or
        a restart, so no later offset of theirs may be committed meanwhile. Faust's own guard
        does not hold for that: it commits past the unacknowledged head of a partition when
        one event is missing there (``min(acked) - committed > 1``), and whenever the partition
        has no committed offset yet (faust-streaming issue 606, open in 0.15.3).

        Their fetching pauses too, and the worker leaves their events fetched before unhandled
        (:func:`stream.batching.is_stale`): handled, a later event would move its user's
        offset past an unacknowledged one's, which would be skipped as a duplicate when
        delivered again, and every acknowledgement would grow Faust's list of acked offsets
        for a partition that commits nothing. Faust resumes a partition it assigns again.
        """
        partitions = set(partitions)
        self.held.update(partitions)
        self.pause_partitions(partitions)

    def _new_offset(self, tp: TP) -> int | None:
        if tp in self.held:
            return None
        return super()._new_offset(tp)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        await super().on_partitions_revoked(revoked)  # Faust forgets their acks: a new owner reads from the commit
        self.held.difference_update(revoked)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        self.held.difference_update(assigned)  # read again from the commit (Faust seeks each assigned partition)
        await super().on_partitions_assigned(assigned, generation_id)

    async def commit_and_end_transactions(self) -> None:
        """Faust's final commit at a stop (``Consumer.on_stop``), given up after
        :data:`STOP_COMMIT_S`.

        aiokafka's commit waits for the group's coordinator for ever (``commit_offsets`` loops on
        ``ensure_coordinator_known``), and Faust's stop waits for the commit: with the broker away
        and offsets acknowledged since the last commit (events flowing), a worker asked to stop
        ran on until the broker came back, past Kubernetes' grace. Nothing is lost by giving it
        up: as after a kill -9, the partitions' next owner reads again from the last commit and
        skips what was applied (docs/architecture.md, *Delivery guarantees*)."""
        commit = asyncio.ensure_future(super().commit_and_end_transactions())
        try:
            await asyncio.wait({commit}, timeout=STOP_COMMIT_S)
        except asyncio.CancelledError:
            commit.cancel()
            raise
        if commit.done():
            return commit.result()
        self.log.warning("the broker did not answer the final commit within %.0f s: the final commit is skipped; "
                         "the events handled since the last commit are delivered again to their partitions' next "
                         "owner, which skips those applied (each event applied once)", STOP_COMMIT_S)
        await cancel_within(commit, STOP_COMMIT_CANCEL_S)
        # the broker is away: the thread's consumer cannot leave the group either, so it is not
        # waited for THREAD_STOP_S (the drain's 30 s, this 5 s, 10 s and the producer's 5 s came
        # to 52 s, within a few seconds of Kubernetes' grace of 60)
        self._thread.shutdown_timeout = THREAD_STOP_AWAY_S
        return None

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher) -> None:  # pragma: no cover - the worker's loop, tested end to end
        # faust/transport/consumer.py's Consumer._drain_messages (faust-streaming 0.11.0 to
        # 0.15.3; FAUST_DRAIN_MESSAGES_FINGERPRINT), with two changes: the hand-over through
        # start()/resume() instead of a wait_first per message, and a short fetch while some
        # partitions are paused (and the last resort's log line quotes the exception's text
        # clipped), and a fetch the broker refuses for want of Read (an ACL taken away: the
        # worker says so and fetches again, where it crashed). Left out, with no effect on the worker: the diagnostic
        # FETCHING flag (nothing reads self.diag.flags), the DEVLOG-only log line of a skipped
        # message, and the test for a commit_every of None (broker_commit_every is an int;
        # this app keeps Faust's 10,000).
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set

        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        commit_every = self._commit_every
        acks_enabled_for = self.app.topics.acks_enabled_for

        yield_every = 100
        num_since_yield = 0
        sleep = asyncio.sleep

        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                # Faust waits up to 1 s for records of the active partitions. When the agent's
                # buffer is full, Faust pauses the partitions that filled it, and this wait then
                # covers only the others, often with nothing to read (a drained topic), while
                # the agent empties the buffer and Faust resumes the paused ones: the worker
                # sat idle up to a second each time (4,800 events/s from a backlog). While some
                # are paused, look again soon.
                ait = getmany(timeout=PAUSED_FETCH_TIMEOUT_S if self._buffered_partitions else 1.0)
                await self.sleep(0)
                if self.should_stop:
                    continue
                try:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield > yield_every:
                            await sleep(0)
                            num_since_yield = 0

                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:  # else read already: skipped
                            gap = offset - (r_offset or 0)
                            if gap > 1 and r_offset:
                                if acks_enabled_for(message.topic):
                                    await self._add_gap(tp, r_offset + 1, offset)
                            if self._n_acked >= commit_every:
                                self._n_acked = 0
                                await self.commit()
                            handover = callback(message)
                            done, yielded = start(handover)
                            if not done:
                                await self.wait_first(resume(handover, yielded), self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                except TopicAuthorizationFailedError as exc:  # an ACL taken away: unready, and fetch again
                    self._read_refused(exc)
                    await self.sleep(READ_REFUSED_WAIT_S)
                    continue
                if self._refused_read is not None:
                    self._read_allowed()

        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %s: %s", type(exc).__name__, exception_text(exc))
            raise


#: the least a fetch waits for (unless ``fetch_max_wait_ms`` passes first): more than a
#: batch of small events, so that a steady trickle is fetched by time, a backlog by size
FETCH_MIN_BYTES = 1 << 20
#: how long a fetch after one that brought nothing waits for its first byte (Kafka's default
#: ``fetch.max.wait.ms``): the broker answers it as soon as a record arrives
IDLE_FETCH_WAIT_MS = 500


def adapt_fetches(fetcher: Any, min_bytes: int, wait_ms: int | Callable[[], int],
                  idle_wait_ms: int = IDLE_FETCH_WAIT_MS) -> None:
    """Make aiokafka's ``fetcher`` (``AIOKafkaConsumer._fetcher``, which reads its
    ``_fetch_min_bytes`` and ``_fetch_max_wait_ms`` each time it builds a fetch request) ask
    for ``min_bytes`` or ``wait_ms`` after a fetch that brought records, and for 1 byte or
    ``idle_wait_ms`` after one that brought none (``_proc_fetch_request`` says which), unless
    records fetched before are still held back (``_records``) or a partition is paused.
    aiokafka leaves a partition with held-back records out of the next requests, and sends a
    broker nothing more while a fetch to it is in flight: in a backlog the agent's buffer is
    full, Faust stops taking a partition's records (they stay held back, fetched), the fetches
    of the others (the searches' and forget requests' among them, often empty) come back
    empty, and a long poll of those would keep the backlog's partition waiting for it once its
    records are taken. ``wait_ms`` may be a function, asked after each fetch (a
    :class:`FetchPacer`'s ``wait_ms``).

    >>> import asyncio, types
    >>> async def fetched(assignment, node_id, request):
    ...     return request == "records"
    >>> f = types.SimpleNamespace(_fetch_min_bytes=1 << 20, _fetch_max_wait_ms=10, _proc_fetch_request=fetched,
    ...                           _records={})
    >>> adapt_fetches(f, 1 << 20, 10)
    >>> _ = asyncio.run(f._proc_fetch_request(None, 0, "empty")); f._fetch_min_bytes, f._fetch_max_wait_ms
    (1, 500)
    >>> _ = asyncio.run(f._proc_fetch_request(None, 0, "records")); f._fetch_min_bytes, f._fetch_max_wait_ms
    (1048576, 10)
    """
    fetch = fetcher._proc_fetch_request
    wait_of = wait_ms if callable(wait_ms) else lambda: wait_ms

    async def fetch_adapting(assignment, node_id, request):
        brought = await fetch(assignment, node_id, request)
        if brought or fetcher._records or _any_paused(assignment):
            fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = min_bytes, wait_of()
        else:
            fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = 1, idle_wait_ms
        return brought

    fetcher._proc_fetch_request = fetch_adapting


#: a paced fetch waits at most this many times ``STREAMREC_FETCH_MAX_WAIT_MS``
PACED_FETCH_CAP = 5


class FetchPacer:
    """How long the worker's fetches wait for records: ``base_ms``
    (``STREAMREC_FETCH_MAX_WAIT_MS``), or as long as the worker has lately taken to handle a
    batch when that is longer, up to ``cap_ms``.

    A fetch costs about a millisecond of CPU however few records it brings (aiokafka's
    request and response in Python, then Faust's hand-over of what it brought: see
    bench/fetch_bench.py). While the worker handles a batch, the records of a fetch that
    returns sooner only wait in the agent's buffer, so fetching more often than the worker
    takes a batch spends CPU and wins nothing. A worker that keeps up (batches shorter than
    ``base_ms``) fetches every ``base_ms``, as before; a saturated one fetches about once a
    batch. :meth:`observe` is told each batch's handling time (the event loop's thread) and
    :meth:`wait_ms` is read by the consumer thread after each fetch (a float, read whole).

    >>> pacer = FetchPacer(10)
    >>> pacer.wait_ms()
    10
    >>> for _ in range(30):
    ...     pacer.observe(0.016)
    >>> pacer.wait_ms()
    16
    >>> for _ in range(30):
    ...     pacer.observe(0.5)
    >>> pacer.wait_ms()
    50
    """

    def __init__(self, base_ms: int, cap_ms: int | None = None, smoothing: float = 0.2) -> None:
        self.base_ms = int(base_ms)
        self.cap_ms = max(self.base_ms, int(cap_ms if cap_ms is not None else PACED_FETCH_CAP * self.base_ms))
        self.smoothing = smoothing
        self._batch_ms = 0.0  # moving average of the batches' handling times

    def observe(self, seconds: float) -> None:
        """One more batch handled, in ``seconds`` (counted as at most ``cap_ms``, so that the
        wait is back to ``base_ms`` a few batches after a backlog's big ones)."""
        self._batch_ms += self.smoothing * (min(seconds * 1000.0, self.cap_ms) - self._batch_ms)

    def wait_ms(self) -> int:
        """The wait of the next fetch that follows records."""
        return round(min(self.cap_ms, max(self.base_ms, self._batch_ms)))


def _any_paused(assignment: Any) -> bool:
    """Whether a partition of aiokafka's ``assignment`` is paused (None: no assignment)."""
    return assignment is not None and any(assignment.state_value(tp).paused for tp in assignment.tps)


#: the longest the consumer thread is waited for at a stop (the batch in hand is finished
#: before it is stopped: stream/app.py, Worker._stop_on_signal)
THREAD_STOP_S = 10.0
#: the longest the consumer thread is waited for at a stop whose final commit the broker did not answer
THREAD_STOP_AWAY_S = 2.0
#: the longest the final commit at a stop is waited for (:meth:`Consumer.commit_and_end_transactions`);
#: the broker answers one in milliseconds
STOP_COMMIT_S = 5.0
#: how long a final commit given up is waited for once cancelled (:func:`cancel_within`)
STOP_COMMIT_CANCEL_S = 1.0


async def cancel_within(task: asyncio.Future, timeout_s: float, what: str = "the final commit") -> bool:
    """Cancel ``task``, again each time it goes on past a cancellation, for at most ``timeout_s``;
    whether it ended. Faust's ``Consumer.commit`` swallows one: a commit that waits for another
    one in flight (the periodic commit, itself waiting for the coordinator) takes the
    cancellation of its wait as that commit's end and starts its own
    (``maybe_wait_for_commit_to_finish``), so ``asyncio.wait_for`` would wait for ever there."""
    deadline = time.monotonic() + timeout_s
    while not task.done():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        task.cancel()
        await asyncio.wait({task}, timeout=min(left, 0.05))
    if not task.cancelled() and task.exception() is not None:
        log.warning("%s, given up, raised %s: %s", what, type(task.exception()).__name__,
                    exception_text(task.exception()))
    return True


async def seek_to_committed_or_start(consumer) -> dict:
    """Seek an aiokafka ``consumer``'s assigned partitions to their committed offsets, and those
    with none (or 0) to offset 0 (:meth:`ConsumerThread.seek_to_committed` says why); return
    the committed offsets, as ``AIOKafkaConsumer.seek_to_committed`` does. Where retention has
    deleted a partition's head, offset 0 is out of range and aiokafka resets to the earliest."""
    committed = await consumer.seek_to_committed()
    for tp, offset in committed.items():
        if not offset:
            consumer.seek(tp, 0)
    return committed


class DaemonWorkerThread(WorkerThread):
    """mode's thread of a service, which the interpreter does not wait for at exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose aiokafka consumer fetches by :data:`FETCH_MIN_BYTES`
    or the transport's ``fetch_max_wait_ms`` (Faust's own: 1 byte or 1,500 ms), paced by the
    transport's ``fetch_pacer`` when it has one.

    It stops within :data:`THREAD_STOP_S` (mode's default is 60 s): with the broker away, its
    aiokafka consumer never finishes leaving the group, and a worker asked to stop (SIGTERM)
    took 62 s, past Kubernetes' grace period of 60 s; nothing it could still commit is lost
    (the broker is away), and the partitions are read again from the last commit.

    Its thread is a daemon: a worker no longer waits for it once that time has passed. With a
    broker that stopped answering (SIGSTOP, a host gone) rather than refusing, its aiokafka
    consumer's stop waits for the fetch in flight, up to ``broker_request_timeout`` (Faust's
    90 s), and the interpreter waited for the thread at exit: the worker's process ran on for
    that long after its event loop closed."""

    shutdown_timeout = THREAD_STOP_S
    Worker = DaemonWorkerThread

    async def stop(self) -> None:
        """mode's stop, whose timeout (the broker away: the aiokafka consumer never finishes
        leaving the group) is said in one line: mode logged it as an ERROR with two tracebacks,
        "Error while stopping child <ConsumerThread: stopping>", which reads as a crash in a stop
        that loses nothing."""
        try:
            await super().stop()
        except TimeoutError:
            log.warning("the consumer thread did not stop within %g s (Kafka does not answer, so it cannot leave the "
                        "group): the worker exits without waiting for it; the group gives its partitions to the other "
                        "workers once the session timeout passes", self.shutdown_timeout)

    def topic_partitions(self, topic: str) -> int | None:
        """How many partitions ``topic`` has, as this member's client metadata says (refreshed
        every ``stream.app.METADATA_MAX_AGE_S``; None: not known). Faust's answer is aiokafka's
        coordinator snapshot, which only the group's leader keeps: every other worker got None,
        so its peer reader (stream/peers.py) counted partitions added since start-up only up to
        its own highest, and the ``partitions`` readiness condition was never judged there."""
        consumer = self._consumer
        if consumer is None:
            return None
        partitions = consumer._client.cluster.partitions_for_topic(topic)  # noqa: SLF001 - no public call
        return len(partitions) if partitions else super().topic_partitions(topic)

    async def seek_to_committed(self) -> dict:
        """Seek every assigned partition to its committed offset, and one with none (or 0) to its
        start, where ``consumer_auto_offset_reset="earliest"`` (stream/app.py) starts it.

        Faust seeks to the committed offsets to have Kafka deliver again what it fetched and
        dropped: records that came back while the flow was stopped for a rebalance (Faust's
        ``getmany`` then calls ``perform_seek``), and events the worker left unacknowledged as
        stale (stream/batching.py). aiokafka's ``seek_to_committed`` leaves a partition without a
        committed offset where its fetcher stands (``if offset and offset > 0``), so those records
        were never read again, and Faust's next commit, which passes a gap at the head of a
        partition never committed (faust-streaming issue 606), lost them. It struck partitions
        added while workers run, whose first events arrive as the group assigns them: offsets
        0..68 of one were fetched with the flow stopped, the seek left it at 69, and
        tests/integration/test_added_partitions.py found those users short (3 runs in 10; none in 39 since).
        Read from the start, an event handled before comes again and its user's offsets
        (stream/state.py) skip it."""
        return await self.call_thread(seek_to_committed_or_start, self._ensure_consumer())

    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Faust reads committed data only when it writes in transactions itself; a site's
        # transactional producer leaves its aborted events in the log, and read uncommitted
        # they were applied (read by AIOKafkaConsumer.start(), which builds its Fetcher)
        consumer._isolation_level = ISOLATION_LEVEL
        wait_ms = getattr(transport, "fetch_max_wait_ms", None)
        wait: int | Callable[[], int] | None = None
        if wait_ms is not None:  # read by AIOKafkaConsumer.start(), which builds its Fetcher
            consumer._fetch_min_bytes = FETCH_MIN_BYTES
            consumer._fetch_max_wait_ms = int(wait_ms)
            pacer = getattr(transport, "fetch_pacer", None)
            wait = pacer.wait_ms if pacer is not None else int(wait_ms)
        start = consumer.start

        async def start_fetching() -> None:
            await start()
            # stopped while the broker is away, its thread died on a cancelled fetch's error
            fetches_end_empty_at_close(consumer._fetcher)
            if wait is not None:
                adapt_fetches(consumer._fetcher, FETCH_MIN_BYTES, wait)

        consumer.start = start_fetching
        commit = consumer.commit

        async def commit_unless_refused(offsets=None) -> None:
            try:
                await commit(offsets)
            except TopicAuthorizationFailedError as exc:  # Read taken away: see REFUSED_AS_REBALANCED
                _access_log.warning("Kafka refused to commit offsets (%s: %s): they are committed once it lets this "
                                    "user read the topics again", type(exc).__name__, exception_text(exc))
                raise CommitFailedError(REFUSED_AS_REBALANCED) from exc

        consumer.commit = commit_unless_refused
        start_once = consumer.start
        consumer.start = lambda: bootstrapped(start_once, "the consumer")
        return consumer


class Producer(faust_aiokafka.Producer):
    """Faust's producer, whose start waits for a broker that went away as the worker started
    (:func:`bootstrapped`) rather than stopping the worker."""

    def _new_producer(self):
        producer = super()._new_producer()
        start_once = producer.start
        producer.start = lambda: bootstrapped(start_once, "the producer")
        return producer


class Transport(faust_aiokafka.Transport):
    """The aiokafka transport with :class:`Consumer` and :class:`Producer`; ``fetch_max_wait_ms``
    (None: Faust's fetch) is how long the worker's fetches wait for :data:`FETCH_MIN_BYTES`, and
    ``fetch_pacer`` (None: always that long) lengthens it while batches take longer."""

    Consumer = Consumer
    Producer = Producer
    fetch_max_wait_ms: int | None = None
    fetch_pacer: FetchPacer | None = None


__all__ = ["BOOTSTRAP_RETRY", "FAUST_DRAIN_MESSAGES_FINGERPRINT", "FETCH_MIN_BYTES", "IDLE_FETCH_WAIT_MS", "PACED_FETCH_CAP",
           "STOP_COMMIT_S", "Consumer", "ConsumerThread", "DaemonWorkerThread", "FetchPacer", "Producer", "Transport",
           "adapt_fetches", "bootstrapped", "cancel_within", "resume",
           "seek_to_committed_or_start", "source_fingerprint", "start"]
