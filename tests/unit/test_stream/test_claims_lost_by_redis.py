"""Claims that Redis lost (a restart that lost its last writes, a failover to a replica that
had not yet received them, a restored dump, a FLUSHALL): the stored claim of a partition is
missing, or older than the one its owner holds. No newer owner can have claimed it since (a
claim only ever counts up from the stored one), so the owner's save goes on and puts its claim
back; a claim taken after that still fences the owner out (stream/state.py)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, Claims, RawMessage
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import Fenced, InMemoryUserStateStore, UserState, encode_state
from stream.step_inputs import StepConfig


def lose(store: InMemoryUserStateStore, partition: int, how: str) -> None:
    """What Redis holds of the partition's claim after it lost writes."""
    if how == "missing":
        del store._claims[partition]
    else:
        store._claims[partition] -= 1


@pytest.mark.parametrize("how", ["missing", "older"])
async def test_a_save_under_a_claim_the_store_lost_goes_on_and_puts_the_claim_back(how):
    store = InMemoryUserStateStore()
    await store.claim([0, 1])
    await store.claim([0, 1])
    fence = await store.claim([0, 1])  # {0: 3, 1: 3}
    lose(store, 0, how)
    await store.save_docs({"u1": encode_state(UserState("u1", clicks=1))}, fence)
    assert (await store.load_many(["u1"]))["u1"].clicks == 1
    assert store._claims == {0: 3, 1: 3}
    newer = await store.claim([0])  # the next owner: its claim outnumbers the restored one
    assert newer == {0: 4}
    with pytest.raises(Fenced):
        await store.save_docs({"u1": encode_state(UserState("u1", clicks=2))}, fence)
    assert (await store.load_many(["u1"]))["u1"].clicks == 1


class Sink:
    async def __call__(self, records):
        return []


def click(eid: str, offset: int) -> RawMessage:
    ev = ClickEvent(event_id=eid, user_id="a", item_id=f"i{offset}", ts=1_700_000_000_000 + offset)
    return RawMessage("streamrec.clicks", 0, offset, b"a", encode(ev), None, 1)


@pytest.mark.parametrize("how", ["missing", "older"])
async def test_the_owner_of_a_partition_goes_on_after_redis_lost_its_claim(how):
    """Before, every batch of the partition was refused as fenced ("claimed by a newer owner",
    when none was), left unacknowledged and the partition held until a rebalance that nothing
    asked for: the partition stopped for good while the worker said it was ready."""
    store = InMemoryUserStateStore()
    await store.claim([0])  # an owner before this one
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=5, n_candidates=20)), None, StepConfig())
    h = BatchHandler(step, store, Sink(), TopicNames(), Metrics(CollectorRegistry()),
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), claims=Claims(lambda: 1))
    h.claims.hold(await store.claim([0]), 1)
    await h.handle_isolated([click("a1", 0)])
    lose(store, 0, how)
    await h.handle_isolated([click("a2", 1)])
    assert (await store.load_many(["a"]))["a"].clicks == 2
