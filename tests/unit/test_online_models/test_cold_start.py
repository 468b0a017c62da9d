"""Cold start: new items nobody has clicked are matched to users by their text."""

from __future__ import annotations

import numpy as np
import pytest

from online_models.search import Catalogue, CatalogueItem, ContentMatcher, TextEmbedder

ITEMS = [
    CatalogueItem(item_id="jacket", title="Women's long winter down jacket with hood", category_path=("Coats",)),
    CatalogueItem(item_id="coat", title="Women's warm winter down coat, hooded", category_path=("Coats",)),
    CatalogueItem(item_id="parka", title="Insulated winter parka for women", category_path=("Coats",)),
    CatalogueItem(item_id="shoes", title="Men's lightweight running shoes", category_path=("Shoes",)),
    CatalogueItem(item_id="trainers", title="Breathable trail running trainers", category_path=("Shoes",)),
    CatalogueItem(item_id="tv", title="55 inch 4K LED smart TV"),
]


@pytest.fixture(scope="module")
def embedder():
    return TextEmbedder(threads=1)


def catalogue_of(embedder, items=ITEMS):
    catalogue = Catalogue(embedder)
    catalogue.upsert(items)
    catalogue.flush()
    return catalogue


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_user_is_offered_the_new_items_closest_to_what_they_viewed(embedder):
    catalogue = catalogue_of(embedder)
    known = {"jacket", "shoes"}
    matcher = ContentMatcher(catalogue, known.__contains__, per_user=2)
    coats, shoes, nothing, empty = matcher.matches([["jacket"], ["shoes"], ["not-in-catalogue"], []])
    assert set(coats) == {"coat", "parka"}  # the cold coats, not the known jacket itself
    assert "trainers" in shoes and "shoes" not in shoes
    assert nothing is None and empty is None
    assert all(0.0 < c <= 1.0 for c in coats.values())
    # the cosine is the profile's: the mean of the user's recent items, normalised
    profile = catalogue.vector("jacket")
    assert coats["coat"] == pytest.approx(float(profile @ catalogue.vector("coat")), abs=1e-3)


def test_an_item_named_by_an_event_leaves_the_answers_at_once_and_the_pool_at_the_next_rebuild(embedder):
    catalogue = catalogue_of(embedder)
    known = {"jacket"}
    clock = Clock()
    matcher = ContentMatcher(catalogue, known.__contains__, per_user=5, refresh_s=1.0, clock=clock)
    assert "coat" in matcher.matches([["jacket"]])[0]
    known.add("coat")  # a click on it
    assert "coat" not in matcher.matches([["jacket"]])[0]  # pool not rebuilt yet, the answer checks again
    assert "coat" in matcher.pool()[0]
    clock.now = 1.0
    assert "coat" not in matcher.pool()[0]
    # every item has events: nothing is cold, nothing is offered
    known.update(i.item_id for i in ITEMS)
    clock.now = 2.0
    assert matcher.matches([["jacket"], ["shoes"]]) == [None, None]


def test_the_pool_is_the_newest_cold_items_and_follows_the_catalogue(embedder):
    catalogue = catalogue_of(embedder)
    matcher = ContentMatcher(catalogue, lambda item: False, pool=3, per_user=10, refresh_s=3600, clock=Clock())
    assert matcher.pool()[0] == ["tv", "trainers", "shoes"]  # the newest indexed first
    assert len(matcher.matches([["jacket"]])[0]) == 3  # never more than the pool
    catalogue.remove("tv")  # the catalogue changed: rebuilt without waiting for refresh_s
    assert matcher.pool()[0] == ["trainers", "shoes", "parka"]
    catalogue.upsert([CatalogueItem(item_id="shoes", title="Men's lightweight running shoes, now in blue")])
    catalogue.flush()  # a changed text is not a new item: its place stays
    assert matcher.pool()[0] == ["trainers", "shoes", "parka"]
    catalogue.upsert([ITEMS[0].__class__(item_id="scarf", title="Red wool scarf", available=False)])
    catalogue.flush()  # an unavailable item is never offered
    assert "scarf" not in matcher.pool()[0]
    scan = ContentMatcher(catalogue, lambda item: False, pool=10, scan=2, clock=Clock())
    assert scan.pool()[0] == ["trainers"]  # only the 2 newest looked at (the scarf, unavailable, is one)
    ids, vectors = scan.pool()
    assert vectors.shape == (1, embedder.dim) and vectors.dtype == np.float32


def test_one_matrix_product_serves_many_users_alike(embedder):
    catalogue = catalogue_of(embedder)
    matcher = ContentMatcher(catalogue, {"jacket", "shoes"}.__contains__, per_user=2)
    alone = matcher.matches([["jacket"]])[0]
    many = matcher.matches([["shoes"], ["jacket"], [], ["shoes", "jacket"]] * 50)
    assert many[1] == pytest.approx(alone) and many[2] is None and len(many) == 200
