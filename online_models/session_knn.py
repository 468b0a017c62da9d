"""Session-based learners: V-SkNN neighbourhoods, sequential rules, and their blend.

Session-based nearest neighbours are, on click logs such as YooChoose, as strong as the
neural session models (Ludewig, Mauro, Latifi & Jannach, *Empirical analysis of
session-based recommendation algorithms*, UMUAI 2021). This module keeps them online:
``learn_one`` appends the event to its session, to an item -> recent-sessions index and to
the sequential rules, so a new item is recommendable as soon as it has been seen twice.

- :class:`SessionKNN` scores the items of the ``k`` most similar recent sessions.
  Similarity is V-SkNN's: the current session is a vector whose weights decay with each
  step back from its newest item, multiplied by the items' IDF, dotted with the neighbour
  session's item set. Each neighbour's items are weighted by how recently its best match
  sat in the current session (``1 / steps back``) and by the item's IDF. Like STAN
  (Garg et al., SIGIR 2019) it can also favour a neighbour's items that sit just after
  the matched item, and it can remind the user of the session's own items.
- :class:`SequentialRules` counts, for every ordered pair of items at most ``steps``
  apart in a session, ``1 / distance``; it proposes the followers of the newest item.
- :class:`SessionHybrid` (the one the evaluation recommends) is SessionKNN plus the rules
  and a reminder of the current session's items, each normalised to [0, 1] and weighted.

The session index and what the learners share are in :mod:`online_models.session_index`,
the rules in :mod:`online_models.sequential_rules`; all three learners import from here.

Memory is bounded: at most ``max_sessions`` sessions (the least recently active are
forgotten, together with the index entries that only they held), ``max_session_len``
items per session, ``max_sessions_per_item`` sessions per item and
``max_rules_per_item`` followers per item.

>>> from online_models.types import Interaction, UserContext
>>> model = SessionHybrid()
>>> for sid, items in enumerate(["abc", "abd", "abc", "xbc"]):
...     for t, item in enumerate(items):
...         model.learn_one(Interaction(f"u{sid}", item, ts=1000 * (10 * sid + t), session_id=f"s{sid}"))
>>> [s.item_id for s in model.rank(UserContext("new", recent_items=("a", "b")), k=4)]
['b', 'a', 'c', 'd']

The session's own items come first (a reminder: on YooChoose a third of next clicks
return to an item of the session), then c, which followed a and b twice, before d.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

# SequentialRules (the blend below uses it) and _SessionIndex lived in this module: callers
# import them from here, and snapshots written before the split name
# online_models.session_knn.SequentialRules and ._SessionIndex, so both stay importable here
from online_models.sequential_rules import SequentialRules
from online_models.session_index import _SessionIndex, _SessionLearner, _step_weight  # noqa: F401
from online_models.types import Interaction, UserContext


class SessionKNN(_SessionLearner):
    """V-SkNN: vector-multiplied session kNN over a sample of recent sessions.

    Parameters: ``k`` neighbours chosen among at most ``sample_size`` recent sessions
    per item of the current session; ``position_weighting`` of the current session's
    items by steps back from the newest (``div``: 1/(s+1), ``linear``, ``quadratic``,
    ``same``); ``idf`` multiplies those weights by the item's IDF; ``idf_score_weight``
    adds ``w * idf`` to a proposed item's weight; ``match_weighting`` weighs a neighbour
    by how far back its newest match sits; ``neighbour_decay`` (None: off) multiplies a
    neighbour item by ``exp(-|distance to the match| / neighbour_decay)``, the distance
    being counted forward in the neighbour session (items before the match count
    ``backward_penalty`` extra steps); ``session_len`` newest items of the current
    session are used; ``recency_half_life_s`` (None: off) halves a neighbour's similarity
    for each half-life between its last event and the context's ``ts``; ``length_norm``
    divides a neighbour's similarity by its length to that power (0: V-SkNN's plain dot
    product, 0.5: cosine-like).
    """

    name: ClassVar[str] = "session_knn"

    def __init__(
        self,
        k: int = 100,
        sample_size: int = 500,
        position_weighting: str = "div",
        idf: bool = True,
        idf_score_weight: float = 1.0,
        match_weighting: str = "div",
        neighbour_decay: float | None = None,
        backward_penalty: int = 0,
        session_len: int = 20,
        remind_weight: float = 0.0,
        recency_half_life_s: float | None = None,
        length_norm: float = 0.0,
        max_sessions: int = 200_000,
        max_session_len: int = 50,
        max_sessions_per_item: int = 1_000,
        session_gap_ms: int = 30 * 60 * 1000,
        seed: int = 0,
    ):
        _step_weight(0, position_weighting), _step_weight(0, match_weighting)  # validate early
        self.k = k
        self.sample_size = sample_size
        self.position_weighting = position_weighting
        self.idf = idf
        self.idf_score_weight = idf_score_weight
        self.match_weighting = match_weighting
        self.neighbour_decay = neighbour_decay
        self.backward_penalty = backward_penalty
        self.session_len = session_len
        self.remind_weight = remind_weight
        self.recency_half_life_s = recency_half_life_s
        self.length_norm = length_norm
        self._new_index(max_sessions, max_session_len, max_sessions_per_item, session_gap_ms)
        self.seed = seed
        self.n_learned = 0

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        self.index.add(x)
        self.n_learned += 1

    def neighbours(self, user: UserContext) -> list[tuple[str, float]]:
        """The ``k`` most similar sessions as (key, similarity), most similar first."""
        current = user.recent_items[-self.session_len:]
        if not current:
            return []
        index = self.index
        weights: dict[str, float] = {}
        n = len(current)
        for pos, item in enumerate(current):  # newer positions overwrite older ones
            weights[item] = _step_weight(n - 1 - pos, self.position_weighting)
        if self.idf:
            weights = {item: w * index.idf(item) for item, w in weights.items()}
        own = index.current_key(user)
        sims: dict[str, float] = {}
        sample = self.sample_size
        for item, w in weights.items():
            keys = index.item_sessions.get(item)
            if not keys:
                continue
            for j, key in enumerate(reversed(keys)):
                if j >= sample:
                    break
                sims[key] = sims.get(key, 0.0) + w
        sims.pop(own, None)
        if self.length_norm:
            sessions, p = index.sessions, self.length_norm
            sims = {key: s / len(sessions.get(key) or (0,)) ** p for key, s in sims.items()}
        if self.recency_half_life_s and user.ts is not None:
            rate = math.log(2) / (1000 * self.recency_half_life_s)
            session_ts = index.session_ts
            sims = {key: s * math.exp(-rate * max(0, user.ts - session_ts.get(key, user.ts))) for key, s in sims.items()}
        return heapq.nlargest(self.k, sims.items(), key=lambda kv: kv[1])

    def score_all(self, user: UserContext) -> dict[str, float]:
        current = user.recent_items[-self.session_len:]
        neighbours = self.neighbours(user)
        index = self.index
        last_pos: dict[str, int] = {}
        for pos, item in enumerate(current):
            last_pos[item] = pos
        n = len(current)
        scores: dict[str, float] = {}
        idf_cache: dict[str, float] = {}
        decay = self.neighbour_decay
        for key, sim in neighbours:
            items = index.sessions.get(key)
            if not items:
                continue
            # the newest item of the current session that the neighbour holds
            best_steps, match_at = n, -1
            for pos, item in enumerate(items):
                p = last_pos.get(item)
                if p is not None and n - 1 - p <= best_steps:
                    best_steps, match_at = n - 1 - p, pos
            weight = sim * _step_weight(best_steps, self.match_weighting)
            seen_here: set[str] = set()
            for pos, item in enumerate(items):
                if item in seen_here:
                    continue
                seen_here.add(item)
                w = weight
                if self.idf_score_weight:
                    idf = idf_cache.get(item)
                    if idf is None:
                        idf = idf_cache[item] = index.idf(item)
                    w += weight * idf * self.idf_score_weight
                if decay is not None and match_at >= 0:
                    dist = pos - match_at
                    if dist < 0:
                        dist = -dist + self.backward_penalty
                    w *= math.exp(-dist / decay)
                scores[item] = scores.get(item, 0.0) + w
        if self.remind_weight and scores:
            _remind(scores, current, self.remind_weight * max(scores.values()), "div")
        return scores



#: SessionKNN parameters of :class:`SessionHybrid` unless given (tuned on train_tr -> train_valid).
TUNED_KNN: Mapping[str, Any] = {"k": 200, "neighbour_decay": 10.0}


class SessionHybrid(_SessionLearner):
    """SessionKNN + sequential rules + a reminder of the session's own items.

    Each part's scores are divided by its maximum, then
    ``knn + sr_weight * rules + remind_weight * reminder``, where the reminder of an item
    of the current session is ``1 / (steps back + 1)`` (the newest item 1).
    The defaults are the ones tuned on YooChoose ``train_tr`` -> ``train_valid``
    (docs/evaluation.md).
    """

    name: ClassVar[str] = "session_hybrid"

    def __init__(
        self,
        sr_weight: float = 0.05,
        remind_weight: float = 1.0,
        remind_weighting: str = "quadratic",
        knn: Mapping[str, Any] | None = None,
        rules: Mapping[str, Any] | None = None,
        seed: int = 0,
        max_sessions: int | None = None,
        max_items: int | None = None,
    ):
        self.sr_weight = sr_weight
        self.remind_weight = remind_weight
        self.remind_weighting = remind_weighting
        _step_weight(0, remind_weighting)
        self.knn = dict(TUNED_KNN if knn is None else knn)
        self.rules = dict(rules or {})
        self.seed = seed
        #: caps over the parts' own (the worker's STREAMREC_MAX_USERS and STREAMREC_MAX_ITEMS)
        self.max_sessions = max_sessions
        self.max_items = max_items
        sessions = {"max_sessions": max_sessions} if max_sessions is not None else {}
        items = {"max_items": max_items} if max_items is not None else {}
        self._knn = SessionKNN(**{**self.knn, **sessions}, seed=seed)
        self._rules = SequentialRules(**{**self.rules, **sessions, **items}, seed=seed)
        self._rules.index = self._knn.index  # one session index for both
        self.n_learned = 0

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        _, items = self._knn.index.add(x)
        self._rules._learn_rules(items)
        self._knn.n_learned += 1
        self.n_learned += 1

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """Both parts forget: the session index they share once, the rules' counts (items
        only) stay; every score cache goes."""
        self._knn.forget_user(user_id, sessions)
        if self._rules.index is not self._knn.index:
            self._rules.forget_user(user_id, sessions)
        self._rules._cache_key = self._rules._cache_scores = None
        self._cache_key = self._cache_scores = None

    def score_all(self, user: UserContext) -> dict[str, float]:
        knn = self._knn.score_all(user)
        scores = _normalised(knn, 1.0)
        if self.sr_weight:
            for item, s in _normalised(self._rules.score_all(user), self.sr_weight).items():
                scores[item] = scores.get(item, 0.0) + s
        if self.remind_weight:
            _remind(scores, user.recent_items[-self._knn.session_len:], self.remind_weight, self.remind_weighting)
        return scores


def _remind(scores: dict[str, float], current: Sequence[str], weight: float, scheme: str) -> None:
    """Add ``weight * _step_weight(steps back, scheme)`` to each item of the current session."""
    n = len(current)
    for pos, item in enumerate(current):
        scores[item] = scores.get(item, 0.0) + weight * _step_weight(n - 1 - pos, scheme)


def _normalised(scores: Mapping[str, float], weight: float) -> dict[str, float]:
    if not scores:
        return {}
    top = max(scores.values())
    if top <= 0:
        return dict(scores)
    f = weight / top
    return {item: s * f for item, s in scores.items()}


__all__ = ["SequentialRules", "SessionHybrid", "SessionKNN"]
