"""The catalogue feed's door as the worker's: a value whose decoding raises anything (a bug),
even an exception whose message is not text, is dead-lettered as ``processing_error``, and
the other items of its fetch are still applied (stream/handler.py does the same for events).
The offsets (what a snapshot records) move past a fetch only once each of its values is in
the catalogue or dead-lettered."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from aiokafka import TopicPartition
from fakes import ConstantEmbedder
from prometheus_client import CollectorRegistry

from online_models.search import Catalogue
from stream import catalogue_feed
from stream.catalogue_feed import CatalogueFeed
from stream.prometheus import Metrics
from stream.records import DEFAULT_BOUNDS, decode_dead_letter
from stream.retry import Backoff
from stream.state import InMemoryUserStateStore


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised too")


@pytest.mark.parametrize("error", [ValueError("no file /models/\udcff.bin"), _Unprintable()])
async def test_an_item_whose_decoding_raises_anything_is_a_dead_letter_and_its_neighbours_are_kept(monkeypatch, error):
    real = catalogue_feed.decode_item

    def flaky(raw, *args):
        if b'"bad"' in raw:
            raise error
        return real(raw, *args)

    monkeypatch.setattr(catalogue_feed, "decode_item", flaky)
    sent: list = []

    async def publish(records):
        sent.extend(records)
        return []

    catalogue = Catalogue(ConstantEmbedder())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), publish, "t.dlq")
    records = [SimpleNamespace(topic="t.items", offset=n, key=key.encode(),
                               value=b'{"item_id": "%s", "title": "Lamp", "ts": 1}' % key.encode())
               for n, key in enumerate(["a", "bad", "c"])]
    await feed._apply(0, records)
    (letter,) = [decode_dead_letter(value) for _, _, value in sent]
    assert (letter.code, letter.offset) == ("processing_error", 1) and type(error).__name__ in letter.reason
    assert "send the item again: its current value, keyed by its item_id" in letter.reason, letter.reason
    catalogue.flush()
    assert "a" in catalogue and "c" in catalogue and "bad" not in catalogue and feed.offsets == {0: 3}


class _Choosy(ConstantEmbedder):
    """Raises on one item's text (a bug of the model or of its tokenizer), or on anything."""

    def __init__(self, always: bool = False) -> None:
        self.always = always

    def passages(self, texts):
        if self.always or any("Poison" in t for t in texts):
            raise ValueError("cannot embed this")
        return self.queries(texts)


def _items(feed_keys):
    return [SimpleNamespace(topic="t.items", offset=n, key=key.encode(),
                            value=b'{"item_id": "%s", "title": "%s", "ts": 1}' % (key.encode(), title.encode()))
            for n, (key, title) in enumerate(feed_keys)]


async def test_an_item_the_text_model_raises_on_is_left_out_and_the_others_are_indexed():
    """The chunk raised at every retry: nothing after it was ever indexed."""
    catalogue = Catalogue(_Choosy())
    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, metrics, None, None)
    await feed._apply(0, _items([("a", "Lamp"), ("p", "Poison pill"), ("c", "Chair")]))
    await feed._flush()
    assert "a" in catalogue and "c" in catalogue and "p" not in catalogue and catalogue.pending == 0
    assert metrics.registry.get_sample_value("streamrec_catalogue_changes_total", {"kind": "failed"}) == 1
    # serve sends no dead letters: it counts it
    assert metrics.registry.get_sample_value("streamrec_events_invalid_total", {"reason": "embedding_failed"}) == 1
    await feed._apply(0, _items([("d", "Desk")]))  # the feed goes on
    await feed._flush()
    assert "d" in catalogue


async def test_a_text_model_that_raises_on_anything_drops_nothing():
    catalogue = Catalogue(_Choosy(always=True))
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), None, None)
    await feed._apply(0, _items([("a", "Lamp"), ("c", "Chair")]))
    with pytest.raises(ValueError, match="cannot embed"):
        await feed._flush()
    assert catalogue.pending == 2  # kept for the retry after the back-off


async def test_a_tombstone_whose_removal_raises_keeps_the_rest_of_its_fetch(monkeypatch):
    """The offsets are past the whole fetch as it is applied: a removal that raised (an index's
    bug) lost every item after it in the fetch."""
    catalogue = Catalogue(ConstantEmbedder())
    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, metrics, None, None)
    real = catalogue.remove

    def remove(item_id):
        if item_id == "b":
            raise RuntimeError("index bug")
        return real(item_id)

    monkeypatch.setattr(catalogue, "remove", remove)
    records = _items([("a", "Lamp")])
    records.append(SimpleNamespace(topic="t.items", offset=1, key=b"b", value=None))
    records += [SimpleNamespace(topic="t.items", offset=2 + n, key=r.key, value=r.value)
                for n, r in enumerate(_items([("c", "Chair")]))]
    await feed._apply(0, records)
    await feed._flush()
    assert "a" in catalogue and "c" in catalogue and feed.offsets == {0: 3}
    assert metrics.registry.get_sample_value("streamrec_catalogue_changes_total", {"kind": "failed"}) == 1


class _OnePartition:
    """The feed's Kafka consumer over partition 0 of ``t.items``, holding ``records`` (offsets
    0, 1, ...): it reads from where it was seeked to, as aiokafka's does."""

    def __init__(self, records) -> None:
        self.records = records
        self.at = 0

        class Client:
            async def force_metadata_update(inner):
                return True

        self._client = Client()

    def partitions_for_topic(self, topic):
        return {0}

    def assign(self, tps):
        pass

    def seek(self, tp, offset):
        self.at = offset

    async def seek_to_beginning(self, tp):
        self.at = 0

    async def end_offsets(self, tps):
        return {tp: len(self.records) for tp in tps}

    async def getmany(self, timeout_ms, max_records):
        await asyncio.sleep(0)
        taken = self.records[self.at : self.at + max_records]
        self.at += len(taken)
        return {TopicPartition("t.items", 0): taken} if taken else {}

    async def stop(self):
        pass


async def _until(predicate, what: str, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_an_upsert_that_raises_once_loses_no_item_and_no_snapshot_runs_ahead_of_the_catalogue(monkeypatch):
    """The offsets moved past each record before its item reached the catalogue: an upsert that
    raised (a bug) sent the feed back to reading from past the fetch, its items were never
    applied, and a snapshot recorded offsets past them: lost for good, after a restart too."""
    records = _items([("a", "Lamp"), ("b", "Chair"), ("c", "Desk")])

    async def reader(options, max_records):
        return _OnePartition(records)

    monkeypatch.setattr(catalogue_feed, "started_reader", reader)
    store = InMemoryUserStateStore()
    written: list[bytes] = []
    real_set_blob = store.set_blob

    async def set_blob(name, data):
        written.append(data)
        await real_set_blob(name, data)

    monkeypatch.setattr(store, "set_blob", set_blob)
    catalogue = Catalogue(ConstantEmbedder())
    real_upsert = catalogue.upsert
    calls = 0

    def upsert(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("index bug")
        real_upsert(items)

    monkeypatch.setattr(catalogue, "upsert", upsert)
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), store=store,
                         snapshot_interval_s=0.0, backoff=Backoff(base_s=0.001, cap_s=0.001, jitter=0))
    task = asyncio.create_task(feed.run())
    try:
        await asyncio.wait_for(feed.caught_up.wait(), 5.0)
        assert sorted(item_id for item_id in "abc" if item_id in catalogue) == ["a", "b", "c"], feed.offsets
        await _until(lambda: written, "the catalogue's snapshot")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    for data in written:  # each snapshot holds every item before the offsets it records
        await real_set_blob(catalogue_feed.SNAPSHOT_KEY, data)
        restarted = CatalogueFeed(Catalogue(ConstantEmbedder()), {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()),
                                  store=store)
        assert await restarted.restore()
        covered = [rec.key.decode() for rec in records[: restarted.offsets.get(0, 0)]]
        assert [item_id for item_id in covered if item_id not in restarted.catalogue] == [], restarted.offsets
    assert restarted.offsets == {0: 3}


async def test_an_item_whose_upsert_raises_alone_is_dead_lettered_and_its_neighbours_are_queued(monkeypatch):
    """Not left out in silence: its value goes to the dead-letter topic with a reason (send the item
    again once the bug is fixed: not this value replayed, which could replace a newer one on the
    compacted topic), and the rest of its fetch is applied."""
    sent: list = []

    async def publish(records):
        sent.extend(records)
        return []

    catalogue = Catalogue(ConstantEmbedder())
    real_upsert = catalogue.upsert

    def upsert(items):
        items = list(items)
        if any(item.item_id == "p" for item in items):
            raise RuntimeError("index bug")
        real_upsert(items)

    monkeypatch.setattr(catalogue, "upsert", upsert)
    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, metrics, publish, "t.dlq")
    await feed._apply(0, _items([("a", "Lamp"), ("p", "Poison pill"), ("c", "Chair")]))
    await feed._flush()
    assert "a" in catalogue and "c" in catalogue and "p" not in catalogue and feed.offsets == {0: 3}
    (letter,) = [decode_dead_letter(value) for _, _, value in sent]
    assert (letter.code, letter.offset, letter.partition) == ("processing_error", 1, 0)
    assert "adding it to the catalogue raised RuntimeError: index bug" in letter.reason
    # not "replay this value": on the compacted items topic an older value replayed replaces a newer one
    assert "send the item again: its current value, keyed by its item_id" in letter.reason, letter.reason
    assert "replay" not in letter.reason, letter.reason
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_catalogue_changes_total", {"kind": "failed"}) == 1
    assert sample("streamrec_catalogue_changes_total", {"kind": "upsert"}) == 2
    assert sample("streamrec_events_invalid_total", {"reason": "processing_error"}) == 1


async def test_a_fetch_stopped_before_its_dead_letters_are_sent_is_not_passed():
    """The offsets were past a fetch before its dead letters were sent: the feed stopped while
    the producer waited, and a snapshot or the next read went past values never dead-lettered."""

    async def publish(records):
        raise asyncio.CancelledError  # the feed is stopped while Kafka has not confirmed them

    feed = CatalogueFeed(Catalogue(ConstantEmbedder()), {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), publish,
                         "t.dlq")
    bad = SimpleNamespace(topic="t.items", offset=0, key=b"x", value=b'{"item_id": "x", "ts": 1}')
    with pytest.raises(asyncio.CancelledError):
        await feed._apply(0, [bad])
    assert feed.offsets == {}


def _publisher(sent: list):
    async def publish(records):
        sent.extend(records)
        return []

    return publish


async def test_an_item_the_text_model_raises_on_is_dead_lettered_with_its_value_and_the_others_are_indexed():
    """It was only logged and counted: its record was gone by the time its embedding failed,
    so nothing reached the dead-letter topic, and nobody could tell a producer what to fix."""
    sent: list = []
    catalogue = Catalogue(_Choosy())
    metrics = Metrics(CollectorRegistry())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, metrics, _publisher(sent), "t.dlq",
                         reader="worker-3:4242")
    records = _items([("a", "Lamp"), ("p", "Poison pill"), ("c", "Chair")])
    await feed._apply(0, records)
    await feed._flush()
    assert "a" in catalogue and "c" in catalogue and "p" not in catalogue and catalogue.pending == 0
    assert feed.offsets == {0: 3}
    ((topic, key, value),) = sent
    letter = decode_dead_letter(value)
    assert (topic, key, letter.code) == ("t.dlq", b"p", "embedding_failed")
    assert (letter.topic, letter.partition, letter.offset, letter.raw) == ("t.items", 0, 1, records[1].value.decode())
    for words in ("raised ValueError: cannot embed this (the text model embeds other texts)", "'p'",
                  "worker-3:4242, whose text model is constant",
                  "send the item again"):
        assert words in letter.reason, letter.reason
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_events_invalid_total", {"reason": "embedding_failed"}) == 1
    assert sample("streamrec_dead_letters_published_total") == 1
    assert sample("streamrec_catalogue_changes_total", {"kind": "failed"}) == 1
    assert sample("streamrec_catalogue_changes_total", {"kind": "upsert"}) == 3


async def test_an_item_queued_before_the_text_model_failed_on_anything_is_dead_lettered_from_its_own_record():
    """The feed reads on past a fetch whose items wait in the queue (the model failed on
    everything, then recovered): the dead letter still carries the value and place of the
    record the item was read from, not of a later one."""
    sent: list = []
    embedder = _Choosy(always=True)
    catalogue = Catalogue(embedder)
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), _publisher(sent),
                         "t.dlq")
    await feed._apply(0, _items([("a", "Lamp"), ("p", "Poison pill")]))
    with pytest.raises(ValueError):
        await feed._flush()
    assert sent == [] and catalogue.pending == 2
    embedder.always = False
    later = [SimpleNamespace(topic="t.items", offset=2, key=b"c", value=b'{"item_id": "c", "title": "Chair", "ts": 1}')]
    await feed._apply(0, later)
    await feed._flush()
    (letter,) = [decode_dead_letter(value) for _, _, value in sent]
    assert (letter.code, letter.offset, letter.raw) == ("embedding_failed", 1,
                                                         '{"item_id": "p", "title": "Poison pill", "ts": 1}')
    assert "a" in catalogue and "c" in catalogue and "p" not in catalogue


async def test_an_item_whose_dead_letter_is_not_confirmed_stays_queued_so_no_snapshot_passes_it():
    async def publish(records):
        raise asyncio.CancelledError  # the feed is stopped while Kafka has not confirmed it

    store = InMemoryUserStateStore()
    catalogue = Catalogue(_Choosy())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), publish, "t.dlq",
                         store=store)
    await feed._apply(0, _items([("p", "Poison pill")]))
    with pytest.raises(asyncio.CancelledError):
        await feed._flush()
    assert catalogue.next_pending() == "p" and not await feed.snapshot()


async def test_a_tombstone_whose_removal_raises_quotes_its_key_cut_short(monkeypatch, caplog):
    """A tombstone's key is not decoded, so no id limit holds it: a 60,000-character key was
    quoted whole in the error line."""
    catalogue = Catalogue(ConstantEmbedder())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), None, None)

    def remove(item_id):
        raise RuntimeError("index bug")

    monkeypatch.setattr(catalogue, "remove", remove)
    with caplog.at_level("ERROR", logger="streamrec.catalogue"):
        await feed._apply(0, [SimpleNamespace(topic="t.items", offset=0, key=b"k" * 60_000, value=None)])
    [line] = [r.getMessage() for r in caplog.records if "a tombstone at" in r.getMessage()]
    assert "k" * 200 + "…" in line and len(line) < 1_000
