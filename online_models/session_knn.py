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
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from online_models.base import OnlineLearner, Recency
from online_models.types import Interaction, UserContext


class _SessionIndex:
    """Sessions, the item -> recent sessions index and item document frequencies.

    Shared bookkeeping of :class:`SessionKNN` and :class:`SequentialRules`. A session's
    key is its ``session_id``; without one, a user's events more than ``session_gap_ms``
    apart start a new session.
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

    def session_key(self, user_id: str, session_id: str | None, ts: int | None) -> str:
        if session_id is not None:
            return "s:" + session_id
        key, number, last = self.user_session.get(user_id, (None, 0, None))
        if key is not None and (ts is None or last is None or ts - last <= self.session_gap_ms):
            return key
        return f"u:{user_id}#{number + 1}"

    def current_key(self, user: UserContext) -> str | None:
        if user.session_id is not None:
            return "s:" + user.session_id
        entry = self.user_session.get(user.user_id)
        return entry[0] if entry is not None else None

    def add(self, x: Interaction) -> tuple[str, list[str]]:
        """Append ``x`` to its session; returns the session key and its items (with x last)."""
        key = self.session_key(x.user_id, x.session_id, x.ts)
        if x.session_id is None:
            _, number, _ = self.user_session.get(x.user_id, (None, 0, None))
            if key != self.user_session.get(x.user_id, (None,))[0]:
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
            if index and index[-1] != key:
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

    def score_all(self, user: UserContext) -> dict[str, float]:
        """Every item the learner can score for ``user`` (items absent score 0)."""
        raise NotImplementedError

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
        self.max_sessions = max_sessions
        self.max_session_len = max_session_len
        self.max_sessions_per_item = max_sessions_per_item
        self.session_gap_ms = session_gap_ms
        self.seed = seed
        self.index = _SessionIndex(max_sessions, max_session_len, max_sessions_per_item, session_gap_ms)
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
            top = max(scores.values())
            for pos, item in enumerate(current):
                scores[item] = scores.get(item, 0.0) + self.remind_weight * top * _step_weight(n - 1 - pos, "div")
        return scores


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
        self.max_sessions = max_sessions
        self.max_session_len = max_session_len
        self.max_sessions_per_item = max_sessions_per_item
        self.session_gap_ms = session_gap_ms
        self.max_items = max_items
        self.seed = seed
        self.index = _SessionIndex(max_sessions, max_session_len, max_sessions_per_item, session_gap_ms)
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
            followers = self.rules.get(before)
            if followers is None:
                followers = self.rules[before] = {}
            followers[new] = followers.get(new, 0.0) + 1.0 / dist
            if len(followers) > self.max_rules_per_item:
                self._prune(before)
            if self.bidirectional:
                back = self.rules.get(new)
                if back is None:
                    back = self.rules[new] = {}
                back[before] = back.get(before, 0.0) + 1.0 / dist
                if len(back) > self.max_rules_per_item:
                    self._prune(new)

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

    def score_all(self, user: UserContext) -> dict[str, float]:
        knn = self._knn.score_all(user)
        scores = _normalised(knn, 1.0)
        if self.sr_weight:
            for item, s in _normalised(self._rules.score_all(user), self.sr_weight).items():
                scores[item] = scores.get(item, 0.0) + s
        if self.remind_weight:
            current = user.recent_items[-self._knn.session_len:]
            n = len(current)
            for pos, item in enumerate(current):
                scores[item] = scores.get(item, 0.0) + self.remind_weight * _step_weight(n - 1 - pos, self.remind_weighting)
        return scores


def _normalised(scores: Mapping[str, float], weight: float) -> dict[str, float]:
    if not scores:
        return {}
    top = max(scores.values())
    if top <= 0:
        return dict(scores)
    f = weight / top
    return {item: s * f for item, s in scores.items()}


__all__ = ["SequentialRules", "SessionHybrid", "SessionKNN"]
