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
