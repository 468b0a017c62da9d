"""The pure step of the worker: (user states, valid events) → (new states, recommendations).

No Kafka, no Redis, no clock: the Faust agent loads state, calls :class:`RecommendationStep`
and writes back what it returns; the benchmarks and tests call the very same object.

Per micro-batch the step

1. skips events whose ``event_id`` the user's state already holds (redelivery),
2. measures live quality: was the user's next event in the last list sent to them?
3. feeds each event to the online models (``Recommender.learn_one``) and moves the
   user's state forward (:func:`stream.state.apply_event`),
4. for every user whose state changed: asks the models for candidates, scores all
   users' candidates with the Transformer in ONE batched call, blends and ranks,
5. returns one :class:`~stream.records.Recommendation` per changed user.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from online_models import Interaction, Recommender, UserContext
from stream.records import Event, PurchaseEvent, Recommendation, RecommendedItem
from stream.state import UserState, apply_event

LIVE_CUTOFFS = (10, 20)
#: users ranked per ``rank_many`` call: under the lists a Recommender keeps for
#: ``record_shown`` (1024), so none is dropped before it is recorded, and few enough that a
#: chunk's ranked lists are freed before the next (fewer garbage-collector passes)
_RANK_CHUNK = 64


@dataclass(frozen=True)
class StepConfig:
    top_k: int = 20
    n_candidates: int = 100
    max_recent: int = 50
    dedupe_window: int = 256
    exclude_purchased: bool = True


@dataclass
class LiveQuality:
    """Counts for online HR@K / MRR@K, added up by the caller into metrics."""

    judged: int = 0
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(LIVE_CUTOFFS, 0))
    reciprocal_rank_sum: float = 0.0


@dataclass
class StepResult:
    states: dict[str, UserState]
    recommendations: list[Recommendation]
    applied: list[Event]
    duplicates: int
    timings: dict[str, float]
    live: LiveQuality


def to_interaction(ev: Event) -> Interaction:
    purchase = isinstance(ev, PurchaseEvent)
    return Interaction(
        user_id=ev.user_id,
        item_id=ev.item_id,
        ts=ev.ts,
        kind="purchase" if purchase else "click",
        session_id=ev.session_id,
        category_id=ev.category_id,
        behavior="purchase" if purchase else "click",
        quantity=ev.quantity if purchase else 1,
    )


def user_context(state: UserState) -> UserContext:
    return UserContext(
        user_id=state.user_id,
        recent_items=tuple(state.recent_items),
        purchased=frozenset(state.purchased),
        session_id=state.session_id,
        ts=state.last_seen_ts or None,
    )


class RecommendationStep:
    """Learn from a batch of events and rank fresh top-K lists for the users it touched.

    ``scorer`` is anything with ``score(sequences, candidates) -> list[array]``, ``version``
    and ``provider`` (the Transformer from :mod:`gpu_scorer`), or ``None`` to rank with
    the online models alone.
    """

    def __init__(self, recommender: Recommender, scorer=None, config: StepConfig | None = None) -> None:
        self.recommender = recommender
        self.scorer = scorer
        self.config = config or StepConfig()

    def model_versions(self) -> dict[str, str]:
        versions = {name: str(v) for name, v in self.recommender.versions.items()}
        if self.scorer is not None:
            versions["transformer"] = str(self.scorer.version)
            versions["scorer_provider"] = str(self.scorer.provider)
        else:
            versions["transformer"] = "none"
        return versions

    def __call__(self, events: Sequence[Event], states: dict[str, UserState], now_ms: Callable[[], int],
                 positions: Sequence[tuple[str, int]] | None = None) -> StepResult:
        """``states`` holds the loaded state of every user in ``events``; ``now_ms`` stamps ``generated_ts``.

        ``positions``, where the events come from Kafka, gives each event's ``("topic:partition",
        offset)``; an event at or below the offset its user's state already applied is a redelivery.
        """
        cfg = self.config
        clock = time.perf_counter
        t0 = clock()
        changed: dict[str, UserState] = {}
        trigger: dict[str, Event] = {}
        applied: list[Event] = []
        duplicates = 0
        live = LiveQuality()
        learn = self.recommender.learn_one
        batch_ids: set[tuple[str, str]] = set()
        for n, ev in enumerate(events):
            source, offset = positions[n] if positions is not None else (None, None)
            state = states.get(ev.user_id)
            if state is None:
                state = states[ev.user_id] = UserState(ev.user_id)
            key = (ev.user_id, ev.event_id)
            if key in batch_ids or state.has_seen(ev.event_id, source, offset):
                duplicates += 1
                continue
            batch_ids.add(key)
            if state.last_recommended:
                self._judge(live, state.last_recommended, ev.item_id)
                state.last_recommended = []
            learn(to_interaction(ev), user_context(state))
            apply_event(state, ev.event_id, ev.item_id, ev.ts, "purchase" if isinstance(ev, PurchaseEvent) else "click",
                        max_recent=cfg.max_recent, dedupe_window=cfg.dedupe_window, session_id=ev.session_id,
                        source=source, offset=offset)
            changed[ev.user_id] = state
            trigger[ev.user_id] = ev
            applied.append(ev)
        t1 = clock()

        contexts = [user_context(s) for s in changed.values()]
        candidates = self.recommender.candidates_many(contexts, cfg.n_candidates)
        t2 = clock()
        extra: list[dict[str, np.ndarray] | None] = [None] * len(contexts)
        if self.scorer is not None and contexts:
            todo = [i for i, c in enumerate(candidates) if c and contexts[i].recent_items]
            if todo:
                scores = self.scorer.score([contexts[i].recent_items for i in todo], [candidates[i] for i in todo])
                for i, s in zip(todo, scores, strict=False):
                    s = np.asarray(s, dtype=float)  # aligned with the candidates: no dict to build
                    extra[i] = {"transformer": s if s.shape == (len(candidates[i]),)
                                else dict(zip(candidates[i], s.tolist(), strict=False))}
        t3 = clock()

        versions = self.model_versions()
        rank_many = self.recommender.rank_many
        record_shown = self.recommender.record_shown
        published: list[list[RecommendedItem]] = []
        for at in range(0, len(contexts), _RANK_CHUNK):
            chunk = contexts[at:at + _RANK_CHUNK]
            ranked_lists = rank_many(chunk, candidates[at:at + _RANK_CHUNK], cfg.top_k, extra[at:at + _RANK_CHUNK])
            for ctx, ranked in zip(chunk, ranked_lists, strict=True):
                if cfg.exclude_purchased and ctx.purchased:
                    ranked = [r for r in ranked if r.item_id not in ctx.purchased]
                record_shown(ctx.user_id, ranked)
                changed[ctx.user_id].last_recommended = [r.item_id for r in ranked]
                published.append(ranked)  # ScoredItem is RecommendedItem: published as ranked
        generated = now_ms()
        recommendations = []
        for ctx, items in zip(contexts, published, strict=True):
            ev = trigger[ctx.user_id]
            recommendations.append(Recommendation(
                user_id=ctx.user_id,
                items=items,
                trigger_event_id=ev.event_id,
                event_ts=ev.ts,
                generated_ts=generated,
                model=versions,
            ))
        t4 = clock()
        timings = {"learn": t1 - t0, "candidates": t2 - t1, "score": t3 - t2, "rank": t4 - t3}
        return StepResult(changed, recommendations, applied, duplicates, timings, live)

    @staticmethod
    def _judge(live: LiveQuality, shown: list[str], item_id: str) -> None:
        live.judged += 1
        try:
            rank = shown.index(item_id) + 1
        except ValueError:
            return
        for k in LIVE_CUTOFFS:
            if rank <= k:
                live.hits[k] += 1
        live.reciprocal_rank_sum += 1.0 / rank
