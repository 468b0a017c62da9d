"""Logging of the long-running processes (worker, serve): one format, and the Kafka client's
repeated complaints thinned out.

While the broker is away, aiokafka logs the same error for every attempt: its fetcher about
ten times a second ("Failed fetch messages from 1: KafkaConnectionError ..."), 200 lines in a
20-s outage, which bury what the worker itself says (and /readyz already says the broker is
away). :class:`Thinned` lets one record of each warning or error through per interval and
says how many it held back; what differs (another partition, another node) is another record,
and information (a group joined, a partition assigned) is never held back. ``streamrec retrain``
thins kafka-python's lines with it too, once a minute (stream/retrain_cli.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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


def configure(level: int | str) -> None:
    """The process's log format and level, and the Kafka client's loggers thinned (one
    :class:`Thinned` each: a filter on a logger sees only what is logged on it)."""
    logging.basicConfig(level=level, format="[%(asctime)s] %(levelname)s %(name)s: %(message)s")
    for name in KAFKA_CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Thinned) for f in logger.filters):
            logger.addFilter(Thinned())


__all__ = ["KAFKA_CLIENT_LOGGERS", "Thinned", "configure"]
