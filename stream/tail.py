"""``streamrec tail``: print recommendations (or dead letters) as they arrive.

One compact line per message; ``--json`` prints the value as it is on the topic.

>>> from online_models.types import Explanation
>>> from stream.records import Recommendation, RecommendedItem
>>> rec = Recommendation(user_id="u1", items=[RecommendedItem("i5", 0.91), RecommendedItem("i2", 0.5)],
...                      trigger_event_id="e7", event_ts=1_000, generated_ts=1_012, model={"scorer": "v3"})
>>> print(recommendation_line(rec))
u1  i5 0.910, i2 0.500  latency 12 ms  after e7  scorer=v3

An item's ``explanation``, where it has one, follows its score as a short sentence:

>>> rec = Recommendation(user_id="u1", items=[
...     RecommendedItem("i5", 0.91, "covisit", Explanation("covisit", because="i77")),
...     RecommendedItem("i9", 0.7, "reminder", Explanation("reminder", because="i9")),
...     RecommendedItem("i2", 0.5, "trending", Explanation("trending", category="c12"))],
...     trigger_event_id="e7", event_ts=1_000, generated_ts=1_012, model={})
>>> print(recommendation_line(rec))
u1  i5 0.910 (because you viewed i77), i9 0.700 (you viewed it before), i2 0.500 (popular now in c12)  latency 12 ms  after e7
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import msgspec
import typer
from kafka import TopicPartition

from online_models.types import Explanation
from stream.decoding import id_problem
from stream.errors import counted, some_of
from stream.kafka_sockets import close_failed_connects
from stream.records import (
    CONTROL_CHARS,
    DeadLetter,
    Recommendation,
    RecommendedItem,
    decode_dead_letter,
    decode_recommendation,
)
from stream.settings import Settings
from stream.topics import probe, require_topic

#: what a shopper reads for a source whose explanation names no item or category
_SAYS = {"covisit": "often viewed together", "reminder": "you viewed it before", "trending": "popular now",
         "popularity": "popular", "recent_popularity": "popular now", "mf": "people with similar taste liked it",
         "session_hybrid": "similar to what you are viewing", "transformer": "picked for you from what you viewed",
         "query": "matches what you searched for", "content": "new, and like what you viewed"}


_MATCHED = {"words": "matches your search's words", "meaning": "matches your search's meaning",
            "both": "matches your search", "shop": "in the shop's results"}


def explanation_text(why: Explanation | None) -> str | None:
    """An item's explanation as a sentence a shopper understands (None: it has none).

    >>> explanation_text(Explanation("covisit", because="i77")), explanation_text(Explanation("trending"))
    ('because you viewed i77', 'popular now')
    >>> explanation_text(Explanation("transformer")), explanation_text(Explanation("newsource")), explanation_text(None)
    ('picked for you from what you viewed', 'recommended for you', None)
    >>> explanation_text(Explanation("search", matched="meaning"))
    "matches your search's meaning"
    """
    if why is None:
        return None
    source = why.source
    if source == "search":
        return _MATCHED.get(why.matched or "", "matches your search")
    if why.category is not None:
        return f"{'popular' if source == 'popularity' else 'popular now'} in {why.category}"
    if why.because is not None and source != "reminder":
        return f"because you viewed {why.because}"
    return _SAYS.get(source, "recommended for you")


def _item_text(it: RecommendedItem) -> str:
    said = explanation_text(it.explanation)
    return f"{it.item_id} {it.score:.3f}" if said is None else f"{it.item_id} {it.score:.3f} ({said})"


def recommendation_line(rec: Recommendation, items: int = 5) -> str:
    """``user  item score (why), ...  latency N ms  after EVENT  model versions`` for one
    recommendation; ``(why)`` is the item's :func:`explanation_text`, where it has one."""
    shown = some_of(rec.items, items, _item_text) or "(no items)"
    models = " ".join(f"{name}={version}" for name, version in sorted(rec.model.items()))
    if rec.context and rec.context.get("kind") == "search":
        shown = f"search {rec.context.get('query', '')!r}: {shown}"
    return f"{rec.user_id}  {shown}  latency {rec.generated_ts - rec.event_ts} ms  after {rec.trigger_event_id}  {models}".rstrip()


#: characters a terminal acts on rather than shows: the control characters ids and text may not
#: hold (ESC starts the sequences that clear the screen, move the cursor or set the window
#: title), the line and paragraph separators, and the bidi overrides
_UNSHOWN = re.compile(f"[{CONTROL_CHARS}\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: str) -> str:
    """``text`` with the characters a terminal would act on written as escapes: a dead letter's
    value and reason are whatever a producer sent, and an operator's terminal must not run them.

    >>> print(shown("a\\nb\\x1b[2J\\rc\\u202e"))
    a\\nb\\x1b[2J\\rc\\u202e
    """
    def escape(m: re.Match) -> str:
        c = m.group()
        return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return _UNSHOWN.sub(escape, text)


def dead_letter_line(letter: DeadLetter, width: int = 80) -> str:
    """Where the bad value was, why it was refused, and the start of it.

    >>> print(dead_letter_line(DeadLetter(reason="field `ts` is missing (required)", topic="streamrec.clicks",
    ...                                   partition=2, offset=41, raw='{"a": 1}', ts=5, code="missing_field")))
    streamrec.clicks[2]@41  missing_field  field `ts` is missing (required)  raw: {"a": 1}
    """
    raw = letter.raw if len(letter.raw) <= width else letter.raw[: width - 1] + "…"
    encoding = "" if letter.raw_encoding == "utf-8" else f" ({letter.raw_encoding})"
    return (f"{letter.topic}[{letter.partition}]@{letter.offset}  {shown(letter.code)}  {shown(letter.reason)}  "
            f"raw{encoding}: {shown(raw)}")


def is_for_user(key: bytes | None, user: str | None) -> bool:
    """Whether a message keyed ``key`` is for ``user`` (every message when no user is asked for).

    >>> is_for_user(b"u1", "u1"), is_for_user(b"u10", "u1"), is_for_user(None, None)
    (True, False, True)
    """
    return user is None or key == user.encode()


#: seconds without a message after which ``tail`` asks whether Kafka still answers
WATCH_EVERY_S = 10.0


class BrokerWatch:
    """While ``tail`` waits for messages, whether Kafka still answers: the consumer reconnects
    in silence, so a broker gone away left tail printing nothing, as a quiet topic does. Every
    ``every_s`` seconds without a message it asks ``check`` (None: it answers; else what is
    wrong) and says the change, once: the broker lost, then the broker back."""

    def __init__(self, where: str, check: Callable[[], str | None], every_s: float = WATCH_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.where, self.check, self.every_s, self.clock = where, check, every_s, clock
        self.checked = clock()
        self.lost = False

    def heard(self) -> None:
        """A message came: the broker answers."""
        self.checked = self.clock()
        self.lost = False

    def line(self) -> str | None:
        """What to say now, if anything (asks Kafka when ``every_s`` passed without a message).

        >>> answers = ["[Errno 111] Connection refused", None]
        >>> now = [0.0]
        >>> watch = BrokerWatch("k:9092", lambda: answers.pop(0), 10, lambda: now[0])
        >>> watch.line() is None  # not yet 10 s
        True
        >>> now[0] = 10; print(watch.line())
        tail: Kafka at k:9092 does not answer ([Errno 111] Connection refused); waiting for it (Ctrl-C stops)
        >>> now[0] = 20; print(watch.line())
        tail: Kafka at k:9092 answers again
        """
        if self.clock() - self.checked < self.every_s:
            return None
        problem = self.check()
        self.checked = self.clock()
        if problem is not None and not self.lost:
            self.lost = True
            return f"tail: Kafka at {self.where} does not answer ({problem}); waiting for it (Ctrl-C stops)"
        if problem is None and self.lost:
            self.lost = False
            return f"tail: Kafka at {self.where} answers again"
        return None


def tail(
    user: Annotated[str | None, typer.Option("--user", "-u", help="Only this user's messages (matched on the message key).")] = None,
    bootstrap: Annotated[str | None, typer.Option(
        "--bootstrap", "-b", help="Kafka bootstrap servers (default STREAMREC_KAFKA_BOOTSTRAP).")] = None,
    topic_prefix: Annotated[str | None, typer.Option(
        "--topic-prefix", help="Prefix of the topic names (default STREAMREC_TOPIC_PREFIX).")] = None,
    from_beginning: Annotated[bool, typer.Option(
        "--from-beginning", help="Start at the oldest message kept on the topic, not at new ones.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, help="Stop after printing N messages.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each value as the raw JSON on the topic.")] = False,
    dlq: Annotated[bool, typer.Option("--dlq", help="Tail the dead-letter topic instead: reason, topic/partition/offset, raw value.")] = False,
    items: Annotated[int, typer.Option("--items", min=1, help="Items shown per recommendation line.")] = 5,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", min=0, help="Stop after this many seconds; with --limit, fewer messages by then is an error (exit 1).")] = None,
) -> int:
    """Print recommendations as they arrive: user, top items with scores, latency (generated_ts - event_ts).
    A forgotten user's tombstone (a null value) prints as such.

    Reads <prefix>recommendations (or <prefix>dlq with --dlq) without joining a consumer group, so it never takes work or offsets from a worker. A broker that stops answering is said on stderr (checked after 10 s without a message), and so is its return. Ctrl-C stops.
    """
    problem = None if user is None else id_problem(user)
    if problem is not None:
        raise typer.BadParameter(f"{problem}: no event carries such a user id", param_hint="--user")
    settings = Settings.with_options(kafka_bootstrap=("--bootstrap", bootstrap), topic_prefix=("--topic-prefix", topic_prefix))
    topic = settings.topics.dlq if dlq else settings.topics.recommendations
    kafka = settings.kafka
    close_failed_connects()  # it follows for as long as it is left: each broker outage's refused attempts, closed
    require_topic(settings, topic)  # a typo in the prefix must not create topics and wait on them forever
    consumer = kafka.reader("streamrec-tail")  # committed data only, as every streamrec reader
    printed = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    watch = BrokerWatch(kafka.bootstrap, lambda: probe(kafka, 2.0), WATCH_EVERY_S)
    try:
        with stop_on_signals() as stop:
            partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
            consumer.assign(partitions)
            if from_beginning:
                consumer.seek_to_beginning(*partitions)
            else:
                consumer.seek_to_end(*partitions)
                for tp in partitions:
                    consumer.position(tp)  # fix "the end" now, not at the first poll
            while not stop.is_set() and (deadline is None or time.monotonic() < deadline):
                polled = consumer.poll(timeout_ms=200)
                if polled:
                    watch.heard()
                elif (said := watch.line()) is not None:
                    typer.secho(said, err=True, fg="yellow")
                for records in polled.values():
                    for record in records:
                        if is_for_user(record.key, user):
                            typer.echo(_render(record.value, dlq, as_json, items, record.key))
                            printed += 1
                            if limit is not None and printed >= limit:
                                stop.set()
                                break
                    if stop.is_set():
                        break
    except KeyboardInterrupt:
        pass  # Ctrl-C outside the main thread's handler: still a clean stop
    finally:
        consumer.close(autocommit=False)
    if limit is not None and printed < limit and deadline is not None and time.monotonic() >= deadline:
        typer.secho(f"tail: {printed} of {counted(limit, 'message')} on {topic} within {timeout:g} s", err=True, fg="red")
        raise typer.Exit(1)
    return printed


class SignalStop(threading.Event):
    """Set by a signal; :attr:`signal` is the first one (None: none came)."""

    signal: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[SignalStop]:
    """An event set by SIGINT or SIGTERM while the block runs (main thread only); handlers restored after.
    Its ``signal`` says which came first: a command exits 128 + it (143 for SIGTERM, 130 for Ctrl-C)."""
    stop = SignalStop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def on_signal(sig: int, _frame) -> None:
        if stop.signal is None:
            stop.signal = sig
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tombstone_line(key: bytes | None) -> str:
    """A null value on the (compacted) recommendations topic: the user was forgotten.

    >>> print(tombstone_line(b"u1"))
    u1  (tombstone: the user was forgotten; their recommendations are erased)

    The key is whatever wrote the tombstone sent: what a terminal would act on is escaped.

    >>> print(tombstone_line(b"\\x1b]0;x\\x07u1").split()[0])
    \\x1b]0;x\\x07u1
    """
    return f"{shown((key or b'').decode('utf-8', 'replace'))}  (tombstone: the user was forgotten; their recommendations are erased)"


def _render(value: bytes | None, dlq: bool, as_json: bool, items: int, key: bytes | None = None) -> str:
    """One message as a line. A null value is a tombstone: a forgotten user's on the
    recommendations topic; on the dead-letter topic, where the workers write none, no letter.

    >>> _render(None, dlq=True, as_json=False, items=5, key=b"u1")
    '(not a dead letter: a null value, a tombstone) u1'
    >>> _render(None, dlq=True, as_json=True, items=5)
    'null'
    """
    if value is None:
        if as_json:
            return "null"
        if dlq:  # was "(not a dead letter: a bytes-like object is required, not 'NoneType') b''"
            return f"(not a dead letter: a null value, a tombstone) {shown((key or b'').decode('utf-8', 'replace'))}"
        return tombstone_line(key)
    if as_json:
        return (value or b"").decode("utf-8", errors="replace")
    try:
        return dead_letter_line(decode_dead_letter(value)) if dlq else recommendation_line(decode_recommendation(value), items)
    except (msgspec.DecodeError, TypeError) as exc:
        kind = "dead letter" if dlq else "recommendation"
        return f"(not a {kind}: {exc}) {(value or b'')[:80]!r}"


__all__ = ["BrokerWatch", "tombstone_line", "dead_letter_line", "explanation_text", "is_for_user", "recommendation_line", "SignalStop", "stop_on_signals", "tail"]
