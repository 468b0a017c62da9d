"""Contract tests for the event decoder: what a producer may send and what it is told back.

Each rule in docs/events.md has a test here; the generated tests check that no input, however
broken, makes ``decode_event`` raise anything but ``InvalidEvent``.
"""

from __future__ import annotations

import base64
import functools
import json
from pathlib import Path

import jsonschema
import msgspec
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import stream.records
from stream.decoding import (
    decode_event,
    decode_forget,
    decode_impression,
    decode_item,
    decode_search,
)
from stream.errors import DEAD_LETTER_CODES, InvalidEvent
from stream.records import (
    MAX_DEPTH,
    MAX_EVENT_BYTES,
    MAX_PRICE,
    MAX_QUANTITY,
    MAX_TS_MS,
    Bounds,
    ClickEvent,
    DeadLetter,
    PurchaseEvent,
    Recommendation,
    RecommendedItem,
    dead_letter,
    decode_dead_letter,
    decode_recommendation,
    encode,
)

CLICK = {"event_id": "e1", "type": "click", "user_id": "u1", "item_id": "i9", "ts": 1_700_000_000_000}
PURCHASE = {**CLICK, "type": "purchase", "quantity": 2, "price": 9.5, "order_id": "o1"}
REQUIRED = ("event_id", "type", "user_id", "item_id", "ts")
ERROR_CODES = set(DEAD_LETTER_CODES) - {"processing_error", "embedding_failed"}  # the decoder's; the worker adds the others

# A JSON value of each kind, with the word the reason uses for what was seen.
SEEN = {"str": "text", "int": 7, "float": 1.5, "bool": True, "null": None, "array": [1], "object": {"a": 1}}
# For each field, the kinds it accepts; every other kind must give `wrong_type`.
ACCEPTS = {
    "event_id": {"str"}, "user_id": {"str"}, "item_id": {"str"}, "ts": {"int"},
    "session_id": {"str", "null"}, "category_id": {"str", "null"}, "source": {"str", "null"},
    "price": {"int", "float", "null"},
}
PURCHASE_ACCEPTS = {"quantity": {"int"}, "order_id": {"str", "null"}, "price": {"int", "float", "null"}}


def raw(d: object) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode()


# --- strategies -------------------------------------------------------------------------

# what an id may hold: no control characters (Cc), and something besides whitespace
_ID_CHARS = st.characters(blacklist_categories=("Cc", "Cs"))
ids = st.text(_ID_CHARS, min_size=1, max_size=128).filter(lambda s: not _blank(s))
texts = st.text(_ID_CHARS, max_size=40)


def _blank(s: str) -> bool:
    """Only the whitespace the id rule names (and str.isspace agrees with it on non-Cc text)."""
    return all(c in " \u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff" or "\u2000" <= c <= "\u200a" for c in s)


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
OPTIONAL = {
    "click": {"session_id": st.none() | ids, "category_id": st.none() | ids, "rec_id": st.none() | ids,
              "price": st.none() | st.integers(0, 10**6) | st.floats(0, 1e6), "source": st.none() | texts},
    "purchase": {"quantity": st.integers(1, MAX_QUANTITY), "price": st.none() | st.floats(0, MAX_PRICE), "order_id": st.none() | ids,
                 "category_id": st.none() | ids, "session_id": st.none() | ids, "rec_id": st.none() | ids},
}


@st.composite
def valid_event_dicts(draw):
    kind = draw(st.sampled_from(["click", "purchase"]))
    d = {"event_id": draw(ids), "type": kind, "user_id": draw(ids), "item_id": draw(ids), "ts": draw(st.integers(0, MAX_TS_MS))}
    for name, values in OPTIONAL[kind].items():
        if draw(st.booleans()):
            d[name] = draw(values)
    known = set(REQUIRED) | set(OPTIONAL["click"]) | set(OPTIONAL["purchase"])
    extra = draw(st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k not in known), json_values, max_size=3))
    return {**extra, **d}


@st.composite
def mutated_event_dicts(draw):
    """A valid event with one to three changes: a field dropped, retyped or set out of range."""
    d = draw(valid_event_dicts())
    names = ["event_id", "type", "user_id", "item_id", "ts", "session_id", "price", "quantity", "category_id"]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["drop", "retype", "edge"]))
        if how == "drop":
            d.pop(name, None)
        elif how == "retype":
            d[name] = draw(json_values)
        else:
            d[name] = draw(st.sampled_from(["", "x" * 129, -1, 0, 0.5, "Click", "purchase", None, 2**64, 10**400, " ",
                                            "a\nb", "\x00", MAX_TS_MS + 1, MAX_QUANTITY + 1, 1e300]))
    return d


@st.composite
def mutated_events(draw):
    """Bytes of a mutated event, sometimes also cut short or with a byte flipped."""
    body = raw(draw(mutated_event_dicts()))
    how = draw(st.sampled_from(["as is", "as is", "truncate", "flip"]))
    if how == "truncate" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "flip" and body:
        i = draw(st.integers(0, len(body) - 1))
        body = body[:i] + bytes([draw(st.integers(0, 255))]) + body[i + 1:]
    return body


def rejected(value: bytes | None, decode=decode_event) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        decode(value)
    err = info.value
    assert err.code in ERROR_CODES
    assert str(err) == err.reason
    return err


def test_valid_click_and_purchase_decode_to_their_types():
    click = decode_event(raw({**CLICK, "session_id": "s", "category_id": "c", "price": 0, "source": "home"}))
    assert isinstance(click, ClickEvent) and click.type == "click" and click.price == 0
    purchase = decode_event(raw(PURCHASE))
    assert isinstance(purchase, PurchaseEvent) and purchase.type == "purchase"
    assert (purchase.quantity, purchase.price, purchase.order_id) == (2, 9.5, "o1")


def test_quantity_defaults_to_one_and_optional_fields_may_be_null():
    ev = decode_event(raw({**CLICK, "type": "purchase", "price": None, "order_id": None}))
    assert ev.quantity == 1 and ev.price is None and ev.order_id is None


@pytest.mark.parametrize("base", [CLICK, PURCHASE], ids=["click", "purchase"])
@pytest.mark.parametrize("name", REQUIRED)
def test_each_missing_required_field_is_named(base, name):
    d = dict(base)
    del d[name]
    err = rejected(raw(d))
    assert (err.code, err.field) == ("missing_field", name)
    assert f"`{name}`" in err.reason and "missing" in err.reason


def _wrong_type_cases():
    purchase = {k: v for k, v in ACCEPTS.items() if k != "source"} | PURCHASE_ACCEPTS  # `source` is click-only
    for base, accepts in ((CLICK, ACCEPTS), (PURCHASE, purchase)):
        for name, ok in accepts.items():
            for kind, value in SEEN.items():
                if kind not in ok and not (kind == "int" and "float" in ok):
                    yield pytest.param(base, name, kind, value, id=f"{base['type']}-{name}-{kind}")


@pytest.mark.parametrize(("base", "name", "kind", "value"), list(_wrong_type_cases()))
def test_wrong_type_names_field_and_what_was_seen(base, name, kind, value):
    err = rejected(raw({**base, name: value}))
    assert (err.code, err.field) == ("wrong_type", name)
    assert f"`{name}`" in err.reason and f"saw {kind}" in err.reason


@pytest.mark.parametrize(("value", "shown"), [("Click", "'Click'"), ("view", "'view'"), ("", "''"), (5, "5"),
                                             (None, "null"), (["click"], '["click"]'), ("a)b", "'a)b'")])
def test_unknown_or_badly_typed_event_type_is_unknown_type(value, shown):
    """The reason shows the value seen, whatever its JSON type (a number or an array was
    "(Expected `str`)", and a search's type was cut at a parenthesis)."""
    err = rejected(raw({**CLICK, "type": value}))
    assert (err.code, err.field) == ("unknown_type", "type")
    assert "`type`" in err.reason and '"click" or "purchase"' in err.reason and f"type {shown};" in err.reason, err.reason
    search = rejected(raw({"event_id": "s1", "type": value, "user_id": "u1", "query": "q", "ts": CLICK["ts"]}), decode_search)
    assert search.code == "unknown_type" and search.reason.endswith(f"searches topic, saw {shown}"), search.reason


@pytest.mark.parametrize(("decode", "value", "said"), [
    (decode_search, b'{"type":"click","event_id":"s1","user_id":"u1","query":"type","ts":1}', "saw 'click'"),
    (decode_search, b'{"type":"click","event_id":"s1","user_id":"u1","query":"x","ts":1,"filters":{"type":"shoe"}}',
     "saw 'click'"),
    (decode_event, b'{"type":5,"event_id":"e1","user_id":"type","item_id":"i1","ts":1}', "unknown event type 5;"),
    (decode_event, b'{"type":5,"typ\\u0065":"click","event_id":"e1","user_id":"u","item_id":"i1","ts":1}',
     "given more than once"),
    (decode_search, b'{"type":"click","event_id":"s1","user_id":"u1","query":"x","ts":1', "saw 'click'"),  # cut short
])
def test_the_type_shown_is_the_top_level_one_however_else_the_word_appears(decode, value, said):
    """The word "type" as a query, a filter's key or an id is not a second `type`; a key
    spelled with an escape is; and a value cut short after its type still shows it."""
    err = rejected(value, decode)
    assert err.code == "unknown_type" and said in err.reason, err.reason


@pytest.mark.parametrize(("decode", "base", "name"), [(decode_event, None, "user_id"), (decode_event, None, "item_id"),
                                                      (decode_event, None, "event_id"),
                                                      (decode_search, "search", "results"), (decode_search, "search", "query")])
def test_a_number_too_large_to_be_finite_where_text_goes_is_of_the_wrong_type(decode, base, name):
    """msgspec reads 1e400 before it checks the field's type: a user_id of 1e400 was
    ``not_finite``, "send a finite number", which a finite number would not have fixed."""
    fields = dict(CLICK) if base is None else {"event_id": "s1", "type": "search", "user_id": "u1", "query": "q", "ts": CLICK["ts"]}
    fields[name] = ["PLACEHOLDER"] if name == "results" else "PLACEHOLDER"
    err = rejected(raw(fields).replace(b'"PLACEHOLDER"', b"1e400"), decode)
    assert err.code == "wrong_type" and f"`{name}" in err.reason and "finite number" not in err.reason, err.reason
    price = rejected(raw({**CLICK, "price": 1.5}).replace(b"1.5", b"1e400"))
    assert price.code == "not_finite"  # where a number goes, it is one that is not finite


@pytest.mark.parametrize("decode", [decode_event, decode_search])
def test_a_huge_unknown_type_is_quoted_cut_short_in_the_reason(decode):
    # the reason is a sentence for a person (and travels beside the raw value in the dead
    # letter): a 60,000-character type made it 60 KB and the dead letter twice the value
    err = rejected(raw({**CLICK, "type": "x" * 60_000}), decode)
    assert (err.code, err.field) == ("unknown_type", "type")
    assert "'" + "x" * 79 + "…" in err.reason and len(err.reason) < 300


def test_a_type_given_twice_is_said_so_not_called_unknown():
    body = raw(CLICK)[1:]  # the click's fields after a first `type` of the other kind
    err = rejected(b'{"type": "purchase", ' + body)
    assert (err.code, err.field) == ("unknown_type", "type")
    assert "given twice" in err.reason and "unknown event type" not in err.reason


@pytest.mark.parametrize(("decode", "value", "code", "says"), [
    (decode_search, {"filters": {"": "v"}}, "invalid_value", "field `filters`: a key is empty"),
    (decode_search, {"filters": {"k" * 129: "v"}}, "too_long", "field `filters`: a key is longer than 128 characters"),
    (decode_item, {"attributes": {"": "v"}}, "invalid_value", "field `attributes`: a key is empty"),
])
def test_a_bad_key_of_an_object_field_names_the_field(decode, value, code, says):
    base = ({"event_id": "e", "type": "search", "user_id": "u", "query": "q", "ts": 1} if decode is decode_search
            else {"item_id": "i", "title": "t", "ts": 1})
    with pytest.raises(InvalidEvent) as info:
        decode(raw({**base, **value}))
    assert info.value.code == code and info.value.reason.startswith(says), info.value.reason
    assert "`key`" not in info.value.reason


@pytest.mark.parametrize(
    ("field", "value"),
    [("user_id", ""), ("event_id", ""), ("ts", -1), ("price", -0.01)],
)
def test_out_of_range_values_are_invalid_value(field, value):
    err = rejected(raw({**CLICK, field: value}))
    assert (err.code, err.field) == ("invalid_value", field) and f"`{field}`" in err.reason


def test_quantity_must_be_at_least_one():
    err = rejected(raw({**PURCHASE, "quantity": 0}))
    assert (err.code, err.field) == ("invalid_value", "quantity")


def test_id_length_counts_characters_not_bytes():
    assert decode_event(raw({**CLICK, "user_id": "😀" * 128})).user_id == "😀" * 128
    assert rejected(raw({**CLICK, "user_id": "😀" * 129})).code == "too_long"


# --- bounds at the door -------------------------------------------------------------------

@pytest.mark.parametrize(("base", "field", "limit"), [
    (CLICK, "event_id", 128), (CLICK, "user_id", 128), (CLICK, "item_id", 128), (CLICK, "session_id", 128),
    (CLICK, "category_id", 128), (CLICK, "source", 256), (PURCHASE, "order_id", 128)])
def test_every_string_field_has_a_length_bound(base, field, limit):
    assert getattr(decode_event(raw({**base, field: "x" * limit})), field) == "x" * limit
    err = rejected(raw({**base, field: "x" * (limit + 1)}))
    assert (err.code, err.field) == ("too_long", field) and str(limit) in err.reason


def _bad_ids():
    for field in ["event_id", "user_id", "item_id", "session_id", "category_id", "order_id"]:
        values = [" ", "   ", "\u3000", "\u00a0 \u2009", "a\nb", "ab\n", "\ttab", "a\x00", "a\x7f", "a\x85"]
        if field in ("session_id", "category_id", "order_id"):
            values.append("")  # optional: null or left out means none; an empty required id is invalid_value
        for value in values:
            yield pytest.param(field, value, id=f"{field}-{value!r}")


@pytest.mark.parametrize(("field", "value"), list(_bad_ids()))
def test_ids_that_are_blank_or_hold_control_characters_are_bad_id(field, value):
    err = rejected(raw({**PURCHASE, field: value}))
    assert (err.code, err.field) == ("bad_id", field) and f"`{field}`" in err.reason


@pytest.mark.parametrize("value", ["a b", "x\u200d y", "ünïcödé", "商品 123", "😀"])
def test_ids_with_inner_spaces_and_any_printable_text_are_fine(value):
    assert decode_event(raw({**CLICK, "user_id": value, "session_id": value})).user_id == value


def test_free_text_may_be_blank_but_not_hold_control_characters():
    assert decode_event(raw({**CLICK, "source": "  "})).source == "  "
    err = rejected(raw({**CLICK, "source": "home\r\n"}))
    assert (err.code, err.field) == ("bad_text", "source")


def test_nesting_deeper_than_the_bound_is_too_deep_and_never_a_crash():
    deep = b'{"event_id":"e1","type":"click","user_id":"u1","item_id":"i9","ts":1,"extra":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    assert len(deep) < MAX_EVENT_BYTES
    err = rejected(deep)
    assert err.code == "too_deep" and "30001 deep" in err.reason
    assert rejected(b"[" * 60_000).code == "too_deep"  # unbalanced: counted as far as it goes
    assert rejected(b'{"a":' * 5_000).code == "too_deep"
    at_limit = {**CLICK, "extra": functools.reduce(lambda inner, _: [inner], range(MAX_DEPTH - 2), [])}
    assert decode_event(raw(at_limit)).event_id == "e1"  # the event is depth 1, extra's arrays the rest
    assert rejected(raw({**at_limit, "extra": [at_limit["extra"]]})).code == "too_deep"


def test_brackets_inside_strings_do_not_count_as_nesting():
    value = {**CLICK, "note": "[" * 500 + "{" * 500, "escaped": '\\"' + "[" * 100}
    assert decode_event(raw(value)).event_id == "e1"


def test_a_lower_depth_bound_is_honoured():
    value = raw({**CLICK, "extra": [[[1]]]})
    assert decode_event(value).event_id == "e1"
    with pytest.raises(InvalidEvent) as info:
        decode_event(value, Bounds(max_depth=3))
    assert info.value.code == "too_deep"


@pytest.mark.parametrize("ts", [10**400, 2**64, MAX_TS_MS + 1])
def test_ts_beyond_the_year_9999_is_out_of_window(ts):
    err = rejected(raw({**CLICK, "ts": ts}))
    assert (err.code, err.field) == ("ts_out_of_window", "ts")
    assert decode_event(raw({**CLICK, "ts": MAX_TS_MS})).ts == MAX_TS_MS


def test_ts_is_checked_against_the_workers_clock_when_given():
    now = 1_700_000_000_000
    hour = 3_600_000
    assert decode_event(raw({**CLICK, "ts": now + hour}), now_ms=now).ts == now + hour
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw({**CLICK, "ts": now + hour + 1}), now_ms=now)
    assert info.value.code == "ts_out_of_window" and "ahead of the worker's clock" in info.value.reason
    # too old is off by default (a replay of an old log), on with max_age_ms
    assert decode_event(raw({**CLICK, "ts": 0}), now_ms=now).ts == 0
    with pytest.raises(InvalidEvent) as info:
        decode_event(raw({**CLICK, "ts": now - 2 * hour}), Bounds(max_age_ms=hour), now)
    assert info.value.code == "ts_out_of_window" and "behind" in info.value.reason


@pytest.mark.parametrize(("field", "value"), [("quantity", 10**400), ("quantity", MAX_QUANTITY + 1), ("price", MAX_PRICE * 2)])
def test_quantity_and_price_over_their_maxima_are_number_too_large(field, value):
    err = rejected(raw({**PURCHASE, field: value}))
    assert (err.code, err.field) == ("number_too_large", field)


def test_lowered_maxima_are_honoured():
    value = raw({**PURCHASE, "quantity": 50, "price": 500.0})
    assert decode_event(value).quantity == 50
    for bounds, field in ((Bounds(max_quantity=49), "quantity"), (Bounds(max_price=499), "price")):
        with pytest.raises(InvalidEvent) as info:
            decode_event(value, bounds)
        assert (info.value.code, info.value.field) == ("number_too_large", field)
    with pytest.raises(ValueError):
        Bounds(max_quantity=MAX_QUANTITY + 1)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400", b"1" + b"0" * 400])
def test_nan_and_infinity_are_not_finite(literal):
    body = raw({**CLICK, "price": 1.5}).replace(b"1.5", literal)
    err = rejected(body)
    assert err.code == "not_finite" and "`price`" in err.reason


def test_a_non_finite_literal_in_an_extra_field_is_not_finite_too():
    err = rejected(raw({**CLICK, "score": 1.5}).replace(b"1.5", b"NaN"))
    assert err.code == "not_finite" and "`score`" in err.reason


@pytest.mark.parametrize("literal", [b"1.0", b"1e3", b"1700000000000.0"])
def test_integers_must_be_written_as_integers(literal):
    body = raw(CLICK).replace(b'"ts": 1700000000000', b'"ts": ' + literal)
    assert rejected(body).code == "wrong_type"


def test_extra_fields_are_accepted_and_ignored():
    extras = {"campaign": {"id": 3, "tags": ["a"]}, "quantity": "ignored on a click", "ts_ms": None}
    assert decode_event(raw({**CLICK, **extras})) == decode_event(raw(CLICK))


def _padded(size: int) -> bytes:
    """A valid click of exactly ``size`` bytes (padding in an extra field)."""
    stub = raw({**CLICK, "pad": ""})
    body = raw({**CLICK, "pad": "x" * (size - len(stub))})
    assert len(body) == size
    return body


def test_a_valid_value_of_exactly_the_limit_is_accepted():
    assert decode_event(_padded(MAX_EVENT_BYTES)).event_id == "e1"


@pytest.mark.parametrize("size", [MAX_EVENT_BYTES + 1, 10 * MAX_EVENT_BYTES])
def test_oversize_is_rejected_before_parsing(size):
    err = rejected(_padded(size))
    assert err.code == "oversize" and str(size) in err.reason and str(MAX_EVENT_BYTES) in err.reason
    assert rejected(b"{" * size).code == "oversize"  # not parsed: no JSON error


@pytest.mark.parametrize(
    "value",
    [b"\xff\xfe{}", raw(CLICK).replace(b'"u1"', b'"u\xc3"'), raw({**CLICK, "session_id": "s"}).replace(b'"s"', b'"\xed\xa0\x80"')],
    ids=["bom-like", "truncated-sequence", "encoded-surrogate"],
)
def test_non_utf8_is_not_utf8(value):
    assert rejected(value).code == "not_utf8"


def test_non_utf8_inside_an_extra_field_is_not_utf8():
    assert rejected(raw({**CLICK, "note": "s"}).replace(b'"s"', b'"\xff"')).code == "not_utf8"


@pytest.mark.parametrize("value", [raw(CLICK).replace(b'"u1"', b'"u\\ud800"'),
                                   raw({**CLICK, "note": ["s"]}).replace(b'"s"', b'"\\udc00x"'),
                                   raw({**CLICK, "note": ["s"]}).replace(b'"s"', b'"\\ud83d"')])
def test_a_lone_surrogate_escape_is_named_as_such(value):
    """msgspec's own words for it ("Input data was truncated", "unexpected end of hex escape")
    send a producer looking for the wrong mistake."""
    err = rejected(value)
    assert err.code == "malformed_json" and "lone UTF-16 surrogate" in err.reason and "truncated" not in err.reason
    paired = raw({**CLICK, "note": ["s"]}).replace(b'"s"', b'"\\ud83d\\ude00"')
    assert decode_event(paired).event_id == "e1"


def test_an_escaped_backslash_before_u_and_hex_is_text_not_a_lone_surrogate():
    """``"C:\\\\udc0ffee"`` is a backslash, then the letters udc0ffee: valid JSON. Cut short,
    it was called a lone surrogate, hiding that the value was truncated."""
    whole = raw({**CLICK, "event_id": "C:\\udc0ffee"})
    assert whole.count(b"\\\\udc0f") == 1 and decode_event(whole).event_id == "C:\\udc0ffee"
    err = rejected(whole[:-1])
    assert err.code == "malformed_json" and "surrogate" not in err.reason and "truncated" in err.reason, err.reason
    both = raw({**CLICK, "event_id": "C:\\udc0ffee", "note": "s"}).replace(b'"s"', b'"\\\\\\ud800"')
    assert "lone UTF-16 surrogate" in rejected(both).reason  # an escaped backslash, then a real lone escape


@pytest.mark.parametrize("value", [b"{", b'{"event_id": }', b"{'a': 1}", b"nan", raw(CLICK) + b"}", b"\x00"])
def test_malformed_json(value):
    assert rejected(value).code == "malformed_json"


@pytest.mark.parametrize("value", [None, b"", b"   \n", bytearray(), memoryview(b"")])
def test_empty_values_are_malformed_json(value):
    err = rejected(value)
    assert err.code == "malformed_json" and "empty" in err.reason


@pytest.mark.parametrize(("value", "seen"), [(b"[]", "an array"), (b"1", "an integer"), (b'"x"', "a string"), (b"null", "null")])
def test_non_objects_are_not_object(value, seen):
    err = rejected(value)
    assert err.code == "not_object" and err.reason.endswith(f"saw {seen}")


def test_bytes_like_inputs_are_accepted():
    assert decode_event(bytearray(raw(CLICK))) == decode_event(memoryview(raw(CLICK))) == decode_event(raw(CLICK))


# --- dead letters -----------------------------------------------------------------------

def test_dead_letter_keeps_utf8_as_text_and_the_rest_as_base64():
    err = InvalidEvent("missing_field", "field `user_id` is missing (required)", "user_id")
    text = dead_letter(err, b'{"x": "\xc3\xa9"}', "streamrec.clicks", 3, 41, 1700)
    assert (text.raw, text.raw_encoding, text.code, text.reason) == ('{"x": "é"}', "utf-8", "missing_field", err.reason)
    assert (text.topic, text.partition, text.offset, text.ts) == ("streamrec.clicks", 3, 41, 1700)
    binary = dead_letter(InvalidEvent("not_utf8", "bad"), b"\xff\x00", "t", 0, 0, 0)
    assert binary.raw_encoding == "base64" and base64.b64decode(binary.raw) == b"\xff\x00"
    assert dead_letter(err, None, "t", 0, 0, 0).raw == ""
    assert decode_dead_letter(encode(binary)) == binary


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_every_reason_names_its_field_and_survives_into_the_dead_letter(value):
    try:
        decode_event(value)
    except InvalidEvent as err:
        if err.code in ("missing_field", "wrong_type", "invalid_value", "unknown_type"):
            assert err.field and f"`{err.field}`" in err.reason
        letter = decode_dead_letter(encode(dead_letter(err, value, "streamrec.clicks", 0, 7, 1)))
        assert letter.reason == err.reason and letter.code == err.code
        restored = letter.raw.encode() if letter.raw_encoding == "utf-8" else base64.b64decode(letter.raw)
        assert restored == value


# --- generated inputs -------------------------------------------------------------------

def _only_invalid_event(value: bytes) -> None:
    try:
        decode_event(value)
    except InvalidEvent as err:
        assert err.code in ERROR_CODES and err.reason


@settings(max_examples=300)
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbf{}")
def test_random_bytes_only_ever_raise_invalid_event(value):
    _only_invalid_event(value)


@settings(max_examples=200)
@given(json_values)
def test_random_json_values_only_ever_raise_invalid_event(value):
    _only_invalid_event(raw(value))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_events())
def test_mutated_events_only_ever_raise_invalid_event(value):
    _only_invalid_event(value)


@settings(max_examples=200)
@given(valid_event_dicts())
def test_valid_events_round_trip_through_encode(d):
    ev = decode_event(raw(d))
    assert type(ev) is (ClickEvent if d["type"] == "click" else PurchaseEvent)
    assert (ev.event_id, ev.user_id, ev.item_id, ev.ts) == (d["event_id"], d["user_id"], d["item_id"], d["ts"])
    assert decode_event(encode(ev)) == ev


def test_recommendation_round_trips():
    rec = Recommendation(user_id="u1", items=[RecommendedItem("i1", 0.9, "covisit"), RecommendedItem("i2", 0.5)],
                         trigger_event_id="e1", event_ts=1, generated_ts=3, model={"scorer": "v1"})
    body = json.loads(encode(rec))
    assert body["items"][1] == {"item_id": "i2", "score": 0.5}  # no reason: left out, not null
    assert decode_recommendation(encode(rec)) == rec


def test_dead_letter_defaults():
    letter = decode_dead_letter(b'{"reason":"r","topic":"t","partition":0,"offset":1,"raw":"x","ts":2}')
    assert letter == DeadLetter(reason="r", topic="t", partition=0, offset=1, raw="x", ts=2)
    assert (letter.code, letter.raw_encoding) == ("invalid", "utf-8")


# --- the JSON Schemas agree with the decoder ----------------------------------------------

SCHEMAS = Path(stream.records.__file__).parent / "schemas"


@functools.cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    """A validator whose `integer` is a JSON integer literal (Python int, not 1.0).

    JSON Schema calls 1.0 an integer; the decoder, like most typed consumers, does not.
    ``json.loads`` keeps the two apart, so the strict checker states the documented rule.
    """
    schema = json.loads((SCHEMAS / name).read_text())
    checker = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=checker)
    jsonschema.Draft202012Validator.check_schema(schema)
    return cls(schema)


EVENT_SCHEMAS = (_validator("click_event.json"), _validator("purchase_event.json"))


def _schema_accepts(value: object) -> bool:
    return any(v.is_valid(value) for v in EVENT_SCHEMAS)


def _decoder_accepts(value: object) -> bool:
    return _accepted(decode_event, value)


@settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])
@given(valid_event_dicts() | mutated_event_dicts() | json_values)
@example({**CLICK, "ts": 2**64})
@example({**PURCHASE, "quantity": None})
@example({**CLICK, "type": "purchase", "quantity": 0})
def test_event_schemas_accept_exactly_what_the_decoder_accepts(value):
    accepted = _decoder_accepts(value)
    event("decoder accepts" if accepted else "decoder rejects")
    assert _schema_accepts(value) == accepted


@pytest.mark.parametrize("name", ["click_event.json", "purchase_event.json", "recommendation.json", "dead_letter.json",
                                  "forget_request.json", "impression_event.json", "search_event.json", "item_event.json"])
def test_schema_examples_are_valid_and_decode(name):
    validator = _validator(name)
    decode = {"recommendation.json": decode_recommendation, "dead_letter.json": decode_dead_letter,
              "forget_request.json": decode_forget, "impression_event.json": decode_impression,
              "search_event.json": decode_search, "item_event.json": decode_item}.get(name, decode_event)
    for example_value in validator.schema["examples"]:
        validator.validate(example_value)
        decode(raw(example_value))


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"user_id": ids, "request_id": ids, "ts": st.integers(-5, 2**64)}) | json_values)
@example({"user_id": "u", "request_id": " ", "ts": 1})
@example({"user_id": "u", "request_id": "r", "ts": 1.0})
def test_the_forget_schema_accepts_exactly_what_the_worker_does(value):
    assert _validator("forget_request.json").is_valid(value) == _accepted(decode_forget, value)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"rec_id": ids, "user_id": ids, "item_ids": st.lists(ids, max_size=4) | json_values,
                              "ts": st.integers(-5, 2**64)}) | json_values)
@example({"rec_id": "r", "user_id": "u", "item_ids": [" "], "ts": 1})
def test_the_impression_schema_accepts_exactly_what_the_worker_does(value):
    assert _validator("impression_event.json").is_valid(value) == _accepted(decode_impression, value)


_queries = st.text(_ID_CHARS, min_size=0, max_size=300) | st.sampled_from(["", " ", "\u3000", "a\x00", "羽绒服", "x" * 256, "x" * 257])
_entries = st.dictionaries(st.sampled_from(["", "brand", "category", "a\x01", "k" * 129]),
                           texts | st.sampled_from(["\x7f", "v" * 257]) | json_values, max_size=3) | json_values


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries(
    {"event_id": ids, "type": st.sampled_from(["search", "click", "Search"]), "user_id": ids, "query": _queries,
     "ts": st.integers(-5, 2**64)},
    optional={"session_id": ids | st.none() | st.sampled_from(["", " "]), "results": st.lists(ids | st.just(" "), max_size=3) | json_values,
              "filters": _entries, "extra": json_values}) | json_values)
@example({"event_id": "e", "type": "search", "user_id": "u", "query": "q", "ts": 1, "results": ["i"] * 201})
@example({"event_id": "e", "type": "search", "user_id": "u", "query": "q", "ts": 1, "filters": {f"k{i}": "v" for i in range(65)}})
@example({"event_id": "e", "user_id": "u", "query": "q", "ts": 1})
@example({"event_id": "e", "type": "search", "user_id": "u", "query": "x" * 256, "ts": 1})
@example({"event_id": "e", "type": "search", "user_id": "u", "query": "x" * 257, "ts": 1})
@example({"event_id": "e", "type": "search", "user_id": "u", "query": "q", "ts": 1, "filters": {"brand": "v" * 256}})
def test_the_search_schema_accepts_exactly_what_the_worker_does(value):
    assert _validator("search_event.json").is_valid(value) == _accepted(decode_search, value)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries(
    {"item_id": ids, "title": _queries, "ts": st.integers(-5, 2**64)},
    optional={"description": texts | st.none() | st.sampled_from(["\x00", "d" * 8193]) | json_values,
              "category_path": st.lists(ids | st.sampled_from(["", " "]), max_size=3) | st.none() | json_values,
              "brand": texts | st.none() | st.just("\x1f"), "price": st.floats(-1, 2e12) | st.none(),
              "attributes": _entries, "available": st.booleans() | json_values}) | json_values)
@example({"item_id": "i", "title": "t", "ts": 1, "category_path": ["c"] * 17})
@example({"item_id": "i", "title": "t" * 512, "ts": 1, "available": None})
@example({"item_id": "i", "title": "t" * 512, "ts": 1, "description": "d" * 8192, "brand": "b" * 256})
@example({"item_id": "i", "title": "t" * 513, "ts": 1})
def test_the_item_schema_accepts_exactly_what_the_worker_does(value):
    assert _validator("item_event.json").is_valid(value) == _accepted(decode_item, value)


def _accepted(decode, value) -> bool:
    """Whether the worker's door ``decode`` lets ``value`` in."""
    try:
        decode(raw(value))
    except InvalidEvent:
        return False
    return True


def _decodes(decode, value) -> bool:
    try:
        decode(raw(value))
    except msgspec.ValidationError:
        return False
    return True


REC = {"user_id": "u1", "items": [{"item_id": "i1", "score": 0.5, "explanation": {"source": "covisit", "because": "i0"}}],
       "trigger_event_id": "e1",
       "event_ts": 1, "generated_ts": 2, "model": {"scorer": "v1"}, "rec_id": "r1", "variant": "A"}
LETTER = {"reason": "r", "topic": "t", "partition": 0, "offset": 3, "raw": "x", "ts": 2,
          "code": "missing_field", "raw_encoding": "utf-8"}


@st.composite
def _mutated(draw, base):
    d = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(0, 2))):
        items = d.get("items")
        nested = isinstance(items, list) and items and isinstance(items[0], dict)
        target = items[0] if nested and draw(st.booleans()) else d
        if target is not d and isinstance(target.get("explanation"), dict) and draw(st.booleans()):
            target = target["explanation"]
        name = draw(st.sampled_from(sorted(target) + ["reason", "explanation", "category", "extra"]))
        if draw(st.booleans()):
            target.pop(name, None)
        else:
            target[name] = draw(json_values | st.sampled_from(["base64", "utf-8"]))
    return d


@settings(max_examples=200)
@given(_mutated(REC))
def test_recommendation_schema_agrees_with_its_decoder(value):
    assert _validator("recommendation.json").is_valid(value) == _decodes(decode_recommendation, value)


@settings(max_examples=200)
@given(_mutated(LETTER))
def test_dead_letter_schema_agrees_with_its_decoder(value):
    assert _validator("dead_letter.json").is_valid(value) == _decodes(decode_dead_letter, value)


# --- the malformed corpus of the integration tests ---------------------------------------

def _malformed_corpus():
    import importlib.util
    import sys
    import time

    path = Path(__file__).resolve().parents[2] / "integration" / "malformed.py"
    spec = importlib.util.spec_from_file_location("malformed_corpus", path)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    now = time.time_ns() // 1_000_000
    return now, module.corpus([f"user{i}" for i in range(15)], now, n_generated=1000, seed=7)


def test_every_value_of_the_malformed_corpus_gets_the_code_it_expects():
    now, values = _malformed_corpus()
    assert len(values) >= 1000
    wrong = []
    for bad in values:
        try:
            decode_event(bad.value, now_ms=now)
            wrong.append((bad.what, "accepted"))
        except InvalidEvent as err:
            if err.code != bad.code:
                wrong.append((bad.what, bad.code, err.code, err.reason))
    assert not wrong
    assert {bad.code for bad in values} == ERROR_CODES  # every rule of the decoder is exercised


@settings(max_examples=400)
@given(st.text(st.characters(max_codepoint=0x3100) | st.sampled_from(list("\x7f\x85\xa0\u2009\u3000\ufeff\x00\n")), max_size=8),
       st.sampled_from(["user_id", "session_id", "source"]))
def test_the_fast_text_check_is_the_schema_pattern(value, field):
    """The decoder checks ids and free text without a regex per field; it must agree with the
    patterns the JSON Schemas state, for any text (as JSON escapes or raw UTF-8)."""
    import re

    pattern = stream.records.TEXT_PATTERN if field == "source" else stream.records.ID_PATTERN
    for ascii_only in (True, False):
        body = json.dumps({**CLICK, field: value}, ensure_ascii=ascii_only).encode()
        try:
            decode_event(body)
            accepted = True
        except InvalidEvent as err:
            accepted = False
            assert err.code in ("bad_id", "bad_text", "invalid_value", "too_long")
        expected = bool(re.search(pattern, value)) and (field != "user_id" or len(value) >= 1)
        assert accepted == expected, (value, field, ascii_only)


@pytest.mark.parametrize("decode", [decode_event, decode_forget, decode_impression, decode_search, decode_item])
def test_a_value_given_as_text_decodes_as_its_utf8_bytes(decode):
    """A caller that read a value as ``str`` got ``TypeError: string argument without an
    encoding`` from every decoder; a text's lone surrogate is the named UTF-8 problem."""
    raw = json.dumps(CLICK, ensure_ascii=False) + " "
    if decode is decode_event:
        assert decode(raw) == decode(raw.encode())
    else:
        assert rejected(raw, decode).code == rejected(raw.encode(), decode).code
    lone = json.dumps({**CLICK, "user_id": "u\udc80"}, ensure_ascii=False)
    err = rejected(lone, decode)
    assert err.code == "not_utf8" and "UTF-8" in err.reason, (err.code, err.reason)
    with pytest.raises(TypeError, match="bytes or str, not dict"):
        decode(dict(CLICK))
