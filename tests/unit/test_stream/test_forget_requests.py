"""Forget requests in the worker's shell (stream/handler.py, stream/decoding.py, stream/forget.py):
the owner deletes the user's state, tombstones their recommendations and purges the models; the
user's older events are refused from then on, newer ones start afresh; a bad request is a dead
letter with a reason; a pseudonymous worker erases the pseudonym's state and tombstones the
site's id."""

from __future__ import annotations

import types

import msgspec
import pytest
from aiokafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

from online_models import Recommender
from stream import forget as forget_module
from stream.cli import app as cli_app
from stream.decoding import decode_forget
from stream.errors import InvalidEvent
from stream.experiments import parse_experiment
from stream.forget import forget_requests
from stream.handler import BatchHandler, Claims, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.pseudonyms import Pseudonyms
from stream.records import (
    ClickEvent,
    ForgetRequest,
    ImpressionEvent,
    SearchEvent,
    decode_dead_letter,
    decode_recommendation,
    encode,
)
from stream.retry import Backoff
from stream.search_step import SearchStep
from stream.settings import TopicNames
from stream.state import Fenced, InMemoryUserStateStore, UserState, fingerprint

T0 = 1_700_000_000_000
TOPICS = TopicNames()


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes | None]] = []

    async def __call__(self, records):
        self.records += list(records)
        return []

    def tombstones(self) -> list[bytes]:
        return [k for t, k, v in self.records if t == TOPICS.recommendations and v is None]


def handler(pseudonyms: Pseudonyms | None = None, claims: Claims | None = None):
    metrics = Metrics(CollectorRegistry())
    sink = Sink()
    h = BatchHandler(RecommendationStep(Recommender.default()), InMemoryUserStateStore(), sink, TOPICS, metrics,
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), pseudonyms=pseudonyms, claims=claims)
    return h, sink, metrics


def clicks(user: str, n: int, start: int = 0, ts: int = T0, offset: int = 0) -> list[RawMessage]:
    out = []
    for i in range(n):
        ev = ClickEvent(event_id=f"{user}-{start + i}", user_id=user, item_id=f"i{(start + i) % 7}", ts=ts + i,
                        session_id=f"s-{user}")
        out.append(RawMessage(TOPICS.clicks, 0, offset + i, user.encode(), encode(ev)))
    return out


def forget_msg(user: str, ts: int, offset: int = 0, request_id: str = "r-1") -> RawMessage:
    return RawMessage(TOPICS.forget, 0, offset, user.encode(),
                      encode(ForgetRequest(user_id=user, request_id=request_id, ts=ts)))


def sample(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def test_the_owner_erases_state_lists_and_models_and_refuses_older_events(caplog):
    h, sink, metrics = handler()
    await h.handle_isolated(clicks("victim", 6) + clicks("other", 4, offset=6))
    assert b"victim" in h.step.recommender.snapshot()

    caplog.set_level("INFO", logger="streamrec.worker")
    await h.handle_isolated([forget_msg("victim", ts=T0 + 100, request_id="req-42")])
    states = await h.store.load_many(["victim", "other"])
    assert states["victim"].clicks == 0 and states["other"].clicks == 4  # fresh, and untouched
    assert "victim" not in h.store._docs
    assert sink.tombstones() == [b"victim"]
    snapshot = h.step.recommender.snapshot()
    assert b"victim" not in snapshot and b"s-victim" not in snapshot and b"other" in snapshot
    assert sample(metrics, "streamrec_users_forgotten_total") == 1
    assert "req-42" in caplog.text and "victim" not in caplog.text

    # Kafka delivers the user's older events again (a re-read): refused, nothing saved or published
    published = len(sink.records)
    await h.handle_isolated(clicks("victim", 6, offset=20))
    assert "victim" not in h.store._docs and len(sink.records) == published
    assert sample(metrics, "streamrec_events_refused_forgotten_total") == 6
    assert b"victim" not in h.step.recommender.snapshot()

    # a newer event starts afresh
    await h.handle_isolated(clicks("victim", 1, start=50, ts=T0 + 101, offset=30))
    fresh = (await h.store.load_many(["victim"]))["victim"]
    assert (fresh.clicks, fresh.recent_items) == (1, ["i1"])


async def test_a_forget_and_events_in_one_batch(caplog):
    """The request is carried out first: the user's older events in the batch are refused,
    newer ones start the fresh state, whatever their order in the batch."""
    h, sink, _ = handler()
    await h.handle_isolated(clicks("u", 3))
    batch = clicks("u", 2, start=3, ts=T0 + 3, offset=3) + [forget_msg("u", ts=T0 + 10)] + clicks(
        "u", 2, start=5, ts=T0 + 11, offset=5)
    await h.handle_isolated(batch)
    state = (await h.store.load_many(["u"]))["u"]
    assert state.clicks == 2 and state.seen == fingerprint("u-5") + fingerprint("u-6")
    recs = [k for t, k, v in sink.records if t == TOPICS.recommendations]
    assert recs[-2:] == [b"u", b"u"] and sink.records[-2][2] is None  # the tombstone, then the fresh list


async def test_a_bad_forget_request_is_a_dead_letter_with_a_reason():
    h, sink, metrics = handler()
    bad = RawMessage(TOPICS.forget, 0, 0, b"u", b'{"user_id": "u", "ts": 5}')
    await h.handle_isolated([bad])
    (letter,) = [decode_dead_letter(v) for t, _, v in sink.records if t == TOPICS.dlq]
    assert letter.code == "missing_field" and "request_id" in letter.reason and letter.topic == TOPICS.forget
    assert sample(metrics, "streamrec_users_forgotten_total") == 0
    assert sample(metrics, "streamrec_events_invalid_total", {"reason": "missing_field"}) == 1


async def test_under_pseudonyms_the_pseudonym_is_erased_and_the_site_id_tombstoned():
    p = Pseudonyms("k")
    h, sink, _ = handler(pseudonyms=p)
    await h.handle_isolated(clicks("site-user", 3))
    assert p.of("site-user") in h.store._docs
    await h.handle_isolated([forget_msg("site-user", ts=T0 + 10)])
    assert p.of("site-user") not in h.store._docs
    assert sink.tombstones() == [b"site-user"]
    assert p.of("site-user").encode() not in h.step.recommender.snapshot()


async def test_a_fenced_worker_erases_nothing_in_the_store():
    claims = Claims()
    h, sink, _ = handler(claims=claims)
    claims.hold(await h.store.claim([0]), 0)
    await h.handle_isolated(clicks("u", 2))
    await h.store.claim([0])  # another worker claims the partition since
    with pytest.raises(Fenced):
        await h.handle_isolated([forget_msg("u", ts=T0 + 10)])
    assert "u" in h.store._docs  # the partition's new owner carries the request out


def test_decode_forget_holds_the_door():
    assert decode_forget(encode(ForgetRequest(user_id="u", request_id="r", ts=1))).user_id == "u"
    for raw, code in ((b'{"user_id": " ", "request_id": "r", "ts": 1}', "bad_id"),
                      (b'{"user_id": "u", "request_id": "r", "ts": -1}', "invalid_value"),
                      (b'[' * 40 + b']' * 40, "too_deep"),
                      (b'{"user_id": "u", "request_id": "r", "ts": "now"}', "wrong_type")):
        with pytest.raises(InvalidEvent) as caught:
            decode_forget(raw)
        assert caught.value.code == code, caught.value.reason
    with pytest.raises(InvalidEvent) as caught:
        decode_forget(encode(ForgetRequest(user_id="u", request_id="r", ts=T0 + 10 ** 9)), now_ms=T0)
    assert caught.value.code == "ts_out_of_window"


class BrokerGoneAfter:
    """A producer whose broker confirms ``n`` records, then stops answering."""

    def __init__(self, n: int) -> None:
        self.left = n

    async def send_and_wait(self, topic, value, key):
        if not self.left:
            raise KafkaTimeoutError()
        self.left -= 1
        return types.SimpleNamespace(partition=0)

    async def stop(self) -> None:
        pass


def test_forget_that_kafka_failed_lists_the_confirmed_requests_and_says_whom_to_send_again(monkeypatch):
    """The broker gone midway: forget printed nothing but the error, not even the requests
    Kafka had confirmed, and the operator could not tell which users were erased."""
    async def started_producer(kafka, **options):
        return BrokerGoneAfter(2)

    monkeypatch.setattr(forget_module, "started_producer", started_producer)
    monkeypatch.setattr(forget_module, "require_topic", lambda settings, topic: 4)
    monkeypatch.setattr(forget_module, "check_copartitioned", lambda kafka, topics: None)
    result = CliRunner().invoke(cli_app, ["forget", "--bootstrap", "127.0.0.1:9", "--topic-prefix", "t.",
                                          "u1", "u2", "u 3", "u4"])
    sent = [line.split("  ", 1)[1] for line in result.output.splitlines()]
    assert sent == ["sent for user u1 (t.forget[0])", "sent for user u2 (t.forget[0])"], result.output
    assert str(result.exception).endswith(
        "Kafka confirmed the requests for the first 2 of the 4 users (above); for the other 2, run forget again "
        "with the same options for: 'u 3' u4")


def test_forget_requests_refuse_an_id_the_worker_would():
    (req,) = forget_requests(["u1"], now_ms=7)
    assert (req.user_id, req.ts) == ("u1", 7) and req.request_id.startswith("forget-")
    with pytest.raises(InvalidEvent):
        forget_requests(["bad\u0001id"])
    with pytest.raises(InvalidEvent, match="not UTF-8"):  # `streamrec forget $'\xff'`: argv's bytes as a surrogate
        forget_requests([b"\xff".decode("utf-8", "surrogateescape")])


async def test_a_learner_whose_purge_raises_leaves_no_half_erasure_behind(caplog):
    """A bug in one learner's forget_user: the user's state and lists go all the same, the
    other learners forget, the user's older events are refused, the failure is counted and
    logged without the id, and the request is not a dead letter."""
    h, sink, metrics = handler()
    await h.handle_isolated(clicks("victim", 5))

    def broken(user_id, sessions=()):
        raise KeyError(user_id)

    h.step.recommender.learners["reminder"].forget_user = broken
    caplog.set_level("INFO")
    await h.handle_isolated([forget_msg("victim", ts=T0 + 100)])
    assert "victim" not in h.store._docs and sink.tombstones() == [b"victim"]
    assert not [t for t, _, _ in sink.records if t == TOPICS.dlq]
    assert sample(metrics, "streamrec_forget_failures_total") == 1
    assert b"victim" not in h.step.recommender.learners["covisit"].snapshot()
    assert h.step.recommender.refuses("victim", T0 + 100)
    assert "reminder" in caplog.text and "KeyError" in caplog.text and "victim" not in caplog.text


async def test_an_impression_counts_once_and_only_for_a_list_the_user_was_sent():
    h, sink, metrics = handler()
    await h.handle_isolated(clicks("u", 2))
    (rec,) = [decode_recommendation(v) for t, _, v in sink.records if t == TOPICS.recommendations][-1:]

    def impression(rec_id: str, offset: int) -> RawMessage:
        return RawMessage(TOPICS.impressions, 0, offset, b"u", encode(ImpressionEvent(
            rec_id=rec_id, user_id="u", item_ids=[it.item_id for it in rec.items[:3]], ts=T0 + 5)))

    await h.handle_isolated([impression(rec.rec_id, 0), impression(rec.rec_id, 1), impression("made-up", 2)])
    await h.handle_isolated([impression(rec.rec_id, 0)])  # Kafka delivers it again
    assert sample(metrics, "streamrec_experiment_impressions_total", {"variant": "default"}) == 1
    assert sample(metrics, "streamrec_experiment_impressions_unmatched_total") == 3


async def test_an_impression_counts_under_the_arm_that_served_the_list_after_the_experiment_changed():
    """Impressions were counted under the user's arm when they came: after the experiment file
    changed (the worker restarted), one of a list arm a served counted for arm b."""
    ab = parse_experiment({"experiment": "ab", "arms": [{"name": "a", "share": 0.5}, {"name": "b", "share": 0.5}]})
    ba = parse_experiment({"experiment": "ab", "arms": [{"name": "b", "share": 0.5}, {"name": "a", "share": 0.5}]})
    user = next(u for u in (f"m{i}" for i in range(1000)) if ab.arm_of(u).name == "a" and ba.arm_of(u).name == "b")
    h, sink, metrics = handler()
    h.step.experiment = ab
    await h.handle_isolated(clicks(user, 2))
    (rec,) = [decode_recommendation(v) for t, _, v in sink.records if t == TOPICS.recommendations][-1:]
    assert rec.variant == "a"
    h.step.experiment = ba  # restarted on the new file
    await h.handle_isolated([RawMessage(TOPICS.impressions, 0, 0, user.encode(), encode(ImpressionEvent(
        rec_id=rec.rec_id, user_id=user, item_ids=[it.item_id for it in rec.items[:3]], ts=T0 + 5)))])
    assert sample(metrics, "streamrec_experiment_impressions_total", {"variant": "a"}) == 1
    assert sample(metrics, "streamrec_experiment_impressions_total", {"variant": "b"}) == 0


def search_msg(user: str, ts: int, offset: int, query: str = "private query") -> RawMessage:
    ev = SearchEvent(event_id=f"q-{offset}", type="search", user_id=user, query=query, ts=ts, results=["i1", "i2"])
    return RawMessage(TOPICS.searches, 0, offset, user.encode(), encode(ev))


def test_the_search_step_refuses_a_forgotten_users_older_search():
    step = RecommendationStep(Recommender.default())
    step.forget([ForgetRequest(user_id="u", request_id="r", ts=T0 + 100)], None, T0 + 200)
    result = SearchStep(step)([SearchEvent(event_id="q", type="search", user_id="u", query="q", ts=T0, results=["a"]),
                               SearchEvent(event_id="q2", type="search", user_id="u", query="q2", ts=T0 + 101,
                                           results=["a"])], {}, lambda: T0 + 300)
    assert result.refused == 1 and len(result.recommendations) == 1  # the newer search starts afresh
    assert msgspec.json.decode(result.docs["u"], type=UserState).recent_queries == ["q2"]


async def test_a_search_older_than_the_forget_is_neither_answered_nor_remembered():
    """A search the user made before their erasure, in the erasure's batch or delivered again
    after it (a restart before the commit): no list after the tombstone, no query in Redis."""
    h, sink, metrics = handler()
    await h.handle_isolated(clicks("victim", 2) + [search_msg("victim", T0 + 5, offset=2)])
    await h.handle_isolated([search_msg("victim", T0 + 6, offset=3), forget_msg("victim", ts=T0 + 100)])
    assert "victim" not in h.store._docs
    recs = [v for t, k, v in sink.records if t == TOPICS.recommendations and k == b"victim"]
    assert recs[-1] is None  # the tombstone is the user's last word
    await h.handle_isolated([search_msg("victim", T0 + 5, offset=2)])  # redelivered after the erasure
    assert "victim" not in h.store._docs and [v for t, k, v in sink.records if k == b"victim"][-1] is None
    assert sample(metrics, "streamrec_events_refused_forgotten_total") == 2


async def test_the_owners_bound_covers_a_search_dated_after_the_request():
    """The site's clock ahead of the requester's: the state's newest search bounds the
    refusal, as its newest event does."""
    h, sink, _ = handler()
    await h.handle_isolated([search_msg("victim", T0 + 500, offset=0)])
    await h.handle_isolated([forget_msg("victim", ts=T0 + 100)])
    await h.handle_isolated([search_msg("victim", T0 + 500, offset=0)])  # redelivered
    assert "victim" not in h.store._docs


@pytest.mark.parametrize("user_id", ["", "u1\x00", " "])
def test_forget_cli_names_its_argument_as_its_usage_line_does(user_id):
    """A bad id was said as 'Invalid value for USER_IDS', an argument the usage line calls USER_ID."""
    result = CliRunner().invoke(cli_app, ["forget", user_id], env={"COLUMNS": "500"})
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and "Invalid value for USER_ID: a user id" in text, text
    assert "USER_IDS" not in text and "Traceback" not in text
