"""``streamrec redrive``: send dead letters' original values back to the topics they came from.

After a bug that dead-lettered valid events (``processing_error``: a learner, the scorer or the
state raised) is fixed, the events it took out are still owed to their users. Each dead letter
holds the original value (``raw``) and the topic it was read from, keyed by the original key;
this command reads ``<prefix>dlq`` once, from its oldest letter (or ``--since``) to its end as it
was when the command started, and sends the chosen letters' values back, keyed as they were, to
the same topics. The worker then handles them as it handles any event: an event it applied
already (the same ``event_id`` among the user's latest ``STREAMREC_DEDUPE_WINDOW``) is skipped,
and a forgotten user's events from before their erasure are never learned.

What is never sent back, and why (the summary counts each):

- a value cut at 64 KiB (``raw_truncated``): the rest of it is lost;
- a letter of the items topic: it is compacted, so an old value would replace a newer one; send
  the item's current value again instead (docs/operations.md, StreamrecItemsNotEmbedded);
- a letter of a topic this deployment's workers do not read (another prefix);
- a letter of a topic that no longer exists: sending to it would make a broker that creates
  topics on first use create it with its defaults, not the workers' partitions and settings;
- a message of the dead-letter topic that is no dead letter;
- the same original message dead-lettered twice (a worker that crashed after sending its
  letter and before committing sends it again): sent once.

>>> letter = DeadLetter(reason="handling it raised KeyError: 'i9'", topic="streamrec.clicks", partition=1,
...                     offset=41, raw='{"event_id":"e1"}', ts=1_700_000_000_000, code="processing_error")
>>> choice = Choice(codes=frozenset({"processing_error"}), topics=frozenset({"streamrec.clicks"}), items_topic="streamrec.items")
>>> choice.refusal(letter, b"u1") is None
True
>>> choice.refusal(msgspec.structs.replace(letter, code="malformed_json"), b"u1")
'code'
>>> original_value(msgspec.structs.replace(letter, raw="/w==", raw_encoding="base64"))
b'\\xff'
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated

import msgspec
import typer
from aiokafka.errors import KafkaError as AioKafkaError
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from stream.decoding import id_problem
from stream.errors import DEAD_LETTER_CODES, StreamrecError, counted, some_of
from stream.produce import started_producer
from stream.records import MAX_TS_MS, DeadLetter, decode_dead_letter
from stream.settings import Settings
from stream.tail import dead_letter_line, is_for_user, stop_on_signals
from stream.topics import require_topic

#: the header a value sent back carries: which dead letter it came from
REDRIVEN_HEADER = "streamrec-redriven-from"

#: ``--code`` for every code
ALL_CODES = "all"

#: why a letter is not sent, in the summary's order: (key, what the summary says of such letters)
REFUSALS = {
    "user": "for other users (--user)",
    "time": "dead-lettered outside --since/--until",
    "code": "of other codes (--code chooses: {codes})",
    "not_a_letter": "not dead letters (not the DeadLetter JSON; left alone)",
    "duplicate": "dead-lettered again (the same original message twice: sent once)",
    "truncated": "cut at 64 KiB when dead-lettered (raw_truncated: the rest of the value is lost; ask the producer to send it again)",
    "items": "of the items topic (compacted: send each item's current value again, keyed by its item_id, not the old value)",
    "topic": "from topics this deployment's workers do not read: {topics} (another --topic-prefix?)",
    "gone": ("of topics that no longer exist: {gone} (not sent, which would create them with the broker's defaults; "
             "a worker creates its topics when it starts: start one, then run this again)"),
}

#: how far before ``--since`` the dead-letter topic is read, for clocks that disagree
CLOCK_SLACK_MS = 300_000

#: seconds without a message, with some of the dead-letter topic left to read, after which it gives up
STALLED_S = 30.0

#: seconds between progress lines on stderr while letters go back
PROGRESS_EVERY_S = 5.0


def parse_time(text: str) -> int:
    """Epoch milliseconds from ``text``: an integer of epoch milliseconds, or an ISO 8601 date
    and time (UTC where it names no offset).

    >>> parse_time("1700000000000"), parse_time("2023-11-14T22:13:20Z"), parse_time("2023-11-14 22:13:20")
    (1700000000000, 1700000000000, 1700000000000)
    >>> parse_time("2023-11-14T23:13:20+01:00")
    1700000000000
    >>> parse_time("yesterday")
    Traceback (most recent call last):
    ...
    ValueError: 'yesterday' is neither epoch milliseconds nor an ISO 8601 date and time (2026-12-06T02:00:00Z)
    >>> parse_time("99999999999999999999")
    Traceback (most recent call last):
    ...
    ValueError: '99999999999999999999' is past the year 9999 (epoch milliseconds go up to 253402300799999)
    """
    text = text.strip()
    if text.lstrip("-").isdigit():
        if int(text) > MAX_TS_MS:  # Kafka's offset lookup by time takes 64 bits: a longer one was a struct.error
            raise ValueError(f"{text!r} is past the year 9999 (epoch milliseconds go up to {MAX_TS_MS})")
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither epoch milliseconds nor an ISO 8601 date and time "
                         "(2026-12-06T02:00:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return round(when.timestamp() * 1000)


def original_value(letter: DeadLetter) -> bytes:
    """The bytes of the value that was dead-lettered (``raw``, decoded as ``raw_encoding`` says)."""
    if letter.raw_encoding == "base64":
        return base64.b64decode(letter.raw, validate=True)
    return letter.raw.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Choice:
    """Which letters go back: ``codes`` (empty: every code), letters of ``topics`` only, the
    letter's ``ts`` in [``since``, ``until``] (epoch ms; None: unbounded), keyed ``user`` (None:
    any)."""

    codes: frozenset[str]
    topics: frozenset[str]
    items_topic: str
    since: int | None = None
    until: int | None = None
    user: str | None = None

    def refusal(self, letter: DeadLetter, key: bytes | None) -> str | None:
        """None when ``letter`` goes back, else the key in :data:`REFUSALS` of why not."""
        if not is_for_user(key, self.user):
            return "user"
        if (self.since is not None and letter.ts < self.since) or (self.until is not None and letter.ts > self.until):
            return "time"
        if self.codes and letter.code not in self.codes:
            return "code"
        if letter.raw_truncated:
            return "truncated"
        if letter.topic == self.items_topic:
            return "items"
        if letter.topic not in self.topics:
            return "topic"
        return None


@dataclass
class Tally:
    """What a redrive did: letters sent back per topic, and left per reason (with their codes and topics)."""

    sent: Counter = field(default_factory=Counter)
    left: Counter = field(default_factory=Counter)
    left_codes: Counter = field(default_factory=Counter)
    left_topics: Counter = field(default_factory=Counter)
    gone_topics: Counter = field(default_factory=Counter)
    read: int = 0
    newest_sent_ts: int | None = None

    def summary(self, dry_run: bool, dlq: str, complete: bool = True) -> str:
        """One paragraph: how many went back where, and every group left with why (``complete``:
        the topic was read to its end, so a later run can start after the newest letter sent).

        >>> t = Tally(read=5); t.sent.update({"streamrec.clicks": 2}); t.left.update({"code": 2, "items": 1})
        >>> t.left_codes.update({"malformed_json": 2}); t.newest_sent_ts = 1700000000000
        >>> print(t.summary(False, "streamrec.dlq"))
        read 5 messages of streamrec.dlq; sent back 2 (streamrec.clicks 2); the newest dead-lettered at 1700000000000 (a later run with --since 1700000000001 leaves these out)
        left 2 of other codes (--code chooses: malformed_json 2)
        left 1 of the items topic (compacted: send each item's current value again, keyed by its item_id, not the old value)
        """
        total = sum(self.sent.values())
        verb = "would send back" if dry_run else "sent back"
        where = f" ({', '.join(f'{t} {n:,}' for t, n in sorted(self.sent.items()))})" if total else ""
        lines = [f"read {counted(self.read, 'message')} of {dlq}; {verb} {total:,}{where}"]
        if self.newest_sent_ts is not None and not dry_run and complete:
            lines[0] += (f"; the newest dead-lettered at {self.newest_sent_ts} (a later run with --since "
                         f"{self.newest_sent_ts + 1} leaves these out)")
        for reason, text in REFUSALS.items():
            n = self.left.get(reason)
            if not n:
                continue
            text = text.format(codes=some_of([f"{c} {k:,}" for c, k in self.left_codes.most_common()], 6),
                               topics=some_of([f"{t} {k:,}" for t, k in self.left_topics.most_common()], 4),
                               gone=some_of([f"{t} {k:,}" for t, k in self.gone_topics.most_common()], 4))
            lines.append(f"left {n:,} {text}")
        return "\n".join(lines)


def _starts(consumer: KafkaConsumer, partitions: list[TopicPartition], since: int | None) -> dict[TopicPartition, int]:
    """Where each partition is read from: its oldest message, or the first Kafka stamped at or
    after ``since`` less :data:`CLOCK_SLACK_MS` (a letter's ``ts`` is the worker's clock, the
    record's timestamp the producer's or the broker's; the letters are then chosen by ``ts``)."""
    if since is None:
        return consumer.beginning_offsets(partitions)
    found = consumer.offsets_for_times({tp: max(since - CLOCK_SLACK_MS, 0) for tp in partitions})
    ends = consumer.end_offsets(partitions)
    return {tp: (found[tp].offset if found.get(tp) is not None else ends[tp]) for tp in partitions}


async def redrive_letters(settings: Settings, choice: Choice, dry_run: bool = False, echo=typer.echo,
                          progress=None, stop=None) -> Tally:
    """Read ``<prefix>dlq`` from its start (or ``choice.since``) to its end as it is now, and send
    the value of every letter ``choice`` takes back to its topic, keyed as the letter is, each
    confirmed by every in-sync replica. ``echo`` gets a line per letter sent (or, with
    ``dry_run``, that would be); ``stop`` (a ``threading.Event``) ends it early, after the sends
    in flight are confirmed."""
    kafka, dlq = settings.kafka, settings.topics.dlq
    tally = Tally()
    consumer = kafka.reader("streamrec-redrive")
    producer = None if dry_run else await started_producer(
        kafka, client_id="streamrec-redrive", acks="all", enable_idempotence=True, request_timeout_ms=30_000)
    sent_from: set[tuple[str, int, int]] = set()
    shown = time.monotonic()
    try:
        partitions = [TopicPartition(dlq, p) for p in sorted(consumer.partitions_for_topic(dlq) or ())]
        ends = consumer.end_offsets(partitions)
        existing = consumer.topics()  # a letter's topic deleted since: not created again by sending to it
        starts = _starts(consumer, partitions, choice.since)
        todo = [tp for tp in partitions if starts[tp] < ends[tp]]
        consumer.assign(todo)
        for tp in todo:
            consumer.seek(tp, starts[tp])
        heard = time.monotonic()
        while todo and not (stop is not None and stop.is_set()):
            polled = consumer.poll(timeout_ms=500, max_records=500)
            chosen: list[tuple[DeadLetter, bytes, bytes | None, str]] = []
            for tp, records in polled.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        break
                    tally.read += 1
                    out = _take(record, choice, tally, sent_from, existing)
                    if out is not None:
                        chosen.append((*out, record.key, f"{dlq}[{tp.partition}]@{record.offset}"))
            if polled:
                heard = time.monotonic()
            elif time.monotonic() - heard > STALLED_S:
                left = some_of([f"{tp.partition}: {consumer.position(tp):,} of {ends[tp]:,}" for tp in todo], 4)
                raise StreamrecError(f"no message of {dlq} arrived for {STALLED_S:g} s with some left to read "
                                     f"(partition: position of end {left}): is Kafka at {kafka.bootstrap} answering? "
                                     f"{_so_far(tally)}")
            await _send(producer, chosen, tally, echo)
            for tp in list(todo):
                if consumer.position(tp) >= ends[tp]:
                    todo.remove(tp)
                    consumer.pause(tp)
            if progress is not None and time.monotonic() - shown >= PROGRESS_EVERY_S:
                shown = time.monotonic()
                progress(f"redrive: {tally.read:,} letters read, {sum(tally.sent.values()):,} sent back")
    except (KafkaError, AioKafkaError) as exc:
        raise StreamrecError(f"redriving from {dlq} at {kafka.bootstrap} failed: {exc!r}; {_so_far(tally)}") from None
    finally:
        consumer.close(autocommit=False)
        if producer is not None:
            await producer.stop()
    return tally


async def _send(producer, chosen: list, tally: Tally, echo) -> None:
    """Send each chosen value (none with no ``producer``: a dry run) and count and echo each one
    Kafka confirmed, in order; the first failure raises after the sends before it are counted."""
    if producer is not None and chosen:
        futures = [await producer.send(letter.topic, value, key=key, headers=[(REDRIVEN_HEADER, origin.encode())])
                   for letter, value, key, origin in chosen]
        results = await asyncio.gather(*futures, return_exceptions=True)
    else:
        results = [None] * len(chosen)
    for (letter, _, _, _), result in zip(chosen, results, strict=True):
        if isinstance(result, BaseException):
            raise result
        tally.sent[letter.topic] += 1
        tally.newest_sent_ts = letter.ts if tally.newest_sent_ts is None else max(tally.newest_sent_ts, letter.ts)
        echo(("sent " if producer is not None else "would send ") + dead_letter_line(letter))


def _so_far(tally: Tally) -> str:
    """What a redrive that stopped part way says: how many Kafka confirmed, and how to go on.

    >>> t = Tally(); print(_so_far(t))
    nothing was sent back; run the same command again
    >>> t.sent.update({"streamrec.clicks": 3}); print(_so_far(t))
    Kafka confirmed 3 values sent back; run the same command again for the rest (the workers skip an event sent back twice while its event_id is among its user's latest STREAMREC_DEDUPE_WINDOW)
    """
    done = sum(tally.sent.values())
    if not done:
        return "nothing was sent back; run the same command again"
    return (f"Kafka confirmed {counted(done, 'value')} sent back; run the same command again for the rest (the workers "
            "skip an event sent back twice while its event_id is among its user's latest STREAMREC_DEDUPE_WINDOW)")


def _take(record, choice: Choice, tally: Tally, sent_from: set,
          existing: set[str] | None = None) -> tuple[DeadLetter, bytes] | None:
    """The letter in ``record`` and its original value when it goes back, else None (counted).
    ``existing``: the topics on the broker (None: not checked)."""
    try:
        letter = decode_dead_letter(record.value or b"")
        value = original_value(letter)
    except (msgspec.DecodeError, binascii.Error, UnicodeEncodeError, ValueError):
        tally.left["not_a_letter"] += 1
        return None
    why = choice.refusal(letter, record.key)
    if why is None and (letter.topic, letter.partition, letter.offset) in sent_from:
        why = "duplicate"
    if why is None and existing is not None and letter.topic not in existing:
        why = "gone"
    if why is not None:
        tally.left[why] += 1
        if why == "code":
            tally.left_codes[letter.code] += 1
        elif why == "topic":
            tally.left_topics[letter.topic] += 1
        elif why == "gone":
            tally.gone_topics[letter.topic] += 1
        return None
    sent_from.add((letter.topic, letter.partition, letter.offset))
    return letter, value


def _time_option(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=name) from None


def redrive(
    code: Annotated[list[str] | None, typer.Option(
        "--code", "-c", help=f"Send back letters of this code (repeat it for several; '{ALL_CODES}': every code). "
        "Default processing_error: valid events whose handling raised (a bug, now fixed).")] = None,
    since: Annotated[str | None, typer.Option(
        "--since", help="Only letters dead-lettered at or after this time: epoch ms, or ISO 8601 (2026-12-06T02:00:00Z; UTC if no offset).")] = None,
    until: Annotated[str | None, typer.Option("--until", help="Only letters dead-lettered at or before this time (as --since).")] = None,
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's letters (matched on the message key).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", "-n", help="List what would be sent back; send nothing.")] = False,
    bootstrap: Annotated[str | None, typer.Option(
        "--bootstrap", "-b", help="Kafka bootstrap servers (default STREAMREC_KAFKA_BOOTSTRAP).")] = None,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="Prefix of the topic names (default STREAMREC_TOPIC_PREFIX).")] = None,
) -> None:
    """Send dead letters' original values back to the topics they came from, once a bug is fixed.

    Reads <prefix>dlq once (from --since, else its oldest letter, to its end as it is when the command starts) and sends each chosen letter's `raw` value to its topic (clicks, purchases, impressions, searches or forget), keyed as it was, with a streamrec-redriven-from header naming the letter. One line per letter sent, then a summary of what was left and why. The workers apply the events as any other: an event applied already (its event_id among the user's latest STREAMREC_DEDUPE_WINDOW) is skipped, and a forgotten user's events from before the erasure are never learned.

    Never sent back: values cut at 64 KiB, letters of the items topic (compacted: send each item's current value instead), letters of topics these workers do not read, letters of topics that no longer exist (sending would create them with the broker's defaults). Try --dry-run first. Ctrl-C stops after the sends in flight are confirmed.
    """
    codes = code or ["processing_error"]
    unknown = [c for c in codes if c != ALL_CODES and c not in DEAD_LETTER_CODES]
    if unknown:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))}: no dead-letter code; the codes are "
                                 f"{', '.join(DEAD_LETTER_CODES)} (or '{ALL_CODES}')", param_hint="--code")
    problem = None if user is None else id_problem(user)
    if problem is not None:
        raise typer.BadParameter(f"{problem}: no event carries such a user id", param_hint="--user")
    start, end = _time_option(since, "--since"), _time_option(until, "--until")
    if start is not None and end is not None and end < start:
        raise typer.BadParameter(f"--until ({until}) is before --since ({since})", param_hint="--until")
    settings = Settings.with_options(kafka_bootstrap=("--bootstrap", bootstrap), topic_prefix=("--topic-prefix", topic_prefix))
    topics = settings.topics
    require_topic(settings, topics.dlq)  # a typo in the prefix must not read nothing and say "sent back 0"
    choice = Choice(codes=frozenset() if ALL_CODES in codes else frozenset(codes), topics=frozenset(topics.consumed),
                    items_topic=topics.items, since=start, until=end, user=user)

    def progress(line: str) -> None:
        typer.secho(line, err=True)

    with stop_on_signals() as stop:
        tally = asyncio.run(redrive_letters(settings, choice, dry_run=dry_run, progress=progress, stop=stop))
    typer.echo(tally.summary(dry_run, topics.dlq, complete=not stop.is_set()))
    if stop.is_set():
        typer.secho(f"redrive: stopped early; {_so_far(tally)}", err=True, fg="yellow")
        raise typer.Exit(128 + (stop.signal or signal.SIGINT))  # 143 for SIGTERM (a scheduler's stop), 130 for Ctrl-C


__all__ = ["REDRIVEN_HEADER", "Choice", "Tally", "original_value", "parse_time", "redrive", "redrive_letters"]
