"""The pure core the Faust worker, the evaluator and the benchmarks all call.

:class:`Recommender` feeds every event to a set of :class:`OnlineLearner` s, merges their
proposals into candidates, and blends their scores (plus any extra source, such as the
GPU Transformer's) into a top-K:

1. **Candidates**: each source with a non-zero weight proposes ``n`` items; the lists are
   interleaved round-robin (sources by decreasing weight) without duplicates until
   ``n_candidates``. Purchased items are dropped when ``exclude_purchased``; nothing else is.
2. **Blend**: each source scores every candidate; scores are min-max normalised per source
   over the candidate list (so scales do not matter, only weights), an extra source's
   missing items count as its minimum; ``blend = sum(weight * normalised)``.
3. **Re-ranker** (``ClickReranker``): once it has learned enough from "shown, then
   clicked", ``reranker_weight * P(click)`` is added.
4. **Rules**: purchased items out; at most ``max_per_category`` items per category
   (categories are learned from ``Interaction.category_id``; unknown ones are uncapped).

The result is the best ``k`` first, no duplicates; ``reason`` is the source that
contributed most to the item's blended score.

Not thread-safe: one instance per worker process, called from one task (Faust agents of a
worker share one event loop thread, so that holds there).

>>> from online_models.datasets import synthetic_interactions
>>> rec = Recommender.default(RecommenderConfig(k=5))
>>> for x in synthetic_interactions(n_events=2000, seed=3):
...     rec.learn_one(x)
>>> user = UserContext("u1", recent_items=("i3", "i7"), purchased=frozenset({"i1"}))
>>> top = rec.recommend(user)
>>> len(top), "i1" in {s.item_id for s in top}
(5, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, zip_longest
from typing import Self

import numpy as np

from online_models.base import OnlineLearner, dump_snapshot, load_snapshot
from online_models.covisit import CoVisitation
from online_models.mf import ImplicitMF
from online_models.popularity import TrendingPopularity
from online_models.reminder import RecentlyViewed
from online_models.reranker import ClickReranker
from online_models.types import Interaction, ScoredItem, UserContext

_RECENCY_SPAN = 20  # recent items that get a recency feature
_PENDING_RANKED = 1024  # ranked lists kept until record_shown


def _default_weights() -> dict[str, float]:
    return {"covisit": 1.0, "reminder": 1.0, "trending": 0.3, "mf": 0.2, "transformer": 1.0}


@dataclass
class RecommenderConfig:
    """Tunables of the blend; a model never reads settings itself."""

    k: int = 20
    n_candidates: int = 200
    #: per source (learner name, or an ``extra_scores`` key such as ``"transformer"``); 0 = off
    weights: dict[str, float] = field(default_factory=_default_weights)
    max_per_category: int | None = None
    exclude_purchased: bool = True
    #: weight of the re-ranker's P(click); 0 turns it off (it still learns). Once trained the
    #: re-ranker knows better than fixed weights (YooChoose, all test sessions: HR@20 0.665 ->
    #: 0.695, MRR@20 0.341 -> 0.375 at 10; Taobao unchanged), so it leads and the blend breaks ties.
    reranker_weight: float = 10.0
    reranker_min_samples: int = 200
    #: users whose published list (k rows of ~15 float32 features, ~1.5 kB) waits for their
    #: next event to label it for the re-ranker; the least recently shown are dropped
    max_tracked_users: int = 20_000


class Recommender:
    """Learners + candidate merge + blend + re-ranker + business rules."""

    def __init__(
        self,
        learners: Mapping[str, OnlineLearner] | None = None,
        config: RecommenderConfig | None = None,
        seed: int = 0,
    ):
        self.config = config if config is not None else RecommenderConfig()
        self.seed = seed
        self.learners: dict[str, OnlineLearner] = dict(learners) if learners is not None else {}
        self.reranker = ClickReranker(min_samples=self.config.reranker_min_samples, seed=seed)
        self.n_learned = 0
        self._categories: dict[str, str] = {}
        self._counts: dict[str, float] = {}  # events per item: the re-ranker's popularity feature
        # user -> (feature names, ranked items, their feature rows): the last rank() per user,
        # waiting for record_shown (called right after rank, so a few entries suffice)
        self._ranked: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
        # user -> the same for the published list, waiting for the user's next event
        self._shown: dict[str, tuple[list[str], list[str], np.ndarray]] = {}

    @classmethod
    def default(cls, config: RecommenderConfig | None = None, seed: int = 0) -> Self:
        """The standard blend: co-visitation, re-consumption, trending popularity, implicit MF."""
        learners: dict[str, OnlineLearner] = {
            "covisit": CoVisitation(seed=seed),
            "reminder": RecentlyViewed(seed=seed),
            "trending": TrendingPopularity(seed=seed),
            "mf": ImplicitMF(seed=seed),
        }
        return cls(learners, config, seed)

    # -- learning ---------------------------------------------------------------------
    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        """Feed ``x`` to every learner, and label the user's last shown list for the re-ranker."""
        shown = self._shown.pop(x.user_id, None)
        if shown is not None:
            self.reranker.learn_rows(*shown, x.item_id)
        if x.category_id is not None:
            self._categories[x.item_id] = x.category_id
        self._counts[x.item_id] = self._counts.get(x.item_id, 0.0) + 1.0
        for learner in self.learners.values():
            learner.learn_one(x, user)
        self.n_learned += 1

    def learn_many(self, xs: Iterable[tuple[Interaction, UserContext | None]]) -> None:
        """:meth:`learn_one` for each ``(event, context before it)``, in order."""
        for x, user in xs:
            self.learn_one(x, user)

    def record_shown(self, user_id: str, items: Sequence[ScoredItem]) -> None:
        """Remember what was published to ``user_id`` (from the last :meth:`rank` for them)."""
        ranked = self._ranked.pop(user_id, None)
        if ranked is None:
            return
        names, ranked_items, matrix = ranked
        row_of = {item: r for r, item in enumerate(ranked_items)}
        rows = [(s.item_id, row_of[s.item_id]) for s in items if s.item_id in row_of]
        if rows:
            shown_items = [item for item, _ in rows]
            _bounded_put(self._shown, user_id, (names, shown_items, matrix[[r for _, r in rows]]),
                         self.config.max_tracked_users)

    # -- candidates -------------------------------------------------------------------
    def _sources(self) -> list[tuple[str, OnlineLearner]]:
        w = self.config.weights
        active = [(n, lr) for n, lr in self.learners.items() if w.get(n, 0.0) > 0.0]
        return sorted(active, key=lambda nl: -w[nl[0]])

    def candidates(self, user: UserContext, n: int | None = None) -> list[str]:
        """Merged proposals of the sources (round-robin), minus purchased if configured."""
        n = self.config.n_candidates if n is None else n
        if n <= 0:
            return []
        lists = []
        for _, learner in self._sources():
            if type(learner).propose_scores is not OnlineLearner.propose_scores:
                lists.append([item for item, _ in learner.propose_scores(user, n)])
            else:  # a learner that only overrides rank()
                lists.append([s.item_id for s in learner.rank(user, None, n)])
        merged = dict.fromkeys(chain.from_iterable(zip_longest(*lists)))  # round-robin, first wins
        merged.pop(None, None)
        purchased = user.purchased if self.config.exclude_purchased else ()
        if purchased:
            return [item for item in merged if item not in purchased][:n]
        return list(merged)[:n]

    # -- ranking ----------------------------------------------------------------------
    def rank(
        self,
        user: UserContext,
        candidates: Sequence[str],
        k: int | None = None,
        extra_scores: Mapping[str, Mapping[str, float]] | None = None,
    ) -> list[ScoredItem]:
        """Blend, re-rank and filter ``candidates``; the best ``k`` first."""
        cfg = self.config
        k = cfg.k if k is None else k
        purchased = user.purchased if cfg.exclude_purchased else frozenset()
        items = [c for c in dict.fromkeys(candidates) if c not in purchased]
        if k <= 0 or not items:
            return []
        names, cols = [], []
        for name, learner in self.learners.items():
            if cfg.weights.get(name, 0.0) != 0.0:
                names.append(name)
                cols.append(_normalise_finite(np.array(learner.score_many(user, items), dtype=float)))
        for name, scores in (extra_scores or {}).items():
            if cfg.weights.get(name, 0.0) != 0.0 and name not in self.learners:
                raw = np.array([scores.get(i, np.nan) for i in items], dtype=float)
                names.append(name)
                cols.append(_normalise(raw))
        n = len(items)
        if cols:
            scores_matrix = np.stack(cols, axis=1)
            contrib = scores_matrix * np.array([cfg.weights[nm] for nm in names])
            blend = contrib.sum(axis=1)
            dominant = contrib.argmax(axis=1)
        else:
            scores_matrix = np.zeros((n, 0))
            blend, dominant = np.zeros(n), np.zeros(n, dtype=np.int64)
        order = np.lexsort((np.arange(n), -blend))
        features, feature_names = self._features(user, items, scores_matrix, names, order)
        final = blend
        if cfg.reranker_weight:
            p = self.reranker.score(feature_names, features)
            if p is not None:
                final = blend + cfg.reranker_weight * p
                order = np.lexsort((np.arange(n), -final))
        picked = self._diversify(items, order, k)
        _bounded_put(self._ranked, user.user_id,
                     (feature_names, [items[i] for i in picked], features[picked].astype(np.float32)),
                     _PENDING_RANKED)
        return [
            ScoredItem(items[i], float(final[i]), names[dominant[i]] if names and contrib[i, dominant[i]] > 0 else None)
            for i in picked
        ]

    def _features(self, user: UserContext, items: list[str], scores: np.ndarray, names: list[str],
                  order: np.ndarray) -> tuple[np.ndarray, list[str]]:
        n = len(items)
        position = np.empty(n)
        position[order] = np.arange(n)
        recency = np.zeros(n)  # 1 / steps back for the user's recent items (newest: 1)
        for back, item in enumerate(reversed(user.recent_items[-_RECENCY_SPAN:]), start=1):
            try:
                i = items.index(item)  # a C scan: cheaper than a dict over all candidates
            except ValueError:
                continue
            if recency[i] == 0.0:
                recency[i] = 1.0 / back
        # 1 / (1 + the item's rank in each source), 0 where the source gave it nothing
        rank_in_source = np.empty_like(scores)
        np.put_along_axis(rank_in_source, np.argsort(-scores, axis=0, kind="stable"),
                          np.arange(n, dtype=float)[:, None], axis=0)
        source_rank = np.where(scores > 0.0, 1.0 / (1.0 + rank_in_source), 0.0)
        get = self._counts.get  # all-time count, squashed to [0, 1)
        popularity = np.log1p(np.array([get(i, 0.0) for i in items], dtype=float))
        extra = np.stack([1.0 / (1.0 + position), popularity / (1.0 + popularity), recency], axis=1)
        return (np.hstack([scores, source_rank, extra]),
                [*names, *(f"{nm}_rank" for nm in names), "blend_position", "popularity", "recency"])

    def _diversify(self, items: list[str], order: np.ndarray, k: int) -> list[int]:
        cap = self.config.max_per_category
        if cap is None:
            return order[:k].tolist()
        picked: list[int] = []
        per_category: dict[str, int] = {}
        categories = self._categories
        for i in order.tolist():
            cat = categories.get(items[i])
            if cat is not None:
                seen = per_category.get(cat, 0)
                if seen >= cap:
                    continue
                per_category[cat] = seen + 1
            picked.append(i)
            if len(picked) >= k:
                break
        return picked

    def recommend(self, user: UserContext, k: int | None = None) -> list[ScoredItem]:
        """:meth:`candidates` then :meth:`rank`, without extra scores."""
        return self.rank(user, self.candidates(user), k)

    # -- state ------------------------------------------------------------------------
    def category(self, item_id: str) -> str | None:
        return self._categories.get(item_id)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # lists awaiting a label are transient: not snapshotted
        state["_ranked"], state["_shown"] = {}, {}
        return state

    def snapshot(self) -> bytes:
        """Every learner, the re-ranker and the blend's own state, as versioned bytes.

        Lists waiting for the user's next event (re-ranker labels) are not included: after a
        restore the re-ranker misses one label per such user; predictions are unaffected.
        """
        params = {"config": asdict(self.config), "seed": self.seed, "learners": sorted(self.learners)}
        return dump_snapshot(self, params, self)

    @classmethod
    def restore(cls, data: bytes) -> Self:
        return load_snapshot(data, cls)[1]

    @property
    def versions(self) -> dict[str, str]:
        out = {name: learner.version for name, learner in self.learners.items()}
        out["reranker"] = self.reranker.version
        return out


def _normalise_finite(scores: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the list (no NaN); a constant column is 0."""
    lo, hi = scores.min(), scores.max()
    if hi <= lo:
        return np.zeros_like(scores)
    scores -= lo
    scores /= hi - lo
    return scores


def _normalise(scores: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] over the list; NaN (no score) becomes 0; a constant column is 0."""
    finite = np.isfinite(scores)
    if not finite.any():
        return np.zeros_like(scores)
    lo, hi = scores[finite].min(), scores[finite].max()
    if hi <= lo:
        return np.zeros_like(scores)
    return np.where(finite, (scores - lo) / (hi - lo), 0.0)


def _bounded_put(store: dict, key: str, value: object, limit: int) -> None:
    store.pop(key, None)
    store[key] = value
    if len(store) > limit:
        del store[next(iter(store))]


__all__ = ["Recommender", "RecommenderConfig"]
