"""A failover that makes the primary a replica while the worker is connected to it: Redis
answers each write with READONLY, and redis-py keeps the connection (it drops one only on a
connection error). The worker must drop it, so that a retry connects afresh to the address in
STREAMREC_REDIS_URL (a managed service's endpoint, or DNS, that the failover moved to the new
primary), rather than being refused by the old primary for as long as it runs."""

from __future__ import annotations

import asyncio

import redis
from prometheus_client import CollectorRegistry

from online_models import Recommender, RecommenderConfig
from stream.handler import BatchHandler, Claims, RawMessage
from stream.health import Health
from stream.pipeline import RecommendationStep
from stream.prometheus import Metrics
from stream.records import ClickEvent, encode
from stream.retry import Backoff
from stream.settings import TopicNames
from stream.state import _SAVE_LUA, RedisUserStateStore
from stream.step_inputs import StepConfig


class DemotedPrimary:
    """A ``redis.asyncio.Redis`` whose pooled connections reach the old primary, a replica now,
    until the pool drops them; a new connection reaches the new primary."""

    def __init__(self) -> None:
        self.connection_pool = self
        self.on_replica = True
        self.docs: dict[str, bytes] = {}
        self.claims = 0

    async def disconnect(self, inuse_connections: bool = True) -> None:
        self.on_replica = False

    async def mget(self, keys):
        return [self.docs.get(k) for k in keys]

    def register_script(self, script: str):
        async def run(keys, args):
            if self.on_replica:
                raise redis.ReadOnlyError("You can't write against a read only replica. script: 5145377d, on @user_script:12.")
            if script == _SAVE_LUA:
                n, d = args[1], args[2]
                self.docs.update(zip(keys[n + d:], args[5 + n:], strict=True))
                return [len(keys) - n - d, [], [], []]
            self.claims += 1
            return [self.claims] * len(keys)

        return run


class Sink:
    async def __call__(self, records):
        return []


async def test_a_worker_connected_to_a_primary_a_failover_demoted_saves_on_the_new_one():
    client = DemotedPrimary()
    health = Health()
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=5, n_candidates=20)), None, StepConfig())
    h = BatchHandler(step, RedisUserStateStore(client), Sink(), TopicNames(), Metrics(CollectorRegistry()),
                     backoff=Backoff(base_s=0.001, cap_s=0.01, jitter=0), health=health, claims=Claims(lambda: 1))
    ev = ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=1_700_000_000_000)
    await asyncio.wait_for(h.handle_isolated([RawMessage("streamrec.clicks", 0, 0, b"u1", encode(ev), None, 1)]), 5)
    assert b'"clicks":1' in client.docs["streamrec:user:u1"]
    assert "state: ok" in health.readiness()[1]


async def test_a_claim_and_a_save_refused_by_a_replica_drop_the_connections_they_came_on():
    for call in ("claim", "save"):
        client = DemotedPrimary()
        store = RedisUserStateStore(client)
        try:
            await (store.claim([0]) if call == "claim" else store.save_docs({"u1": b"{}"}))
        except redis.ReadOnlyError:
            pass
        assert not client.on_replica, call
