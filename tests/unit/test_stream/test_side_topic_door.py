"""Details of the door every topic's values pass (stream/decoding.py), seen from the side topics."""

from __future__ import annotations

import pytest

from stream.decoding import (
    decode_event,
    decode_forget,
    decode_impression,
    decode_item,
    decode_search,
)
from stream.errors import InvalidEvent

BOM = b"\xef\xbb\xbf"
VALUES = [
    (decode_search, b'{"event_id":"s1","type":"search","user_id":"u1","query":"tv","ts":1}'),
    (decode_item, b'{"item_id":"i1","title":"Lamp","ts":1}'),
    (decode_forget, b'{"user_id":"u1","request_id":"r1","ts":1}'),
    (decode_impression, b'{"rec_id":"r1","user_id":"u1","item_ids":["i1"],"ts":1}'),
    (decode_event, b'{"event_id":"e1","type":"click","user_id":"u1","item_id":"i9","ts":1}'),
]


@pytest.mark.parametrize(("decode", "value"), VALUES, ids=lambda v: getattr(v, "__name__", ""))
def test_a_value_behind_a_byte_order_mark_is_refused_naming_the_mark(decode, value):
    """A BOM (what some encoders put first: .NET's UTF8Encoding(true), Python's utf-8-sig) is
    invisible in the dead letter's ``raw``, so "invalid character (byte 0)" left a producer
    looking at what reads as a valid value: the reason names the mark."""
    decode(value)
    with pytest.raises(InvalidEvent) as info:
        decode(BOM + value)
    assert info.value.code == "malformed_json" and "byte-order mark" in info.value.reason
