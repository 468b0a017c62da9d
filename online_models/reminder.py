"""Re-consumption: propose what the user has just been looking at.

On shop logs a large share of next events return to an item seen minutes ago (view, then
cart, favourite, buy; or comparing a few items back and forth). This source scores each of
the user's last ``n_recent`` items by ``sum(recency_decay ** steps_back)`` over its
occurrences, so an item seen often and lately comes first. The blend removes purchased
items; this source removes nothing.

The user's items come from ``UserContext.recent_items`` (the stream keeps them); when a
context carries none, the learner's own bounded per-user history is used
(``max_users`` users, the least recently active forgotten).

>>> from online_models.types import Interaction, UserContext
>>> rv = RecentlyViewed()
>>> [s.item_id for s in rv.rank(UserContext("u", recent_items=("a", "b", "a", "c")))]
['a', 'c', 'b']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from operator import itemgetter

from online_models.base import OnlineLearner, trim_oldest
from online_models.types import Interaction, UserContext


class RecentlyViewed(OnlineLearner):
    name = "reminder"

    def __init__(self, n_recent: int = 20, recency_decay: float = 0.8, max_users: int = 100_000, seed: int = 0):
        self.n_recent = n_recent
        self.recency_decay = recency_decay
        self.max_users = max_users
        self.seed = seed  # deterministic learner; kept for the common signature
        self.n_learned = 0
        self._history: dict[str, list[str]] = {}
        self._decays = [recency_decay**j for j in range(n_recent)]
        self._cache: tuple[object, dict[str, float]] | None = None

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        self.n_learned += 1
        history = self._history.pop(x.user_id, None)
        if history is None:
            history = []
            trim_oldest(self._history, self.max_users - 1)  # room for the user: the least recently active go
        self._history[x.user_id] = history
        history.append(x.item_id)
        if len(history) > self.n_recent:
            del history[0]

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """The user's history goes (it is keyed by user id only), and the last scores, which
        may be theirs."""
        self._history.pop(user_id, None)
        self._cache = None

    def _scores(self, user: UserContext) -> dict[str, float]:
        recent = user.recent_items or tuple(self._history.get(user.user_id, ()))
        recent = recent[-self.n_recent :]
        if self._cache is not None and self._cache[0] == recent:
            return self._cache[1]
        scores: dict[str, float] = {}
        decays = self._decays
        for j, item in enumerate(reversed(recent)):
            scores[item] = scores.get(item, 0.0) + decays[j]
        self._cache = (recent, scores)
        return scores

    def predict_one(self, user: UserContext, item_id: str) -> float:
        return self._scores(user).get(item_id, 0.0)

    def score_many(self, user: UserContext, items: Sequence[str]) -> list[float]:
        get = self._scores(user).get
        return [get(i, 0.0) for i in items]

    def because(self, user: UserContext, items: Sequence[str]) -> list[str | None]:
        """The item itself where the user viewed it before (it has a score here), else None."""
        recent = set((user.recent_items or tuple(self._history.get(user.user_id, ())))[-self.n_recent :])
        return [item if item in recent else None for item in items]

    def propose_scores(self, user: UserContext, k: int) -> list[tuple[str, float]]:
        return sorted(self._scores(user).items(), key=itemgetter(1), reverse=True)[:k]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state


__all__ = ["RecentlyViewed"]
