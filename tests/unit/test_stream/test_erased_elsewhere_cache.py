"""A user erased by another worker loses the document the owner keeps of them too.

A forget request not keyed by its user's id (an unkeyed privacy tool) lands on a partition
another worker owns: that worker deletes the user's state in Redis, but the owner keeps the
document it saved last (stream/state.py, CachedUserStateStore) and, at the user's next event,
would load it and write the erased state back. The owner's peer reader reads that request
(stream/peers.py): the owner's store drops the user then."""

from __future__ import annotations

import time
from types import SimpleNamespace

from aiokafka import TopicPartition

from stream.app import create_app
from stream.handler import RawMessage
from stream.records import ClickEvent, ForgetRequest, encode
from stream.settings import Settings
from stream.state import InMemoryUserStateStore

P = "t."
NOW = time.time_ns() // 1_000_000


async def _sink(records):
    return []


def click(offset: int, ts: int, generation: int) -> RawMessage:
    value = encode(ClickEvent(event_id=f"e{offset}", user_id="u1", item_id=f"i{offset}", ts=ts))
    return RawMessage(P + "clicks", 0, offset, b"u1", value, None, generation)


async def test_the_owner_forgets_the_document_of_a_user_another_worker_erased():
    redis = InMemoryUserStateStore()
    shell = create_app(Settings.from_env({"STREAMREC_TOPIC_PREFIX": P, "STREAMREC_PARTITIONS": "2"}),
                       load_model=False, store=redis).streamrec
    shell.handler.publish = _sink
    await shell.handler.handle_isolated([click(0, NOW - 5_000, shell.generation())])  # the owner saved (and keeps) u1's state
    # another worker got the request, on its partition 1 (keyed by something else), and erased u1
    request = ForgetRequest(user_id="u1", request_id="forget-1", ts=NOW - 1_000)
    await redis.save_docs({}, delete=["u1"])
    peers = shell.peers
    peers.reading = frozenset({(P + "forget", 1)})
    await peers._learn({TopicPartition(P + "forget", 1): [SimpleNamespace(offset=0, value=encode(request))]},
                       peers._version)
    await shell.handler.handle_isolated([click(1, NOW, shell.generation())])  # u1's next event: a fresh state
    assert (await redis.load_many(["u1"]))["u1"].recent_items == ["i1"]
