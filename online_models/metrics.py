"""Next-item ranking metrics: HR@K, MRR@K, NDCG@K and catalogue coverage.

Each prediction is judged against exactly one target item (the next event), so:

- **HR@K** (hit rate) is 1 when the target is among the first K items, else 0;
- **MRR@K** is ``1 / rank`` of the target (rank 1 = first) when it is in the first K, else 0;
- **NDCG@K** is ``1 / log2(rank + 1)`` when the target is in the first K, else 0 (with one
  relevant item the ideal DCG is 1);
- **catalogue coverage@K** is the share of the catalogue (every item seen in the log so
  far) that appeared in at least one top-K list.

An item the model cannot rank is simply absent from its list, so it counts as a miss.

>>> ranked = ["a", "b", "c"]
>>> hit_rate(ranked, "b", k=2), reciprocal_rank(ranked, "b", k=2), round(ndcg(ranked, "b", k=2), 4)
(1.0, 0.5, 0.6309)
>>> hit_rate(ranked, "c", k=2), reciprocal_rank(ranked, "c", k=2), ndcg(ranked, "c", k=2)
(0.0, 0.0, 0.0)
>>> m = RankingMetrics(ks=(1, 2))
>>> [m.update(ranked, target) for ranked, target in [(["a", "b"], "a"), (["a", "b"], "b"), (["c"], "z")]]
[1, 2, None]
>>> m.summary()["HR@2"], round(m.summary()["MRR@2"], 4), m.n
(0.6667, 0.5, 3)
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from online_models.types import Interaction


def target_rank(ranked: Sequence[str], target: str, k: int) -> int | None:
    """1-based rank of ``target`` within the first ``k`` of ``ranked``, or None.

    >>> target_rank(["x", "y"], "y", 20), target_rank(["x", "y"], "y", 1)
    (2, None)
    """
    for i, item in enumerate(ranked[:k]):
        if item == target:
            return i + 1
    return None


def hit_rate(ranked: Sequence[str], target: str, k: int) -> float:
    """1.0 when ``target`` is in the first ``k`` of ``ranked``, else 0.0."""
    return 0.0 if target_rank(ranked, target, k) is None else 1.0


def reciprocal_rank(ranked: Sequence[str], target: str, k: int) -> float:
    """``1 / rank`` of ``target`` within the first ``k``, else 0.0.

    >>> reciprocal_rank(["a", "b", "c", "d"], "d", 20)
    0.25
    """
    r = target_rank(ranked, target, k)
    return 0.0 if r is None else 1.0 / r


def ndcg(ranked: Sequence[str], target: str, k: int) -> float:
    """``1 / log2(rank + 1)`` of ``target`` within the first ``k``, else 0.0.

    >>> ndcg(["a"], "a", 10)
    1.0
    """
    r = target_rank(ranked, target, k)
    return 0.0 if r is None else 1.0 / math.log2(r + 1)


def rank_summary(ranks: Iterable[int | None], ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """HR@K, MRR@K and NDCG@K (means) from each prediction's 1-based rank of its target
    (None or 0: not ranked at all), for rankers that compute ranks in bulk (the Transformer's
    training validation); the same figures as :func:`hit_rate`, :func:`reciprocal_rank` and
    :func:`ndcg` one list at a time.

    >>> {name: round(v, 4) for name, v in rank_summary([1, 4, None, 30], ks=(5,)).items()}
    {'HR@5': 0.5, 'MRR@5': 0.3125, 'NDCG@5': 0.3577}
    """
    r = np.array([0 if x is None else int(x) for x in ranks], dtype=np.int64)
    n = max(1, len(r))
    out: dict[str, float] = {}
    for k in ks:
        hit = (r >= 1) & (r <= k)
        rr = np.where(hit, 1.0 / np.maximum(r, 1), 0.0)
        gain = np.where(hit, 1.0 / np.log2(np.maximum(r, 1) + 1.0), 0.0)
        out[f"HR@{k}"] = float(hit.sum()) / n
        out[f"MRR@{k}"] = float(rr.sum()) / n
        out[f"NDCG@{k}"] = float(gain.sum()) / n
    return out


def catalogue_coverage(lists: Iterable[Sequence[str]], catalogue_size: int, k: int) -> float:
    """Share of a catalogue of ``catalogue_size`` items shown in at least one top-``k`` list.

    >>> catalogue_coverage([["a", "b"], ["b", "c"]], catalogue_size=10, k=1)
    0.2
    """
    if catalogue_size <= 0:
        return 0.0
    shown: set[str] = set()
    for ranked in lists:
        shown.update(ranked[:k])
    return len(shown) / catalogue_size


class RankingMetrics:
    """Running HR/MRR/NDCG at several K, and the items shown (for coverage).

    ``update`` takes one ranked list (best first) and the item that actually came next.
    ``summary`` rounds to 4 decimals; ``n`` is the number of predictions judged.
    """

    def __init__(self, ks: Sequence[int] = (10, 20)):
        if not ks or any(k < 1 for k in ks):
            raise ValueError(f"ks must be positive cut-offs, saw {ks!r}")
        self.ks = tuple(sorted(set(ks)))
        self.n = 0
        self.hits = {k: 0.0 for k in self.ks}
        self.rr = {k: 0.0 for k in self.ks}
        self.dcg = {k: 0.0 for k in self.ks}
        self.shown: dict[int, set[str]] = {k: set() for k in self.ks}

    def update(self, ranked: Sequence[str], target: str) -> int | None:
        """Judge one list; returns the target's 1-based rank within the largest K, or None."""
        kmax = self.ks[-1]
        r = target_rank(ranked, target, kmax)
        self.n += 1
        for k in self.ks:
            self.shown[k].update(ranked[:k])
            if r is not None and r <= k:
                self.hits[k] += 1.0
                self.rr[k] += 1.0 / r
                self.dcg[k] += 1.0 / math.log2(r + 1)
        return r

    def value(self, metric: str, k: int) -> float:
        """The mean of ``metric`` (``HR``, ``MRR`` or ``NDCG``) at cut-off ``k``."""
        table = {"HR": self.hits, "MRR": self.rr, "NDCG": self.dcg}[metric]
        return table[k] / self.n if self.n else 0.0

    def coverage(self, catalogue_size: int, k: int) -> float:
        return len(self.shown[k]) / catalogue_size if catalogue_size > 0 else 0.0

    def summary(self, catalogue_size: int | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        for k in self.ks:
            for metric in ("HR", "MRR", "NDCG"):
                out[f"{metric}@{k}"] = round(self.value(metric, k), 4)
            if catalogue_size is not None:
                out[f"coverage@{k}"] = round(self.coverage(catalogue_size, k), 4)
        return out


#: HR@K by the user's history length before the event: (label, fewest events, most events)
HISTORY_BUCKETS = (("1-2", 1, 2), ("3-10", 3, 10), (">10", 11, None))


@dataclass
class Judge:
    """What one contender's judged lists add up to."""

    ks: tuple[int, ...]
    metrics: RankingMetrics = field(init=False)
    by_history: dict[str, RankingMetrics] = field(init=False)
    saved: RankingMetrics = field(init=False)
    shown: Counter = field(default_factory=Counter)  # item -> times in a judged top-kmax
    diversity_sum: float = 0.0
    diversity_n: int = 0
    curve: list[tuple[int, float, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = RankingMetrics(self.ks)
        self.by_history = {label: RankingMetrics(self.ks) for label, _, _ in HISTORY_BUCKETS}
        self.saved = RankingMetrics(self.ks)

    def add(self, shown: list[str], target: str, history: int, categories: Mapping[str, str],
            saved_pair: bool = False) -> None:
        kmax = self.ks[-1]
        top = shown[:kmax]
        self.metrics.update(top, target)
        for label, low, high in HISTORY_BUCKETS:
            if history >= low and (high is None or history <= high):
                self.by_history[label].update(top, target)
        if saved_pair:
            self.saved.update(top, target)
        self.shown.update(top)
        cats = [c for c in map(categories.get, top) if c is not None]
        if len(cats) >= 2:
            pairs = len(cats) * (len(cats) - 1) // 2
            same = sum(n * (n - 1) // 2 for n in Counter(cats).values())
            self.diversity_sum += (pairs - same) / pairs
            self.diversity_n += 1

    def point(self, x: int) -> None:
        kmax = self.ks[-1]
        self.curve.append((x, self.metrics.value("HR", kmax), self.metrics.value("MRR", kmax)))

    def summary(self, catalogue: int, popularity_rank: Mapping[str, int], step_s: Sequence[float] = ()
                ) -> dict[str, Any]:
        kmax = self.ks[-1]
        out: dict[str, Any] = {"predictions": self.metrics.n, **self.metrics.summary(catalogue)}
        out["diversity"] = round(self.diversity_sum / self.diversity_n, 4) if self.diversity_n else None
        total = sum(self.shown.values())
        worst = len(popularity_rank) + 1  # an item never seen in the log ranks last
        out["novelty"] = (round(sum(n * popularity_rank.get(i, worst) for i, n in self.shown.items()) / total, 1)
                          if total else None)
        out["history"] = {label: {"predictions": m.n, f"HR@{kmax}": round(m.value("HR", kmax), 4)}
                          for label, m in self.by_history.items()}
        out["latency_ms"] = latency_summary(step_s)
        return out


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by the nearest-rank rule (a value that was
    measured, never an interpolation); NaN when there are none.

    >>> percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50), percentile(range(1, 101), 99), percentile([], 50)
    (3.0, 100, nan)
    """
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def latency_summary(step_s: Sequence[float]) -> dict[str, float]:
    """p50/p99 (ms) of one step call (one batch)."""
    if not step_s:
        return {}
    return {"step_p50": round(1000 * percentile(step_s, 50), 4), "step_p99": round(1000 * percentile(step_s, 99), 4)}


def popularity_ranks(events: Iterable[Interaction]) -> dict[str, int]:
    """Item -> its rank by number of events (1 = the most popular)."""
    counts = Counter(x.item_id for x in events)
    return {item: r for r, (item, _) in enumerate(counts.most_common(), start=1)}


__all__ = ["HISTORY_BUCKETS", "Judge", "RankingMetrics", "catalogue_coverage", "hit_rate", "latency_summary", "ndcg", "percentile",
           "popularity_ranks", "rank_summary", "reciprocal_rank", "target_rank"]
