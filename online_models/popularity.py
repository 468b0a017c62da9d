"""Item popularity three ways: all-time counts, a sliding window, exponential decay.

All three keep one float per item in a numpy array (an item's row is fixed when it is
first seen), so learning is O(1) and scoring a batch is one fancy-index. At most
``max_items`` items are kept: when a new one would pass that, the three quarters with the
highest scores stay (for trending, the highest decayed weight) and the rest go. To propose items
each keeps a *pool*: the ``pool_size`` best items as of the last full refresh (every
``refresh_every`` events, an ``argpartition``) plus any item that has since climbed above
the pool's floor, so a new item that takes off is recommendable at once.

Clicks and purchases count ``click_weight`` and ``purchase_weight`` (times the quantity).
A proposal list is reused for ``reuse_proposals`` learned events (the head of a popularity
ranking barely moves in a few events, and proposing is the costly part).

>>> from online_models.types import Interaction, UserContext
>>> trending = TrendingPopularity(half_life_s=60)
>>> trending.learn_one(Interaction("u", "old", ts=0))
>>> trending.learn_one(Interaction("u", "new", ts=120_000))   # two half-lives later
>>> round(trending.predict_one(UserContext("u", ts=120_000), "old"), 3)
0.25
>>> [s.item_id for s in trending.rank(UserContext("u"), k=2)]
['new', 'old']
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from itertools import chain, repeat

import numpy as np

from online_models.base import OnlineLearner, heaviest_rows
from online_models.types import Interaction, UserContext

_MAX_EXPONENT = 30.0  # rescale the decayed scores before exp() grows past ~1e13


class _ItemScores(OnlineLearner):
    """Shared machinery: item index, score array, candidate pool."""

    name = "_popularity"
    explains_by_category = True  # "popular now in c12"
    #: whether a row's score only grows between evictions (with weights >= 0): all-time counts,
    #: and trending's inflated sums (its rescaling shrinks every score and the floor alike). Then
    #: every item that can be in the top ``pool_size`` is in the pool (it was at the last refresh,
    #: or crossed the floor since, and joined), and a refresh ranks the pool, not every item
    grows_only = True

    def __init__(
        self,
        click_weight: float = 1.0,
        purchase_weight: float = 3.0,
        pool_size: int = 500,
        refresh_every: int = 200,
        reuse_proposals: int = 16,
        max_items: int = 300_000,
        seed: int = 0,
    ):
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, saw {max_items!r}")
        self.click_weight = click_weight
        self.purchase_weight = purchase_weight
        self.pool_size = pool_size
        self.refresh_every = refresh_every
        self.reuse_proposals = reuse_proposals
        self.max_items = max_items
        self.seed = seed  # deterministic learner; kept for the common signature
        self.n_learned = 0
        self._index: dict[str, int] = {}
        self._items: list[str] = []
        self._scores = np.zeros(64)
        self._pool: dict[int, None] = {}
        self._pool_floor = 0.0
        # (at, k, unscaled proposals, their items)
        self._proposed: tuple[int, int, list[tuple[str, float]], list[str]] | None = None

    # -- storage ----------------------------------------------------------------------
    def _row(self, item_id: str) -> int:
        idx = self._index.get(item_id)
        if idx is None:
            if len(self._items) >= self.max_items:
                self._evict()
            idx = len(self._items)
            self._index[item_id] = idx
            self._items.append(item_id)
            if idx >= len(self._scores):
                self._scores = np.concatenate([self._scores, np.zeros(len(self._scores))])
        return idx

    def _evict(self) -> None:
        """Keep the three quarters of ``max_items`` items with the highest scores (the decayed
        weight, for trending), renumbering their rows in their old order."""
        scores = self._scores[: len(self._items)]
        keep, new_row = heaviest_rows(scores, self.max_items)
        self._items = [self._items[i] for i in keep.tolist()]
        self._index = {item: r for r, item in enumerate(self._items)}
        fresh = np.zeros(len(self._scores))  # it held max_items rows: room enough
        fresh[: len(keep)] = scores[keep]
        self._scores = fresh
        self._renumbered(new_row)
        self._refresh_pool(full=True)  # the pool's rows are the old numbers
        self._proposed = None  # it may name items that are gone

    def _renumbered(self, new_row: np.ndarray) -> None:
        """Rows were renumbered (``new_row[old]``, -1: gone): a subclass updates what it keeps by row."""

    def _weight(self, x: Interaction) -> float:
        w = self.purchase_weight * x.quantity if x.kind == "purchase" else self.click_weight
        return float(w)

    def _after_update(self, idx: int) -> None:
        self.n_learned += 1
        if idx not in self._pool and self._scores[idx] >= self._pool_floor:
            self._pool[idx] = None
        if self.n_learned % self.refresh_every == 0:
            self._refresh_pool()

    def _refresh_pool(self, full: bool = False) -> None:
        """The pool: the ``pool_size`` rows of highest score (all rows while there are no more),
        and the floor (the lowest of their scores) an updated row must reach to join it until
        the next refresh.

        Ranking every item cost 1.3 ms at 85,000 items and 4.3 ms at 300,000 (the cap), once
        every ``refresh_every`` (200) events: 6-22 µs an event, growing with the catalogue. Where
        scores only grow (:attr:`grows_only`), every row that can be among the new top is in the
        pool already, and only the pool is ranked: the same scores and floor, the same rows but
        for which of several rows tied at the floor stay (``argpartition`` chooses, as before).
        Keeping every tied row instead would let a log of identical timestamps (a bulk load)
        grow the pool to the whole catalogue."""
        n = len(self._items)
        if n <= self.pool_size:
            self._pool = dict.fromkeys(range(n))
            self._pool_floor = 0.0
            return
        rows = None
        if (not full and self.grows_only and len(self._pool) >= self.pool_size
                and self.click_weight >= 0 and self.purchase_weight >= 0):
            rows = np.fromiter(self._pool, dtype=np.int64, count=len(self._pool))
        scores = self._scores[:n] if rows is None else self._scores[rows]
        top = np.argpartition(-scores, self.pool_size - 1)[: self.pool_size]
        if rows is not None:
            top = rows[top]
        top.sort()  # stable order, independent of argpartition's internals
        self._pool_floor = float(self._scores[top].min())
        self._pool = dict.fromkeys(top.tolist())

    def _scale(self, user: UserContext | None) -> float:
        return 1.0

    # -- scoring ----------------------------------------------------------------------
    def predict_one(self, user: UserContext, item_id: str) -> float:
        idx = self._index.get(item_id)
        return 0.0 if idx is None else float(self._scores[idx]) * self._scale(user)

    def score_many(self, user: UserContext, items: Sequence[str]) -> list[float]:
        get = self._index.get
        rows = np.array([get(i, -1) for i in items], dtype=np.int64)
        known = rows >= 0
        out = np.where(known, self._scores[np.where(known, rows, 0)], 0.0) * self._scale(user)
        return out.tolist()

    def score_batch(self, users: Sequence[UserContext], items: Sequence[Sequence[str]]) -> np.ndarray:
        sizes = [len(x) for x in items]
        n = sum(sizes)
        rows = np.fromiter(map(self._index.get, chain.from_iterable(items), repeat(-1)), dtype=np.int64, count=n)
        known = rows >= 0
        out = np.where(known, self._scores[np.where(known, rows, 0)], 0.0)
        return out * np.repeat([self._scale(u) for u in users], sizes)

    def propose_scores(self, user: UserContext, k: int) -> list[tuple[str, float]]:
        scale = self._scale(user)  # the same for every item: the order does not depend on the user
        return [(item, score * scale) for item, score in self._proposals(k)[2][:k]]

    def propose_items(self, user: UserContext, k: int) -> list[str]:
        return self._proposals(k)[3][:k]

    def _proposals(self, k: int) -> tuple[int, int, list[tuple[str, float]], list[str]]:
        cached = self._proposed
        if (cached is None or len(cached) < 4  # a snapshot from before the items were cached too
                or cached[1] < k or self.n_learned - cached[0] >= max(1, self.reuse_proposals)):
            proposed = self._propose(k)
            cached = self._proposed = (self.n_learned, k, proposed, [item for item, _ in proposed])
        return cached

    def _propose(self, k: int) -> list[tuple[str, float]]:
        if not self._pool:
            return []
        rows = np.fromiter(self._pool, dtype=np.int64, count=len(self._pool))
        vals = self._scores[rows]
        keep = vals > 0
        rows, vals = rows[keep], vals[keep]
        if len(rows) > k:
            part = np.argpartition(-vals, k - 1)[:k]
            rows, vals = rows[part], vals[part]
        order = np.lexsort((rows, -vals))  # best first, ties by first seen
        items = self._items
        return list(zip([items[r] for r in rows[order].tolist()], vals[order].tolist(), strict=False))


class GlobalPopularity(_ItemScores):
    """All-time weighted counts: the evaluator's "global popularity" baseline."""

    name = "popularity"

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        idx = self._row(x.item_id)
        self._scores[idx] += self._weight(x)
        self._after_update(idx)


class RecentPopularity(_ItemScores):
    """Weighted counts over the last ``window_s`` seconds of event time (a sliding window).

    Events leave the window as newer ones arrive (event time, not wall-clock time).
    """

    name = "recent_popularity"
    grows_only = False  # events leave the window and take their weight with them

    def __init__(self, window_s: float = 3600.0, click_weight: float = 1.0, purchase_weight: float = 3.0,
                 pool_size: int = 500, refresh_every: int = 200, reuse_proposals: int = 16,
                 max_items: int = 300_000, max_window_events: int = 1_000_000, seed: int = 0):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0 seconds, saw {window_s!r}")
        super().__init__(click_weight, purchase_weight, pool_size, refresh_every, reuse_proposals, max_items, seed)
        self.window_s = window_s
        self.max_window_events = max_window_events
        self._window: deque[tuple[int, int, float]] = deque()
        self._max_ts: int | None = None

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        idx = self._row(x.item_id)
        w = self._weight(x)
        self._scores[idx] += w
        self._window.append((x.ts, idx, w))
        self._max_ts = x.ts if self._max_ts is None else max(self._max_ts, x.ts)
        horizon = self._max_ts - self.window_s * 1000.0
        window, scores = self._window, self._scores
        while window and (window[0][0] < horizon or len(window) > self.max_window_events):
            _, old, ow = window.popleft()
            if old >= 0:
                scores[old] = max(0.0, scores[old] - ow)
        self._after_update(idx)

    def _renumbered(self, new_row: np.ndarray) -> None:
        rows = new_row.tolist()
        self._window = deque((ts, rows[r] if r >= 0 else -1, w) for ts, r, w in self._window)


class TrendingPopularity(_ItemScores):
    """Exponentially decayed counts: an event ``half_life_s`` ago counts half.

    Stored scores are inflated by ``exp(rate * (ts - ref))`` so that learning touches one
    row; every score is rescaled (and ``ref`` moved) before the exponent grows large.
    ``predict_one`` gives the decayed count at ``user.ts`` (default: the newest event seen).
    """

    name = "trending"

    def __init__(self, half_life_s: float = 1800.0, click_weight: float = 1.0, purchase_weight: float = 3.0,
                 pool_size: int = 500, refresh_every: int = 200, reuse_proposals: int = 16,
                 max_items: int = 300_000, seed: int = 0):
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0 seconds, saw {half_life_s!r}")
        super().__init__(click_weight, purchase_weight, pool_size, refresh_every, reuse_proposals, max_items, seed)
        self.half_life_s = half_life_s
        self._rate = math.log(2.0) / (half_life_s * 1000.0)  # per millisecond
        self._ref_ts: int | None = None
        self._max_ts: int | None = None

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        if self._ref_ts is None:
            self._ref_ts = x.ts
        self._max_ts = x.ts if self._max_ts is None else max(self._max_ts, x.ts)
        exponent = self._rate * (x.ts - self._ref_ts)
        if exponent > _MAX_EXPONENT:
            shrink = math.exp(-exponent)
            self._scores *= shrink
            self._pool_floor *= shrink
            self._ref_ts, exponent = x.ts, 0.0
        idx = self._row(x.item_id)
        self._scores[idx] += self._weight(x) * math.exp(exponent)
        self._after_update(idx)

    def _scale(self, user: UserContext | None) -> float:
        """``exp(-rate * (now - ref))``: the decay from the reference time to the user's.

        A user behind the reference time (a late event, a log replayed out of order) gets the
        scores as of the reference time: undoing the decay would multiply by up to ``e**700``
        and overflow (the order of the items is the same either way).
        """
        if self._ref_ts is None:
            return 1.0
        now = user.ts if user is not None and user.ts is not None else self._max_ts
        return math.exp(max(-700.0, min(0.0, -self._rate * (now - self._ref_ts))))


__all__ = ["GlobalPopularity", "RecentPopularity", "TrendingPopularity"]
