"""An online re-ranker: logistic regression on "shown, then clicked or not".

The :class:`~online_models.recommender.Recommender` describes each candidate it ranks by
a few features (each source's normalised score and the item's rank in that source, its
position in the blend, its all-time popularity, whether and how recently the user saw it). When a list is published
(``record_shown``) the features of the shown items are kept; the user's next interaction
labels them: the item they went to is a positive, ``n_negatives`` other shown items,
drawn at random, are negatives. A logistic regression learns from those by SGD
(:class:`LogisticSGD`: River's ``LogisticRegression(optimizer=SGD(lr), l2=l2)`` update, on
plain floats); scoring a whole candidate list is then one dot product with the learned
weights, so the re-ranker costs microseconds per list.

Until it has learned from ``min_samples`` labelled items it scores nothing (``None``), so
a cold re-ranker cannot reorder the blend with noise.

>>> import numpy as np
>>> rr = ClickReranker(min_samples=10, seed=1)
>>> for _ in range(20):
...     rr.learn_shown({"a": {"covisit": 1.0}, "b": {"covisit": 0.0}, "c": {"covisit": 0.1}}, "a")
>>> p = rr.score(["covisit"], np.array([[1.0], [0.0]]))
>>> bool(p[0] > p[1])
True
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from operator import mul

import numpy as np

from online_models.base import ParamsMixin


class LogisticSGD:
    """Binary logistic regression learned one row at a time by plain SGD, with River's
    ``LogisticRegression(optimizer=SGD(learning_rate), l2=l2)`` update (log loss on the
    logit, intercept learned at ``intercept_lr``, gradient clipped at ``clip_gradient``,
    weights starting at 0):

        g = dloss/dlogit(y, w . x + b);  b -= intercept_lr * g;  w_j -= lr * (g * x_j + l2 * w_j)

    for each feature ``j`` of the row. River does the same through a dict and a Rust vector
    per row (about 10 µs); a row of 15 floats here takes 2-3 µs, and the re-ranker learns
    two or three rows per event. ``weights`` (feature name -> weight) and ``intercept`` are
    what :meth:`ClickReranker.score` and the ranker read.

    >>> m = LogisticSGD(learning_rate=0.5)
    >>> for _ in range(50):
    ...     m.learn_row(["a", "b"], [1.0, 0.0], True)
    ...     m.learn_row(["a", "b"], [0.0, 1.0], False)
    >>> m.weights["a"] > 0 > m.weights["b"]
    True
    """

    def __init__(self, learning_rate: float = 0.05, l2: float = 0.0, intercept_lr: float = 0.01,
                 clip_gradient: float = 1e12) -> None:
        self.learning_rate = learning_rate
        self.l2 = l2
        self.intercept_lr = intercept_lr
        self.clip_gradient = clip_gradient
        self.weights: dict[str, float] = {}
        self.intercept = 0.0

    def learn_row(self, names: Sequence[str], values: Sequence[float], clicked: bool) -> None:
        """One SGD step on the row ``values`` (features ``names``), labelled ``clicked``."""
        weights = self.weights
        get = weights.get
        w = [get(n, 0.0) for n in names]
        z = sum(map(mul, w, values)) + self.intercept
        if clicked:  # River's Log.gradient, y in {-1, 1}
            g = math.exp(-z) * -1.0 if z > 18.0 else (-1.0 if z < -18.0 else -1.0 / (math.exp(z) + 1.0))
        else:
            g = math.exp(z) if z < -18.0 else (1.0 if z > 18.0 else 1.0 / (math.exp(-z) + 1.0))
        g = min(max(g, -self.clip_gradient), self.clip_gradient)
        self.intercept -= self.intercept_lr * g
        lr, l2 = self.learning_rate, self.l2
        for name, wj, xj in zip(names, w, values, strict=True):
            weights[name] = wj - lr * (g * xj + l2 * wj)


class ClickReranker(ParamsMixin):
    """Learns P(next interaction is this shown item | its features)."""

    name = "reranker"

    def __init__(
        self,
        learning_rate: float = 0.05,
        l2: float = 1e-4,
        n_negatives: int = 2,
        min_samples: int = 200,
        seed: int = 0,
    ):
        self.learning_rate = learning_rate
        self.l2 = l2
        self.n_negatives = n_negatives
        self.min_samples = min_samples
        self.seed = seed
        self.model = LogisticSGD(learning_rate, l2)
        self._rng = random.Random(seed)
        self.n_learned = 0
        self.n_positives = 0

    def learn_one(self, features: Mapping[str, float], clicked: bool) -> None:
        """One labelled shown item."""
        self._learn(list(features), list(features.values()), bool(clicked))

    def _learn(self, names: Sequence[str], values: Sequence[float], clicked: bool) -> None:
        self.model.learn_row(names, values, clicked)
        self.n_learned += 1
        self.n_positives += clicked

    def learn_shown(self, shown: Mapping[str, Mapping[str, float]], next_item: str) -> None:
        """Learn from a published list (item -> features) and the item the user went to.

        The clicked item (if it was shown) is a positive; ``n_negatives`` of the others
        are negatives. A list the user ignored gives one negative, so the intercept learns
        how often lists are ignored without swamping the positives.
        """
        for item, clicked in _pick(self._rng, list(shown), next_item, self.n_negatives):
            self.learn_one(shown[item], clicked)

    def learn_rows(self, names: Sequence[str], items: Sequence[str], rows: np.ndarray, next_item: str) -> None:
        """:meth:`learn_shown` for a list kept compactly: ``rows[i]`` describes ``items[i]``."""
        if len(items) == 0:
            return
        items = list(items)
        width = min(len(names), rows.shape[1])
        names = list(names)[:width]
        index = {item: i for i, item in enumerate(items)}
        for item, clicked in _pick(self._rng, items, next_item, self.n_negatives):
            self._learn(names, rows[index[item], :width].tolist(), clicked)

    def __setstate__(self, state: dict) -> None:
        """A snapshot from before :class:`LogisticSGD` holds River's ``LogisticRegression``:
        its weights and intercept carry over (its settings are this re-ranker's)."""
        model = state.get("model")
        if model is not None and not isinstance(model, LogisticSGD):
            lr = LogisticSGD(state.get("learning_rate", 0.05), state.get("l2", 1e-4))
            lr.weights = {str(k): float(v) for k, v in dict(model.weights).items()}
            lr.intercept = float(model.intercept)
            state = {**state, "model": lr}
        self.__dict__.update(state)

    @property
    def ready(self) -> bool:
        return self.n_learned >= self.min_samples and self.n_positives > 0

    def score(self, names: Sequence[str], matrix: np.ndarray) -> np.ndarray | None:
        """P(click) for each row of ``matrix`` (columns named ``names``); None until ready."""
        if not self.ready:
            return None
        weights = self.model.weights
        w = np.array([weights.get(n, 0.0) for n in names])
        z = matrix @ w + self.model.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


def _pick(rng: random.Random, shown: list[str], next_item: str, n_negatives: int) -> list[tuple[str, bool]]:
    """The labelled items of a shown list: the clicked one and sampled negatives."""
    if not shown:
        return []
    others = [item for item in shown if item != next_item]
    if next_item in shown:
        return [(next_item, True), *((item, False) for item in rng.sample(others, min(n_negatives, len(others))))]
    return [(item, False) for item in rng.sample(others, min(1, len(others)))]


__all__ = ["ClickReranker"]
