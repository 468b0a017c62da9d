"""What the session learners share: the session index, position weights, the score table.

:class:`_SessionIndex` holds the sessions, an item -> recent sessions index and the items'
document frequencies; :class:`~online_models.session_knn.SessionKNN` and
:class:`~online_models.sequential_rules.SequentialRules` each keep one, and
:class:`~online_models.session_knn.SessionHybrid` shares one between both.
:func:`_step_weight` weighs a session's items by their steps back from the newest, and
:class:`_SessionLearner` is the base whose one score table per context both proposes items
and scores the blend's candidates.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

from online_models.base import OnlineLearner, owned_by, session_key
from online_models.types import Interaction, UserContext


class _SessionIndex:
    """Sessions, the item -> recent sessions index and item document frequencies.

    Shared bookkeeping of :class:`SessionKNN` and :class:`SequentialRules`. Sessions are
    keyed by :func:`~online_models.base.session_key` with ``session_gap_ms``: an event's
    ``session_id``; without one, a user's events more than ``session_gap_ms`` apart start a
    new session.
    """

    def __init__(self, max_sessions: int, max_session_len: int, max_sessions_per_item: int, session_gap_ms: int):
        self.max_sessions = max_sessions
        self.max_session_len = max_session_len
        self.max_sessions_per_item = max_sessions_per_item
        self.session_gap_ms = session_gap_ms
        self.sessions: OrderedDict[str, list[str]] = OrderedDict()  # least recently active first
        self.session_ts: dict[str, int] = {}
        self.item_sessions: dict[str, deque[str]] = {}  # most recent session last
        self.df: dict[str, int] = {}  # live sessions holding the item
        self.user_session: OrderedDict[str, tuple[str, int, int]] = OrderedDict()  # user -> (key, n, last ts)

    def current_key(self, user: UserContext) -> str | None:
        """The key of the session ``user`` is in (None: a user with no session yet)."""
        if user.session_id is not None:
            return session_key(user, self.session_gap_ms)
        entry = self.user_session.get(user.user_id)
        return entry[0] if entry is not None else None

    def add(self, x: Interaction) -> tuple[str, list[str]]:
        """Append ``x`` to its session; returns the session key and its items (with x last)."""
        entry = self.user_session.get(x.user_id) if x.session_id is None else None
        key = session_key(x, self.session_gap_ms, entry)
        if x.session_id is None:
            number = entry[1] if entry is not None else 0
            if entry is None or key != entry[0]:
                number += 1
            self.user_session[x.user_id] = (key, number, x.ts)
            self.user_session.move_to_end(x.user_id)
            while len(self.user_session) > self.max_sessions:
                self.user_session.popitem(last=False)
        items = self.sessions.get(key)
        if items is None:
            items = self.sessions[key] = []
            while len(self.sessions) > self.max_sessions:
                self._forget(*self.sessions.popitem(last=False))
        else:
            self.sessions.move_to_end(key)
        item = x.item_id
        if item not in items:
            self.df[item] = self.df.get(item, 0) + 1
            index = self.item_sessions.get(item)
            if index is None:
                index = self.item_sessions[item] = deque(maxlen=self.max_sessions_per_item)
            index.append(key)
        else:  # move the session to the recent end of the item's index
            index = self.item_sessions[item]
            if not index or index[-1] != key:  # (empty: a forget took every session it listed)
                try:
                    index.remove(key)
                except ValueError:
                    pass
                index.append(key)
        items.append(item)
        if len(items) > self.max_session_len:
            dropped = items.pop(0)
            if dropped not in items:
                self._release(dropped, key)
        self.session_ts[key] = x.ts
        return key, items

    def _release(self, item: str, key: str) -> None:
        left = self.df.get(item, 0) - 1
        if left > 0:
            self.df[item] = left
        else:
            self.df.pop(item, None)
            self.item_sessions.pop(item, None)

    def _forget(self, key: str, items: list[str]) -> None:
        self.session_ts.pop(key, None)
        for item in set(items):
            self._release(item, key)

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """Drop the user's sessions (:func:`~online_models.base.owned_by`) as eviction does
        (their items' document frequencies go down, an item no live session holds leaves),
        their keys from every item's index (also the keys of sessions evicted earlier, or
        that no longer hold the item, which eviction leaves there), and the user's open session.
        """
        owns = owned_by(user_id, sessions, gapped=self.session_gap_ms is not None)
        self.user_session.pop(user_id, None)
        for key in [k for k in self.sessions if owns(k)]:
            self._forget(key, self.sessions.pop(key))
        for key in [k for k in self.session_ts if owns(k)]:
            del self.session_ts[key]
        item_sessions = self.item_sessions
        for item, index in list(item_sessions.items()):
            if not any(map(owns, index)):
                continue
            kept = [k for k in index if not owns(k)]
            if kept or item in self.df:
                item_sessions[item] = deque(kept, maxlen=index.maxlen)
            else:
                del item_sessions[item]

    def idf(self, item: str) -> float:
        n = len(self.sessions)
        return math.log((n + 1) / (self.df.get(item, 0) + 1)) + 1e-9


def _step_weight(steps_back: int, scheme: str) -> float:
    """Weight of the item ``steps_back`` steps before the newest (0 = the newest)."""
    if scheme == "div":
        return 1.0 / (steps_back + 1)
    if scheme == "linear":
        return max(1.0 - 0.1 * steps_back, 0.0)
    if scheme == "same":
        return 1.0
    if scheme == "quadratic":
        return 1.0 / (steps_back + 1) ** 2
    raise ValueError(f"unknown position weighting {scheme!r} (div, linear, quadratic, same)")


class _SessionLearner(OnlineLearner):
    """What the session learners share: one score table per context, used both to propose
    items (a candidate source) and to score the blend's candidates."""

    name: ClassVar[str] = "_session"

    _cache_key: tuple | None = None
    _cache_scores: dict[str, float] | None = None

    def _new_index(self, max_sessions: int, max_session_len: int, max_sessions_per_item: int,
                   session_gap_ms: int) -> None:
        """Keep the session index's constructor arguments under their own names, and build it."""
        self.max_sessions = max_sessions
        self.max_session_len = max_session_len
        self.max_sessions_per_item = max_sessions_per_item
        self.session_gap_ms = session_gap_ms
        self.index = _SessionIndex(max_sessions, max_session_len, max_sessions_per_item, session_gap_ms)

    def score_all(self, user: UserContext) -> dict[str, float]:
        """Every item the learner can score for ``user`` (items absent score 0)."""
        raise NotImplementedError

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """The user's sessions leave the session index (:meth:`_SessionIndex.forget_user`), and
        the cached scores (keyed by a context's user and session) go."""
        self.index.forget_user(user_id, sessions)
        self._cache_key = self._cache_scores = None

    def _scores(self, user: UserContext) -> dict[str, float]:
        key = (self.n_learned, user.user_id, user.session_id, user.recent_items)
        if key != self._cache_key or self._cache_scores is None:
            self._cache_scores = self.score_all(user)
            self._cache_key = key
        return self._cache_scores

    def predict_one(self, user: UserContext, item_id: str) -> float:
        return self._scores(user).get(item_id, 0.0)

    def score_many(self, user: UserContext, items: Sequence[str]) -> list[float]:
        scores = self._scores(user)
        return [scores.get(item, 0.0) for item in items]

    def propose_scores(self, user: UserContext, k: int) -> list[tuple[str, float]]:
        if k <= 0:
            return []
        scores = self._scores(user)
        return heapq.nsmallest(k, scores.items(), key=lambda kv: (-kv[1], kv[0]))

    def __getstate__(self) -> dict[str, Any]:  # the score cache is not state
        state = self.__dict__.copy()
        state.pop("_cache_key", None)
        state.pop("_cache_scores", None)
        return state
