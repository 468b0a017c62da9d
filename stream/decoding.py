"""The worker's door: bytes in, a valid event out, or an :class:`~stream.errors.InvalidEvent`
whose ``reason`` names the field and what was seen (the dead letter's reason).

Decoding is strict: the contract's types (stream/records.py, docs/events.md), then what the
types cannot say (UTF-8 throughout, no control characters in ids, nesting depth, the worker's
:class:`~stream.records.Bounds`), each with its own code.

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

import json
import re

import msgspec
import numpy as np

from stream.errors import InvalidEvent, clipped
from stream.records import (
    CONTROL_CHARS,
    DEFAULT_BOUNDS,
    MAX_EVENT_BYTES,
    MAX_ID_CHARS,
    MAX_PRICE,
    MAX_QUANTITY,
    MAX_TEXT_CHARS,
    MAX_TS_MS,
    TEXT_FIELDS,
    TEXT_LIMITS,
    Bounds,
    Event,
    ForgetRequest,
    ImpressionEvent,
    ItemEvent,
    PurchaseEvent,
    SearchEvent,
)

_SPACES = " \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
_HAS_CONTROL = re.compile(f"[{CONTROL_CHARS}]")
_CLICK_IDS = ("event_id", "user_id", "item_id", "session_id", "category_id", "rec_id")
_PURCHASE_IDS = ("event_id", "user_id", "item_id", "order_id", "category_id", "session_id", "rec_id")


_event_decoder = msgspec.json.Decoder(Event)
_forget_decoder = msgspec.json.Decoder(ForgetRequest)
_FORGET_IDS = ("user_id", "request_id")
_impression_decoder = msgspec.json.Decoder(ImpressionEvent)
_search_decoder = msgspec.json.Decoder(SearchEvent)
_item_decoder = msgspec.json.Decoder(ItemEvent)

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_KEY_PATH = re.compile(r" - at `key` in `\$\.?([^`]*)`$")  # a key of an object field (filters, attributes)
_EXPECTED_TYPE = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`")
_CONSTRAINT = re.compile(r"^Expected `([^`]+)` (.+)$")
#: the start of a ``type`` reason that does not show the value yet (:func:`_type_shown`)
_TYPE_UNSEEN = 'field `type` must be "click" or "purchase"'
#: the input fields that take numbers: elsewhere a number msgspec cannot read is of the wrong type
NUMBER_FIELDS = frozenset({"ts", "price", "quantity"})
_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "object": "a JSON object",
               "array": "an array", "bool": "a boolean", "null": "null"}


def _words(t: str) -> str:
    parts = [p.strip() for p in t.split("|")]
    named = [_TYPE_WORDS.get(p, f"`{p}`") for p in parts if p != "null"]
    return " or ".join(named) if named else "null"


def _invalid_from_validation(message: str) -> InvalidEvent:
    """Turn msgspec's validation message into a reason a producer can act on."""
    if (k := _KEY_PATH.search(message)) is not None:
        return _invalid_key(message[: k.start()], k.group(1))
    m = _PATH.search(message)
    field = m.group(1) if m else None
    name = re.split(r"[.\[]", field or "", maxsplit=1)[0]  # the top-level field: `results` of `results[0]`
    body = message[: m.start()] if m else message
    where = f"field `{field}`" if field else "the value"
    if body.startswith("Object missing required field"):
        missing = body.split("`")[1]
        if missing == "type":
            return InvalidEvent("missing_field", 'field `type` is missing; expected "click" or "purchase"', "type")
        return InvalidEvent("missing_field", f"field `{missing}` is missing (required)", missing)
    if body.startswith("Invalid value") and field == "type":
        seen = body[len("Invalid value "):]
        if seen.strip("'\"") in ("click", "purchase"):  # the first `type` chose the other kind
            return InvalidEvent("unknown_type", f"field `type` is given twice, with different values (the second {seen}); "
                                                "send it once", "type")
        # quoted cut short: a type of 60,000 characters made a 60 KB reason
        return InvalidEvent("unknown_type", f'field `type`: unknown event type {clipped(seen, 80)}; expected "click" or '
                                            '"purchase"', "type")
    if field == "type":  # not a string, or an enum's value: :func:`_type_shown` says which
        return InvalidEvent("unknown_type", f'{_TYPE_UNSEEN} ({body.strip()})', "type")
    if (t := _EXPECTED_TYPE.match(body)) is not None:
        if field is None:
            return InvalidEvent("not_object", f"the value must be a JSON object, saw {_words(t.group(2))}")
        return InvalidEvent("wrong_type", f"{where}: expected {_words(t.group(1))}, saw {t.group(2)}", field)
    if body.startswith("Number out of range"):
        if field is not None and name not in NUMBER_FIELDS:
            # msgspec reads the number before it checks the field's type: 1e400 as a user_id
            # is a number where text goes, not a number to make finite
            return InvalidEvent("wrong_type", f"{where}: saw a number too large to read, where the field takes no "
                                              "number (docs/events.md gives each field's type)", field)
        return InvalidEvent("not_finite", f"{where}: the number is too large to be finite; send a finite number", field)
    if (c := _CONSTRAINT.match(body)) is not None:
        rule = c.group(2)
        if rule.startswith("of length <="):
            if name in ("results", "filters", "attributes", "category_path", "item_ids") and field == name:
                return InvalidEvent("too_long", f"{where}: {rule.replace('of length', 'at most').replace('<= ', '')} entries are accepted", field)
            limit = MAX_TEXT_CHARS if field in TEXT_FIELDS else TEXT_LIMITS.get(name, MAX_ID_CHARS)
            return InvalidEvent("too_long", f"{where}: longer than {limit} characters", field)
        if field == "ts" and rule.startswith("<="):
            return InvalidEvent("ts_out_of_window", f"{where}: must be epoch milliseconds up to {MAX_TS_MS} (the year 9999)", field)
        if field in ("quantity", "price") and rule.startswith("<="):
            limit = MAX_QUANTITY if field == "quantity" else MAX_PRICE
            return InvalidEvent("number_too_large", f"{where}: must be at most {limit}", field)
        if field in ("user_id", "item_id", "event_id", "query", "title"):
            return InvalidEvent("invalid_value", f"{where}: must not be empty", field)
        expected = rule.replace("length", "a length")
        return InvalidEvent("invalid_value", f"{where}: must be {_words(c.group(1))} {expected}", field)
    return InvalidEvent("invalid_value", f"{where}: {body}", field)


def _invalid_key(body: str, field: str) -> InvalidEvent:
    """The reason for a key of object field ``field`` that msgspec refused with ``body``."""
    c = _CONSTRAINT.match(body)
    rule = c.group(2) if c is not None else ""
    if rule.startswith("of length <="):
        return InvalidEvent("too_long", f"field `{field}`: a key is longer than {rule.split('<=')[1].strip()} characters",
                            field)
    if rule.startswith("of length >="):
        return InvalidEvent("invalid_value", f"field `{field}`: a key is empty; keys must not be empty", field)
    return InvalidEvent("invalid_value", f"field `{field}`: a key is not accepted ({body.strip()})", field)


_BRACKETS = frozenset(b"[]{}")
# strings (also an unterminated one) and every run of bytes that is neither a bracket nor a
# quote: what is left of a value after removing them is its brackets, outside strings
_NOT_A_BRACKET = re.compile(rb'"(?:[^"\\]|\\.)*"?|[^"\[\]{}]+', re.S)
_NON_FINITE = (b"NaN", b"Infinity")
_BOM = b"\xef\xbb\xbf"
_POSITION = re.compile(r"\(byte (\d+)\)")
_KEY_BEFORE = re.compile(rb'"((?:[^"\\]|\\.){1,64})"\s*:\s*-?$')


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (brackets inside strings do not
    count; an unbalanced value counts as far as it goes).

    >>> json_depth(b'{"a": [1, {"b": "[[["}]}')
    3
    """
    brackets = _NOT_A_BRACKET.sub(b"", raw)
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, dtype=np.uint8)
    steps = np.where((codes == 0x5B) | (codes == 0x7B), 1, -1)
    return int(np.cumsum(steps).max())


def _check_depth(raw: bytes, max_depth: int) -> None:
    depth = json_depth(raw)
    if depth > max_depth:
        raise InvalidEvent("too_deep", f"the value nests arrays and objects {depth} deep; at most {max_depth} levels are accepted")


#: a ``\uD800``-``\uDBFF`` escape not followed by a ``\uDC00``-``\uDFFF`` one, or such a low
#: half not preceded by a high one (group 2); an escape only where an even run of backslashes,
#: escaped backslashes, goes before it (group 1): ``"C:\\udc0ffee"`` is text, not an escape
_LONE_SURROGATE = re.compile(rb"(?<!\\)((?:\\\\)*)"
                             rb"(\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F][0-9a-fA-F]{2})"
                             rb"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2})")


def _malformed(raw: bytes, exc: Exception) -> InvalidEvent:
    """The dead-letter reason for bytes msgspec could not parse."""
    try:
        _check_utf8(raw)
    except InvalidEvent as exc:
        return exc
    if not raw.strip():
        return InvalidEvent("malformed_json", "the value is empty; expected a JSON object")
    if raw.startswith(_BOM):  # invisible in the dead letter's raw: msgspec's "invalid character (byte 0)" puzzles
        return InvalidEvent("malformed_json", "the value starts with a UTF-8 byte-order mark (the bytes EF BB BF, invisible "
                                              "in `raw`), which JSON does not allow; send the JSON without it (Python: "
                                              "encoding utf-8, not utf-8-sig; .NET: new UTF8Encoding(false))")
    if (lone := _LONE_SURROGATE.search(raw)) is not None:  # msgspec's words for it mislead (e.g. "truncated")
        escape = lone.group(2).decode("ascii")
        return InvalidEvent("malformed_json", f"the value is not valid JSON: the escape {escape} at byte {lone.start(2)} "
                                              "is a lone UTF-16 surrogate (half of a pair), which is not text; "
                                              "encode text as UTF-8 or escape whole pairs")
    if (m := _POSITION.search(str(exc))) is not None:
        at = int(m.group(1))
        if raw.startswith(_NON_FINITE, at):
            literal = "NaN" if raw.startswith(b"NaN", at) else ("-" if raw[at - 1: at] == b"-" else "") + "Infinity"
            key = _KEY_BEFORE.search(raw[max(0, at - 80): at])
            where = f"field `{key.group(1).decode('utf-8', 'replace')}`" if key else f"byte {at}"
            return InvalidEvent("not_finite", f"{where}: {literal} is not a number JSON allows; send a finite number, "
                                              "or null (leave the field out) for none",
                                key.group(1).decode("utf-8", "replace") if key else None)
    return InvalidEvent("malformed_json", f"the value is not valid JSON: {exc}")


def _check_text(event: Event, raw: bytes, ascii_only: bool) -> None:
    """ID_PATTERN and TEXT_PATTERN, checked faster than by a regex per field: whether an id is
    all whitespace is one ``str.strip`` of the pattern's whitespace, and a decoded string can
    hold a control character only where the JSON has an escape (a backslash), a DEL byte (JSON
    lets U+007F through unescaped) or non-ASCII bytes (U+0080..U+009F), so only then are the
    fields searched for one."""
    risky = not ascii_only or b"\\" in raw or b"\x7f" in raw
    purchase = type(event) is PurchaseEvent
    for name in _PURCHASE_IDS if purchase else _CLICK_IDS:
        value = getattr(event, name)
        if value is not None and (not value.strip(_SPACES) or (risky and _HAS_CONTROL.search(value))):
            raise InvalidEvent("bad_id", f"field `{name}`: an id must hold something besides whitespace, and no control "
                                         "characters (U+0000-U+001F, U+007F-U+009F); leave an optional id out (or null) for none", name)
    if risky and not purchase and event.source is not None and _HAS_CONTROL.search(event.source):
        raise InvalidEvent("bad_text", "field `source`: free text may not hold control characters (U+0000-U+001F, U+007F-U+009F)", "source")


def _check_utf8(raw: bytes, ascii_only: bool | None = None) -> None:
    if not (raw.isascii() if ascii_only is None else ascii_only):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise InvalidEvent("not_utf8", f"the value is not UTF-8 text (bad byte at position {uexc.start}); events are UTF-8 JSON") from None


def _check_bounds(event: Event, bounds: Bounds, now_ms: int | None) -> None:
    """The worker's own bounds: the ``ts`` window around its clock, and lowered maxima."""
    if now_ms is not None:
        ts = event.ts
        if ts > now_ms + bounds.max_future_ms:
            raise InvalidEvent("ts_out_of_window", f"field `ts`: {ts} is {_span(ts - now_ms)} ahead of the worker's clock; at most "
                                                   f"{_span(bounds.max_future_ms)} ahead is accepted (STREAMREC_MAX_FUTURE_S); "
                                                   "ts is epoch milliseconds", "ts")
        if bounds.max_age_ms and ts < now_ms - bounds.max_age_ms:
            raise InvalidEvent("ts_out_of_window", f"field `ts`: {ts} is {_span(now_ms - ts)} behind the worker's clock; at most "
                                                   f"{_span(bounds.max_age_ms)} behind is accepted (STREAMREC_MAX_EVENT_AGE_S)", "ts")
    if bounds.max_quantity < MAX_QUANTITY and getattr(event, "quantity", 1) > bounds.max_quantity:
        raise InvalidEvent("number_too_large", f"field `quantity`: {event.quantity} is over this worker's maximum of "
                                               f"{bounds.max_quantity} (STREAMREC_MAX_QUANTITY)", "quantity")
    if bounds.max_price < MAX_PRICE and getattr(event, "price", None) is not None and event.price > bounds.max_price:
        raise InvalidEvent("number_too_large", f"field `price`: {event.price} is over this worker's maximum of "
                                               f"{bounds.max_price:g} (STREAMREC_MAX_PRICE)", "price")


def _span(ms: int) -> str:
    """``90061000`` → ``'1.0 days'``: a duration for a reason, in the unit that reads best."""
    for unit, size in (("days", 86_400_000), ("h", 3_600_000), ("min", 60_000), ("s", 1000)):
        if ms >= size:
            return f"{ms / size:.1f} {unit}" if ms % size else f"{ms // size} {unit}"
    return f"{ms} ms"


def _as_bytes(raw: bytearray | memoryview | str) -> bytes:
    """A value given as text (a caller that read it as ``str``) as its UTF-8 bytes; a lone
    surrogate in it becomes the bytes that :func:`_check_utf8` then refuses, named."""
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogatepass")
    if isinstance(raw, bytearray | memoryview):
        return bytes(raw)
    raise TypeError(f"a value to decode is bytes or str, not {type(raw).__name__}")


def _parse(raw: bytes | bytearray | memoryview | str | None, decoder: msgspec.json.Decoder, bounds: Bounds):
    """The checks every value passes before and while it is parsed: present, size, depth,
    JSON, types, UTF-8. Returns the decoded value and whether ``raw`` is ASCII."""
    if raw is None:
        raise InvalidEvent("malformed_json", "the value is empty (null message); expected a JSON object")
    if not isinstance(raw, bytes):
        raw = _as_bytes(raw)
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEvent("oversize", f"the value is {len(raw)} bytes, over the {MAX_EVENT_BYTES}-byte limit; it was not parsed")
    if raw.count(b"[") + raw.count(b"{") > bounds.max_depth:  # else it cannot nest deeper: two C scans
        _check_depth(raw, bounds.max_depth)
    try:
        value = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        _check_utf8(raw)  # a bad byte in a key looks like a missing field to msgspec; the encoding comes first
        invalid = _invalid_from_validation(str(exc))
        if invalid.field == "type" and invalid.reason.startswith(_TYPE_UNSEEN):
            invalid = _type_shown(raw, invalid)
        raise invalid from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _malformed(raw, exc) from None
    except RecursionError:  # deeper than the interpreter's stack, under a lowered max_depth: cannot happen at MAX_DEPTH
        raise InvalidEvent("too_deep", f"the value nests arrays and objects too deep; at most {bounds.max_depth} levels are accepted") from None
    ascii_only = raw.isascii()
    _check_utf8(raw, ascii_only)  # msgspec skips unknown fields without checking their text; the whole value must be UTF-8
    return value, raw, ascii_only


def decode_event(raw: bytes | bytearray | memoryview | str | None, bounds: Bounds = DEFAULT_BOUNDS,
                 now_ms: int | None = None) -> Event:
    """Decode and validate one input value; raise :class:`InvalidEvent` on any breach.

    ``now_ms`` (the worker's clock) turns on the ``ts`` window of ``bounds``; without it only
    the static bounds apply, which are the JSON Schemas'.
    """
    event, raw, ascii_only = _parse(raw, _event_decoder, bounds)
    _check_text(event, raw, ascii_only)
    if now_ms is not None or bounds is not DEFAULT_BOUNDS:
        _check_bounds(event, bounds, now_ms)
    return event


def decode_forget(raw: bytes | bytearray | memoryview | str | None, bounds: Bounds = DEFAULT_BOUNDS,
                  now_ms: int | None = None) -> ForgetRequest:
    """Decode and validate one value of the forget topic (stream/records.py ``ForgetRequest``),
    with the door events pass; ``now_ms`` turns on the ``ts`` window ahead of the clock (a
    request dated far ahead would refuse the user's events until then).

    >>> decode_forget(b'{"user_id":"u1","request_id":"r-9","ts":1700000000000}').request_id
    'r-9'
    """
    request, raw, ascii_only = _parse(raw, _forget_decoder, bounds)
    _check_ids(request, _FORGET_IDS, not ascii_only or b"\\" in raw or b"\x7f" in raw)
    if now_ms is not None and request.ts > now_ms + bounds.max_future_ms:
        raise InvalidEvent("ts_out_of_window", f"field `ts`: {request.ts} is {_span(request.ts - now_ms)} ahead of the "
                                               f"worker's clock; at most {_span(bounds.max_future_ms)} ahead is accepted "
                                               "(STREAMREC_MAX_FUTURE_S); ts is epoch milliseconds", "ts")
    return request


def decode_impression(raw: bytes | bytearray | memoryview | str | None, bounds: Bounds = DEFAULT_BOUNDS,
                      now_ms: int | None = None) -> ImpressionEvent:
    """Decode and validate one value of the impressions topic (``ImpressionEvent``), with the
    door events pass (``now_ms`` is accepted for a common signature; an impression's ``ts``
    only counts, so it has no window).

    >>> decode_impression(b'{"rec_id":"r1","user_id":"u1","item_ids":["i1","i2"],"ts":1}').item_ids
    ['i1', 'i2']
    """
    impression, raw, ascii_only = _parse(raw, _impression_decoder, bounds)
    risky = not ascii_only or b"\\" in raw or b"\x7f" in raw
    _check_ids(impression, ("rec_id", "user_id"), risky)
    _check_list(impression.item_ids, "item_ids", risky)
    return impression


def decode_search(raw: bytes | bytearray | memoryview | str | None, bounds: Bounds = DEFAULT_BOUNDS,
                  now_ms: int | None = None) -> SearchEvent:
    """Decode and validate one value of the searches topic (``SearchEvent``), with the door
    events pass: the ids' rules, free text without control characters, a query that holds
    more than whitespace, and the ``ts`` window of ``bounds`` when ``now_ms`` is given.

    >>> decode_search('{"event_id":"s1","type":"search","user_id":"u1","query":"羽绒服","ts":1}'.encode()).query
    '羽绒服'
    >>> try:
    ...     decode_search(b'{"event_id":"s1","type":"click","user_id":"u1","query":"x","ts":1}')
    ... except InvalidEvent as exc:
    ...     print(exc.code, '|', exc.reason)
    unknown_type | field `type`: must be "search" on the searches topic, saw 'click'
    """
    try:
        search, raw, ascii_only = _parse(raw, _search_decoder, bounds)
    except InvalidEvent as exc:
        raise _typed(exc, "search", "searches") from None
    risky = not ascii_only or b"\\" in raw or b"\x7f" in raw
    _check_ids(search, ("event_id", "user_id"), risky)
    _check_ids(search, ("session_id",), risky, optional=True)
    _check_list(search.results, "results", risky)
    if not search.query.strip(_SPACES):
        raise InvalidEvent("invalid_value", "field `query`: must hold something besides whitespace", "query")
    _check_free_text("query", search.query, risky)
    _check_entries(search.filters, "filters", risky)
    if now_ms is not None or bounds is not DEFAULT_BOUNDS:
        _check_bounds(search, bounds, now_ms)
    return search


def decode_item(raw: bytes | bytearray | memoryview | str | None, bounds: Bounds = DEFAULT_BOUNDS,
                now_ms: int | None = None) -> ItemEvent:
    """Decode and validate one value of the items topic (``ItemEvent``; a null value there is
    a tombstone, which the caller handles before decoding). ``now_ms`` is accepted for a
    common signature: an item's ``ts`` orders its versions and has no window.

    >>> decode_item(b'{"item_id":"i1","title":"Down jacket","category_path":["Women","Coats"],"ts":1}').category_path
    ['Women', 'Coats']
    """
    item, raw, ascii_only = _parse(raw, _item_decoder, bounds)
    risky = not ascii_only or b"\\" in raw or b"\x7f" in raw
    _check_ids(item, ("item_id",), risky)
    _check_list(item.category_path, "category_path", risky)
    if not item.title.strip(_SPACES):
        raise InvalidEvent("invalid_value", "field `title`: must hold something besides whitespace", "title")
    for name in ("title", "description", "brand"):
        _check_free_text(name, getattr(item, name), risky)
    _check_entries(item.attributes, "attributes", risky)
    if bounds is not DEFAULT_BOUNDS:
        _check_bounds(item, bounds, None)  # the lowered price maximum; an item's ts has no window
    return item


def _type_shown(raw: bytes, invalid: InvalidEvent) -> InvalidEvent:
    """``invalid`` (a ``type`` msgspec refused without saying what it saw: a number, an array,
    an enum's value) restated with the value ``raw`` holds, as JSON, cut short; as it was where
    that value cannot be told."""
    objects: list[list[tuple[str, object]]] = []  # each object's pairs as given, the outermost last

    def pairs(given: list[tuple[str, object]]) -> dict:
        objects.append(given)
        return dict(given)

    try:  # Python's reader, not msgspec: it keeps a key given twice, and reads an escaped key as its text
        json.loads(raw, object_pairs_hook=pairs)
    except (ValueError, RecursionError):
        return invalid
    types = [value for key, value in objects[-1] if key == "type"] if objects else []
    if len(types) > 1:  # msgspec refused one of them
        return InvalidEvent("unknown_type", "field `type` is given more than once; send it once", "type")
    if not types:
        return invalid
    given = types[0]  # a string quoted as msgspec quotes one ('search'), anything else as JSON
    seen = clipped(f"'{given}'" if isinstance(given, str) else json.dumps(given, ensure_ascii=False), 80)
    return InvalidEvent("unknown_type", f'field `type`: unknown event type {seen}; expected "click" or "purchase"',
                        "type")


def _typed(exc: InvalidEvent, expected: str, topic: str) -> InvalidEvent:
    """The click-or-purchase wording of a ``type`` problem, restated for another topic's type."""
    if exc.field != "type":
        return exc
    if exc.code == "missing_field":
        return InvalidEvent("missing_field", f'field `type` is missing; expected "{expected}"', "type")
    if "given more than once" in exc.reason or "given twice" in exc.reason:
        return exc
    seen = re.search(r'unknown event type (.+); expected "click" or "purchase"$|Invalid (?:enum )?value ([^)]+)',
                     exc.reason)
    shown = clipped(seen.group(1) or seen.group(2), 80) if seen else "another value"
    return InvalidEvent("unknown_type", f'field `type`: must be "{expected}" on the {topic} topic, saw {shown}', "type")


def _check_free_text(name: str, text: str | None, risky: bool) -> None:
    if text is not None and risky and _HAS_CONTROL.search(text):
        raise InvalidEvent("bad_text", f"field `{name}`: free text may not hold control characters (U+0000-U+001F, U+007F-U+009F)", name)


def _check_list(ids: list[str] | None, name: str, risky: bool) -> None:
    for text in ids or ():
        if not text.strip(_SPACES) or (risky and _HAS_CONTROL.search(text)):
            raise InvalidEvent("bad_id", f"field `{name}`: an id must hold something besides whitespace, and no "
                                         "control characters (U+0000-U+001F, U+007F-U+009F)", name)


def _check_entries(entries: dict[str, str] | None, name: str, risky: bool) -> None:
    if entries and risky:
        for key, text in entries.items():
            if _HAS_CONTROL.search(key) or _HAS_CONTROL.search(text):
                raise InvalidEvent("bad_text", f"field `{name}`: keys and values may not hold control characters "
                                               "(U+0000-U+001F, U+007F-U+009F)", name)


def id_problem(text: str, max_chars: int = MAX_ID_CHARS) -> str | None:
    """Why an id given on a command line (a user to tail, a prefix of event ids) could not be
    one the worker accepts, or None: the rules :func:`decode_event` applies to ids.

    >>> id_problem("u1") is None, id_problem(" "), id_problem("a" * 3, max_chars=2)
    (True, 'an id must hold something besides whitespace', 'an id has at most 2 characters')
    """
    try:
        text.encode()
    except UnicodeEncodeError:  # bytes that are not UTF-8 on the command line arrive as lone surrogates
        return f"{text!r} is not UTF-8 text"
    if len(text) > max_chars:
        return f"an id has at most {max_chars} characters"
    if not text.strip(_SPACES):
        return "an id must hold something besides whitespace"
    if _HAS_CONTROL.search(text):
        return "an id holds no control characters (U+0000-U+001F, U+007F-U+009F)"
    return None


def _check_ids(value, names: tuple[str, ...], risky: bool, optional: bool = False) -> None:
    """The id rule for the fields ``names`` of ``value``; ``optional``: None passes."""
    for name in names:
        text = getattr(value, name)
        if text is None and optional:
            continue
        if not text.strip(_SPACES) or (risky and _HAS_CONTROL.search(text)):
            leave = "; leave an optional id out (or null) for none" if optional else ""
            raise InvalidEvent("bad_id", f"field `{name}`: an id must hold something besides whitespace, and no control "
                                         f"characters (U+0000-U+001F, U+007F-U+009F){leave}", name)


__all__ = ["decode_event", "decode_forget", "decode_impression", "decode_item", "decode_search", "id_problem",
           "json_depth"]
