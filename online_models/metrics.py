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
from collections.abc import Iterable, Sequence


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


__all__ = ["RankingMetrics", "catalogue_coverage", "hit_rate", "ndcg", "reciprocal_rank", "target_rank"]
