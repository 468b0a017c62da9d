"""Sequential rules: the followers of a session's newest items, counted online.

For every ordered pair of items at most ``steps`` apart in a session
:class:`SequentialRules` adds ``1 / distance``; it proposes the followers of the newest
item. Part of :class:`~online_models.session_knn.SessionHybrid`, and a learner of its own.

>>> from online_models.types import Interaction, UserContext
>>> rules = SequentialRules()
>>> for t, item in enumerate("abcab"):
...     rules.learn_one(Interaction("u1", item, ts=t, session_id="s1"))
>>> [s.item_id for s in rules.rank(UserContext("u2", recent_items=("a",)), k=3)]
['b', 'c']
"""

from __future__ import annotations

import heapq
from typing import ClassVar

from online_models.base import Recency
from online_models.session_index import _SessionLearner
from online_models.types import Interaction, UserContext


class SequentialRules(_SessionLearner):
    """Sequential rules: ``rule[a][b] += 1 / distance`` when b follows a within ``steps``.

    Proposes the followers of the session's newest item (and, with ``history`` > 1, of
    the items before it, weighted ``1 / (steps back + 1)``). ``bidirectional`` also counts
    the pair backwards (association rules rather than sequential ones).
    """

    name: ClassVar[str] = "sequential_rules"

    def __init__(
        self,
        steps: int = 10,
        history: int = 1,
        bidirectional: bool = False,
        max_rules_per_item: int = 500,
        max_sessions: int = 200_000,
        max_session_len: int = 50,
        max_sessions_per_item: int = 1_000,
        session_gap_ms: int = 30 * 60 * 1000,
        max_items: int = 200_000,
        seed: int = 0,
    ):
        self.steps = steps
        self.history = history
        self.bidirectional = bidirectional
        self.max_rules_per_item = max_rules_per_item
        self._new_index(max_sessions, max_session_len, max_sessions_per_item, session_gap_ms)
        self.max_items = max_items
        self.seed = seed
        self.rules: dict[str, dict[str, float]] = {}
        self._seen = Recency(max_items)  # the rules of at most max_items items, the least recently seen go
        self.n_learned = 0

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        for gone in self._seen.touch(x.item_id):
            self.rules.pop(gone, None)
        _, items = self.index.add(x)
        self._learn_rules(items)
        self.n_learned += 1

    def _learn_rules(self, items: list[str]) -> None:
        new = items[-1]
        last = len(items) - 1
        for dist in range(1, min(self.steps, last) + 1):
            before = items[last - dist]
            if before == new:
                continue
            self._strengthen(before, new, 1.0 / dist)
            if self.bidirectional:
                self._strengthen(new, before, 1.0 / dist)

    def _strengthen(self, item: str, follower: str, w: float) -> None:
        """``rule[item][follower] += w``, pruning ``item``'s followers past the cap."""
        followers = self.rules.get(item)
        if followers is None:
            followers = self.rules[item] = {}
        followers[follower] = followers.get(follower, 0.0) + w
        if len(followers) > self.max_rules_per_item:
            self._prune(item)

    def _prune(self, item: str) -> None:
        """Keep the stronger half of ``item``'s followers."""
        keep = heapq.nlargest(self.max_rules_per_item // 2, self.rules[item].items(), key=lambda kv: kv[1])
        self.rules[item] = dict(keep)

    def score_all(self, user: UserContext) -> dict[str, float]:
        scores: dict[str, float] = {}
        recent = user.recent_items
        for back in range(min(self.history, len(recent))):
            followers = self.rules.get(recent[-1 - back])
            if not followers:
                continue
            w = 1.0 / (back + 1)
            for item, s in followers.items():
                scores[item] = scores.get(item, 0.0) + w * s
        return scores


__all__ = ["SequentialRules"]
