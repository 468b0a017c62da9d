"""The public contracts as code: input events, recommendations and dead letters.

These types follow ``docs/events.md`` (the producers' reference) and
``stream/schemas/*.json`` (JSON Schema for other languages) field for field; the tests
check the three agree. Decoding is strict: a value that breaks the contract raises
:class:`~stream.errors.InvalidEvent` whose ``reason`` names the field and what was seen.

>>> ev = decode_event(b'{"event_id":"e1","type":"click","user_id":"u1","item_id":"i9","ts":1700000000000}')
>>> ev.item_id, type(ev).__name__
('i9', 'ClickEvent')
>>> try:
...     decode_event(b'{"event_id":"e1","type":"click","user_id":7,"item_id":"i9","ts":1}')
... except InvalidEvent as exc:
...     print(exc.code, '|', exc.reason)
wrong_type | field `user_id`: expected a string, saw int
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Literal

import msgspec

from online_models.types import ScoredItem
from stream.errors import InvalidEvent

MAX_EVENT_BYTES = 64 * 1024
"""A value larger than this is rejected to the dead-letter topic without being parsed."""

DEAD_LETTER_RAW_LIMIT = MAX_EVENT_BYTES
"""At most this many bytes of a bad value travel in its dead letter."""

MAX_ID_CHARS = 128

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_CHARS)]
EpochMs = Annotated[int, msgspec.Meta(ge=0)]
Price = Annotated[float, msgspec.Meta(ge=0)]
Quantity = Annotated[int, msgspec.Meta(ge=1)]


class ClickEvent(msgspec.Struct, tag_field="type", tag="click", kw_only=True, frozen=True, omit_defaults=True):
    """A user viewed or clicked an item."""

    event_id: Id
    user_id: Id
    item_id: Id
    ts: EpochMs
    session_id: str | None = None
    category_id: str | None = None
    price: Price | None = None
    source: str | None = None

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
    order_id: str | None = None
    category_id: str | None = None
    session_id: str | None = None

    @property
    def type(self) -> str:
        return "purchase"


Event = ClickEvent | PurchaseEvent
EVENT_TYPES = ("click", "purchase")


#: one item of a Recommendation: the models' ranked item, published as it is, without a copy
RecommendedItem = ScoredItem


class Recommendation(msgspec.Struct, frozen=True, kw_only=True):
    """Fresh top-K for one user, published keyed by ``user_id``; items best first."""

    user_id: str
    items: list[RecommendedItem]
    trigger_event_id: str
    event_ts: int
    generated_ts: int
    model: dict[str, str]


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


_event_decoder = msgspec.json.Decoder(Event)
_encoder = msgspec.json.Encoder()
_recommendation_decoder = msgspec.json.Decoder(Recommendation)
_dead_letter_decoder = msgspec.json.Decoder(DeadLetter)

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_EXPECTED_TYPE = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`")
_CONSTRAINT = re.compile(r"^Expected `([^`]+)` (.+)$")
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "object": "a JSON object",
               "array": "an array", "bool": "a boolean", "null": "null"}


def _words(t: str) -> str:
    parts = [p.strip() for p in t.split("|")]
    named = [_TYPE_WORDS.get(p, f"`{p}`") for p in parts if p != "null"]
    return " or ".join(named) if named else "null"


def _invalid_from_validation(message: str) -> InvalidEvent:
    """Turn msgspec's validation message into a reason a producer can act on."""
    m = _PATH.search(message)
    field = m.group(1) if m else None
    body = message[: m.start()] if m else message
    where = f"field `{field}`" if field else "the value"
    if body.startswith("Object missing required field"):
        missing = body.split("`")[1]
        if missing == "type":
            return InvalidEvent("missing_field", 'field `type` is missing; expected "click" or "purchase"', "type")
        return InvalidEvent("missing_field", f"field `{missing}` is missing (required)", missing)
    if body.startswith("Invalid value") and field == "type":
        seen = body[len("Invalid value "):]
        return InvalidEvent("unknown_type", f'field `type`: unknown event type {seen}; expected "click" or "purchase"', "type")
    if field == "type":
        return InvalidEvent("unknown_type", f'field `type` must be "click" or "purchase" ({body.strip()})', "type")
    if (t := _EXPECTED_TYPE.match(body)) is not None:
        if field is None:
            return InvalidEvent("not_object", f"the value must be a JSON object, saw {_words(t.group(2))}")
        return InvalidEvent("wrong_type", f"{where}: expected {_words(t.group(1))}, saw {t.group(2)}", field)
    if (c := _CONSTRAINT.match(body)) is not None:
        expected = c.group(2).replace("length", "a length")
        if field in ("user_id", "item_id", "event_id"):
            return InvalidEvent("invalid_value", f"{where}: must be a non-empty string of at most {MAX_ID_CHARS} characters", field)
        return InvalidEvent("invalid_value", f"{where}: must be {_words(c.group(1))} {expected}", field)
    return InvalidEvent("invalid_value", f"{where}: {body}", field)


def decode_event(raw: bytes | bytearray | memoryview | None) -> Event:
    """Decode and validate one input value; raise :class:`InvalidEvent` on any breach."""
    if raw is None:
        raise InvalidEvent("malformed_json", "the value is empty (null message); expected a JSON object")
    if not isinstance(raw, bytes):
        raw = bytes(raw)
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversize", f"the value is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit; it was not parsed")
    try:
        event = _event_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise _invalid_from_validation(str(exc)) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidEvent("not_utf8", f"the value is not UTF-8 text (bad byte at position {uexc.start}); events are UTF-8 JSON") from None
        if not raw.strip():
            raise InvalidEvent("malformed_json", "the value is empty; expected a JSON object") from None
        raise InvalidEvent("malformed_json", f"the value is not valid JSON: {exc}") from None
    # msgspec skips unknown fields without checking their text; the whole value must be UTF-8
    if not raw.isascii():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidEvent("not_utf8", f"the value is not UTF-8 text (bad byte at position {uexc.start}); events are UTF-8 JSON") from None
    return event


def encode(obj: msgspec.Struct) -> bytes:
    """JSON bytes for any contract type (events, recommendations, dead letters)."""
    return _encoder.encode(obj)


def decode_recommendation(raw: bytes) -> Recommendation:
    return _recommendation_decoder.decode(raw)


def decode_dead_letter(raw: bytes) -> DeadLetter:
    return _dead_letter_decoder.decode(raw)


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
    "EVENT_TYPES",
    "MAX_EVENT_BYTES",
    "ClickEvent",
    "DeadLetter",
    "Event",
    "PurchaseEvent",
    "Recommendation",
    "RecommendedItem",
    "dead_letter",
    "decode_dead_letter",
    "decode_event",
    "decode_recommendation",
    "encode",
]
