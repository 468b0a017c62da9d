"""The catalogue feed's door as the worker's: a value whose decoding raises anything (a bug),
even an exception whose message is not text, is dead-lettered as ``processing_error``, and
the other items of its fetch are still applied (stream/handler.py does the same for events)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from online_models.search import Catalogue
from stream import catalogue_feed
from stream.catalogue_feed import CatalogueFeed
from stream.prometheus import Metrics
from stream.records import DEFAULT_BOUNDS, decode_dead_letter


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ raised too")


class _Embedder:
    dim = 4
    name = "constant"

    def queries(self, texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    passages = queries


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

    catalogue = Catalogue(_Embedder())
    feed = CatalogueFeed(catalogue, {}, "t.items", DEFAULT_BOUNDS, Metrics(CollectorRegistry()), publish, "t.dlq")
    records = [SimpleNamespace(topic="t.items", offset=n, key=key.encode(),
                               value=b'{"item_id": "%s", "title": "Lamp", "ts": 1}' % key.encode())
               for n, key in enumerate(["a", "bad", "c"])]
    await feed._apply(0, records)
    (letter,) = [decode_dead_letter(value) for _, _, value in sent]
    assert (letter.code, letter.offset) == ("processing_error", 1) and type(error).__name__ in letter.reason
    catalogue.flush()
    assert "a" in catalogue and "c" in catalogue and "bad" not in catalogue and feed.offsets == {0: 3}


class _Choosy(_Embedder):
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
    catalogue = Catalogue(_Embedder())
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
