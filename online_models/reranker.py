"""An online re-ranker: River logistic regression on "shown, then clicked or not".

The :class:`~online_models.recommender.Recommender` describes each candidate it ranks by
a few features (each source's normalised score and the item's rank in that source, its
position in the blend, its all-time popularity, whether and how recently the user saw it). When a list is published
(``record_shown``) the features of the shown items are kept; the user's next interaction
labels them: the item they went to is a positive, ``n_negatives`` other shown items,
drawn at random, are negatives. River's ``LogisticRegression`` learns from those; scoring
a whole candidate list is then one dot product with the learned weights (no per-item
River call), so the re-ranker costs microseconds per list.

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

import random
from collections.abc import Mapping, Sequence

import numpy as np
from river import linear_model, optim

from online_models.base import ParamsMixin


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
        self.model = linear_model.LogisticRegression(optimizer=optim.SGD(learning_rate), l2=l2)
        self._rng = random.Random(seed)
        self.n_learned = 0
        self.n_positives = 0

    def learn_one(self, features: Mapping[str, float], clicked: bool) -> None:
        """One labelled shown item."""
        self.model.learn_one(dict(features), bool(clicked))
        self.n_learned += 1
        self.n_positives += bool(clicked)

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
        names = list(names)
        labelled = _pick(self._rng, list(items), next_item, self.n_negatives)
        index = {item: i for i, item in enumerate(items)}
        for item, clicked in labelled:
            self.learn_one(dict(zip(names, rows[index[item]].tolist(), strict=False)), clicked)

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
