"""Offline evaluation through the worker's own step (``streamrec evaluate``).

Every contender is a :class:`~stream.pipeline.RecommendationStep` built by
:meth:`RecommendationStep.from_settings` from a :class:`~stream.settings.Settings`, over an
:class:`~stream.state.InMemoryUserStateStore`: the log's interactions become the events the
worker decodes, each batch's user states are loaded from the store, the step moves them
forward, ranks, learns, and the new states are saved, as the Faust agent does with Redis.

- ``served`` is the worker with the settings it would read (``STREAMREC_*``, defaults where
  unset), plus the registered Transformer when one is given.
- A learner by name (``popularity``, ``covisit``, ``session_hybrid``, ...) is a baseline: the
  same step and settings over a recommender whose only source is that learner, without the
  click re-ranker.

**Judging.** Each event of a user who had an earlier event is judged against the latest list
published to that user before it: the step's own judgement (:attr:`StepResult.judged
<stream.step_results.StepResult.judged>`), the one the worker's live hit rate counts. With
``batch_size=1`` (the default) every event is its own batch: the list judged is the one
ranked right after the user's previous event (test-then-learn). A larger batch replays the
log as a busy worker sees it: several events of a user may meet the same, older list.

Protocols:

- :func:`prequential`: the whole log in time order;
- :func:`session_rec`: learn a training log, then predict each next click of the test
  sessions, *learning* (the test log replayed in time order, test-then-learn) or *frozen*
  (``learn=False``: states move, models do not).

>>> from online_models.datasets import synthetic_interactions
>>> report = prequential(synthetic_interactions(n_events=300, seed=2), ["served", "popularity"])
>>> sorted(report["models"]), report["models"]["served"]["predictions"] > 0
(['popularity', 'served'], True)
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from online_models import Interaction, Recommender, RecommenderConfig, learner_classes
from online_models.datasets import score_references, sessions_of
from online_models.metrics import Judge, popularity_ranks
from stream.decoding import decode_event
from stream.errors import InvalidEvent
from stream.pipeline import RecommendationStep, default_models
from stream.records import Event, encode
from stream.settings import Settings
from stream.shell import load_arm_scorers
from stream.state import InMemoryUserStateStore
from stream.step_inputs import recommender_config, to_event
from stream.step_results import StepResult, VariantCounts

#: the worker as configured; the name the reports and the JSON summary keep
SERVED = "served"
#: contenders the prequential protocol runs when none are named
DEFAULT_MODELS = (SERVED, "popularity", "recent_popularity", "covisit")
#: the baselines ``served`` must beat
BASELINES = ("popularity", "recent_popularity", "covisit")
#: contenders the session-rec protocol runs when none are named
SESSION_MODELS = (SERVED, "session_hybrid", "covisit", "popularity")
#: the input partition the replay says its events come from (the step's watermark key)
SOURCE = "replay:0"


def learner_registry() -> dict[str, type]:
    """Learner classes by ``name`` (every concrete OnlineLearner of the library)."""
    return {cls.name: cls for cls in learner_classes()}


def contender_names() -> list[str]:
    return [SERVED, *sorted(learner_registry())]


def admit(log: Sequence[Interaction], settings: Settings, first: int = 0
          ) -> tuple[list[Interaction], list[Event], Counter]:
    """What the worker's door lets in: each interaction encoded as a producer sends it and
    decoded by the worker's own :func:`~stream.decoding.decode_event` with the settings'
    bounds (the static ones: a replayed log's time is not the worker's clock). Returns the
    admitted interactions, their events, and the refused counted by dead-letter code."""
    bounds = settings.bounds
    kept: list[Interaction] = []
    events: list[Event] = []
    refused: Counter = Counter()
    for n, x in enumerate(log):
        try:
            ev = decode_event(encode(to_event(x, f"e{first + n}")), bounds)
        except InvalidEvent as exc:
            refused[exc.code] += 1
            continue
        kept.append(x)
        events.append(ev)
    return kept, events, refused


def _sync(coro):
    """Run a coroutine that never waits (the in-memory store's) to its end, without a loop."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the in-memory store awaited something")  # pragma: no cover


class Contender:
    """One step over its own in-memory store, fed batches as the worker's agent feeds it."""

    def __init__(self, name: str, step: RecommendationStep):
        self.name = name
        self.step = step
        self.store = InMemoryUserStateStore()
        self.offset = 0
        self.step_s: list[float] = []
        #: events the step could not handle (the worker dead-letters them as processing_error)
        self.failed = 0
        #: per experiment arm: lists, attributed clicks and purchases, live hits, over the replay
        self.variants: dict[str, VariantCounts] = {}

    def feed(self, events: Sequence[Event], learn: bool = True) -> tuple[StepResult, dict]:
        """Load, step, save; returns the step's result and the states it started from."""
        states = _sync(self.store.load_many(dict.fromkeys(e.user_id for e in events)))
        positions = [(SOURCE, self.offset + i) for i in range(len(events))]
        self.offset += len(events)
        t0 = time.perf_counter()
        result = self.step(events, states, _no_clock, positions, learn=learn)
        self.step_s.append(time.perf_counter() - t0)
        self.failed += len(result.failures)
        for name, counts in result.variants.items():
            self.variants.setdefault(name, VariantCounts()).add(counts)
        _sync(self.store.save_docs(result.docs))
        return result, states


def _no_clock() -> int:
    return 0


def build_contender(name: str, settings: Settings, scorer=None, seed: int = 0) -> Contender:
    """``served`` (the worker under ``settings``, with ``scorer``) or one learner alone."""
    if name == SERVED:
        step = RecommendationStep.from_settings(settings, scorer)
        step.recommender = default_models(settings, step.experiment, seed=seed)
        step.arm_scorers = load_arm_scorers(step.experiment, settings)  # arms that pin a model version
        return Contender(name, step)
    registry = learner_registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(contender_names())}")
    base = recommender_config(settings)
    config = RecommenderConfig(k=base.k, n_candidates=base.n_candidates, exclude_purchased=base.exclude_purchased,
                               max_items=base.max_items, max_users=base.max_users, weights={name: 1.0},
                               reranker_weight=0.0)
    return Contender(name, RecommendationStep.from_settings(
        settings, None, Recommender({name: registry[name](seed=seed)}, config, seed)))


def _counter(progress: Callable[[int], None] | None) -> Callable[[int], None]:
    """A callback that adds up the events fed and hands the running total to ``progress``."""
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done)

    return tick


def _batches(items: Sequence, size: int):
    for at in range(0, len(items), size):
        yield items[at:at + size]


def _replay(contender: Contender, judge: Judge | None, events: Sequence[Event], batch_size: int,
            categories: dict[str, str], learn: bool = True,
            saved_pair: Callable[[Event], bool] | None = None,
            on_batch: Callable[[int], None] | None = None) -> None:
    """Feed ``events`` in batches; judge what the step judged (``saved_pair`` says whether a
    judged event's prediction is one of the saved lists' pairs)."""
    for batch in _batches(events, batch_size):
        for ev in batch:
            if ev.category_id is not None:
                categories[ev.item_id] = ev.category_id
        result, before = contender.feed(batch, learn)
        if judge is not None and result.judged:
            earlier: Counter = Counter()
            applied = {id(ev) for ev in result.applied}
            history = {}
            for n, ev in enumerate(batch):
                if id(ev) in applied:
                    st = before.get(ev.user_id)
                    history[n] = (st.clicks + st.purchases if st is not None else 0) + earlier[ev.user_id]
                    earlier[ev.user_id] += 1
            for n, shown in result.judged:
                ev = batch[n]
                judge.add(shown, ev.item_id, history[n], categories, saved_pair is not None and saved_pair(ev))
        if on_batch is not None:
            on_batch(len(batch))


def prequential(
    interactions: Iterable[Interaction],
    models: Sequence[str] | None = None,
    settings: Settings | None = None,
    scorer=None,
    ks: Sequence[int] = (10, 20),
    seed: int = 0,
    batch_size: int = 1,
    curve_points: int = 100,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Replay the log in time order (stable) through each contender; returns the summary.

    ``progress`` is called with the number of events done (all contenders together)."""
    settings = settings if settings is not None else Settings.from_env({})
    ks = _check_ks(ks, settings)
    log, events, refused = admit(sorted(interactions, key=lambda x: x.ts), settings)
    names = list(models) if models else list(DEFAULT_MODELS)
    contenders = [build_contender(name, settings, scorer, seed) for name in names]
    catalogue = len({x.item_id for x in log})
    popularity = popularity_ranks(log)
    every = max(1, len(events) // max(1, curve_points))
    tick = _counter(progress)

    out: dict[str, Any] = {}
    curves: dict[str, list] = {}
    for c in contenders:
        judge = Judge(ks)
        categories: dict[str, str] = {}
        for at in range(0, len(events), every):
            chunk = events[at:at + every]
            _replay(c, judge, chunk, batch_size, categories, on_batch=tick)
            judge.point(at + len(chunk))
        out[c.name] = {**judge.summary(catalogue, popularity, c.step_s), "dead_lettered": c.failed}
        curves[c.name] = [list(p) for p in judge.curve]
    report = {
        "protocol": "prequential",
        "events": len(events),
        "refused": dict(refused),
        "users": len({x.user_id for x in log}),
        "catalogue": catalogue,
        "ks": list(ks),
        "batch_size": batch_size,
        "judged": "every event of a user with an earlier event, against the latest list published to them before it",
        "models": out,
        "curves": curves,
        "settings": settings_summary(settings),
        "scorer": _scorer_name(scorer),
    }
    report["verdict"] = verdict(report["models"], ks[-1])
    served = next((c for c in contenders if c.name == SERVED), None)
    if served is not None and served.step.experiment is not None:  # streamrec report --json reads these two keys
        experiment = served.step.experiment
        report["experiment"] = experiment.name
        report["control"] = experiment.control
        report["variants"] = {name: served.variants.get(name, VariantCounts()).as_json() for name in experiment.names}
    return report


def session_rec(
    train: Iterable[Interaction],
    test: Iterable[Interaction],
    models: Sequence[str] | None = None,
    settings: Settings | None = None,
    scorer=None,
    ks: Sequence[int] = (10, 20),
    references: Mapping[str, Mapping[tuple[str, int], list[str]]] | None = None,
    modes: Sequence[str] = ("frozen", "learning"),
    seed: int = 0,
    batch_size: int = 1,
    train_batch_size: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The session-rec protocol through the step (see the module's docstring).

    The training log goes through the step as the live traffic it was: in batches of
    ``train_batch_size`` (default ``batch_size``), every list published and labelled by the
    user's next event for the click re-ranker; the test log in batches of ``batch_size`` in
    *learning* mode, click by click in *frozen* mode (a session at a time, where a batch would
    only hide lists).
    ``progress`` gets the number of events fed so far."""
    settings = settings if settings is not None else Settings.from_env({})
    ks = _check_ks(ks, settings)
    for mode in modes:
        if mode not in ("frozen", "learning"):
            raise ValueError(f"unknown mode {mode!r} (frozen, learning)")
    train, train_events, refused = admit(sorted(train, key=lambda x: x.ts), settings)
    test, test_events, refused_test = admit(list(test), settings, first=len(train))
    refused.update(refused_test)
    event_of = {id(x): ev for x, ev in zip(test, test_events, strict=True)}
    sessions = sessions_of(test)
    ref_scores = score_references(references, sessions, ks) if references else {}
    pairs = {p for lists in (references or {}).values() for p in lists if p[0] in sessions}
    names = list(models) if models else list(SESSION_MODELS)
    n_train = len(train)
    # the test events by session, in time order, and the (session, position) of each
    where: dict[str, tuple[str, int]] = {}
    by_session: dict[str, list[Event]] = {}
    for sid, seq in sessions.items():
        for pos, x in enumerate(seq):
            ev = event_of[id(x)]
            by_session.setdefault(sid, []).append(ev)
            where[ev.event_id] = (sid, pos)
    in_time = sorted(itertools.chain.from_iterable(by_session.values()), key=lambda ev: ev.ts)
    catalogue = len({x.item_id for x in train})
    popularity = popularity_ranks(itertools.chain(train, (x for seq in sessions.values() for x in seq)))
    predictions = sum(len(s) - 1 for s in sessions.values())
    every = max(1, predictions // 100)
    tick = _counter(progress)

    def saved(ev: Event) -> bool:
        """A judged event at session position p > 0 is the prediction made after position p - 1."""
        sid, pos = where[ev.event_id]
        return (sid, pos - 1) in pairs

    out: dict[str, dict[str, Any]] = {}
    curves: dict[str, list] = {}
    for name in names:
        out[name] = {}
        for mode in modes:
            c = build_contender(name, settings, scorer, seed)
            categories: dict[str, str] = {}
            t0 = time.perf_counter()
            _replay(c, None, train_events, train_batch_size or batch_size, categories, on_batch=tick)
            train_s = time.perf_counter() - t0
            c.step_s.clear()
            judge = Judge(ks)
            if mode == "frozen":  # session by session, click by click, the models as training left them
                for seq in by_session.values():
                    before = judge.metrics.n
                    _replay(c, judge, seq, 1, categories, learn=False, saved_pair=saved, on_batch=tick)
                    if judge.metrics.n // every > before // every:
                        judge.point(judge.metrics.n)
            else:
                for at in range(0, len(in_time), every):
                    chunk = in_time[at:at + every]
                    _replay(c, judge, chunk, batch_size, categories, saved_pair=saved, on_batch=tick)
                    judge.point(judge.metrics.n)
            result = judge.summary(catalogue, popularity, c.step_s)
            result["train_s"] = round(train_s, 2)
            result["dead_lettered"] = c.failed
            if pairs:
                result["saved_pairs"] = {"predictions": judge.saved.n, **judge.saved.summary()}
            out[name][mode] = result
            curves[f"{name} ({mode})"] = [list(p) for p in judge.curve]
    return {
        "protocol": "session-rec",
        "train_events": n_train,
        "refused": dict(refused),
        "test_sessions": len(sessions),
        "test_predictions": predictions,
        "catalogue": catalogue,
        "ks": list(ks),
        "modes": list(modes),
        "batch_size": batch_size,
        "references": ref_scores,
        "saved_pairs": len(pairs),
        "models": out,
        "curves": curves,
        "x_label": "test predictions (frozen: session by session; learning: in time order)",
        "settings": settings_summary(settings),
        "scorer": _scorer_name(scorer),
    }


def session_rec_units(train_events: int, test: Iterable[Interaction], n_models: int, n_modes: int) -> int:
    """The ``progress`` total of :func:`session_rec` (for a progress bar)."""
    return n_models * n_modes * (train_events + sum(len(s) for s in sessions_of(test).values()))


def _check_ks(ks: Sequence[int], settings: Settings) -> tuple[int, ...]:
    ks = tuple(sorted(set(ks)))
    if not ks or ks[0] < 1:
        raise ValueError(f"cut-offs must be positive, saw {list(ks)}")
    if ks[-1] > settings.top_k:
        raise ValueError(f"cut-off {ks[-1]} is longer than the lists the worker publishes "
                         f"(STREAMREC_TOP_K={settings.top_k}); raise STREAMREC_TOP_K or lower the cut-off")
    return ks


def verdict(models: Mapping[str, Mapping[str, Any]], k: int) -> dict[str, Any]:
    """Whether ``served``'s HR@k beats every baseline present."""
    key = f"HR@{k}"
    base = {b: models[b][key] for b in BASELINES if b in models}
    if SERVED not in models or not base or not models[SERVED].get("predictions"):
        return {}
    best = max(base, key=base.get)
    return {SERVED: {"beats_every_baseline": models[SERVED][key] > base[best], "best_baseline": best,
                     "margin": round(models[SERVED][key] - base[best], 4)}}


def settings_summary(settings: Settings) -> dict[str, str]:
    """The settings that shape a list, and any other that differs from its default."""
    default = {env: value for env, value, _ in Settings.from_env({}).describe()}
    shaping = {"STREAMREC_TOP_K", "STREAMREC_CANDIDATES", "STREAMREC_RECENT_ITEMS", "STREAMREC_BLEND_WEIGHTS",
               "STREAMREC_EXCLUDE_PURCHASED", "STREAMREC_BATCH_SIZE"}
    return {env: value for env, value, _ in settings.describe()
            if env in shaping or (value != default.get(env) and "URL" not in env and "KEY" not in env)}


def _scorer_name(scorer) -> str | None:
    return None if scorer is None else f"{getattr(scorer, 'version', '?')} on {getattr(scorer, 'provider', '?')}"


__all__ = ["BASELINES", "DEFAULT_MODELS", "SERVED", "SESSION_MODELS", "Contender", "admit", "build_contender", "prequential",
           "session_rec", "verdict"]
