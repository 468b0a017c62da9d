"""A corpus of malformed input values, each with the dead-letter code the worker must give it.

Hand-written values (among them the three that crashed round 1's agent: arrays nested 30,000
deep, a 400-digit ``ts``, a 400-digit ``quantity``) and generated ones: a valid event of a given
user with exactly one thing wrong, so that the expected code is unambiguous. Deterministic for
a seed. Used by tests/integration/test_malformed_corpus.py (through a running worker) and
tests/unit/test_stream/test_records.py (through the decoder alone).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

MAX_TS_MS = 253_402_300_799_999
HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Bad:
    topic: str  # "clicks" or "purchases"
    key: bytes
    value: bytes | None
    code: str
    what: str


def _event(kind: str, user: str, n: int, now_ms: int) -> dict:
    d = {"event_id": f"bad-{user}-{n}", "type": kind, "user_id": user, "item_id": f"it{n % 97}", "ts": now_ms - 1000}
    if kind == "purchase":
        d.update(quantity=2, price=9.5, order_id=f"o{n}")
    else:
        d.update(session_id=f"{user}-s", category_id="c1", source="home")
    return d


def _dump(d: object) -> bytes:
    return json.dumps(d, ensure_ascii=False).encode()


def _nested(depth: int, opener: str) -> str:
    closer = "]" if opener == "[" else "}"
    if opener == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * (depth - 1) + "{}" + closer * (depth - 1)


def hand_written(user: str, now_ms: int) -> list[Bad]:
    """The values a person would try first, and the three of the round-1 report."""
    click = _event("click", user, 0, now_ms)
    buy = _event("purchase", user, 1, now_ms)
    k = user.encode()
    base = json.dumps(click)[:-1]
    out = [
        # the three that crashed the agent
        Bad("clicks", k, (base + ', "extra": ' + "[" * 30_000 + "]" * 30_000 + "}").encode(), "too_deep", "30,000 nested arrays"),
        Bad("clicks", k, (base.replace(f'"ts": {click["ts"]}', '"ts": ' + "9" * 400) + "}").encode(), "ts_out_of_window", "400-digit ts"),
        Bad("purchases", k, _dump({**buy, "quantity": int("9" * 400)}), "number_too_large", "400-digit quantity"),
        # one of each rule
        Bad("clicks", k, b'{"event_id": "x", "type": "click",', "malformed_json", "cut short"),
        Bad("clicks", k, None, "malformed_json", "null message"),
        Bad("clicks", k, b"", "malformed_json", "empty value"),
        Bad("clicks", k, b"   \n\t", "malformed_json", "whitespace only"),
        Bad("clicks", k, b"\xff\xfe\x00{}", "not_utf8", "UTF-16 bytes"),
        Bad("clicks", k, _dump(click).replace(b'"home"', b'"h\xe9me"'), "not_utf8", "Latin-1 in source"),
        Bad("clicks", k, b"[1, 2, 3]", "not_object", "an array"),
        Bad("clicks", k, b'"click"', "not_object", "a string"),
        Bad("clicks", k, b"null", "not_object", "JSON null"),
        Bad("clicks", k, b"42", "not_object", "a number"),
        Bad("clicks", k, _dump({k2: v for k2, v in click.items() if k2 != "type"}), "missing_field", "no type"),
        Bad("clicks", k, _dump({k2: v for k2, v in click.items() if k2 != "user_id"}), "missing_field", "no user_id"),
        Bad("clicks", k, _dump({**click, "type": "wishlist"}), "unknown_type", "type wishlist"),
        Bad("clicks", k, _dump({**click, "type": 7}), "unknown_type", "type 7"),
        Bad("clicks", k, _dump({**click, "user_id": 1042}), "wrong_type", "numeric user_id"),
        Bad("clicks", k, _dump({**click, "ts": "yesterday"}), "wrong_type", "ts as text"),
        Bad("clicks", k, _dump({**click, "ts": 1.7e12}), "wrong_type", "ts as float"),
        Bad("clicks", k, _dump({**click, "price": "9.50"}), "wrong_type", "price as text"),
        Bad("clicks", k, _dump({**click, "item_id": ""}), "invalid_value", "empty item_id"),
        Bad("clicks", k, _dump({**click, "ts": -5}), "invalid_value", "negative ts"),
        Bad("purchases", k, _dump({**buy, "quantity": 0}), "invalid_value", "quantity 0"),
        Bad("purchases", k, _dump({**buy, "price": -1}), "invalid_value", "negative price"),
        Bad("clicks", k, _dump({**click, "user_id": "u" * 129}), "too_long", "129-char user_id"),
        Bad("clicks", k, _dump({**click, "source": "s" * 257}), "too_long", "257-char source"),
        Bad("purchases", k, _dump({**buy, "order_id": "o" * 500}), "too_long", "500-char order_id"),
        Bad("clicks", k, _dump({**click, "user_id": "   "}), "bad_id", "blank user_id"),
        Bad("clicks", k, _dump({**click, "item_id": "i\n1"}), "bad_id", "newline in item_id"),
        Bad("clicks", k, _dump({**click, "session_id": ""}), "bad_id", "empty session_id"),
        Bad("clicks", k, _dump({**click, "source": "home\x00"}), "bad_text", "NUL in source"),
        Bad("clicks", k, _dump({**click, "ts": now_ms + 30 * 24 * HOUR_MS}), "ts_out_of_window", "a month ahead"),
        Bad("clicks", k, _dump({**click, "ts": MAX_TS_MS + 1}), "ts_out_of_window", "after the year 9999"),
        Bad("purchases", k, _dump({**buy, "quantity": 10_001}), "number_too_large", "quantity 10001"),
        Bad("purchases", k, _dump({**buy, "price": 1e13}), "number_too_large", "price 1e13"),
        Bad("clicks", k, _dump({**click, "price": 1.5}).replace(b"1.5", b"NaN"), "not_finite", "NaN price"),
        Bad("clicks", k, _dump({**click, "price": 1.5}).replace(b"1.5", b"-Infinity"), "not_finite", "-Infinity price"),
        Bad("clicks", k, _dump({**click, "price": 1.5}).replace(b"1.5", b"1e400"), "not_finite", "1e400 price"),
        Bad("clicks", k, _dump({**click, "pad": "x" * 70_000}), "oversize", "70 KB"),
    ]
    return out


def generated(users: list[str], n: int, now_ms: int, seed: int = 0) -> list[Bad]:
    """``n`` values: a valid event of a random user, with one random thing wrong."""
    rng = random.Random(seed)
    out: list[Bad] = []
    ws = [" ", "\u3000", "\u00a0", "\u2009", "\ufeff"]
    controls = [chr(c) for c in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]]
    for i in range(n):
        user = rng.choice(users)
        kind = rng.choice(["click", "purchase"])
        topic = "clicks" if kind == "click" else "purchases"
        d = _event(kind, user, 1000 + i, now_ms)
        id_fields = ["event_id", "user_id", "item_id", "category_id" if kind == "click" else "order_id"]
        how = rng.randrange(14)
        if how == 0:
            depth = rng.choice([33, 40, 100, 1000, rng.randrange(33, 30_000)])
            d["extra"] = "@@NEST@@"
            value = _dump(d).replace(b'"@@NEST@@"', _nested(depth - 1, rng.choice("[{")).encode())
            code, what = ("oversize" if len(value) > 65_536 else "too_deep"), f"nested {depth}"
        elif how == 1:
            digits = rng.randrange(16, 401)
            value, code, what = _dump(d).replace(f'"ts": {d["ts"]}'.encode(), b'"ts": ' + str(rng.randrange(1, 10)).encode() + b"0" * digits), "ts_out_of_window", f"{digits}-digit ts"
        elif how == 2:
            d["ts"] = now_ms + rng.randrange(2 * HOUR_MS, 1000 * 24 * HOUR_MS)
            value, code, what = _dump(d), "ts_out_of_window", "ts in the future"
        elif how == 3 and kind == "purchase":
            d["quantity"] = rng.choice([10_001, 10**6, 10 ** rng.randrange(5, 401)])
            value, code, what = _dump(d), "number_too_large", "quantity too large"
        elif how == 3:
            d["price"] = rng.choice([1.5e12, 1e15, 1e300])
            value, code, what = _dump(d), "number_too_large", "price too large"
        elif how == 4:
            d["price"] = 1.5
            literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-2e400", b"1" + b"0" * rng.randrange(310, 400)])
            value, code, what = _dump(d).replace(b'"price": 1.5', b'"price": ' + literal), "not_finite", f"price {literal[:12]!r}"
        elif how == 5:
            field = rng.choice(id_fields)
            d[field] = "".join(rng.choice(ws) for _ in range(rng.randrange(1, 6)))
            value, code, what = _dump(d), "bad_id", f"blank {field}"
        elif how == 6:
            field = rng.choice(id_fields)
            s = f"v{rng.randrange(1000)}"
            at = rng.randrange(len(s) + 1)
            d[field] = s[:at] + rng.choice(controls) + s[at:]
            value, code, what = _dump(d), "bad_id", f"control character in {field}"
        elif how == 7:
            field = rng.choice([*id_fields, "source"] if kind == "click" else id_fields)
            limit = 256 if field == "source" else 128
            d[field] = "z" * rng.randrange(limit + 1, 3 * limit)
            value, code, what = _dump(d), "too_long", f"long {field}"
        elif how == 8:
            raw = _dump(d)
            value, code, what = raw[: rng.randrange(1, len(raw) - 1)], "malformed_json", "cut short"
        elif how == 9:
            raw = _dump(d)
            at = rng.randrange(len(raw))
            value, code, what = raw[:at] + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"]) + raw[at:], "not_utf8", "a bad byte"
        elif how == 10:
            field = rng.choice(["event_id", "user_id", "item_id", "ts", "type"])
            del d[field]
            value, code, what = _dump(d), "missing_field", f"no {field}"
        elif how == 11:
            field = rng.choice(["event_id", "user_id", "item_id", "ts"])
            d[field] = rng.choice([[1], {"a": 1}, True] + ([3] if field != "ts" else ["3"]))
            value, code, what = _dump(d), "wrong_type", f"{field} retyped"
        elif how == 12:
            d["type"] = rng.choice(["view", "Click", "PURCHASE", "cart", ""])
            value, code, what = _dump(d), "unknown_type", "unknown type"
        else:
            value = rng.choice([b"[]", b"true", b"3.14", b'"a string"', b"[{}]"])
            code, what = "not_object", "not an object"
        out.append(Bad(topic, user.encode(), value, code, what))
    return out


def corpus(users: list[str], now_ms: int, n_generated: int = 1000, seed: int = 0) -> list[Bad]:
    hand = [b for u in users[:2] for b in hand_written(u, now_ms)]
    return hand + generated(users, n_generated, now_ms, seed)
