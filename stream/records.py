"""The public contracts as code: input events, recommendations, forget requests and dead letters.

These types follow ``docs/events.md`` (the producers' reference) and
``stream/schemas/*.json`` (JSON Schema for other languages) field for field; the tests
check the three agree. Input events are decoded by :func:`stream.decoding.decode_event`,
which holds the worker's door: strict decoding, and a reason a person can act on for each refusal.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace
from typing import Annotated, Literal

import msgspec

from online_models.types import ScoredItem
from stream.errors import InvalidEvent

MAX_EVENT_BYTES = 64 * 1024
"""A value larger than this is rejected to the dead-letter topic without being parsed."""

DEAD_LETTER_RAW_LIMIT = MAX_EVENT_BYTES
"""At most this many bytes of a bad value travel in its dead letter."""

MAX_ID_CHARS = 128
"""Longest id: ``event_id``, ``user_id``, ``item_id``, ``session_id``, ``category_id``, ``order_id``."""

MAX_TEXT_CHARS = 256
"""Longest free text (``source``)."""

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects anywhere in a value (the event itself is depth 1)."""

MAX_TS_MS = 253_402_300_799_999
"""The last millisecond of the year 9999: the largest ``ts`` any schema accepts."""

MAX_QUANTITY = 10_000
"""The largest ``quantity`` (``STREAMREC_MAX_QUANTITY`` may only lower it)."""

MAX_PRICE = 1_000_000_000_000
"""The largest ``price`` (``STREAMREC_MAX_PRICE`` may only lower it)."""

# Control characters (Unicode category Cc) and the whitespace an id may not consist of only,
# spelled out so that Python's re (msgspec, jsonschema) and ECMA 262 (the JSON Schemas'
# regex dialect) read the patterns the same way; ``(?![\s\S])`` is "end of text" in both
# (Python's ``$`` would also match before a final newline).
CONTROL_CHARS = r"\x00-\x1f\x7f-\x9f"
_SPACE = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
ID_PATTERN = rf"^[^{CONTROL_CHARS}]*[^{CONTROL_CHARS}{_SPACE}][^{CONTROL_CHARS}]*(?![\s\S])"
"""An id holds no control character and something besides whitespace."""
TEXT_PATTERN = rf"^[^{CONTROL_CHARS}]*(?![\s\S])"
"""Free text holds no control character."""

# The types bound lengths; ID_PATTERN and TEXT_PATTERN (which the JSON Schemas state) are
# checked after decoding by _check_text, which does the same in a fraction of the time.
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
OptionalId = Annotated[str, msgspec.Meta(max_length=MAX_ID_CHARS)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_CHARS)]
EpochMs = Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)]
Price = Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE)]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUANTITY)]

MAX_QUERY_CHARS = 256
"""Longest search ``query``."""

MAX_TITLE_CHARS = 512
"""Longest item ``title``."""

MAX_DESCRIPTION_CHARS = 8192
"""Longest item ``description``."""

MAX_RESULTS = 200
"""Most item ids one SearchEvent's ``results`` may list."""

MAX_CATEGORY_DEPTH = 16
"""Most levels of an item's ``category_path``."""

MAX_ENTRIES = 64
"""Most entries in a SearchEvent's ``filters`` or an ItemEvent's ``attributes``."""

#: the fields that hold ids, and the ones that hold free text (with their limits)
ID_FIELDS = ("event_id", "user_id", "item_id", "session_id", "category_id", "order_id", "rec_id")
TEXT_FIELDS = ("source",)
TEXT_LIMITS = {"source": MAX_TEXT_CHARS, "query": MAX_QUERY_CHARS, "title": MAX_TITLE_CHARS,
               "description": MAX_DESCRIPTION_CHARS, "brand": MAX_TEXT_CHARS, "filters": MAX_TEXT_CHARS,
               "attributes": MAX_TEXT_CHARS, "category_path": MAX_ID_CHARS}

@dataclass(frozen=True)
class Bounds:
    """The bounds a worker enforces beyond the static ones of the types (and the schemas).

    ``max_future_ms``: a ``ts`` later than the worker's clock plus this is refused (a producer
    clock far ahead, or seconds sent as milliseconds times 1000). ``max_age_ms``: a ``ts``
    older than the clock minus this is refused; 0 (the default) accepts any age, as a replay
    of an old log needs. ``max_quantity`` and ``max_price`` may only lower
    :data:`MAX_QUANTITY` and :data:`MAX_PRICE`; ``max_depth`` may only lower :data:`MAX_DEPTH`.
    """

    max_depth: int = MAX_DEPTH
    max_future_ms: int = 3_600_000
    max_age_ms: int = 0
    max_quantity: int = MAX_QUANTITY
    max_price: float = MAX_PRICE

    def __post_init__(self) -> None:
        for name, ceiling in (("max_depth", MAX_DEPTH), ("max_quantity", MAX_QUANTITY), ("max_price", MAX_PRICE)):
            value = getattr(self, name)
            if not 1 <= value <= ceiling:
                raise ValueError(f"{name}={value}: expected 1 to {ceiling}")
        if self.max_future_ms < 0 or self.max_age_ms < 0:
            raise ValueError(f"max_future_ms={self.max_future_ms}, max_age_ms={self.max_age_ms}: neither may be negative")

    def rereading(self) -> Bounds:
        """These bounds for a value read again later than its owner read it (the peers, a
        replay): a ts too far ahead stays too far ahead (the clock only moves on), but its age
        was the owner's to judge when it arrived, so none is refused for it now.

        >>> Bounds(max_age_ms=60_000).rereading().max_age_ms
        0
        """
        return replace(self, max_age_ms=0)


DEFAULT_BOUNDS = Bounds()


class ClickEvent(msgspec.Struct, tag_field="type", tag="click", kw_only=True, frozen=True, omit_defaults=True):
    """A user viewed or clicked an item."""

    event_id: Id
    user_id: Id
    item_id: Id
    ts: EpochMs
    session_id: OptionalId | None = None
    category_id: OptionalId | None = None
    price: Price | None = None
    source: Text | None = None
    #: the recommendation this click came from, when the site echoes it (attribution)
    rec_id: OptionalId | None = None

    @property
    def type(self) -> str:
        return "click"


class PurchaseEvent(msgspec.Struct, tag_field="type", tag="purchase", kw_only=True, frozen=True, omit_defaults=True):
    """A user bought an item."""

    event_id: Id
    user_id: Id
    item_id: Id
    ts: EpochMs
    quantity: Quantity = 1
    price: Price | None = None
    order_id: OptionalId | None = None
    category_id: OptionalId | None = None
    session_id: OptionalId | None = None
    #: the recommendation this purchase came from, when the site echoes it (attribution)
    rec_id: OptionalId | None = None

    @property
    def type(self) -> str:
        return "purchase"


Event = ClickEvent | PurchaseEvent
EVENT_TYPES = ("click", "purchase")


Query = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_QUERY_CHARS)]
Title = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TITLE_CHARS)]
Description = Annotated[str, msgspec.Meta(max_length=MAX_DESCRIPTION_CHARS)]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
Entries = Annotated[dict[Key, Text], msgspec.Meta(max_length=MAX_ENTRIES)]


class SearchEvent(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """A user searched the shop (on the ``searches`` topic, keyed by ``user_id``).

    ``results`` are the item ids the shop's own engine showed, best first: when present the
    worker re-ranks those for the user instead of searching its own catalogue. ``filters``
    narrow what the worker returns (``category``: a level of the item's ``category_path``;
    ``brand``); other keys are accepted and ignored.
    """

    event_id: Id
    type: Literal["search"]
    user_id: Id
    query: Query
    ts: EpochMs
    session_id: OptionalId | None = None
    results: Annotated[list[Id], msgspec.Meta(max_length=MAX_RESULTS)] | None = None
    filters: Entries | None = None


class ItemEvent(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """An item of the catalogue, new or changed (on the compacted ``items`` topic, keyed by
    ``item_id``; a null value, a tombstone, removes the item). The latest value per item wins."""

    item_id: Id
    title: Title
    ts: EpochMs
    description: Description | None = None
    category_path: Annotated[list[Id], msgspec.Meta(max_length=MAX_CATEGORY_DEPTH)] | None = None
    brand: Text | None = None
    price: Price | None = None
    attributes: Entries | None = None
    available: bool = True


#: most item ids one ImpressionEvent may list
MAX_IMPRESSION_ITEMS = 1000


class ImpressionEvent(msgspec.Struct, kw_only=True, frozen=True):
    """The site showed (some of) a recommendation to its user (on the ``impressions`` topic,
    keyed by ``user_id``): the denominator of click-through rates when sites report them."""

    rec_id: Id
    user_id: Id
    item_ids: Annotated[list[Id], msgspec.Meta(max_length=MAX_IMPRESSION_ITEMS)]
    ts: EpochMs


class ForgetRequest(msgspec.Struct, kw_only=True, frozen=True):
    """Erase a user (on the ``forget`` topic, keyed by ``user_id``; ``streamrec forget`` sends
    them): their state, what the models hold of them, and their recommendations (a tombstone).
    Events of the user at or before ``ts`` are never learned again; later ones start afresh."""

    user_id: Id
    request_id: Id
    ts: EpochMs


#: one item of a Recommendation: the models' ranked item, published as it is, without a copy
RecommendedItem = ScoredItem


class Recommendation(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Fresh top-K for one user, published keyed by ``user_id``; items best first. ``rec_id``
    names this list (the site echoes it on the clicks and purchases it causes); ``variant`` is
    the experiment arm that served it (``"default"`` without an experiment). Both are optional
    for readers of lists published before they existed."""

    user_id: str
    items: list[RecommendedItem]
    trigger_event_id: str
    event_ts: int
    generated_ts: int
    model: dict[str, str]
    rec_id: str | None = None
    variant: str | None = None
    #: what the list answers: absent for the home page (a click or a purchase), ``{"kind":
    #: "search", "query": ...}`` for a search
    context: dict[str, str] | None = None


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """An input value the worker could not use, with why and where it came from.

    ``raw`` is the original value as text where it decodes as UTF-8, else base64;
    ``raw_encoding`` says which. ``raw_bytes`` is the original size; values over
    :data:`DEAD_LETTER_RAW_LIMIT` bytes are cut to that many (``raw_truncated``) so that an
    oversize value still fits a Kafka message. ``code`` is the short label the metrics use.
    """

    reason: str
    topic: str
    partition: int
    offset: int
    raw: str
    ts: int
    code: str = "invalid"
    raw_encoding: Literal["utf-8", "base64"] = "utf-8"
    raw_bytes: int = 0
    raw_truncated: bool = False


_encoder = msgspec.json.Encoder()
_recommendation_decoder = msgspec.json.Decoder(Recommendation)
_forget_request_decoder = msgspec.json.Decoder(ForgetRequest)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)


def encode(obj: msgspec.Struct) -> bytes:
    """JSON bytes for any contract type (events, recommendations, dead letters)."""
    return _encoder.encode(obj)


def decode_recommendation(raw: bytes) -> Recommendation:
    return _recommendation_decoder.decode(raw)


def decode_forget_request(raw: bytes) -> ForgetRequest:
    """Types only; the worker's door for forget requests is :func:`stream.decoding.decode_forget`."""
    return _forget_request_decoder.decode(raw)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(raw)


#: the most bytes of the original message's key a dead letter goes out under
DEAD_LETTER_KEY_LIMIT = 1024


def dead_letter_record(topic: str, key: bytes | None, letter: DeadLetter) -> tuple[str, bytes | None, bytes]:
    """``letter`` as a record for the dead-letter ``topic``, keyed by the original message's
    ``key`` cut to :data:`DEAD_LETTER_KEY_LIMIT` bytes: a key near Kafka's 1 MiB limit, with
    the letter added, would not fit a message, and would be refused (and retried) for ever.

    >>> dead_letter_record("dlq", b"k" * 5000, DeadLetter(reason="r", topic="t", partition=0, offset=1, raw="", ts=2))[1] == b"k" * 1024
    True
    """
    return topic, key if key is None or len(key) <= DEAD_LETTER_KEY_LIMIT else key[:DEAD_LETTER_KEY_LIMIT], encode(letter)


def dead_letter(error: InvalidEvent, raw: bytes | None, topic: str, partition: int, offset: int, ts: int) -> DeadLetter:
    """The dead letter for ``raw``; the raw value travels as text where it is UTF-8, else base64."""
    data = bytes(raw or b"")
    size = len(data)
    truncated = size > DEAD_LETTER_RAW_LIMIT
    if truncated:
        data = data[:DEAD_LETTER_RAW_LIMIT]
    text, encoding = None, "utf-8"
    for cut in range(4 if truncated else 1):  # a cut may split a multi-byte character
        try:
            text = data[: len(data) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    if text is None:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return DeadLetter(reason=error.reason, topic=topic, partition=partition, offset=offset, raw=text, ts=ts,
                      code=error.code, raw_encoding=encoding, raw_bytes=size, raw_truncated=truncated)


__all__ = [
    "DEFAULT_BOUNDS",
    "EVENT_TYPES",
    "MAX_DEPTH",
    "Bounds",
    "MAX_EVENT_BYTES",
    "ClickEvent",
    "DeadLetter",
    "Event",
    "ForgetRequest",
    "ImpressionEvent",
    "ItemEvent",
    "PurchaseEvent",
    "Recommendation",
    "RecommendedItem",
    "SearchEvent",
    "dead_letter",
    "dead_letter_record",
    "decode_dead_letter",
    "decode_forget_request",
    "decode_recommendation",
    "encode",
]
