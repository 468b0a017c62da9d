"""Cold start: items nobody has clicked yet, recommended by what they are.

An item the shop has just added has no clicks, so no co-visitation, popularity or factor can
put it in a list. Its text can: the catalogue holds its vector, and a user's recent items
have vectors too. :class:`ContentMatcher` keeps the newest catalogue items that no event has
named yet (the *cold pool*: at most ``pool`` of them, found among the ``scan`` newest), and
for each user finds the ``per_user`` of them closest to the mean vector of their last
``recent`` items that the catalogue knows. Their cosines become the ``content`` source of
the blend; once an item has events it leaves the pool, and the learners take over.

One matrix product per batch of users (``users × pool`` cosines): measured on the demo
shop's 2,000 items, 8.5 µs per user with 100 cold items and 18 µs with 1,000, in batches of
1,800 users (bench figures in docs/search.md). The pool is rebuilt at most every
``refresh_s`` seconds or when the catalogue changes, and an item named by an event since is
dropped from the answers at once. A user with no recent item in the catalogue, or an empty
pool, costs nothing.

Pure: the caller says which items are known (the recommender's :meth:`has_events
<online_models.recommender.Recommender.has_events>`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from online_models.search.catalogue import Catalogue, CatalogueMemo

#: the most new items matched at once: the newest without events (in a shop that adds items
#: every day these are its new arrivals; older items nobody clicked are pushed out by them)
COLD_POOL = 200
#: how many of the catalogue's newest items are looked at to fill the pool
COLD_SCAN = 5_000
#: new items each user is offered
PER_USER = 5
#: a user's recent items that make their profile
PROFILE_ITEMS = 5
#: item vectors kept between batches (1.5 kB each)
VECTOR_CACHE = 50_000


class ContentMatcher:
    """The ``per_user`` cold items closest in meaning to each user's recent items.

    >>> from online_models.search.catalogue import CatalogueItem
    >>> from online_models.search.text import TextEmbedder
    >>> catalogue = Catalogue(TextEmbedder(threads=1))
    >>> catalogue.upsert([CatalogueItem(item_id="old", title="red wool scarf"),
    ...                   CatalogueItem(item_id="new", title="long red wool scarf"),
    ...                   CatalogueItem(item_id="far", title="garden hose, 20 metres")])
    >>> _ = catalogue.flush()
    >>> matcher = ContentMatcher(catalogue, known=lambda item: item == "old", per_user=1)
    >>> [sorted(m) if m else m for m in matcher.matches([["old"], [], ["unknown"]])]
    [['new'], None, None]
    """

    def __init__(self, catalogue: Catalogue, known: Callable[[str], bool], *, pool: int = COLD_POOL,
                 scan: int = COLD_SCAN, per_user: int = PER_USER, recent: int = PROFILE_ITEMS,
                 refresh_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.catalogue = catalogue
        self.known = known
        self.pool_size, self.scan, self.per_user, self.recent = pool, scan, per_user, recent
        self.refresh_s = refresh_s
        self.clock = clock
        self._pool_ids: list[str] = []
        self._pool = np.empty((0, 0), dtype=np.float32)
        self._built_at = -float("inf")
        self._built_version = -1
        self._lock = threading.Lock()
        #: item -> its vector: a user's recent items come back batch after batch
        self._vectors = CatalogueMemo(catalogue, VECTOR_CACHE)

    def pool(self) -> tuple[list[str], np.ndarray]:
        """The cold pool (item ids and their vectors), rebuilt when stale."""
        now = self.clock()
        catalogue = self.catalogue
        with self._lock:
            if catalogue.version != self._built_version or now - self._built_at >= self.refresh_s:
                version = catalogue.version
                self._pool_ids, self._pool = catalogue.newest(self.known, self.pool_size, self.scan)
                self._built_at, self._built_version = now, version
            return self._pool_ids, self._pool

    def matches(self, recent_items: Sequence[Sequence[str]]) -> list[dict[str, float] | None]:
        """For each user (their recent items, oldest first): ``{item: cosine}`` of the new items
        closest to them, or None (nothing to match them with)."""
        out: list[dict[str, float] | None] = [None] * len(recent_items)
        if not any(recent_items) or not len(self.catalogue):
            return out
        ids, pool = self.pool()
        if not ids:
            return out
        lasts = [recent[-self.recent:] for recent in recent_items]
        vectors = self._vectors.get_many((item for last in lasts for item in last), self.catalogue.vectors_of)
        if not vectors:
            return out
        row_of = {item: row for row, item in enumerate(vectors)}
        # one row more, of zeros, for the places of a user's items the catalogue does not have
        table = np.empty((len(vectors) + 1, pool.shape[1]), dtype=np.float32)
        for row, vector in enumerate(vectors.values()):
            table[row] = vector
        table[-1] = 0.0
        absent = len(vectors)
        users: list[int] = []
        places: list[list[int]] = []
        for u, last in enumerate(lasts):
            mine = [row_of.get(item, absent) for item in last]
            if len(mine) > mine.count(absent):
                users.append(u)
                places.append(mine + [absent] * (self.recent - len(mine)))
        if not users:
            return out
        # each profile is the sum of the user's item vectors: the mean, once normalised
        profile = table[np.asarray(places)].sum(axis=1)
        profile /= np.maximum(np.linalg.norm(profile, axis=1, keepdims=True), 1e-12)
        cosines = profile @ pool.T  # users x pool
        n = min(self.per_user, len(ids))
        top = np.argpartition(-cosines, n - 1, axis=1)[:, :n] if n < len(ids) else np.tile(np.arange(n), (len(users), 1))
        values = np.take_along_axis(cosines, top, axis=1).tolist()
        known = self.known
        for u, picked, cos in zip(users, top.tolist(), values, strict=True):
            # an item named by an event since the pool was built is left out
            fresh = {ids[j]: c for j, c in zip(picked, cos, strict=True) if not known(ids[j])}
            out[u] = fresh or None
        return out
