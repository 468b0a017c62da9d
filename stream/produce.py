"""``streamrec produce``: replay an interaction log (or the synthetic shop) as Kafka events.

The pure part gives each :class:`~online_models.types.Interaction` an event id that a replay
reproduces (the event is :func:`stream.step_inputs.to_event`'s, as the evaluator's), and paces
the stream with a token bucket:

>>> from online_models.types import Interaction
>>> x = Interaction("u7", "i3", 1_700_000_000_000, "purchase", "s1", "c2")
>>> to_event(x, event_id("taobao-1a2b3c4d", 12))
PurchaseEvent(event_id='taobao-1a2b3c4d-12', user_id='u7', item_id='i3', ts=1700000000000, quantity=1, price=None, order_id=None, category_id='c2', session_id='s1', rec_id=None)
>>> bucket = TokenBucket(rate=1000, burst=10, now=0.0)
>>> bucket.reserve(10, now=0.0), bucket.reserve(10, now=0.010), bucket.reserve(5, now=0.025)
(0.01, 0.01, 0.0)

The I/O shell writes through the worker's own producer path (:class:`stream.publisher.RecordBatches`:
one record batch per topic-partition, partitions by Kafka's murmur2 rule, as the Java client
chooses them): the per-message ``send`` path of kafka-python managed about 10,000 events/s on
the 2-core dev box, this one well over 100,000.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from online_models.datasets import FORMATS, SEED_MAX, DatasetError, read_interactions
from online_models.types import Interaction
from stream import logs
from stream.connections import AccessDenied, KafkaConnection
from stream.decoding import id_problem
from stream.errors import StreamrecError, counted, existing_file
from stream.produce_catalogue import read_catalogue_file, send_catalogue, synthetic_items
from stream.publisher import RecordBatches, murmur2_partition
from stream.records import MAX_ID_CHARS, encode
from stream.settings import Settings, TopicNames
from stream.step_inputs import to_event
from stream.topics import check_login, ensure_streamrec_topics

DEFAULT_SYNTHETIC_EVENTS = 10_000
#: room an event id leaves after its prefix: '-' and a position of up to 13 digits
ID_INDEX_CHARS = 14


# --- pure steps -------------------------------------------------------------------------

def source_tag(dataset: Path | None, fmt: str, seed: int) -> str:
    """What every event id of one replay starts with: the format and which log (or seed).

    >>> source_tag(None, "synthetic", 42)
    'synthetic-s42'
    >>> source_tag(Path("/data/UserBehavior.csv"), "taobao", 42) == source_tag(Path("UserBehavior.csv"), "taobao", 1)
    True
    """
    if dataset is None:
        return f"synthetic-s{seed}"
    digest = hashlib.blake2b(Path(dataset).name.encode(), digest_size=4).hexdigest()
    return f"{fmt}-{digest}"


def event_id(tag: str, index: int) -> str:
    """The id of the ``index``-th event of a replay: the same every time the log is replayed,
    so a worker de-duplicates a replay it has already applied."""
    return f"{tag}-{index}"


def topic_for(x: Interaction, topics: TopicNames) -> str:
    return topics.purchases if x.kind == "purchase" else topics.clicks


class TokenBucket:
    """At most ``rate`` events per second on average, bursts of at most ``burst``.

    :meth:`reserve` takes tokens at once, going into debt when there are too few, and says
    how long the caller must wait before sending; time slept beyond that refills the bucket
    (up to ``burst``), so a sleep that overshoots does not lower the long-run rate. The bucket
    starts empty: a replay starts at the rate, not with a burst.
    The clock is passed in, which keeps the bucket pure and testable with a fake clock.
    """

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, saw {rate}")
        self.rate = float(rate)
        # default: 100 ms worth, so a process descheduled for that long on a busy box catches up
        self.burst = float(burst) if burst is not None else max(1.0, self.rate * 0.1)
        self._tokens = 0.0
        self._last = now

    def reserve(self, n: int, now: float) -> float:
        """Take ``n`` tokens; return the seconds to wait before sending them (0.0: send now)."""
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
        self._tokens -= n
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


def chunk_size(rate: float | None) -> int:
    """Events sent between two looks at the clock: about 5 ms worth, 2 000 when unpaced.

    >>> chunk_size(2_000), chunk_size(20_000), chunk_size(None)
    (10, 100, 2000)
    """
    if rate is None:
        return 2_000
    return max(1, min(2_000, int(rate * 0.005)))


@dataclass
class ProduceSummary:
    clicks: int = 0
    purchases: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    #: the signal that interrupted it (the exit status is 128 plus its number)
    signal: int | None = None
    topics: dict[str, int] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return self.clicks + self.purchases

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        head = "interrupted after" if self.interrupted else "sent"
        return (f"{head} {counted(self.events, 'event')} ({counted(self.clicks, 'click')}, "
                f"{counted(self.purchases, 'purchase')}) "
                f"in {self.seconds:.2f} s: {self.rate:,.0f} events/s")


# --- the I/O shell ----------------------------------------------------------------------

async def started_producer(kafka: KafkaConnection, **options) -> AIOKafkaProducer:
    """An aiokafka producer reaching Kafka as ``kafka`` says, started; a broker that refuses the
    login is an :class:`~stream.connections.AccessDenied`, one that does not answer a
    :class:`~stream.errors.ServiceUnavailable`."""
    logs.thin_kafka_client()  # a broker gone mid-send: one line of each error per 10 s, not thousands a second
    producer = AIOKafkaProducer(**kafka.client_options(), **options)
    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        await asyncio.to_thread(check_login, kafka)  # AccessDenied when the broker refused the login
        raise kafka.unavailable(exc) from None
    return producer


def resume_hint(done: int) -> str:
    """How to send the rest of a log whose first ``done`` events are in Kafka: from event
    ``done + 1`` on, under the ids a whole replay gives them.

    >>> resume_hint(12_340)
    'run the same command with --skip 12340: it sends the log from its event 12,341 on, under the event ids a whole replay gives them (a worker skips an event whose id is among the latest STREAMREC_DEDUPE_WINDOW of its user, should one go twice)'
    """
    return (f"run the same command with --skip {done}: it sends the log from its event {done + 1:,} on, under the "
            "event ids a whole replay gives them (a worker skips an event whose id is among the latest "
            "STREAMREC_DEDUPE_WINDOW of its user, should one go twice)")


def _after(skipped: int) -> str:
    return f" after the first {skipped:,} (--skip)" if skipped else ""


def skip_events(interactions: Iterator[Interaction], n: int, source: str, say: Callable[[str], None],
                every_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> int:
    """Read and drop the first ``n`` of ``interactions`` (``--skip``); how many there were.

    They cannot be jumped over: a log is read line by line, and each event of the synthetic shop
    follows from the ones before it (one random stream). So ``say`` is told what is read and
    how many (``--skip 100000000`` was minutes of silence before the first event went), then every
    ``every_s`` seconds how far it got.

    >>> from online_models.datasets import synthetic_interactions
    >>> skip_events(synthetic_interactions(50), 20, "the synthetic shop", print)
    --skip 20: generating the first 20 events of the synthetic shop to drop them, before any is sent (each follows from the ones before it: none can be jumped over)
    20
    """
    if n <= 0:
        return 0
    verb = "generating" if source == "the synthetic shop" else "reading"
    why = "each follows from the ones before it" if verb == "generating" else "a log is read line by line"
    say(f"--skip {n:,}: {verb} the first {counted(n, 'event')} of {source} to drop them, before any is sent ({why}: "
        "none can be jumped over)")
    started = said = clock()
    skipped = 0
    for _ in itertools.islice(interactions, n):
        skipped += 1
        if not skipped % 4096 and clock() - said >= every_s:
            said = clock()
            say(f"--skip: {skipped:,} of {n:,} events dropped ({100 * skipped / n:.0f}%) in {said - started:.0f} s")
    return skipped


def replay_progress(sent: int, confirmed: int, unbroken: int, skipped: int = 0) -> str:
    """What a replay that Kafka failed had put in Kafka, of the first ``sent`` events it sent
    (after the ``skipped`` first events of the log): ``confirmed`` events, the first ``unbroken``
    all among them; and how to send the rest.

    >>> replay_progress(12_800, 12_340, 12_340)
    'Kafka confirmed the first 12,340 events of the log and none after them; to send the rest, run the same command with --skip 12340: it sends the log from its event 12,341 on, under the event ids a whole replay gives them (a worker skips an event whose id is among the latest STREAMREC_DEDUPE_WINDOW of its user, should one go twice)'
    >>> replay_progress(12_800, 12_340, 12_000).split(";")[0]
    'Kafka confirmed 12,340 of the first 12,800 events of the log: all of the first 12,000, and 340 after them'
    >>> replay_progress(800, 700, 700, skipped=5_000).split(": it")[0]
    'Kafka confirmed the first 700 events of the log after the first 5,000 (--skip) and none after them; to send the rest, run the same command with --skip 5700'
    >>> replay_progress(800, 0, 0)
    'Kafka confirmed none of the 800 events sent; run the same command again to send them'
    """
    if sent == 0:
        return "no event had been sent"
    if confirmed == 0:
        return f"Kafka confirmed none of the {counted(sent, 'event')} sent; run the same command again to send them"
    if confirmed == unbroken:
        head = f"Kafka confirmed the first {counted(confirmed, 'event')} of the log{_after(skipped)} and none after them"
    else:
        head = (f"Kafka confirmed {confirmed:,} of the first {counted(sent, 'event')} of the log{_after(skipped)}: all "
                f"of the first {unbroken:,}, and {confirmed - unbroken:,} after them")
    return f"{head}; to send the rest, {resume_hint(skipped + unbroken)}"


def bad_line_progress(sent: int, skipped: int = 0) -> str:
    """What a replay stopped by a line that is no event says it sent (``sent`` events, after the
    ``skipped`` first ones of the log), and how to go on.

    >>> bad_line_progress(50_000).split(": it")[0]
    'produce stopped there, and Kafka confirmed the 50,000 events of the log before that line; correct or delete the line, then run the same command with --skip 50000'
    >>> bad_line_progress(20_000, skipped=30_000).split(": it")[0]
    'produce stopped there, and Kafka confirmed the 20,000 events of the log before that line after the first 30,000 (--skip); correct or delete the line, then run the same command with --skip 50000'
    """
    return (f"produce stopped there, and Kafka confirmed the {counted(sent, 'event')} of the log before that line"
            f"{_after(skipped)}; correct or delete the line, then {resume_hint(skipped + sent)}")


def _take(it: Iterator[Interaction], n: int) -> tuple[list[Interaction], DatasetError | None]:
    """The next ``n`` interactions at most, and the error of a line that is not one, if the log
    reached such a line (it is read as it is sent): the ones read before it come with it."""
    chunk: list[Interaction] = []
    try:
        for x in it:
            chunk.append(x)
            if len(chunk) == n:
                break
    except DatasetError as exc:
        return chunk, exc
    return chunk, None


def send_failure(kafka: KafkaConnection, exc: KafkaError, what: str) -> Exception:
    """What a send that Kafka failed raises: the broker's refusal of the login
    (:class:`~stream.connections.AccessDenied`), else a sentence saying ``what`` failed."""
    denied = kafka.refusal(exc)
    return denied if denied is not None else StreamrecError(f"{what} to {kafka.bootstrap} failed: {exc!r}")


async def replay(
    interactions: Iterable[Interaction],
    bootstrap: KafkaConnection | str,
    topics: TopicNames,
    tag: str,
    rate: float | None = None,
    keep_ts: bool = False,
    stop: asyncio.Event | None = None,
    on_progress: Callable[[ProduceSummary], None] | None = None,
    acks: int | str = 1,
    skipped: int = 0,
) -> ProduceSummary:
    """Send every interaction as an event, paced to ``rate`` events/s (None: as fast as it goes).

    Returns when all were acknowledged, or early (flushing what was sent) when ``stop`` is set.
    ``bootstrap``: ``Settings.kafka`` (or bootstrap servers alone for a plaintext broker).
    ``skipped``: how many events of the log come before ``interactions`` (``--skip``): the first
    one's id is the log's position ``skipped``, as in a whole replay.
    """
    kafka = KafkaConnection.of(bootstrap)
    producer = await started_producer(kafka, client_id="streamrec-produce", acks=acks, linger_ms=0,
                                      max_batch_size=256 * 1024, request_timeout_ms=30_000)
    summary = ProduceSummary(topics={topics.clicks: 0, topics.purchases: 0})
    batches = RecordBatches(producer)
    bad_line: DatasetError | None = None  # a line of the log that is not an event: the ones before it go
    try:
        counts = {topics.clicks: len(await batches.partitions(topics.clicks)),
                  topics.purchases: len(await batches.partitions(topics.purchases))}
        bucket = TokenBucket(rate, now=time.monotonic()) if rate else None
        step = chunk_size(rate)
        partition_of: dict[tuple[str, bytes], int] = {}
        started = time.monotonic()
        last_report = started
        it = iter(interactions)
        index = skipped
        while bad_line is None and (stop is None or not stop.is_set()):
            chunk, bad_line = _take(it, step)
            if not chunk:
                break
            if bucket is not None and (wait := bucket.reserve(len(chunk), time.monotonic())) > 0:
                if stop is None:
                    await asyncio.sleep(wait)
                else:  # a slow rate waits long: a signal meanwhile stops it now, this chunk unsent
                    try:
                        await asyncio.wait_for(stop.wait(), wait)
                        break
                    except TimeoutError:
                        pass
            now_ms = None if keep_ts else time.time_ns() // 1_000_000
            for x in chunk:
                topic = topics.purchases if x.kind == "purchase" else topics.clicks
                key = x.user_id.encode()
                partition = partition_of.get((topic, key))
                if partition is None:
                    partition = partition_of[(topic, key)] = murmur2_partition(key, counts[topic])
                value = encode(to_event(x, f"{tag}-{index}", now_ms))
                if not batches.append(topic, partition, key, value) and not await batches.add(  # the common case: no await per event
                        topic, partition, key, value):
                    raise StreamrecError(f"an event of {len(value)} bytes does not fit in an empty record batch")
                index += 1
                summary.topics[topic] += 1
            summary.clicks, summary.purchases = summary.topics[topics.clicks], summary.topics[topics.purchases]
            batches.raise_delivered()  # a delivery error stops the replay here, not at the end
            if bucket is not None:
                await batches.send_open()  # paced: out now, do not wait for a batch to fill
            else:
                await asyncio.sleep(0)  # let the sender task run and the stop signal in
            if on_progress is not None and time.monotonic() - last_report >= 0.1:
                last_report = time.monotonic()
                summary.seconds = last_report - started
                on_progress(summary)
        summary.interrupted = stop is not None and stop.is_set()
        await batches.send_open()
        await batches.wait_all()
        summary.seconds = time.monotonic() - started
    except KafkaError as exc:
        await producer.stop()  # waits for every batch sent to be acknowledged or to fail
        confirmed, unbroken = batches.acknowledged()
        batches.abandon()  # the batches still in flight fail too: the first failure is the one said
        failure = send_failure(kafka, exc, "sending events")
        if isinstance(failure, AccessDenied):
            raise failure from None
        raise StreamrecError(f"{failure}; {replay_progress(batches.appended, confirmed, unbroken, skipped)}") from None
    finally:
        await producer.stop()
    if on_progress is not None:
        on_progress(summary)
    if bad_line is not None:  # every event before it is in Kafka now (else a KafkaError above)
        raise DatasetError(f"{bad_line}; {bad_line_progress(batches.appended, skipped)}")
    return summary


# --- the command ------------------------------------------------------------------------

def produce(
    dataset: Annotated[Path | None, typer.Option(
        "--dataset", "-d", help="Log to replay; leave out for the built-in synthetic shop.",
        dir_okay=False, readable=True, callback=existing_file)] = None,
    format: Annotated[str, typer.Option(
        "--format", "-f", help=f"Format of --dataset: {', '.join(f for f in FORMATS if f != 'synthetic')} "
        "(synthetic without --dataset).")] = "synthetic",
    rate: Annotated[float | None, typer.Option(
        "--rate", "-r", min=0.001, max=10_000_000, help="Events per second (token bucket), up to 10,000,000; leave out for as fast as possible.")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", "-n", min=0, help=f"Send at most N events (synthetic: exactly N, default {DEFAULT_SYNTHETIC_EVENTS:,}).")] = None,
    skip: Annotated[int, typer.Option(
        "--skip", min=0, max=sys.maxsize, help="Start after the first N events of the log (or of the synthetic shop): they are read, "
        "not sent, and the events after them keep the ids a whole replay gives them. To go on where a replay that "
        "stopped says it got to; --limit counts the events sent after them.")] = 0,
    bootstrap: Annotated[str | None, typer.Option(
        "--bootstrap", "-b", help="Kafka bootstrap servers (default STREAMREC_KAFKA_BOOTSTRAP).")] = None,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="Prefix of the topic names (default STREAMREC_TOPIC_PREFIX).")] = None,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed of the synthetic generator.")] = 42,
    keep_ts: Annotated[bool, typer.Option(
        "--keep-ts/--now-ts", help="Keep the log's timestamps, or stamp each event with the time it is sent "
        "(the default, so that event-to-recommendation latency means something).")] = False,
    id_prefix: Annotated[str | None, typer.Option(
        "--id-prefix", help="Start event ids with this instead of the log's tag (format, file, seed): a fresh "
        "prefix makes a replay count as new events for a worker that has already seen this log.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    catalogue: Annotated[Path | None, typer.Option(
        "--catalogue", help="Send this catalogue (JSON Lines, one ItemEvent per line: docs/events.md) to <prefix>items "
        "instead of events; every line is checked first.", dir_okay=False, readable=True, callback=existing_file)] = None,
    demo_catalogue: Annotated[bool, typer.Option(
        "--demo-catalogue", help="Send the synthetic shop's catalogue (2,000 items titled in English and Chinese, "
        "for --seed) to <prefix>items instead of events, for search.")] = False,
) -> ProduceSummary | int:
    """Replay a click/purchase log (or a synthetic shop) as events, keyed by user_id.

    Clicks go to <prefix>clicks, purchases to <prefix>purchases; missing topics are created first.

    Event ids are the same on every replay of the same log (format, file name or seed, and position), so a worker that already applied them skips them.

    Ctrl-C stops early: what was sent is flushed and the summary printed.

    With --catalogue FILE: the items of FILE go to <prefix>items, keyed by item_id, for search.
    """
    if catalogue is not None or demo_catalogue:
        if dataset is not None or (catalogue is not None and demo_catalogue):
            raise typer.BadParameter("send one catalogue or a log of events, not both", param_hint="--catalogue")
        if rate is not None or limit is not None or skip or id_prefix is not None or keep_ts:
            raise typer.BadParameter("--rate, --limit, --skip, --id-prefix and --keep-ts pace and name events: a "
                                     "catalogue is sent whole", param_hint="--catalogue")
        return _produce_catalogue(catalogue, bootstrap, topic_prefix, seed)
    fmt = "synthetic" if dataset is None and format in ("synthetic", "") else format
    if fmt not in FORMATS:
        raise typer.BadParameter(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", param_hint="--format")
    if dataset is None and fmt != "synthetic":
        raise typer.BadParameter(f"format {fmt} needs --dataset PATH", param_hint="--dataset")
    if dataset is not None and fmt == "synthetic":
        raise typer.BadParameter("--dataset needs --format (taobao, yoochoose or otto)", param_hint="--format")
    problem = None if id_prefix is None else id_problem(id_prefix, MAX_ID_CHARS - ID_INDEX_CHARS)
    if problem is not None:
        raise typer.BadParameter(f"{problem} (an event id is the prefix, '-' and the event's position)",
                                 param_hint="--id-prefix")
    settings = Settings.with_options(kafka_bootstrap=("--bootstrap", bootstrap), topic_prefix=("--topic-prefix", topic_prefix))
    topics = settings.topics
    n = limit if limit is not None or dataset is not None else DEFAULT_SYNTHETIC_EVENTS
    read = None if n is None else n + skip  # the skipped events are read too
    try:
        interactions = iter(read_interactions(dataset, fmt, read, seed=seed) if dataset is None
                            else read_interactions(dataset, fmt, read))
        # the skipped events and the first one sent read now, before Kafka: a log in another
        # format, with no events, or with no more than --skip, is said at once (a later bad line
        # is said when it is reached: a log is read as it is sent)
        skipped = skip_events(interactions, skip, "the synthetic shop" if dataset is None else str(dataset),
                              lambda line: typer.echo(line, err=True))
        first = next(interactions, None)
    except DatasetError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    if first is None and n != 0:
        if skipped:
            raise typer.BadParameter(f"{dataset}: no {fmt} events after the first {skipped:,} (the log has "
                                     f"{counted(skipped, 'event')}); nothing is left to send", param_hint="--skip")
        raise typer.BadParameter(f"{dataset}: no {fmt} events in it (empty, or a header alone); check the file "
                                 "and --format", param_hint="--dataset")
    interactions = itertools.chain([] if first is None else [first], interactions)

    ensure_streamrec_topics(settings)
    tag = id_prefix if id_prefix is not None else source_tag(dataset, fmt, seed)
    summary = _run_with_progress(interactions, settings.kafka, topics, tag,
                                 rate, keep_ts, progress, total=n, skipped=skipped)
    typer.echo(summary.line())
    typer.echo(f"topics: {topics.clicks} ({summary.topics.get(topics.clicks, 0):,}), "
               f"{topics.purchases} ({summary.topics.get(topics.purchases, 0):,}) on {settings.kafka_bootstrap}")
    if summary.interrupted:
        raise typer.Exit(128 + (summary.signal or signal.SIGINT))
    return summary


def _produce_catalogue(path: Path | None, bootstrap: str | None, topic_prefix: str | None, seed: int) -> int:
    settings = Settings.with_options(kafka_bootstrap=("--bootstrap", bootstrap), topic_prefix=("--topic-prefix", topic_prefix))
    now = time.time_ns() // 1_000_000
    items = read_catalogue_file(path, now, settings.bounds) if path is not None else synthetic_items(seed, now)
    if not items:  # before Kafka: sending nothing would say "sent 0 items" and leave search empty
        raise typer.BadParameter(f"{path}: no items in it (empty, or blank lines alone); one ItemEvent per line "
                                 "(docs/events.md)", param_hint="--catalogue")
    ensure_streamrec_topics(settings)

    async def main() -> int:
        kafka = settings.kafka
        producer = await started_producer(kafka, client_id="streamrec-produce-catalogue", acks="all", linger_ms=5,
                                          max_batch_size=256 * 1024)
        try:
            return await send_catalogue(items, producer, settings.topics.items)
        except KafkaError as exc:
            raise send_failure(kafka, exc, "sending the catalogue") from None
        finally:
            await producer.stop()

    sent = asyncio.run(main())
    typer.echo(f"sent {counted(sent, 'item')} to {settings.topics.items} on {settings.kafka_bootstrap}")
    return sent


def _run_with_progress(interactions, bootstrap, topics, tag, rate, keep_ts, show, total, skipped=0) -> ProduceSummary:
    console = Console(stderr=True)
    columns = [TextColumn("[bold]producing"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]:>10,.0f} ev/s"), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not show, transient=False) as bar:
        task = bar.add_task("events", total=total, rate=0.0)

        def on_progress(s: ProduceSummary) -> None:
            bar.update(task, completed=s.events, rate=s.rate)

        async def main() -> ProduceSummary:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            signals = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
            received: list[signal.Signals] = []
            for sig in signals:
                loop.add_signal_handler(sig, _stopper(loop, stop, sig, received))
            try:
                summary = await replay(interactions, bootstrap, topics, tag, rate, keep_ts, stop, on_progress,
                                       skipped=skipped)
                summary.signal = int(received[0]) if received else None
                return summary
            finally:
                for sig in signals:
                    loop.remove_signal_handler(sig)

        return asyncio.run(main())


def _stopper(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, sig: signal.Signals,
             received: list[signal.Signals]) -> Callable[[], None]:
    def handle() -> None:
        received.append(sig)
        stop.set()  # the replay loop flushes and returns; a second signal kills the default way
        loop.remove_signal_handler(sig)

    return handle


__all__ = ["ProduceSummary", "TokenBucket", "bad_line_progress", "chunk_size", "event_id", "produce", "replay",
           "replay_progress", "resume_hint", "skip_events", "source_tag", "topic_for"]
