"""A stand-in for the replay's Kafka reader (stream.replay.started_reader) that holds given
values at offsets 0, 1, ... of one partition: for the unit tests of stream/replay.py's callers."""

from __future__ import annotations

from types import SimpleNamespace

from aiokafka import TopicPartition

from stream import replay as replay_module


def reader_holding(monkeypatch, topic: str, values: list[bytes], partition: int = 0) -> None:
    """Make ``replay`` read ``values`` from ``topic``'s ``partition``, from offset 0, then nothing."""

    class Consumer:
        def __init__(self):
            self.at = 0

        def assign(self, tps):
            pass

        def seek(self, tp, offset):
            self.at = offset

        async def getmany(self, *tps, timeout_ms):
            if self.at >= len(values):
                return {}
            records = [SimpleNamespace(offset=n, value=v) for n, v in enumerate(values) if n >= self.at]
            self.at = len(values)
            return {TopicPartition(topic, partition): records}

        async def position(self, tp):
            return self.at

        async def stop(self):
            pass

    async def started_reader(*args, **kw):
        return Consumer()

    monkeypatch.setattr(replay_module, "started_reader", started_reader)
