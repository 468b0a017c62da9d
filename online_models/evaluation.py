"""Test-then-learn (prequential) evaluation through the same calls the worker makes.

The log is replayed in time order. Before each event of a user who already has history,
every contender recommends for the user's context as it stood after their previous event
(exactly what the worker would have published then), the list is judged against the
event's item, and only then does the contender learn from the event. Nothing is seen
before it is predicted, so the figures are honest online figures.

Contenders:

- a learner alone (``popularity``, ``recent_popularity``, ``trending``, ``covisit``,
  ``mf``, ``session_hybrid``, ...): ``learner.rank(user, None, k)``, the learner
  proposing from its own knowledge, then ``learner.learn_one(x, user)``;
- ``blend``: :meth:`Recommender.default` with the given config: ``candidates`` then
  ``rank`` (with the external scorer's scores as ``extra_scores["transformer"]`` when a
  scorer is given), ``record_shown``, ``learn_one``, as :mod:`stream.pipeline` does;
- ``blend+session``: the same with :class:`~online_models.session_knn.SessionHybrid` added
  as a source (weight ``session_hybrid`` in the config);
- ``scorer``: the external scorer alone, ranking the blend's candidates.

An external scorer is any callable ``(user_ctx, candidates) -> {item: score}``
(:data:`ExternalScorer`); :func:`batch_scorer` adapts the worker's batch scorer.

>>> from online_models.datasets import synthetic_interactions
>>> report = prequential(synthetic_interactions(n_events=400, seed=2), models=["popularity", "covisit"])
>>> sorted(report["models"]), report["models"]["covisit"]["predictions"] > 0
(['covisit', 'popularity'], True)
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from online_models.base import OnlineLearner, learner_classes
from online_models.metrics import RankingMetrics
from online_models.recommender import Recommender, RecommenderConfig
from online_models.session_knn import SessionHybrid
from online_models.types import Interaction, UserContext

#: ``(user context, candidates) -> {item: score}``; higher is better, missing = no score.
ExternalScorer = Callable[[UserContext, Sequence[str]], Mapping[str, float]]

#: Contenders the prequential protocol runs when none are named.
DEFAULT_MODELS = ("popularity", "recent_popularity", "trending", "covisit", "mf", "reminder", "session_hybrid", "blend",
                  "blend+session")
#: The baselines the blend must beat.
BASELINES = ("popularity", "recent_popularity", "covisit")
BLEND_NAMES = ("blend", "blend+session")
#: SessionHybrid + the Transformer trained on the training log (online_models/transformer_blend.py).
TRANSFORMER_HYBRID = "session_hybrid+transformer"


def batch_scorer(scorer: Any) -> ExternalScorer:
    """Adapt an object with ``score(sequences, candidates) -> list[array]`` (the worker's
    Transformer scorer) to :data:`ExternalScorer`."""

    def score(user: UserContext, candidates: Sequence[str]) -> Mapping[str, float]:
        if not candidates or not user.recent_items:
            return {}
        (row,) = scorer.score([user.recent_items], [list(candidates)])
        return dict(zip(candidates, (float(s) for s in row), strict=True))

    return score


class Contender(Protocol):
    name: str

    def recommend(self, user: UserContext, k: int) -> list[str]: ...

    def learn(self, x: Interaction, user: UserContext) -> None: ...


@dataclass
class LearnerContender:
    """One learner alone; it proposes and ranks from its own knowledge."""

    name: str
    learner: OnlineLearner

    def recommend(self, user: UserContext, k: int) -> list[str]:
        return [s.item_id for s in self.learner.rank(user, None, k)]

    def learn(self, x: Interaction, user: UserContext) -> None:
        self.learner.learn_one(x, user)


@dataclass
class BlendContender:
    """The Recommender as the worker drives it (candidates, rank, record_shown, learn)."""

    name: str
    recommender: Recommender
    scorer: ExternalScorer | None = None

    def recommend(self, user: UserContext, k: int) -> list[str]:
        rec = self.recommender
        candidates = rec.candidates(user)
        extra = None
        if self.scorer is not None and candidates:
            extra = {"transformer": self.scorer(user, candidates)}
        ranked = rec.rank(user, candidates, k, extra_scores=extra) if candidates else []
        rec.record_shown(user.user_id, ranked)
        return [s.item_id for s in ranked]

    def learn(self, x: Interaction, user: UserContext) -> None:
        self.recommender.learn_one(x, user)


@dataclass
class ScorerContender:
    """The external scorer alone, ranking the candidates of its own default blend."""

    name: str
    scorer: ExternalScorer
    recommender: Recommender

    def recommend(self, user: UserContext, k: int) -> list[str]:
        candidates = self.recommender.candidates(user)
        scores = self.scorer(user, candidates) if candidates else {}
        order = sorted((c for c in candidates if c in scores), key=lambda c: -scores[c])
        return order[:k]

    def learn(self, x: Interaction, user: UserContext) -> None:
        self.recommender.learn_one(x, user)


def default_config() -> RecommenderConfig:
    """The blend config the evaluation uses unless told otherwise (see docs/evaluation.md)."""
    return RecommenderConfig()


def session_config(base: RecommenderConfig | None = None, weight: float = 1.0) -> RecommenderConfig:
    """``base`` with the session learner switched on as a source of weight ``weight``."""
    cfg = base if base is not None else default_config()
    weights = dict(cfg.weights)
    weights.setdefault("session_hybrid", weight)
    return RecommenderConfig(**{**cfg.__dict__, "weights": weights})


def learner_registry() -> dict[str, type[OnlineLearner]]:
    """Learner classes by ``name`` (every concrete OnlineLearner imported)."""
    import online_models  # noqa: F401  (imports every learner module)
    import online_models.session_knn  # noqa: F401

    return {cls.name: cls for cls in learner_classes()}


def build_contenders(
    models: Sequence[str] | None = None,
    config: RecommenderConfig | None = None,
    scorer: ExternalScorer | None = None,
    seed: int = 0,
    session_params: Mapping[str, Any] | None = None,
) -> list[Contender]:
    """Fresh contenders by name; ``scorer`` adds ``scorer`` and feeds the blends."""
    names = list(models) if models else list(DEFAULT_MODELS)
    if scorer is not None and "scorer" not in names:
        names.append("scorer")
    registry = learner_registry()
    config = config if config is not None else default_config()
    out: list[Contender] = []
    for name in names:
        if name == "blend":
            out.append(BlendContender(name, Recommender.default(config, seed=seed), scorer))
        elif name == "blend+session":
            rec = Recommender.default(session_config(config), seed=seed)
            rec.learners["session_hybrid"] = SessionHybrid(**(session_params or {}), seed=seed)
            out.append(BlendContender(name, rec, scorer))
        elif name == TRANSFORMER_HYBRID:
            from online_models.transformer_blend import TransformerHybrid  # needs torch

            out.append(TransformerHybrid(name, seed=seed, session_params=session_params))
        elif name == "scorer":
            if scorer is None:
                raise ValueError("the 'scorer' contender needs an external scorer")
            out.append(ScorerContender(name, scorer, Recommender.default(config, seed=seed)))
        elif name in registry:
            cls = registry[name]
            kwargs = dict(session_params or {}) if cls is SessionHybrid else {}
            out.append(LearnerContender(name, cls(**kwargs, seed=seed)))
        else:
            known = sorted([*registry, "blend", "blend+session", "scorer", TRANSFORMER_HYBRID])
            raise ValueError(f"unknown model {name!r}; choose from {', '.join(known)}")
    return out


class ContextTracker:
    """Each user's context as the stream keeps it: recent items (oldest first, at most
    ``max_recent``), purchased items, session id and the last event's time. Bounded to
    ``max_users`` (least recently active forgotten)."""

    def __init__(self, max_recent: int = 50, max_users: int = 1_000_000):
        self.max_recent = max_recent
        self.max_users = max_users
        self._users: OrderedDict[str, UserContext] = OrderedDict()

    def context(self, user_id: str) -> UserContext:
        ctx = self._users.get(user_id)
        return ctx if ctx is not None else UserContext(user_id)

    def update(self, x: Interaction) -> None:
        ctx = self.context(x.user_id)
        recent = (*ctx.recent_items, x.item_id)[-self.max_recent:]
        purchased = ctx.purchased | {x.item_id} if x.kind == "purchase" else ctx.purchased
        self._users[x.user_id] = UserContext(x.user_id, recent, purchased, x.session_id, x.ts)
        self._users.move_to_end(x.user_id)
        if len(self._users) > self.max_users:
            self._users.popitem(last=False)


@dataclass
class ContenderStats:
    """What one contender accumulated during a replay."""

    metrics: RankingMetrics
    recommend_s: list[float] = field(default_factory=list)
    learn_s: list[float] = field(default_factory=list)
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (events, HR@kmax, MRR@kmax)

    def summary(self, catalogue: int) -> dict[str, Any]:
        out: dict[str, Any] = {"predictions": self.metrics.n, **self.metrics.summary(catalogue)}
        out["latency_ms"] = latency_summary(self.recommend_s, self.learn_s)
        return out


def latency_summary(recommend_s: Sequence[float], learn_s: Sequence[float]) -> dict[str, float]:
    """p50/p99 (ms) of recommend, learn, and recommend + learn per event."""
    out: dict[str, float] = {}
    n = min(len(recommend_s), len(learn_s))
    total = [recommend_s[i] + learn_s[i] for i in range(n)]
    for label, xs in (("recommend", recommend_s), ("learn", learn_s), ("event", total)):
        if xs:
            ordered = sorted(xs)
            out[f"{label}_p50"] = round(1000 * ordered[len(ordered) // 2], 4)
            out[f"{label}_p99"] = round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4)
    return out


def prequential(
    interactions: Iterable[Interaction],
    models: Sequence[str] | None = None,
    ks: Sequence[int] = (10, 20),
    config: RecommenderConfig | None = None,
    scorer: ExternalScorer | None = None,
    seed: int = 0,
    max_recent: int = 50,
    curve_points: int = 100,
    progress: Callable[[int], None] | None = None,
    contenders: Sequence[Contender] | None = None,
    session_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Next-event test-then-learn replay (sorted by time, stable); returns the summary.

    ``progress`` is called with the number of events done after each event.
    """
    events = sorted(interactions, key=lambda x: x.ts)
    if contenders is None:
        if models and TRANSFORMER_HYBRID in models:
            raise ValueError(f"{TRANSFORMER_HYBRID} trains its Transformer on a training log before predicting: "
                             "run it with the session-rec protocol")
        contenders = build_contenders(models, config, scorer, seed, session_params)
    ks = tuple(sorted(set(ks)))
    kmax = ks[-1]
    tracker = ContextTracker(max_recent)
    stats = {c.name: ContenderStats(RankingMetrics(ks)) for c in contenders}
    every = max(1, len(events) // max(1, curve_points))
    catalogue: set[str] = set()
    clock = time.perf_counter
    for i, x in enumerate(events):
        user = tracker.context(x.user_id)
        judged = bool(user.recent_items)
        for c in contenders:
            st = stats[c.name]
            t0 = clock()
            if judged:
                ranked = c.recommend(user, kmax)
                t1 = clock()
                st.metrics.update(ranked, x.item_id)
                st.recommend_s.append(t1 - t0)
            t1 = clock()
            c.learn(x, user)
            if judged:
                st.learn_s.append(clock() - t1)
        tracker.update(x)
        catalogue.add(x.item_id)
        if (i + 1) % every == 0 or i + 1 == len(events):
            for st in stats.values():
                st.curve.append((i + 1, st.metrics.value("HR", kmax), st.metrics.value("MRR", kmax)))
        if progress is not None:
            progress(i + 1)
    report = {
        "protocol": "prequential",
        "events": len(events),
        "users": len({x.user_id for x in events}),
        "catalogue": len(catalogue),
        "ks": list(ks),
        "judged": "every event of a user with at least one earlier event",
        "models": {name: st.summary(len(catalogue)) for name, st in stats.items()},
        "curves": {name: [list(p) for p in st.curve] for name, st in stats.items()},
        "config": _config_dict(config if config is not None else default_config()),
    }
    report["verdict"] = blend_verdict(report["models"], kmax)
    return report


def blend_verdict(models: Mapping[str, Mapping[str, Any]], k: int) -> dict[str, Any]:
    """Whether each blend's HR@k beats every baseline present."""
    key = f"HR@{k}"
    base = {b: models[b][key] for b in BASELINES if b in models}
    out: dict[str, Any] = {}
    for blend in BLEND_NAMES:
        if blend in models and base:
            best = max(base, key=base.get)
            out[blend] = {"beats_every_baseline": models[blend][key] > base[best], "best_baseline": best,
                          "margin": round(models[blend][key] - base[best], 4)}
    return out


def _config_dict(config: RecommenderConfig) -> dict[str, Any]:
    return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.__dict__.items()}


def plot_curves(report: Mapping[str, Any], path: str, title: str | None = None) -> None:
    """PNG of cumulative HR@K and MRR@K over the replay for each contender (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kmax = max(report["ks"])
    fig, (ax_hr, ax_mrr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in report["curves"].items():
        if not points:
            continue
        xs = [p[0] for p in points]
        ax_hr.plot(xs, [p[1] for p in points], label=name, lw=2 if name.startswith("blend") else 1.2)
        ax_mrr.plot(xs, [p[2] for p in points], label=name, lw=2 if name.startswith("blend") else 1.2)
    for ax, metric in ((ax_hr, "HR"), (ax_mrr, "MRR")):
        ax.set_xlabel(report.get("x_label", "events replayed"))
        ax.set_ylabel(f"cumulative {metric}@{kmax}")
        ax.grid(alpha=0.3)
    ax_hr.legend(fontsize=8)
    fig.suptitle(title or f"{report['protocol']} evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = [
    "BASELINES",
    "DEFAULT_MODELS",
    "BlendContender",
    "ContextTracker",
    "ExternalScorer",
    "LearnerContender",
    "ScorerContender",
    "batch_scorer",
    "build_contenders",
    "latency_summary",
    "plot_curves",
    "prequential",
]
