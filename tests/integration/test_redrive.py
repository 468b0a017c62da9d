"""`streamrec redrive` on a real broker: the chosen dead letters' original values go back to
their topics, keyed as they were, once each; what must not go back stays; and a worker applies
what came back exactly once, however often it is redriven."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from workerkit import all_committed, applied_counts, produce, read_all, wait_for

from stream.records import ClickEvent, DeadLetter, PurchaseEvent, encode
from stream.redrive import REDRIVEN_HEADER

ROOT = Path(__file__).resolve().parents[2]
TS = 1_700_000_000_000


def streamrec(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def letter(prefix: str, topic: str, offset: int, raw: str, code: str = "processing_error", **extra) -> bytes:
    return encode(DeadLetter(reason=f"handling it raised KeyError ({code})", topic=f"{prefix}{topic}", partition=0,
                             offset=offset, raw=raw, ts=TS + offset, code=code, raw_bytes=len(raw.encode()), **extra))


def click(user: str, event_id: str, item: str = "i1") -> str:
    return encode(ClickEvent(event_id=event_id, user_id=user, item_id=item, ts=TS)).decode()


def test_redrive_sends_back_the_chosen_letters_once_and_leaves_the_rest(worker_env, topic_prefix):
    env, bootstrap = worker_env, worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    purchase = encode(PurchaseEvent(event_id="p1", user_id="u2", item_id="i7", ts=TS)).decode()
    redrivable = click("u1", "e1")
    produce(bootstrap, topic_prefix, [
        ("dlq", b"u1", letter(topic_prefix, "clicks", 10, redrivable)),
        ("dlq", b"u1", letter(topic_prefix, "clicks", 10, redrivable)),  # the same message dead-lettered twice
        ("dlq", b"u3", letter(topic_prefix, "clicks", 11, "{not json", code="malformed_json")),
        ("dlq", b"i5", letter(topic_prefix, "items", 12, '{"item_id":"i5"}')),
        ("dlq", b"u4", letter(topic_prefix, "clicks", 13, click("u4", "e4")[:20], raw_truncated=True)),
        ("dlq", b"u5", letter("other.", "clicks", 14, click("u5", "e5"))),
        ("dlq", b"u6", b"not a dead letter"),
        ("dlq", b"u2", letter(topic_prefix, "purchases", 15, purchase)),
    ])

    dry = streamrec(env, "redrive", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert sum(line.startswith("would send ") for line in dry.stdout.splitlines()) == 2, dry.stdout
    assert read_all(bootstrap, f"{topic_prefix}clicks") == [] and read_all(bootstrap, f"{topic_prefix}purchases") == []

    done = streamrec(env, "redrive")
    assert done.returncode == 0, done.stderr
    summary = done.stdout
    assert "read 8 messages" in summary and "sent back 2" in summary, summary
    for said in ("left 1 of other codes (--code chooses: malformed_json 1)", "left 1 dead-lettered again",
                 "left 1 cut at 64 KiB", "left 1 of the items topic", "left 1 not dead letters",
                 "left 1 from topics this deployment's workers do not read: other.clicks 1"):
        assert said in summary, summary
    clicks, purchases = read_all(bootstrap, f"{topic_prefix}clicks"), read_all(bootstrap, f"{topic_prefix}purchases")
    assert [(r.key, r.value.decode()) for r in clicks] == [(b"u1", redrivable)]
    assert [(r.key, r.value.decode()) for r in purchases] == [(b"u2", purchase)]
    assert dict(clicks[0].headers)[REDRIVEN_HEADER].startswith(f"{topic_prefix}dlq[".encode())
    # keyed as a site sends it: the partition a site's own send of that key reaches
    (_, site_partition, _), = produce(bootstrap, topic_prefix, [("clicks", b"u1", redrivable.encode())])
    assert clicks[0].partition == site_partition

    malformed = streamrec(env, "redrive", "--code", "malformed_json", "--since", str(TS + 11), "--until", str(TS + 11))
    assert malformed.returncode == 0, malformed.stderr
    assert "sent back 1 (" in malformed.stdout and "left 6 dead-lettered outside --since/--until" in malformed.stdout, malformed.stdout


def test_a_worker_applies_a_redriven_event_once_however_often_it_comes_back(worker_env, workers, topic_prefix, redis_client):
    env, bootstrap = worker_env, worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    worker = workers()
    produce(bootstrap, topic_prefix, [("clicks", b"u1", click("u1", "e1").encode())])
    wait_for(lambda: applied_counts(redis_client, topic_prefix, ["u1"])["u1"] == 1, 90, "the first click applied", worker)
    # the worker dead-lettered e2 (a bug, since fixed): it owes u1 that click
    produce(bootstrap, topic_prefix, [("dlq", b"u1", letter(topic_prefix, "clicks", 1, click("u1", "e2", "i2")))])
    for _ in range(2):  # an operator who runs it twice
        done = streamrec(env, "redrive")
        assert done.returncode == 0 and "sent back 1" in done.stdout, done.stdout + done.stderr
    wait_for(lambda: len(read_all(bootstrap, f"{topic_prefix}clicks")) == 3, 30, "both redriven clicks on the topic")
    # the worker has read both copies once its committed offsets reach the end of clicks
    wait_for(lambda: _applied_and_read(redis_client, topic_prefix, bootstrap, env["STREAMREC_APP_ID"]), 90,
             "u1's two clicks applied, and every click read", worker)
    assert applied_counts(redis_client, topic_prefix, ["u1"])["u1"] == 2
    worker.assert_alive()


def _applied_and_read(client, prefix: str, bootstrap: str, group: str) -> bool:
    return applied_counts(client, prefix, ["u1"])["u1"] == 2 and all_committed(bootstrap, group, [f"{prefix}clicks"])


def test_a_letter_whose_topic_is_gone_is_left_not_sent_to_a_topic_the_broker_would_create(worker_env, topic_prefix,
                                                                                           kafka_admin):
    env, bootstrap = worker_env, worker_env["STREAMREC_KAFKA_BOOTSTRAP"]
    # the impressions topic does not exist (deleted since; worker_env creates clicks, purchases and the dlq alone)
    produce(bootstrap, topic_prefix, [
        ("dlq", b"u7", letter(topic_prefix, "impressions", 20, click("u7", "e7"))),
        ("dlq", b"u1", letter(topic_prefix, "clicks", 21, click("u1", "e1"))),
    ])

    for args in (["--dry-run"], []):
        done = streamrec(env, "redrive", *args)
        assert done.returncode == 0, done.stderr
        assert "back 1 (" in done.stdout, done.stdout
        assert f"left 1 of topics that no longer exist: {topic_prefix}impressions 1" in done.stdout, done.stdout
    assert f"{topic_prefix}impressions" not in kafka_admin.list_topics()  # a broker that creates topics on use did not
    assert [r.key for r in read_all(bootstrap, f"{topic_prefix}clicks")] == [b"u1"]
