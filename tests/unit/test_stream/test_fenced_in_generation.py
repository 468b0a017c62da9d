"""A batch fenced while this worker's consumer group still assigns it the partition.

A fenced batch is left unacknowledged and its partitions' commits are held until a rebalance
revokes them (stream/shell.py, leave_unacknowledged). After a pause or a network split the
rebalance follows (the group moved the partitions on), but a claim taken by a worker of
another consumer group (another STREAMREC_APP_ID over the same Redis and STREAMREC_TOPIC_PREFIX,
a blue/green deployment's second group) brings none: the partition stood still for good, every
batch of it dropped as held, while /readyz said ready."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from stream.app import create_app
from stream.handler import RawMessage
from stream.records import ClickEvent, encode
from stream.settings import Settings
from stream.state import InMemoryUserStateStore

P = "g."
CLICKS = P + "clicks"


class Consumer:
    """What the shell reads and calls of the worker's Faust consumer (stream/consumer.py)."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.held: set = set()

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def topic_partitions(self, topic: str) -> int:
        return 2

    def hold(self, partitions) -> None:
        self.held.update(partitions)


class FakeApp:
    def __init__(self, assigned: set[TopicPartition], generation: int) -> None:
        self.consumer = Consumer(assigned)
        self.consumer_generation_id = generation
        self.flow_control = SimpleNamespace(is_active=lambda: True)

    def add_future(self, coro) -> None:
        coro.close()  # the replay and the peer reader: not this test's


def click_event(offset: int, generation: int):
    """A Faust event as take_batches hands it over."""
    value = encode(ClickEvent(event_id=f"e{offset}", user_id="u1", item_id=f"i{offset}", ts=1_700_000_000_000 + offset))
    msg = RawMessage(CLICKS, 0, offset, b"u1", value, None, generation)
    return SimpleNamespace(message=SimpleNamespace(topic=msg.topic, partition=msg.partition, offset=msg.offset,
                                                   key=msg.key, value=msg.value, timestamp=None, generation_id=generation,
                                                   tp=TopicPartition(CLICKS, 0), headers=None))


async def _sink(records):
    return []


async def test_a_batch_fenced_in_the_current_generation_makes_the_worker_unready_until_a_rebalance():
    store = InMemoryUserStateStore()
    settings = Settings.from_env({"STREAMREC_TOPIC_PREFIX": P, "STREAMREC_PARTITIONS": "2",
                                  "STREAMREC_SNAPSHOT_FORK": "false"})
    shell = create_app(settings, load_model=False, store=store).streamrec
    shell.handler.publish = _sink
    shell.models_ready.set()
    for condition in ("kafka", "redis", "models"):  # as the watch timer and the restore say them
        shell.health.set(condition, True, "fine")
    shell.health.checked()
    app = FakeApp({TopicPartition(CLICKS, 0)}, shell.generation())
    await shell.on_assigned(app, app.consumer.assigned)  # claims partition 0
    await shell.handle_taken(app, [click_event(0, app.consumer_generation_id)])
    assert shell.health.readiness()[0]
    await store.claim([0])  # a worker of another consumer group takes partition 0 too
    batch = [click_event(1, app.consumer_generation_id)]
    await shell.handle_taken(app, batch)
    assert batch == [] and app.consumer.held == {TopicPartition(CLICKS, 0)}  # left unacknowledged, held
    ready, text = shell.health.readiness()
    assert not ready
    assert "batches: FAIL" in text and "still assigns" in text and "STREAMREC_APP_ID" in text
    # a rebalance revokes the partition (the consumer forgets what it held) and assigns it again
    await shell.on_revoked({TopicPartition(CLICKS, 0)})
    app.consumer.held.clear()
    await shell.on_assigned(app, app.consumer.assigned)
    ready, text = shell.health.readiness()
    assert ready and "batches: ok" in text
