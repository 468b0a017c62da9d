"""The pure core the Faust worker, the evaluator and the benchmarks all call.

:class:`Recommender` feeds every event to a set of :class:`OnlineLearner` s, merges their
proposals into candidates, and blends their scores (plus any extra source, such as the
GPU Transformer's) into a top-K:

1. **Candidates**: each source with a non-zero weight proposes ``n`` items; the lists are
   interleaved round-robin (sources by decreasing weight) without duplicates until
   ``n_candidates``. Purchased items are dropped when ``exclude_purchased``; nothing else is.
2. **Blend**: each source scores every candidate; scores are min-max normalised per source
   over the candidate list (so scales do not matter, only weights), an extra source's
   missing items count as its minimum; ``blend = sum(weight * normalised)``.
3. **Re-ranker** (``ClickReranker``): once it has learned enough from "shown, then
   clicked", ``reranker_weight * P(click)`` is added.
4. **Rules**: purchased items out; at most ``max_per_category`` items per category
   (categories are learned from ``Interaction.category_id``; unknown ones are uncapped).

The result is the best ``k`` first, no duplicates; ``reason`` is the source that
contributed most to the item's blended score, and ``explanation`` says the same with what
that source knows of the item (``Explanation``: for co-visitation, the user's recent item
it co-occurred with most; for the reminder, the item itself; for trending, its category),
worked out for the ``k`` published items only.

Not thread-safe: one instance per worker process, called from one task (Faust agents of a
worker share one event loop thread, so that holds there).

>>> from online_models.datasets import synthetic_interactions
>>> rec = Recommender.default(RecommenderConfig(k=5))
>>> for x in synthetic_interactions(n_events=2000, seed=3):
...     rec.learn_one(x)
>>> user = UserContext("u1", recent_items=("i3", "i7"), purchased=frozenset({"i1"}))
>>> top = rec.recommend(user)
>>> len(top), "i1" in {s.item_id for s in top}
(5, False)
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain, repeat, zip_longest
from typing import Self

import numpy as np

from online_models import ranking
from online_models.base import OnlineLearner, Recency, dump_snapshot, load_snapshot, trim_oldest
from online_models.covisit import CoVisitation
from online_models.mf import ImplicitMF
from online_models.popularity import TrendingPopularity
from online_models.reminder import RecentlyViewed
from online_models.reranker import ClickReranker
from online_models.session_knn import SessionHybrid
from online_models.types import Explanation, Interaction, ScoredItem, UserContext

_PENDING_RANKED = 16_384  # ranked lists kept until record_shown: a whole batch's users (stream's MAX_BATCH_SIZE)


def _default_weights() -> dict[str, float]:
    # mf is off by default: in the blend it moved neither Taobao's prequential HR@20 (0.0486
    # with it, 0.0486 without) nor YooChoose's validation (docs/architecture.md), and it was
    # half of the worker's CPU per event (learn 58, propose 50, rank 57 of 318 µs). Give it a
    # weight (``STREAMREC_BLEND_WEIGHTS=mf=0.2``) to run it.
    # "query": the catalogue's matches of the user's latest search (stream/pipeline.py
    # query_candidates); users who never searched have no such column, so it changes nothing for them.
    # "content": new items no event has named yet, close in meaning to the user's recent items
    # (cold start: online_models/search/cold_start.py); nothing when every item has events
    return {"covisit": 1.0, "reminder": 1.0, "trending": 0.3, "mf": 0.0, "session_hybrid": 0.0, "transformer": 1.0,
            "query": 1.0, "content": 1.0}


#: the largest blend weight a source may have: a list's scores are sums of weights times
#: scores in [0, 1], so they stay finite numbers whatever the weights (``float("9" * 400)`` is
#: infinite, and an infinite weight would publish ``"score": null``)
MAX_WEIGHT = 1e6


def weight_ok(weight: object) -> bool:
    """A number from 0 to :data:`MAX_WEIGHT` (not a bool, not NaN)."""
    return isinstance(weight, int | float) and not isinstance(weight, bool) and 0.0 <= weight <= MAX_WEIGHT


def parse_weights(spec: str | None) -> dict[str, float]:
    """``"covisit=1,mf=0.2"`` → ``{"covisit": 1.0, "mf": 0.2}`` (blank: no overrides).

    >>> parse_weights("mf=0.2, trending=0")
    {'mf': 0.2, 'trending': 0.0}
    """
    out: dict[str, float] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not name.strip() or not weight_ok(weight):
            raise ValueError(f"expected name=weight with a weight from 0 to {MAX_WEIGHT:g}, saw {part.strip()!r}")
        if name.strip() in out:  # the last one won, silently: which did the operator mean?
            raise ValueError(f"{name.strip()} is given twice; give each source's weight once")
        out[name.strip()] = weight
    return out


@dataclass
class RecommenderConfig:
    """Tunables of the blend; a model never reads settings itself."""

    #: items per list and candidates scored per list (the worker's STREAMREC_TOP_K and
    #: STREAMREC_CANDIDATES, whose defaults are these)
    k: int = 20
    n_candidates: int = 50
    #: per source (learner name, or an ``extra_scores`` key such as ``"transformer"``); 0 = off
    weights: dict[str, float] = field(default_factory=_default_weights)
    max_per_category: int | None = None
    exclude_purchased: bool = True
    #: weight of the re-ranker's P(click); 0 turns it off (it still learns). Once trained the
    #: re-ranker knows better than fixed weights (YooChoose, all test sessions: HR@20 0.665 ->
    #: 0.695, MRR@20 0.341 -> 0.375 at 10; Taobao unchanged), so it leads and the blend breaks ties.
    reranker_weight: float = 10.0
    reranker_min_samples: int = 200
    #: users whose published list (k rows of ~15 float32 features, ~1.5 kB) waits for their
    #: next event to label it for the re-ranker; the least recently shown are dropped
    max_tracked_users: int = 20_000
    #: capacity of every item-keyed table (the blend's counts and categories, each learner's
    #: items) and of every user- or session-keyed one (the learners' histories, sessions and
    #: user factors): past it, the least recently seen (or, where a learner says so, the least
    #: weighty) go. Recommender.default hands them to the learners it builds.
    max_items: int = 300_000
    max_users: int = 100_000


class ForgetError(RuntimeError):
    """A learner's ``forget_user`` raised; ``learner`` names it (the message never holds the user)."""

    def __init__(self, learner: str, error: BaseException) -> None:
        super().__init__(f"learner {learner!r} could not forget a user: {type(error).__name__}")
        self.learner = learner


class Recommender:
    """Learners + candidate merge + blend + re-ranker + business rules."""

    def __init__(
        self,
        learners: Mapping[str, OnlineLearner] | None = None,
        config: RecommenderConfig | None = None,
        seed: int = 0,
    ):
        self.config = config if config is not None else RecommenderConfig()
        self.seed = seed
        self.learners: dict[str, OnlineLearner] = dict(learners) if learners is not None else {}
        self.reranker = ClickReranker(min_samples=self.config.reranker_min_samples, seed=seed)
        self.n_learned = 0
        self._categories: dict[str, str] = {}
        self._counts: dict[str, float] = {}  # events per item: the re-ranker's popularity feature
        self._seen = Recency(self.config.max_items)
        # user -> (feature names, ranked items, their feature rows): the last rank() per user,
        # waiting for record_shown (called right after rank, so a few entries suffice)
        self._ranked: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
        # user -> the same for the published list, waiting for the user's next event
        self._shown: dict[str, tuple[list[str], list[str], np.ndarray]] = {}
        #: where the events learned come from: source (the stream's ``"topic:partition"``) ->
        #: the highest offset learned or passed over; a snapshot carries it, so that a restart
        #: knows which events to learn again (stream/pipeline.py keeps it)
        self.learned_offsets: dict[str, int] = {}
        #: the broker's id of each topic those sources belong to (stream/pipeline.py
        #: ``align_topics``): a topic deleted and created again has a new id, and offsets that
        #: start over, so the models' watermark of its partitions no longer holds
        self.topic_ids: dict[str, str] = {}
        # session id -> its user, least recently active session first (learn_one keeps it), so
        # that forget_user reaches the learners' session-keyed tables. It holds at most
        # config.max_users sessions, which is complete for every session a learner still holds
        # when the learner caps its sessions at max_users or fewer (Recommender.default hands
        # max_sessions = max_users to each) and evicts by last activity, as they all do: a
        # learner keeps session S only while fewer than its cap of other session keys have
        # been active since S's last event; each session id active here since then is such a
        # key (events without one only add keys on the learners' side), so fewer than
        # max_users were, and S is still here. A learner built by hand with a larger cap can
        # outlive it. Events without a session id, or with the user id as one, need no entry:
        # their keys derive from the user id (online_models.base.owned_by). One bound for all
        # users rather than one per user: a user with many sessions cannot grow it past
        # max_users, and forget_user finds a user's sessions in one pass (forgets are rare).
        # A session id more than one user sent (a shared device, ids the site numbers per
        # user) maps to all of them (:func:`_with_owner`), since the learners keep one session
        # of their items: forgetting any of them drops it whole.
        self._session_users: dict[str, str | tuple[str, ...]] = {}
        #: keyed hash of a forgotten user id -> the erasure time (refuses); the salt is random
        #: per Recommender and travels in its snapshot, so no raw id is kept
        self._forget_salt: bytes = os.urandom(16)
        self._forgotten: dict[bytes, int] = {}
        #: when each was forgotten (the caller's clock, ms), where later than its bound: what
        #: :meth:`trim_forgotten` goes by, so that a request dated in the past is not dropped early
        self._forgotten_at: dict[bytes, int] = {}

    #: the learners :meth:`default` can build, by name
    DEFAULT_LEARNERS = {"covisit": CoVisitation, "reminder": RecentlyViewed, "trending": TrendingPopularity,
                        "mf": ImplicitMF, "session_hybrid": SessionHybrid}
    #: the sources scored beside the learners (``extra_scores`` of :meth:`rank_many`): the
    #: Transformer, a user's latest query's matches, and new items by content (cold start)
    EXTRA_SOURCES = ("transformer", "query", "content")

    @classmethod
    def default(cls, config: RecommenderConfig | None = None, seed: int = 0) -> Self:
        """The standard blend: co-visitation, re-consumption and trending popularity, plus
        implicit MF when ``config.weights["mf"] > 0``. A learner whose weight is 0 would
        learn every event for nothing, so it is not built."""
        config = config if config is not None else RecommenderConfig()
        caps = {"max_items": config.max_items, "max_users": config.max_users, "max_sessions": config.max_users}
        learners: dict[str, OnlineLearner] = {}
        for name, make in cls.DEFAULT_LEARNERS.items():
            if config.weights.get(name, 0.0) > 0.0:
                accepted = inspect.signature(make).parameters
                learners[name] = make(seed=seed, **{k: v for k, v in caps.items() if k in accepted})
        return cls(learners, config, seed)

    # -- learning ---------------------------------------------------------------------
    @property
    def learns_with_context(self) -> bool:
        """Whether a learner reads the user's context when it learns (else it may be None)."""
        return any(learner.learns_with_context for learner in self.learners.values())

    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        """Feed ``x`` to every learner, and label the user's last shown list for the re-ranker.

        The learners go first: should one raise, the blend's own tables and the re-ranker have
        not taken the event (stream/pipeline.py dead-letters it). Only the event's session id
        is noted before them (``_session_users``), so that a forget reaches whatever a
        learner kept of it before raising. Events of a forgotten user are not refused here:
        the caller asks :meth:`refuses` first."""
        sid = x.session_id
        if sid is not None:  # tracked before the learners learn: one may keep the session, then raise
            uid = x.user_id
            if sid != uid:
                owners = self._session_users
                held = owners.pop(sid, uid)
                owners[sid] = uid if held == uid else _with_owner(held, uid)
                cap = self.config.max_users  # at least the cap's newest (see __init__), 1/64 more at most
                trim_oldest(owners, cap + cap // 64, keep=cap)
        for learner in self.learners.values():
            learner.learn_one(x, user)
        shown = self._shown.pop(x.user_id, None)
        if shown is not None:
            self.reranker.learn_rows(*shown, x.item_id)
        for gone in self._seen.touch(x.item_id):
            self._counts.pop(gone, None)
            self._categories.pop(gone, None)
        if x.category_id is not None:
            self._categories[x.item_id] = x.category_id
        self._counts[x.item_id] = self._counts.get(x.item_id, 0.0) + 1.0
        self.n_learned += 1

    def learn_many(self, xs: Iterable[tuple[Interaction, UserContext | None]]) -> None:
        """:meth:`learn_one` for each ``(event, context before it)``, in order."""
        for x, user in xs:
            self.learn_one(x, user)

    _forget_hasher = None  # blake2b keyed with _forget_salt, built once (copying it: 0.3 µs a hash, not 0.5)

    def _forget_key(self, user_id: str) -> bytes:
        """``blake2b(user_id, key=salt, digest_size=16)``: how the forgotten are remembered."""
        hasher = self._forget_hasher
        if hasher is None:
            hasher = self._forget_hasher = hashlib.blake2b(key=self._forget_salt, digest_size=16)
        h = hasher.copy()
        h.update(user_id.encode())
        return h.digest()

    def forget_user(self, user_id: str, before_ts: int, at_ms: int | None = None) -> None:
        """Erase ``user_id``: every learner drops what it keeps of the user and of their
        tracked sessions (:meth:`OnlineLearner.forget_user`), and so do the blend's own
        per-user tables (lists waiting for a label, the session tracking). The user is then
        remembered, by a keyed hash only, with ``before_ts``: :meth:`refuses` their events at
        or before it (a replayed log must not teach them again); later events start afresh.

        What remains are anonymous item aggregates (co-visitation pair counts, item factors,
        popularity, the re-ranker's feature weights, item counts and categories), which the
        user's events moved but which name no user.

        The refusal is recorded first and every learner is asked even when one raises (a bug):
        the first error is raised afterwards as :class:`ForgetError`, naming the learner, so
        the caller can report that a model may still hold part of the user. ``at_ms``: when
        this happens (the worker's clock), which :meth:`trim_forgotten` goes by where it is
        later than ``before_ts``.
        """
        key = self._forget_key(user_id)
        before = self._forgotten.get(key)
        self._forgotten[key] = bound = before_ts if before is None else max(before, before_ts)
        if at_ms is not None and at_ms > bound:
            self._forgotten_at[key] = max(at_ms, self._forgotten_at.get(key, at_ms))
        self._ranked.pop(user_id, None)
        self._shown.pop(user_id, None)
        owners = self._session_users
        sessions = [sid for sid, held in owners.items()
                    if held == user_id or (type(held) is tuple and (not held or user_id in held))]
        failed: list[tuple[str, BaseException]] = []
        for name, learner in self.learners.items():
            try:
                learner.forget_user(user_id, sessions)
            except Exception as exc:  # noqa: BLE001 - the others still forget; raised below
                failed.append((name, exc))
        for sid in sessions:
            del owners[sid]
        if failed:
            name, exc = failed[0]
            raise ForgetError(name, exc) from exc

    def refuses(self, user_id: str, ts: int) -> bool:
        """Whether an event of ``user_id`` at ``ts`` must not be learned: the user was
        forgotten with ``before_ts >= ts``. One truth test while nobody was forgotten."""
        if not self._forgotten:
            return False
        before = self._forgotten.get(self._forget_key(user_id))
        return before is not None and ts <= before

    @property
    def forgotten_users(self) -> int:
        """How many forgotten users are remembered (each counted once)."""
        return len(self._forgotten)

    def trim_forgotten(self, before_ts: int) -> int:
        """Stop remembering the forgotten users whose bound, and the time they were forgotten
        (``at_ms``), are older than ``before_ts``; return how many. The caller (the worker, at
        each snapshot) passes a time by which Kafka no longer holds any event such a user sent
        before their request, so no replay or redelivery can bring one back: the set then holds
        the erasures of that window, not of the worker's whole life. An old event re-sent by a
        producer afterwards is learned as a new one.

        >>> r = Recommender()
        >>> r.forget_user("u1", before_ts=1_000)
        >>> r.forget_user("u2", before_ts=5_000)
        >>> r.forget_user("u3", before_ts=500, at_ms=9_000)  # a request dated in the past
        >>> r.trim_forgotten(2_000), r.refuses("u1", 900), r.refuses("u2", 900), r.refuses("u3", 400)
        (1, False, True, True)
        """
        at = self._forgotten_at
        old = [key for key, bound in self._forgotten.items() if bound < before_ts and at.get(key, bound) < before_ts]
        for key in old:
            del self._forgotten[key]
            at.pop(key, None)
        return len(old)

    def forget_ranked(self, user_id: str, items: Sequence[ScoredItem] = ()) -> None:
        """Drop the last :meth:`rank` for ``user_id`` without recording it as shown (a list
        that was not published, or an evaluation whose models do not learn)."""
        self._ranked.pop(user_id, None)

    def record_shown(self, user_id: str, items: Sequence[ScoredItem]) -> None:
        """Remember what was published to ``user_id`` (from the last :meth:`rank` for them)."""
        ranked = self._ranked.pop(user_id, None)
        if ranked is None:
            return
        names, ranked_items, matrix = ranked
        if [s.item_id for s in items] == ranked_items:  # the whole list, as ranked (the usual case)
            if ranked_items:  # a copy: matrix may be a view of a whole batch's rows
                _bounded_put(self._shown, user_id, (names, ranked_items, matrix.copy()), self.config.max_tracked_users)
            return
        row_of = {item: r for r, item in enumerate(ranked_items)}
        rows = [(s.item_id, row_of[s.item_id]) for s in items if s.item_id in row_of]
        if rows:
            shown_items = [item for item, _ in rows]
            _bounded_put(self._shown, user_id, (names, shown_items, matrix[[r for _, r in rows]]),
                         self.config.max_tracked_users)

    # -- candidates -------------------------------------------------------------------
    def _sources(self) -> list[tuple[str, OnlineLearner]]:
        w = self.config.weights
        active = [(n, lr) for n, lr in self.learners.items() if w.get(n, 0.0) > 0.0]
        return sorted(active, key=lambda nl: -w[nl[0]])

    def candidates(self, user: UserContext, n: int | None = None) -> list[str]:
        """Merged proposals of the sources (round-robin), minus purchased if configured."""
        return self.candidates_many([user], n)[0]

    def candidates_many(self, users: Sequence[UserContext], n: int | None = None) -> list[list[str]]:
        """:meth:`candidates` for each user (the sources are looked up once for all)."""
        n = self.config.n_candidates if n is None else n
        if n <= 0:
            return [[] for _ in users]
        proposers = [learner.propose_items for _, learner in self._sources()]
        exclude = self.config.exclude_purchased
        out = []
        for user in users:
            lists = [propose(user, n) for propose in proposers]
            merged = dict.fromkeys(chain.from_iterable(zip_longest(*lists)))  # round-robin, first wins
            merged.pop(None, None)
            purchased = user.purchased if exclude else ()
            if purchased:
                out.append([item for item in merged if item not in purchased][:n])
            else:
                out.append(list(merged)[:n])
        return out

    # -- ranking ----------------------------------------------------------------------
    def rank(
        self,
        user: UserContext,
        candidates: Sequence[str],
        k: int | None = None,
        extra_scores: Mapping[str, Mapping[str, float] | Sequence[float]] | None = None,
    ) -> list[ScoredItem]:
        """Blend, re-rank and filter ``candidates``; the best ``k`` first (:meth:`rank_many` of one)."""
        return self.rank_many([user], [candidates], k, [extra_scores])[0]

    def rank_many(
        self,
        users: Sequence[UserContext],
        candidates: Sequence[Sequence[str]],
        k: int | None = None,
        extra_scores: Sequence[Mapping[str, Mapping[str, float] | Sequence[float]] | None] | None = None,
        explain: bool = True,
    ) -> list[list[ScoredItem]]:
        """:meth:`rank` of ``candidates[i]`` for ``users[i]``, for all users at once.

        The lists are the same as ranking user by user (a user's result never depends on
        the others in the batch), and so is what :meth:`record_shown` gets; the numpy work
        is done once over all users' candidates (:mod:`online_models.ranking`). A source of
        ``extra_scores[i]`` gives ``{item: score}`` or scores aligned with ``candidates[i]``
        (an array: NaN is no score; a repeated candidate takes its last score, as the dict
        ``dict(zip(candidates[i], scores))`` would). A user listed twice keeps only the last
        list pending for :meth:`record_shown`, as with ``rank`` twice before recording.
        ``explain=False`` leaves each item's ``explanation`` None (its ``reason`` is still set):
        for a caller that shows only some of the items, and asks :meth:`explain` for those.
        """
        cfg = self.config
        k = cfg.k if k is None else k
        n_users = len(users)
        if len(candidates) != n_users or (extra_scores is not None and len(extra_scores) != n_users):
            raise ValueError(f"{n_users} users but {len(candidates)} candidate lists"
                             f"{'' if extra_scores is None else f' and {len(extra_scores)} extra_scores'}")
        out: list[list[ScoredItem]] = [[] for _ in range(n_users)]
        if k <= 0:
            return out
        weights = cfg.weights
        # users grouped by their extra sources (names and order): one vectorised pass per group
        groups: dict[tuple[str, ...], list[tuple[int, list[str], list]]] = {}
        for u in range(n_users):
            cands = candidates[u]
            purchased = users[u].purchased if cfg.exclude_purchased else None
            items = [c for c in dict.fromkeys(cands) if c not in purchased] if purchased else list(dict.fromkeys(cands))
            if not items:
                continue
            names, cols = [], []
            extra = extra_scores[u] if extra_scores is not None else None
            for name, scores in (extra or {}).items():
                if weights.get(name, 0.0) != 0.0 and name not in self.learners:
                    names.append(name)
                    cols.append(ranking.extra_column(scores, cands, items))
            groups.setdefault(tuple(names), []).append((u, items, cols))
        done: list[tuple[list[str], list[str], np.ndarray] | None] = [None] * n_users
        for extra_names, members in groups.items():
            self._rank_group(users, members, extra_names, k, out, done, explain)
        for u, ranked in enumerate(done):  # in call order, as rank() user by user would
            if ranked is not None:
                _bounded_put(self._ranked, users[u].user_id, ranked, _PENDING_RANKED)
        return out

    def _rank_group(self, users: Sequence[UserContext], members: list[tuple[int, list[str], list]],
                    extra_names: tuple[str, ...], k: int, out: list, done: list, explain: bool = True) -> None:
        cfg = self.config
        seg = ranking.Segments([len(items) for _, items, _ in members])
        flat_items = list(chain.from_iterable(items for _, items, _ in members))
        learners = [(nm, lr) for nm, lr in self.learners.items() if cfg.weights.get(nm, 0.0) != 0.0]
        names = [nm for nm, _ in learners] + list(extra_names)
        norm = np.empty((len(names), seg.n))
        member_users = [users[u] for u, _, _ in members]
        member_items = [items for _, items, _ in members]
        for j, (_, learner) in enumerate(learners):
            norm[j] = ranking.normalise(learner.score_batch(member_users, member_items), seg, finite=True)
        for j in range(len(extra_names)):
            raw_extra = np.concatenate([np.asarray(cols[j], dtype=float) for _, _, cols in members])
            norm[len(learners) + j] = ranking.normalise(raw_extra, seg, finite=False)
        blend, dominant, credited = ranking.blend(norm, np.array([cfg.weights[nm] for nm in names]))
        order = seg.order(blend)
        get = self._counts.get
        counts = np.fromiter(map(get, flat_items, repeat(0.0)), dtype=float, count=seg.n)
        recency = ranking.recency([u.recent_items for u in member_users], member_items, seg)
        feats = ranking.features(norm, seg, seg.local_ranks(blend, order), recency, counts)
        feature_names = [*names, *(f"{nm}_rank" for nm in names), "blend_position", "popularity", "recency"]
        final = blend
        if cfg.reranker_weight and self.reranker.ready:
            model = self.reranker.model
            w = [model.weights.get(nm, 0.0) for nm in feature_names]
            final = blend + cfg.reranker_weight * ranking.click_probability(feats, w, model.intercept)
            order = seg.order(final)
        if cfg.max_per_category is None:
            picked, counts_picked = seg.top(order, k)
        else:
            picked, counts_picked = ranking.diversify(member_items, self._categories, cfg.max_per_category,
                                                      order, seg, k)
        rows = np.ascontiguousarray(feats[:, picked].T, dtype=np.float32)
        picked_list = picked.tolist()
        scores = final[picked].tolist()
        reasons = [names[d] if c else None for d, c in zip(dominant[picked].tolist(), credited[picked].tolist(),
                                                            strict=True)]
        at = 0
        for (u, _, _), n in zip(members, counts_picked.tolist(), strict=True):
            end = at + n
            ids = [flat_items[i] for i in picked_list[at:end]]
            why = reasons[at:end]
            explanations = self.explain(users[u], ids, why) if explain else [None] * len(ids)
            out[u] = [ScoredItem(i, s, r, e) for i, s, r, e in zip(ids, scores[at:end], why, explanations,
                                                                  strict=True)]
            done[u] = (feature_names, ids, rows[at:end])
            at = end

    def explain(self, user: UserContext, ids: list[str], reasons: list[str | None]) -> list[Explanation | None]:
        """Each published item's :class:`Explanation`: its ``reason`` (the source that
        contributed most to its blend), with what that source says of it (the learner's
        :meth:`~online_models.base.OnlineLearner.because`, asked once per source for the
        items it leads; the item's category for a popularity source). None where no source
        was credited. Only the list's ``k`` items are explained, never all candidates. Each
        item's explanation is its own, whichever other items are asked with it: a caller that
        ranked with ``rank_many(explain=False)`` asks here for the items it shows."""
        out: list[Explanation | None] = [None] * len(ids)
        groups: dict[str, list[int]] = {}  # source -> the places of the items it leads, in list order
        for at, reason in enumerate(reasons):
            if reason is not None:
                group = groups.get(reason)
                if group is None:
                    groups[reason] = [at]
                else:
                    group.append(at)
        for source, places in groups.items():
            learner = self.learners.get(source)  # None: an extra source (the Transformer)
            if learner is None:
                one = Explanation(source)  # immutable: one for all its items
                for at in places:
                    out[at] = one
                continue
            items = [ids[at] for at in places]
            because = learner.because(user, items)
            if learner.explains_by_category:
                categories = self._categories.get
                for at, item, b in zip(places, items, because or repeat(None), strict=False):
                    out[at] = Explanation(source, b, categories(item))
            elif because is None:
                one = Explanation(source)
                for at in places:
                    out[at] = one
            else:
                for at, b in zip(places, because, strict=True):
                    out[at] = Explanation(source, b)
        return out

    def recommend(self, user: UserContext, k: int | None = None) -> list[ScoredItem]:
        """:meth:`candidates` then :meth:`rank`, without extra scores."""
        return self.rank(user, self.candidates(user), k)

    # -- state ------------------------------------------------------------------------
    def category(self, item_id: str) -> str | None:
        return self._categories.get(item_id)

    def has_events(self, item_id: str) -> bool:
        """Whether an event has named ``item_id`` (among the ``max_items`` most recently named):
        an item without is *cold*, and only its content can recommend it."""
        return item_id in self._counts

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # lists awaiting a label are transient: not snapshotted
        state["_ranked"], state["_shown"] = {}, {}
        state.pop("_forget_hasher", None)  # not data; rebuilt from the salt
        return state

    def __setstate__(self, state: dict) -> None:
        """A snapshot from before forget_user has no session tracking and nobody forgotten."""
        self.__dict__.update(state)
        if "_forget_salt" not in state:
            self._forget_salt = os.urandom(16)
        if "_forgotten" not in state:
            self._forgotten = {}
        if "_forgotten_at" not in state:  # forgotten before trimming existed: trimmed by their bound
            self._forgotten_at = {}
        if "_session_users" not in state:
            self._session_users = {}
        if "topic_ids" not in state:  # from before topic ids were kept: the topics it learned are taken as current
            self.topic_ids = {}

    def snapshot(self, key: str | bytes | None = None) -> bytes:
        """Every learner, the re-ranker and the blend's own state, as versioned bytes.

        Lists waiting for the user's next event (re-ranker labels) are not included: after a
        restore the re-ranker misses one label per such user; predictions are unaffected.
        """
        params = {"config": asdict(self.config), "seed": self.seed, "learners": sorted(self.learners)}
        return dump_snapshot(self, params, self, key)

    @classmethod
    def restore(cls, data: bytes, key: str | bytes | None = None) -> Self:
        return load_snapshot(data, cls, key)[1]

    @property
    def versions(self) -> dict[str, str]:
        out = {name: learner.version for name, learner in self.learners.items()}
        out["reranker"] = self.reranker.version
        return out


#: users a session id is linked to at most; a session id sent by more (ids numbered per user:
#: "1" for everyone) is linked to all users, as ``()``: any user's erasure drops it
MAX_SESSION_OWNERS = 16


def _with_owner(held: str | tuple[str, ...], uid: str) -> str | tuple[str, ...]:
    """The users of a session whose latest event ``uid`` sent, ``held`` those before it (one, or
    a tuple of several; ``()``: more than :data:`MAX_SESSION_OWNERS`, so anyone's).

    >>> _with_owner("u1", "u2"), _with_owner(("u1", "u2"), "u1"), _with_owner(("u1", "u2"), "u3")
    (('u1', 'u2'), ('u1', 'u2'), ('u1', 'u2', 'u3'))
    >>> _with_owner(tuple(f"u{n}" for n in range(MAX_SESSION_OWNERS)), "x"), _with_owner((), "x")
    ((), ())
    """
    if type(held) is not tuple:
        return (held, uid)
    if not held or uid in held:
        return held
    return held + (uid,) if len(held) < MAX_SESSION_OWNERS else ()


def _bounded_put(store: dict, key: str, value: object, limit: int) -> None:
    store.pop(key, None)
    store[key] = value
    trim_oldest(store, limit)


__all__ = ["MAX_WEIGHT", "ForgetError", "Recommender", "RecommenderConfig", "parse_weights", "weight_ok"]
