"""The demo's reader (stream.demo.Watcher) guards its fetches at close as every streamrec reader
does (stream.connections.fetches_end_empty_at_close, aiokafka issue 647): it built its own
AIOKafkaConsumer without the guard, so a demo stopped while the broker was away had the
consumer's stop raise the fetch's CancelledError. It now reads through started_reader."""

import asyncio
import types

from aiokafka import AIOKafkaConsumer

from stream import connections
from stream.demo import Watcher


def test_the_demos_reader_guards_the_fetcher_of_the_consumer_it_reads_with(monkeypatch):
    built: list[AIOKafkaConsumer] = []
    guarded: list[object] = []

    async def fake_start(self):  # the attributes aiokafka's own start() leaves, without a broker
        async def closed():
            pass

        self._fetcher = types.SimpleNamespace(_closed=False, _proc_fetch_request=None, close=closed, _records={})
        built.append(self)

    monkeypatch.setattr(AIOKafkaConsumer, "start", fake_start)
    monkeypatch.setattr(connections, "fetches_end_empty_at_close", guarded.append)
    watcher = Watcher("127.0.0.1:9", "t.recommendations", "t.dlq", show_every=10)
    watcher.stop_flag.set()  # started, then stopped at once: the consumer it read with is built and stopped
    asyncio.run(watcher._consume())
    assert watcher.ready.is_set()
    (consumer,) = built
    assert guarded == [consumer._fetcher], "the demo's consumer stops without the fetch guard"
    assert consumer.subscription() == {"t.recommendations", "t.dlq"}
    assert consumer._group_id is None and consumer._isolation_level == connections.ISOLATION_LEVEL
