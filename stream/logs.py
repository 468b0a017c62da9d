"""Logging of the long-running processes (worker, serve): one format, and the Kafka client's
repeated complaints thinned out (``produce`` and ``forget`` thin them too).

While the broker is away, aiokafka logs the same error for every attempt: its fetcher about
ten times a second ("Failed fetch messages from 1: KafkaConnectionError ..."), 200 lines in a
20-s outage, which bury what the worker itself says (and /readyz already says the broker is
away). :class:`Thinned` lets one record of each warning or error through per interval and
says how many it held back; what differs (another partition, another node) is another record,
and information (a group joined, a partition assigned) is never held back. ``streamrec retrain``
thins kafka-python's lines with it too, once a minute (stream/retrain_cli.py).

A traceback quotes each exception's own text whole, and a bug's exception may carry anything (a
producer's error with the 1 MB value it refused, a user's text): :class:`ClippedTracebacks`, on
the loggers that log the exceptions of handling events, quotes it as a dead letter does
(:func:`~stream.step_results.exception_text`: one line, at most 300 characters), frames intact.

A thread that ends by an exception it did not catch (Faust's consumer thread, a library's) is
one record on ``streamrec.threads`` (:func:`log_thread_deaths`), not Python's print to stderr,
which Faust's worker logs again line by line: 60 WARNING lines, a caret each, for one
traceback.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable

from stream.step_results import exception_text

#: the Kafka client's loggers that repeat themselves while the broker is away
KAFKA_CLIENT_LOGGERS = ("aiokafka", "aiokafka.consumer.fetcher", "aiokafka.consumer.group_coordinator",
                        "aiokafka.consumer.consumer", "aiokafka.conn", "aiokafka.cluster", "aiokafka.producer.sender",
                        "aiokafka.producer.producer")  # "aiokafka" is its client's (aiokafka/client.py)
#: the most distinct messages remembered per logger (while the broker is away they are few)
MAX_TEMPLATES = 256


class Thinned(logging.Filter):
    """At most one warning or error of each message (as formatted) every ``every_s`` seconds;
    the next one through says how many were held back. Records below WARNING all go through.

    >>> clock = iter([0.0, 1.0, 2.0, 3.0, 12.0]).__next__
    >>> thinned = Thinned(10.0, clock)
    >>> def record(arg, level=logging.ERROR):
    ...     return logging.LogRecord("x", level, "f", 1, "failed: %s", (arg,), None)
    >>> records = [record("down"), record("down"), record("down"), record("away"), record("down")]
    >>> [thinned.filter(r) for r in records]
    [True, False, False, True, True]
    >>> records[4].getMessage()
    'failed: down (2 more like it in the last 12 s)'
    >>> all(thinned.filter(record("down", logging.INFO)) for _ in range(3))
    True
    """

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.every_s = every_s
        self.clock = clock
        self._seen: dict[str, tuple[float, int]] = {}  # message -> (when one went through, held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self.clock()
        message = record.getMessage()
        seen = self._seen.get(message)
        if seen is not None and now - seen[0] < self.every_s:
            self._seen[message] = (seen[0], seen[1] + 1)
            return False
        if seen is not None and seen[1]:
            # args (), not None: mode's formatter makes None (None,), which the message then fails to take
            record.msg, record.args = f"{message} ({seen[1]} more like it in the last {now - seen[0]:.0f} s)", ()
        if seen is None and len(self._seen) >= MAX_TEMPLATES:
            self._seen.clear()
        self._seen[message] = (now, 0)
        return True


_CAUSE = "\nThe above exception was the direct cause of the following exception:\n\n"
_CONTEXT = "\nDuring handling of the above exception, another exception occurred:\n\n"


def clipped_traceback(exc: BaseException, limit: int = 300) -> str:
    """``exc``'s traceback as logging prints it (its causes and contexts first), each exception's
    own text quoted by :func:`~stream.step_results.exception_text` (one line, at most ``limit``
    characters); the frames are the code's, and stay whole.

    >>> try:
    ...     raise ValueError("x" * 1_000_000)
    ... except ValueError as error:
    ...     text = clipped_traceback(error, 20)
    >>> text.splitlines()[0], text.splitlines()[-1], len(text) < 500
    ('Traceback (most recent call last):', 'ValueError: xxxxxxxxxxxxxxxxxxxx…', True)
    """
    chain: list[tuple[BaseException, str]] = []  # (exception, what links it to the one after it), last first
    seen: set[int] = set()
    link = ""
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, _CAUSE
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, _CONTEXT
        else:
            current = None
    parts: list[str] = []
    for error, link in reversed(chain):
        if error.__traceback__ is not None:
            parts += ["Traceback (most recent call last):\n", *traceback.format_tb(error.__traceback__)]
        kind = type(error)
        name = kind.__qualname__ if kind.__module__ in ("builtins", "__main__") else f"{kind.__module__}.{kind.__qualname__}"
        text = exception_text(error, limit)
        parts.append(f"{name}: {text}\n" if text else f"{name}\n")
        parts.append(link)
    return "".join(parts).rstrip("\n")


class ClippedTracebacks(logging.Filter):
    """A record's traceback rendered by :func:`clipped_traceback` (each exception's text at most
    ``limit`` characters), for every formatter that prints ``exc_text`` (logging's, Faust's)."""

    def __init__(self, limit: int = 300) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and not record.exc_text:
            record.exc_text = clipped_traceback(exc, self.limit)
        return True


#: the text format of the records streamrec's own processes log (Faust's worker has its own)
TEXT_FORMAT = "[%(asctime)s] %(levelname)s %(name)s: %(message)s"


class JsonLines(logging.Formatter):
    r"""One JSON object per record, on one line, for a log collector (``STREAMREC_LOG_FORMAT=json``):
    ``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``pid``, ``message``, and
    ``exception`` (the traceback, as text: :class:`ClippedTracebacks` clips it where it is on)
    and ``stack`` when the record has them. A newline in a message stays inside its string.

    >>> record = logging.LogRecord("streamrec", logging.WARNING, "f", 1, "lag %d\nnext", (5,), None)
    >>> record.created, record.msecs, record.process = 1_780_000_000.25, 250.0, 7
    >>> JsonLines().format(record)
    '{"ts": "2026-05-28T20:26:40.250Z", "level": "WARNING", "logger": "streamrec", "pid": 7, "message": "lag 5\\nnext"}'
    """

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname, "logger": record.name, "pid": record.process, "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def handler_config(fmt: str, level: int | str) -> dict | None:
    """A :func:`logging.config.dictConfig` for Faust's worker (``mode.Worker(logging_config=)``) that
    keeps ``STREAMREC_LOG_FORMAT=json`` once Faust sets its logging up; None for ``text`` (Faust's
    own format, as before). Loggers made before it stay on (``disable_existing_loggers``)."""
    if fmt.strip().lower() != "json":
        return None
    return {"version": 1, "disable_existing_loggers": False,
            "formatters": {"json": {"()": JsonLines}},
            "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "json"}},
            "root": {"level": logging.getLevelName(level) if isinstance(level, int) else level.upper(),
                     "handlers": ["default"]}}


def configure(level: int | str, fmt: str = "text") -> None:
    """The process's log format (``text`` or ``json``: ``STREAMREC_LOG_FORMAT``) and level, the
    Kafka client's loggers thinned, and threads' uncaught exceptions logged (:func:`log_thread_deaths`)."""
    if fmt.strip().lower() == "json":
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines())
        logging.basicConfig(level=level, handlers=[handler])
    else:
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    thin_kafka_client()
    log_thread_deaths()


def log_thread_deaths() -> None:
    """Log a thread's uncaught exception as one ERROR record on ``streamrec.threads``, its
    traceback clipped (:class:`ClippedTracebacks`), in place of Python's print to stderr
    (``threading.excepthook``); a thread's SystemExit stays silent, as Python's own hook has it."""
    log = logging.getLogger("streamrec.threads")
    if not any(isinstance(f, ClippedTracebacks) for f in log.filters):
        log.addFilter(ClippedTracebacks())

    def logged(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "a thread"
        text = exception_text(args.exc_value) if args.exc_value is not None else ""
        log.error("thread %s ended by an exception it did not catch: %s%s", name, args.exc_type.__name__,
                  f": {text}" if text else "", exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    threading.excepthook = logged


def exit_now(status: int) -> None:
    """Exit without cleaning up, what an operator's second Ctrl-C or SIGTERM asks of the worker
    and of serve: what was logged is flushed first."""
    logging.shutdown()
    os._exit(status)


def thin_kafka_client() -> None:
    """The Kafka client's loggers thinned (one :class:`Thinned` each: a filter on a logger sees
    only what is logged on it), and nothing else about logging changed: what the short commands
    (``produce``, ``forget``) call, whose aiokafka printed some 10,000 lines a second while a
    broker that went away mid-replay was retried."""
    for name in KAFKA_CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Thinned) for f in logger.filters):
            logger.addFilter(Thinned())


__all__ = ["KAFKA_CLIENT_LOGGERS", "TEXT_FORMAT", "ClippedTracebacks", "JsonLines", "Thinned", "clipped_traceback", "configure", "exit_now", "log_thread_deaths",
           "handler_config", "thin_kafka_client"]
