"""Hostile values on the side topics (searches, impressions, forget, items) through a running
worker, between valid clicks and searches of the same users: every bad value is dead-lettered
with the code it deserves and a reason, every valid event and search is handled, the agent
never restarts and /readyz stays 200."""

from __future__ import annotations

import json
import signal
import time

import redis
from workerkit import applied_counts, produce, read_all, wait_for

from stream.records import decode_dead_letter, decode_recommendation
from stream.topics import ensure_topics

USERS = [f"h{i}" for i in range(4)]


def _search(user: str, eid: str, now: int, **kw) -> bytes:
    return json.dumps({"event_id": eid, "type": "search", "user_id": user, "query": "tv", "ts": now, **kw},
                      ensure_ascii=False).encode()


def test_hostile_values_on_the_side_topics_are_dead_lettered_and_the_rest_handled(worker_env, workers, topic_prefix):
    bootstrap, url = worker_env["STREAMREC_KAFKA_BOOTSTRAP"], worker_env["STREAMREC_REDIS_URL"]
    ensure_topics(bootstrap, [f"{topic_prefix}{t}" for t in ("searches", "impressions", "forget", "items")], 2)
    now = time.time_ns() // 1_000_000
    base = _search("h0", "bad", now)[:-1]
    bad = [  # (topic, key, value, code)
        ("searches", b"h0", base + b', "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "too_deep"),
        ("searches", b"h0", base.replace(str(now).encode(), b"9" * 400) + b"}", "ts_out_of_window"),
        ("searches", b"h0", base.replace(str(now).encode(), b"NaN") + b"}", "not_finite"),
        ("searches", b"h0", base.replace(str(now).encode(), b"1e400") + b"}", "not_finite"),
        ("searches", b"h0", _search("h0", "b5", now, query="caf\u00e9").replace("é".encode(), b"\xe9"), "not_utf8"),
        ("searches", b"h0", b"\xef\xbb\xbf" + _search("h0", "b6", now), "malformed_json"),
        ("searches", b"h0", b"[1, 2]", "not_object"),
        ("searches", b"h0", b"42", "not_object"),
        ("searches", b"h0", None, "malformed_json"),
        ("searches", b"h0", _search("h0", "b9", now, query="x" * 70_000), "oversize"),
        ("searches", b"h0", _search("h0", "b10", now, query=" \u3000\u00a0"), "invalid_value"),
        ("searches", b"h0", _search("h0", "b11", now, query="a\nb"), "bad_text"),
        ("searches", b"h0", _search("h0", "b12", now, results=[1, 2]), "wrong_type"),
        ("searches", b"h0", _search("h0", "b13", now, results=["i"] * 201), "too_long"),
        ("searches", b"h0", _search("h0", "b14", now, type="click"), "unknown_type"),
        ("impressions", b"h1", b'{"rec_id":"r","user_id":"h1","item_ids":[NaN],"ts":1}', "not_finite"),
        ("impressions", b"h1", b'{"rec_id":"r","user_id":"h1","item_ids":[1],"ts":1}', "wrong_type"),
        ("impressions", b"h1", b"[]", "not_object"),
        ("forget", b"h2", b'{"user_id":"h2"}', "missing_field"),
        ("forget", b"h2", b'{"user_id":"h2","request_id":"r","ts":' + b"9" * 400 + b"}", "ts_out_of_window"),
        ("forget", b"h2", b"\xff\xfe", "not_utf8"),
        ("items", b"it1", b"[" * 40 + b"]" * 40, "too_deep"),
        ("items", b"it2", b'{"item_id":"it2","title":"","ts":1}', "invalid_value"),
    ]
    valid = []
    for n, u in enumerate(USERS):
        valid.append(("clicks", u.encode(), json.dumps({"event_id": f"c-{u}", "type": "click", "user_id": u,
                                                          "item_id": f"i{n}", "ts": now}).encode()))
        valid.append(("searches", u.encode(), _search(u, f"s-{u}", now, query="\u200f\U0001f600")))
    valid.append(("impressions", b"h3", b'{"rec_id":"nope","user_id":"h3","item_ids":[],"ts":1}'))
    valid.append(("forget", b"never", b'{"user_id":"never","request_id":"r-never","ts":1}'))
    valid.append(("items", b"ghost", None))  # a tombstone of an item never sent
    order: list[tuple[tuple[str, bytes | None, bytes | None], str | None]] = []  # (record, the code it deserves)
    for n, (topic, key, value, code) in enumerate(bad):  # the valid ones in between
        order.append(((topic, key, value), code))
        if n < len(valid):
            order.append((valid[n], None))
    order += [(record, None) for record in valid[len(bad):]]
    positions = produce(bootstrap, topic_prefix, [record for record, _ in order])
    expected = {pos: code for pos, (_, code) in zip(positions, order, strict=True) if code is not None}

    worker = workers(metrics=True)
    client = redis.Redis.from_url(url)
    try:
        wait_for(lambda: applied_counts(client, topic_prefix, USERS) == {u: 1 for u in USERS}, 240,
                 "every valid click to be applied", worker)
        letters = wait_for(lambda: (found := read_all(bootstrap, f"{topic_prefix}dlq")) and len(found) >= len(expected)
                           and found, 120, f"{len(expected)} dead letters", worker)
        got = {}
        for record in letters:
            letter = decode_dead_letter(record.value)
            got.setdefault((letter.topic, letter.partition, letter.offset), []).append(letter)
        wrong = [(code, [(d.code, d.reason) for d in got.get(pos, [])]) for pos, code in expected.items()
                 if [d.code for d in got.get(pos, [])] != [code]]
        assert not wrong, wrong
        assert set(got) == set(expected) and all(d.reason for v in got.values() for d in v)
        answered = lambda: {r.trigger_event_id for r in (decode_recommendation(x.value) for x in  # noqa: E731
                            read_all(bootstrap, f"{topic_prefix}recommendations") if x.value is not None)}
        wait_for(lambda: {f"s-{u}" for u in USERS} <= answered(), 60, "every valid search answered", worker)
        wait_for(lambda: worker.http("/readyz")[0] == 200, 30, "/readyz to say ready", worker)  # its checks run every 2 s
        assert worker.agent_restarts() == []
    finally:
        client.close()
    assert worker.stop(signal.SIGTERM) == 0, worker.log_tail()
    assert "Traceback" not in worker.log_text(), worker.log_tail(80)
