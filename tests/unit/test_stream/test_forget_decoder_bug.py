"""A forget request whose decoding raises anything (a bug, not InvalidEvent) is the owner's to
dead-letter (``processing_error``: stream/handler.py), not a reason for the other workers' peer
reader, or a takeover's replay, to stop: they pass over it, as over such an event, and carry out
the requests around it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from aiokafka import TopicPartition
from replay_reader import reader_holding

from online_models import Recommender
from stream import peers as peers_module
from stream import replay as replay_module
from stream.peers import PeerLearner
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import Bounds, ForgetRequest, encode

FORGET = "s.forget"
NOW = time.time_ns() // 1_000_000
GOOD = encode(ForgetRequest(user_id="u2", request_id="r-good", ts=NOW))
BAD = encode(ForgetRequest(user_id="u1", request_id="r-bug", ts=NOW))


def buggy(real):
    def decode(raw, *args):
        if b"r-bug" in raw:
            raise RecursionError("maximum recursion depth exceeded while deserializing an object")
        return real(raw, *args)
    return decode


async def test_the_peer_reader_passes_over_a_forget_request_whose_decoding_raises(monkeypatch):
    monkeypatch.setattr(peers_module, "decode_forget", buggy(peers_module.decode_forget))
    step = RecommendationStep(Recommender.default())
    topics = ("s.clicks", FORGET)
    peers = PeerLearner(step, {"bootstrap_servers": "unused:9092"}, topics, Bounds(), asyncio.Lock(), Metrics(),
                        committed=dict, forget_topic=FORGET)
    peers.assign({("s.clicks", 0), (FORGET, 0)}, {t: range(2) for t in topics})
    peers.reading = frozenset({("s.clicks", 1), (FORGET, 1)})
    batch = {TopicPartition(FORGET, 1): [SimpleNamespace(offset=0, value=BAD), SimpleNamespace(offset=1, value=GOOD)]}
    await peers._learn(batch, peers._version)
    assert step.recommender.refuses("u2", NOW) and not step.recommender.refuses("u1", NOW)
    assert step.recommender.learned_offsets[f"{FORGET}:1"] == 1


async def test_the_replay_passes_over_a_forget_request_whose_decoding_raises(monkeypatch):
    monkeypatch.setattr(replay_module, "decode_forget", buggy(replay_module.decode_forget))

    reader_holding(monkeypatch, FORGET, [BAD, GOOD])
    step = RecommendationStep(Recommender.default())
    told: list[int] = []
    await replay_module.replay(step, "unused:9092", [replay_module.Gap(FORGET, 0, 0, 2)], Bounds(), forget_topic=FORGET,
                               on_forget=told.append)
    assert told == [1] and step.recommender.refuses("u2", NOW) and not step.recommender.refuses("u1", NOW)
