"""An erasure the restored snapshot predates is snapshotted again within a second.

A worker that erased a user and stopped before its next snapshot restarts from a snapshot that
still holds them: the replay applies the forget request to the models again (stream/replay.py),
and the snapshot in the store must then stop holding the user within about a second, as after a
live erasure (docs/operations.md, "When an erasure is complete"), not at the next interval
(``STREAMREC_SNAPSHOT_INTERVAL_S``, 300 s by default)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from aiokafka import TopicPartition
from replay_reader import reader_holding

from online_models import Recommender
from stream import replay as replay_module
from stream import shell as shell_module
from stream.app import create_app
from stream.decoding import decode_event
from stream.pipeline import RecommendationStep
from stream.records import Bounds, ClickEvent, ForgetRequest, encode
from stream.settings import Settings
from stream.state import InMemoryUserStateStore
from stream.step_inputs import source_of

P = "t."
CLICKS, FORGET = P + "clicks", P + "forget"
NOW = time.time_ns() // 1_000_000


def kafka_holding_a_forget_request(monkeypatch) -> None:
    """The replay's reader: partition 0 of the forget topic holds one request for u1, at offset 0."""
    reader_holding(monkeypatch, FORGET, [encode(ForgetRequest(user_id="u1", request_id="forget-1", ts=NOW))])
    monkeypatch.setattr(shell_module, "committed_offsets", lambda *args, **kw: {(FORGET, 0): 1})


async def test_a_forget_request_replayed_at_restart_asks_for_a_snapshot_at_once(monkeypatch):
    kafka_holding_a_forget_request(monkeypatch)
    shell = create_app(Settings.from_env({"STREAMREC_TOPIC_PREFIX": P, "STREAMREC_PARTITIONS": "1"}),
                       load_model=False, store=InMemoryUserStateStore()).streamrec
    # restored from a snapshot taken before the erasure: it holds u1, and never saw the forget topic
    click = decode_event(encode(ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=NOW - 60_000)))
    shell.step.relearn([click], [(source_of(CLICKS, 0), 0)])
    app = SimpleNamespace(consumer=SimpleNamespace(assignment=lambda: {TopicPartition(FORGET, 0)}))
    await shell._replay(app)
    assert shell.step.recommender.refuses("u1", NOW)  # the models forgot u1 again
    assert shell.forgets_pending.is_set()  # and the snapshot in the store follows within a second


async def test_the_replay_says_how_many_forget_requests_it_applied(monkeypatch):
    kafka_holding_a_forget_request(monkeypatch)
    step = RecommendationStep(Recommender.default())
    told: list[int] = []
    gaps = [replay_module.Gap(FORGET, 0, 0, 1)]
    assert await replay_module.replay(step, "unused:9092", gaps, Bounds(), forget_topic=FORGET,
                                      on_forget=told.append) == 0
    assert told == [1] and step.recommender.refuses("u1", NOW)
