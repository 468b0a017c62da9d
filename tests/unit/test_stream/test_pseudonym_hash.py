"""Pseudonymous user ids: the state, the models and their snapshot hold only the keyed hash;
the recommendation still goes out keyed by, and naming, the id the site sent."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import PREFIX, Pseudonyms, pseudonyms_of
from stream.records import ClickEvent, decode_recommendation, encode
from stream.settings import Settings, TopicNames
from stream.state import InMemoryUserStateStore
from stream.step_inputs import StepConfig

RAW_ID = "alice@example.com"


class Published:
    def __init__(self):
        self.records = []

    async def __call__(self, records):
        self.records.extend(records)
        return []


def messages(n, user=RAW_ID, start=0):
    out = []
    for i in range(start, start + n):
        ev = ClickEvent(event_id=f"e{i}", user_id=user if i % 2 == 0 else f"bob{i % 3}", item_id=f"i{i % 7}",
                        ts=1_700_000_000_000 + i)
        out.append(RawMessage("streamrec.clicks", 0, i, ev.user_id.encode(), encode(ev), None))
    return out


def test_the_same_id_and_key_give_the_same_pseudonym_and_nothing_else_does():
    p = Pseudonyms("k1")
    assert p.of(RAW_ID) == p.of(RAW_ID)
    assert p.of(RAW_ID) != p.of(RAW_ID + " ") != Pseudonyms("k2").of(RAW_ID)
    assert p.of(RAW_ID).startswith(PREFIX) and RAW_ID not in p.of(RAW_ID)
    assert "k1" not in repr(p)
    assert pseudonyms_of("") is None and isinstance(pseudonyms_of("k"), Pseudonyms)


def test_the_setting_is_a_secret():
    s = Settings.from_env({"STREAMREC_PSEUDONYM_KEY": "sentinel-pseudonym-key"})
    assert s.pseudonym_key == "sentinel-pseudonym-key"
    assert "sentinel-pseudonym-key" not in repr(s.describe())


async def test_state_and_models_hold_pseudonyms_and_lists_go_out_under_the_sites_id():
    store, sent = InMemoryUserStateStore(), Published()
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=5)), None, StepConfig())
    handler = BatchHandler(step, store, sent, TopicNames(), Metrics(CollectorRegistry()), pseudonyms=Pseudonyms("k"))
    await handler.handle(messages(20))
    await handler.handle(messages(10, start=20))
    pseudonym = Pseudonyms("k").of(RAW_ID)

    # the site's id in the output: as the record key and in the recommendation itself
    recs = [(key, decode_recommendation(value)) for topic, key, value in sent.records if topic.endswith("recommendations")]
    alice = [rec for key, rec in recs if key == RAW_ID.encode()]
    assert alice and all(rec.user_id == RAW_ID for rec in alice)
    assert all(rec.user_id == key.decode() for key, rec in recs)
    assert all(pseudonym not in encode(rec).decode() for _, rec in recs)

    # nothing the worker keeps holds the raw id: the documents and their keys, the models' snapshot
    assert all(RAW_ID.encode() not in doc and not uid.startswith("alice") for uid, doc in store._docs.items())
    assert (await store.load_many([pseudonym]))[pseudonym].clicks == 15  # one state across both batches
    assert RAW_ID.encode() not in step.recommender.snapshot()
    assert pseudonym.encode() in step.recommender.snapshot()
