"""The numeric core of :meth:`Recommender.rank_many <online_models.recommender.Recommender.rank_many>`.

Many users' candidate lists are ranked at once: their rows are concatenated, user ``s``
owning rows ``starts[s] : starts[s] + lengths[s]`` (a *segment*). Each step of the blend is
then a handful of numpy calls over all rows instead of dozens of small-array calls per user:
min-max normalisation per segment with ``np.minimum.reduceat`` / ``np.maximum.reduceat``,
and orderings by sorting a ``(users, longest list)`` matrix row by row (stable, so ties keep
the candidate order; padding sorts last), which is much cheaper than one ``np.lexsort`` over
all rows.

Every value of a row depends only on its own row and on its segment's minimum, maximum and
ordering, and is computed elementwise (the re-ranker's dot product too, column by column
rather than by a BLAS ``gemv`` whose rounding depends on where a row sits in the matrix), so
a user ranks bit for bit the same alone or in any batch.

Around that core, what is done user by user over the same rows: an extra source's column
(:func:`extra_column`), the re-ranker's recency feature (:func:`recency`) and the
per-category cap that replaces :meth:`Segments.top` when one is set (:func:`diversify`).

>>> seg = Segments([2, 3])
>>> normalise(np.array([1.0, 3.0, 5.0, 5.0, 7.0]), seg, finite=True).tolist()
[0.0, 1.0, 0.0, 0.0, 1.0]
>>> seg.local_ranks(np.array([1.0, 3.0, 5.0, 5.0, 7.0])).tolist()  # 0 = highest in its segment
[1.0, 0.0, 1.0, 2.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RECENCY_SPAN = 20  # a user's recent items that get a recency feature
_ZERO = np.zeros(1, dtype=np.intp)
_ZERO.flags.writeable = False


class Segments:
    """Row bookkeeping for users' concatenated candidate lists (every list non-empty)."""

    def __init__(self, lengths: Sequence[int]):
        self.lengths = np.array(lengths, dtype=np.intp)
        n_seg = len(lengths)
        self.single = n_seg == 1  # one user (rank): cheaper numpy calls, same results
        self.n = sum(lengths)
        self.width = max(lengths, default=0)
        self._positions = np.arange(self.width, dtype=float)
        if self.single:
            self.starts = _ZERO
            return
        self.starts = np.zeros(n_seg, dtype=np.intp)
        np.cumsum(self.lengths[:-1], out=self.starts[1:])
        self.seg = np.repeat(np.arange(n_seg, dtype=np.intp), self.lengths)
        local = np.arange(self.n, dtype=np.intp) - self.starts[self.seg]  # row within its segment
        self.cell = self.seg * self.width + local  # the row's cell in a (segments, width) matrix
        self._rows = np.arange(n_seg)[:, None]

    def expand(self, per_segment: np.ndarray) -> np.ndarray:
        """A per-segment value for each row (one segment: the value, which broadcasts)."""
        return per_segment if self.single else per_segment[self.seg]

    def order(self, values: np.ndarray) -> np.ndarray:
        """``(segments, width)``: each segment's local row indices, highest value first.

        Ties keep the row order (stable sort), NaN comes last, then the padding (indices
        ``>= lengths[s]``): what ``np.argsort(-values_of_s, kind="stable")`` gives per segment.
        """
        if self.single:
            return np.argsort(np.negative(values), kind="stable")[None, :]
        keys = np.full((len(self.lengths), self.width), np.nan)
        keys.flat[self.cell] = np.negative(values)
        return np.argsort(keys, axis=1, kind="stable")

    def local_ranks(self, values: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
        """Each row's position (0 = first, as float) in its segment's :meth:`order`; for a
        ``(columns, rows)`` matrix, per column."""
        if values.ndim == 2:
            return self._column_ranks(values)
        if order is None:
            order = self.order(values)
        if self.single:
            ranks = np.empty(self.n)
            ranks[order[0]] = self._positions
            return ranks
        ranks = np.empty(order.shape)
        ranks[self._rows, order] = self._positions
        return ranks.flat[self.cell]

    def _column_ranks(self, matrix: np.ndarray) -> np.ndarray:
        m = matrix.shape[0]
        cols = np.arange(m)[:, None]
        if self.single:  # (columns, rows): one sort of all columns
            ranks = np.empty(matrix.shape)
            ranks[cols, np.argsort(np.negative(matrix), axis=1, kind="stable")] = self._positions
            return ranks
        keys = np.full((m, len(self.lengths) * self.width), np.nan)
        keys[:, self.cell] = np.negative(matrix)
        order = np.argsort(keys.reshape(m, len(self.lengths), self.width), axis=2, kind="stable")
        ranks = np.empty(order.shape)
        ranks[cols[:, :, None], self._rows[None, :, :], order] = self._positions
        return ranks.reshape(m, -1)[:, self.cell]

    def top(self, order: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``k`` rows of each segment's ``order`` (global row indices, segment by
        segment) and how many each segment gave."""
        if self.single:
            return order[0, :k], np.minimum(self.lengths, k)
        head = order[:, :k]
        counts = np.minimum(self.lengths, k)
        keep = np.arange(head.shape[1])[None, :] < counts[:, None]
        return (head + self.starts[:, None])[keep], counts


def normalise(x: np.ndarray, seg: Segments, finite: bool) -> np.ndarray:
    """Min-max to [0, 1] within each segment; a constant segment is 0.

    ``finite=True`` (learners' scores) takes the values as they are, once one vectorised check
    found them all finite; ``finite=False`` (extra sources, or learners' scores that are not
    all finite) ignores non-finite values for the range and maps them to 0 (no score). An
    infinity or NaN never reaches the blend.
    """
    if finite and not np.isfinite(x).all():
        finite = False
    if seg.single:
        return _normalise_one(x, finite)
    if finite:
        lo = np.minimum.reduceat(x, seg.starts)
        hi = np.maximum.reduceat(x, seg.starts)
        flat = hi <= lo  # NaN anywhere: not flat, the NaN propagates as for one list
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            out = (x - seg.expand(lo)) / seg.expand(hi - lo)
        if flat.any():
            out[np.broadcast_to(seg.expand(flat), out.shape)] = 0.0
        return _finite(out)
    ok = np.isfinite(x)
    lo = np.minimum.reduceat(np.where(ok, x, np.inf), seg.starts)
    hi = np.maximum.reduceat(np.where(ok, x, -np.inf), seg.starts)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = (x - seg.expand(lo)) / seg.expand(hi - lo)
    return _finite(np.where(ok & seg.expand(hi > lo), out, 0.0))


def _finite(out: np.ndarray) -> np.ndarray:
    """``out`` with 0 where a range too wide for a float (``hi - lo`` overflowing) left no number."""
    if np.isfinite(out).all():
        return out
    return np.where(np.isfinite(out), out, 0.0)


def _normalise_one(x: np.ndarray, finite: bool) -> np.ndarray:
    """:func:`normalise` of one segment (the same arithmetic, scalar bounds)."""
    ok = None if finite else np.isfinite(x)
    if ok is None or ok.all():
        lo, hi = x.min(), x.max()
        ok = None
    elif not ok.any():
        return np.zeros_like(x)
    else:
        lo, hi = x[ok].min(), x[ok].max()
    if hi <= lo:
        return np.zeros_like(x)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        out = (x - lo) / (hi - lo)
    return _finite(out if ok is None else np.where(ok, out, 0.0))


def blend(normalised: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(blend, dominant source, credited)`` of a ``(sources, rows)`` matrix.

    The sum is ``c0 + (c1 + c2 + ...)``, the order numpy's ``contrib.sum(axis=1)`` adds a
    row's few contributions in; ``credited`` says the dominant contribution is positive.
    """
    m, n = normalised.shape
    if m == 0:
        return np.zeros(n), np.zeros(n, dtype=np.intp), np.zeros(n, dtype=bool)
    contrib = normalised * weights[:, None]
    total = contrib[0].copy()
    if m > 1:
        rest = contrib[1].copy()
        for j in range(2, m):
            rest += contrib[j]
        total += rest
    return total, contrib.argmax(axis=0), contrib.max(axis=0) > 0.0


def features(normalised: np.ndarray, seg: Segments, blend_rank: np.ndarray, recency: np.ndarray,
             counts: np.ndarray) -> np.ndarray:
    """The re-ranker's features, ``(2 * sources + 3, rows)``: each source's normalised score,
    ``1 / (1 + rank in the source)`` (0 where it gave nothing), ``1 / (1 + blend position)``,
    squashed all-time popularity, recency."""
    m = normalised.shape[0]
    out = np.empty((2 * m + 3, seg.n))
    out[:m] = normalised
    if m:
        source_rank = out[m: 2 * m]
        np.divide(1.0, 1.0 + seg.local_ranks(normalised), out=source_rank)
        source_rank[~(normalised > 0.0)] = 0.0
    np.divide(1.0, 1.0 + blend_rank, out=out[2 * m])
    popularity = np.log1p(counts)
    np.divide(popularity, 1.0 + popularity, out=out[2 * m + 1])
    out[2 * m + 2] = recency
    return out


def extra_column(scores: Mapping[str, float] | Sequence[float], candidates: Sequence[str],
                 items: list[str]) -> Sequence[float]:
    """An extra source's raw scores of ``items`` (NaN: none), from a dict or from scores
    aligned with ``candidates``."""
    if isinstance(scores, Mapping):
        get = scores.get
        return [get(i, np.nan) for i in items]
    values = np.asarray(scores, dtype=float)
    if values.shape != (len(candidates),):
        raise ValueError(f"extra scores of shape {values.shape} for {len(candidates)} candidates")
    if len(items) == len(candidates):  # no repeats, nothing dropped: aligned with items already
        return values
    at = {c: j for j, c in enumerate(candidates)}  # the last of repeats, as dict(zip()) keeps
    return values[[at[i] for i in items]]


def recency(recent_items: Sequence[Sequence[str]], items: Sequence[list[str]], seg: Segments) -> np.ndarray:
    """1 / steps back for each user's recent items (its last ``RECENCY_SPAN``) among their
    candidates ``items`` (newest: 1; 0 for the others)."""
    out = np.zeros(seg.n)
    rows: dict[int, float] = {}
    for recent, candidates, start in zip(recent_items, items, seg.starts.tolist(), strict=True):
        tail = recent[-RECENCY_SPAN:]
        among = set(tail).intersection(candidates)  # most recent items are not candidates: no scan for those
        if not among:
            continue
        for back, item in enumerate(reversed(tail), start=1):
            if item in among:
                rows.setdefault(start + candidates.index(item), 1.0 / back)  # a C scan, for the few
    if rows:
        out[list(rows)] = list(rows.values())
    return out


def diversify(items: Sequence[list[str]], categories: Mapping[str, str], cap: int, order: np.ndarray,
              seg: Segments, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`Segments.top` with at most ``cap`` items per category (an item of no known
    category is uncapped): each user's first ``k`` allowed rows of ``order``, and how many."""
    picked: list[int] = []
    counts = []
    for candidates, row, start in zip(items, order.tolist(), seg.starts.tolist(), strict=True):
        n = 0
        per_category: dict[str, int] = {}
        for i in row[: len(candidates)]:
            cat = categories.get(candidates[i])
            if cat is not None:
                seen = per_category.get(cat, 0)
                if seen >= cap:
                    continue
                per_category[cat] = seen + 1
            picked.append(start + i)
            n += 1
            if n >= k:
                break
        counts.append(n)
    return np.array(picked, dtype=np.intp), np.array(counts, dtype=np.intp)


def click_probability(feats: np.ndarray, weights: Sequence[float], intercept: float) -> np.ndarray:
    """``sigmoid(weights . row + intercept)`` for each column of ``feats``, as
    :meth:`ClickReranker.score <online_models.reranker.ClickReranker.score>` computes it (up
    to rounding), one feature at a time so that a row's value does not depend on the batch."""
    terms = feats * np.asarray(weights, dtype=float)[:, None]
    # summed strictly in feature order, so a row's sum never depends on the batch; both ways
    # below add the same numbers in the same order (accumulate: one call, slow on many rows)
    if terms.shape[1] <= 512:
        z = np.add.accumulate(terms, axis=0)[-1]
    else:
        z = terms[0].copy()
        for j in range(1, len(terms)):
            z += terms[j]
    z += intercept
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


__all__ = ["RECENCY_SPAN", "Segments", "blend", "click_probability", "diversify", "extra_column", "features",
           "normalise", "recency"]
