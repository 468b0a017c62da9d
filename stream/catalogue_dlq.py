"""The catalogue feed's dead letters (stream/catalogue_feed.py): what each says, and their sending.

The feed dead-letters a value of the items topic it cannot take: one that breaks the contract
(the decoder's codes, and ``invalid_value`` for a key that is not the item's id), one whose
decoding or queueing raised (``processing_error``: :func:`decoding_raised`,
:func:`adding_raised`), and a valid item the text model raised on alone (``embedding_failed``:
:func:`embedding_failed`), from the record it was read from (:class:`ItemSource`, kept while
the item waits in the queue). Each reason says what to do: the items topic is compacted, so
none of them says to replay its value as it is (an older value sent again would replace any
newer one of the same key); they say to send the item again, its current value.

:class:`ItemDeadLetters` counts them and sends them, retrying until Kafka confirmed them all:
the feed moves its offsets past a value only then. Without a ``publish`` (``streamrec serve``)
they are only counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from stream.errors import InvalidEvent, clipped, described
from stream.prometheus import Metrics
from stream.records import DeadLetter, dead_letter_record
from stream.retry import Backoff
from stream.step_results import exception_text

log = logging.getLogger("streamrec.catalogue")

#: what a ``processing_error`` dead letter of the items topic says to do: not to replay its value
#: as it is (the topic is compacted, so an older value sent again replaces any newer one)
RESEND_ITEM = ("report it, then, once the bug is fixed, send the item again: its current value, keyed by its item_id "
               "(not this dead letter's value as it is: the items topic is compacted, and an older value sent again "
               "would replace any newer one)")


class ItemSource(NamedTuple):
    """The record a queued item was read from: what its dead letter needs, should the text
    model raise on the item (the fetch that held it is long gone by then)."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int


def key_not_item_id(key: bytes | None, item_id: str) -> InvalidEvent:
    """A value keyed by another id than its item_id: compacted by key, it would outlive its tombstone."""
    return InvalidEvent(
        "invalid_value", f"the message key {clipped(repr((key or b'').decode('utf-8', 'replace')), 80)} is "
        f"not the item's item_id {item_id!r}: the items topic is compacted by key, so a tombstone for "
        f"{item_id!r} would not remove it; key each item by its item_id", "item_id")


def decoding_raised(exc: Exception) -> InvalidEvent:
    """A value whose decoding raised something else than :class:`InvalidEvent` (a decoder's bug)."""
    return InvalidEvent("processing_error", f"decoding the value raised {type(exc).__name__}: "
                                            f"{exception_text(exc)} (a bug); this value is not in the catalogue (an older "
                                            f"one may be) until a new value for the item arrives: {RESEND_ITEM}")


def adding_raised(exc: Exception) -> InvalidEvent:
    """A valid item that queueing in the catalogue raised on alone (a bug)."""
    return InvalidEvent(
        "processing_error", f"the item is valid, but adding it to the catalogue raised {type(exc).__name__}: "
        f"{clipped(exception_text(exc), 300)}; this value is not in the catalogue (an older one may be) until a "
        f"new value for the item arrives: {RESEND_ITEM}")


def embedding_failed(item_id: str, failure: Exception, reader: str, model: str) -> InvalidEvent:
    """An item the catalogue of ``reader`` could not index alone (in practice its text model
    ``model``: the index takes any vector), and what to do."""
    return InvalidEvent(
        "embedding_failed",
        f"the item is valid, but embedding its text, or indexing it, raised {type(failure).__name__}: "
        f"{clipped(exception_text(failure), 300)} (the text model embeds other texts); item {item_id!r} is out "
        f"of the catalogue of {reader}, whose text model is {model}, until a new value for it arrives "
        "(each worker that reads the items topic sends a dead letter of its own): report this value (a bug of "
        "the text model), then send the item again once that is fixed, or now with its title or description changed")


class ItemDeadLetters:
    """Count the feed's dead letters and send them with ``publish(records)`` (the worker's
    :class:`~stream.publisher.BatchPublisher`) to ``topic``; with either None, only count them."""

    def __init__(self, metrics: Metrics, publish: Callable[[list], Awaitable[list]] | None, topic: str | None,
                 backoff: Backoff) -> None:
        self.metrics = metrics
        self.publish = publish
        self.topic = topic
        self.backoff = backoff

    @property
    def sent(self) -> bool:
        """Whether they are sent (else only counted: ``streamrec serve``)."""
        return self.publish is not None and self.topic is not None

    async def send(self, letters: list[tuple[bytes | None, DeadLetter]]) -> None:
        """Count ``letters`` (key, letter) and send them to the dead-letter topic, retrying until
        Kafka confirms them all (without a ``publish``, they are only counted)."""
        for _, letter in letters:
            self.metrics.events_invalid.labels(letter.code).inc()
        if not letters or self.publish is None or self.topic is None:
            return
        pending = [dead_letter_record(self.topic, key, letter) for key, letter in letters]
        delays = self.backoff.delays()
        while pending:
            try:
                pending = await self.publish(pending)
            except Exception as exc:  # noqa: BLE001 - the producer failed: send them again
                log.warning("dead-lettering %d item value(s) failed (%s); retrying", len(pending), described(exc))
            if pending:
                await asyncio.sleep(next(delays))
        self.metrics.dead_letters_published.inc(len(letters))


__all__ = ["RESEND_ITEM", "ItemDeadLetters", "ItemSource", "adding_raised", "decoding_raised", "embedding_failed",
           "key_not_item_id"]
