"""A stand-in for kafka-python's KafkaConsumer as `streamrec retrain` uses it, for unit tests."""

from __future__ import annotations


class FakeRetrainConsumer:
    """The part of kafka-python's KafkaConsumer that `streamrec retrain` uses: one partition of
    each topic, a backlog that ends at ``END``, nothing to poll; a test overrides what it needs."""

    END = 0

    def __init__(self, **kw):
        self.polls = 0

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, partitions):
        pass

    def seek_to_beginning(self, *partitions):
        pass

    def end_offsets(self, partitions):
        return {tp: self.END for tp in partitions}

    def poll(self, timeout_ms, max_records):
        self.polls += 1
        return {}

    def position(self, tp):
        return 0

    def close(self, autocommit):
        pass
