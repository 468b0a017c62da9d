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
from operator import attrgetter
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
from stream.step_inputs import recommender_config, to_event, to_interaction
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


class Retraining:
    """The served Transformer retrained as the log goes, as ``streamrec retrain`` does beside
    the workers: every ``every_s`` seconds of the log's time (counted from its first replayed
    event) ``fit`` gets every interaction before that moment (the training log's and the
    replayed ones), and the model it returns is served from ``delay_s`` seconds after that
    moment (the time a retrainer takes to train and register it), until the next one.
    ``fit(interactions) -> scorer`` (``streamrec evaluate`` trains with
    :class:`gpu_scorer.retraining.Retrainer`); a moment with no new interaction since the
    previous fit keeps the previous model.

    >>> fits = []
    >>> r = Retraining(lambda xs: fits.append(len(xs)) or f"model{len(fits)}", every_s=10, delay_s=2, ts_of=int)
    >>> class Step: scorer = "model0"
    >>> step, log = Step(), []
    >>> for ts in (0, 4_000, 11_000, 12_500, 13_000, 45_000):
    ...     r.advance(ts, step); served = step.scorer; r.record([ts]); log.append((ts // 1000, served))
    >>> log  # fit at 10 s on [0, 4] s, served from 12 s; 20 and 30 s: a fit on [0, 4, 11, 12.5, 13] s, served from 32 s
    [(0, 'model0'), (4, 'model0'), (11, 'model0'), (12, 'model1'), (13, 'model1'), (45, 'model2')]
    >>> fits, r.fits
    ([2, 5], 2)
    """

    def __init__(self, fit: Callable[[list], object], every_s: float, delay_s: float = 0.0,
                 history: Iterable = (), ts_of: Callable[[object], int] = attrgetter("ts")) -> None:
        if every_s <= 0 or delay_s < 0:
            raise ValueError(f"retraining needs every_s > 0 and delay_s >= 0, saw {every_s} and {delay_s}")
        self.fit = fit
        self.every_ms = every_s * 1000
        self.delay_ms = delay_s * 1000
        self.history = list(history)
        self.ts_of = ts_of
        self.next_at: float | None = None  # the next moment a model is fitted (None: before the first event)
        self.pending: list[tuple[float, object]] = []  # (served from, scorer)
        self.fits = 0
        self._fitted_on = -1  # how many interactions the last fit had

    def advance(self, ts_ms: int, step) -> None:
        """Before replaying events from ``ts_ms`` on: fit what is due, serve what is ready."""
        if self.next_at is None:
            self.next_at = ts_ms + self.every_ms
        while ts_ms >= self.next_at:
            cut = self.next_at
            known = [x for x in self.history if self.ts_of(x) < cut]
            if len(known) != self._fitted_on:
                self.pending.append((cut + self.delay_ms, self.fit(known)))
                self._fitted_on = len(known)
                self.fits += 1
            self.next_at += self.every_ms
        while self.pending and self.pending[0][0] <= ts_ms:
            step.scorer = self.pending.pop(0)[1]

    def record(self, interactions: Iterable) -> None:
        """What was replayed: the next fits learn it."""
        self.history.extend(interactions)


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
            on_batch: Callable[[int], None] | None = None, retraining: Retraining | None = None,
            targets: set[str] | None = None) -> None:
    """Feed ``events`` in batches; judge what the step judged (``saved_pair`` says whether a
    judged event's prediction is one of the saved lists' pairs); ``retraining`` swaps the
    step's Transformer as the log's time passes; ``targets`` gets the items judged."""
    for batch in _batches(events, batch_size):
        for ev in batch:
            if ev.category_id is not None:
                categories[ev.item_id] = ev.category_id
        if retraining is not None:
            retraining.advance(batch[0].ts, contender.step)
        result, before = contender.feed(batch, learn)
        if retraining is not None:
            retraining.record(to_interaction(ev) for ev in batch)
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
                if targets is not None:
                    targets.add(ev.item_id)
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
    retraining: Callable[..., Retraining] | None = None,
) -> dict[str, Any]:
    """Replay the log in time order (stable) through each contender; returns the summary.

    ``progress`` is called with the number of events done (all contenders together).
    ``retraining(history=...)``: a :class:`Retraining` for ``served``, whose Transformer is
    then retrained as the log goes."""
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
    targets: set[str] = set()  # the items judged
    for c in contenders:
        judge = Judge(ks)
        categories: dict[str, str] = {}
        retrain = retraining(history=()) if retraining is not None and c.name == SERVED else None
        for at in range(0, len(events), every):
            chunk = events[at:at + every]
            _replay(c, judge, chunk, batch_size, categories, on_batch=tick, retraining=retrain, targets=targets)
            judge.point(at + len(chunk))
        out[c.name] = {**judge.summary(catalogue, popularity, c.step_s), "dead_lettered": c.failed,
                       **_retrain_summary(retrain)}
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
        **_vocabulary_summary(scorer, targets),
    }
    report["verdict"] = verdict(report["models"], ks[-1])
    served = next((c for c in contenders if c.name == SERVED), None)
    if served is not None and served.step.experiment is not None:  # streamrec report --json reads these keys
        experiment = served.step.experiment
        report["experiment"] = experiment.name
        report["control"] = experiment.control
        report["variants"] = {name: served.variants.get(name, VariantCounts()).as_json() for name in experiment.names}
        report["shares"] = {arm.name: arm.share for arm in experiment.arms}  # the report's sample-ratio check
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
    retraining: Callable[..., Retraining] | None = None,
) -> dict[str, Any]:
    """The session-rec protocol through the step (see the module's docstring).

    The training log goes through the step as the live traffic it was: in batches of
    ``train_batch_size`` (default ``batch_size``), every list published and labelled by the
    user's next event for the click re-ranker; the test log in batches of ``batch_size`` in
    *learning* mode, click by click in *frozen* mode (a session at a time, where a batch would
    only hide lists).
    ``progress`` gets the number of events fed so far. ``retraining(history=...)``: a
    :class:`Retraining` for ``served`` in *learning* mode, which starts from the training log."""
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
    targets: set[str] = set()  # the items judged
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
            retrain = None
            if mode == "frozen":  # session by session, click by click, the models as training left them
                for seq in by_session.values():
                    before = judge.metrics.n
                    _replay(c, judge, seq, 1, categories, learn=False, saved_pair=saved, on_batch=tick,
                            targets=targets)
                    if judge.metrics.n // every > before // every:
                        judge.point(judge.metrics.n)
            else:
                retrain = retraining(history=train) if retraining is not None and name == SERVED else None
                for at in range(0, len(in_time), every):
                    chunk = in_time[at:at + every]
                    _replay(c, judge, chunk, batch_size, categories, saved_pair=saved, on_batch=tick,
                            retraining=retrain, targets=targets)
                    judge.point(judge.metrics.n)
            result = judge.summary(catalogue, popularity, c.step_s)
            result["train_s"] = round(train_s, 2)
            result["dead_lettered"] = c.failed
            result.update(_retrain_summary(retrain))
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
        **_vocabulary_summary(scorer, targets),
    }


def _retrain_summary(retrain: Retraining | None) -> dict[str, Any]:
    if retrain is None:
        return {}
    return {"retrained": {"every_s": retrain.every_ms / 1000, "delay_s": retrain.delay_ms / 1000, "fits": retrain.fits}}


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


#: below this share of the items judged in its vocabulary, the Transformer given to ``served``
#: was trained on other items (another shop, another log) and the report says so
LOW_VOCABULARY_SHARE = 0.5


def _vocabulary_summary(scorer, targets: set[str]) -> dict[str, Any]:
    """``{"scorer_vocabulary": ...}``: how many of the items judged the scorer's vocabulary
    holds, and a ``warning`` below :data:`LOW_VOCABULARY_SHARE`; empty without a scorer (or
    one without a vocabulary) or with no item judged. An item the vocabulary lacks is scored
    as the out-of-vocabulary row: the Transformer can neither rank it nor read it in a history."""
    vocab = getattr(scorer, "vocab", None)
    if vocab is None or not targets:
        return {}
    known = sum(1 for item in targets if item in vocab)
    share = known / len(targets)
    summary: dict[str, Any] = {"items_judged": len(targets), "in_vocabulary": known, "share": round(share, 4)}
    if share < LOW_VOCABULARY_SHARE:
        summary["warning"] = _vocabulary_warning(share, known, len(targets), _scorer_name(scorer))
    return {"scorer_vocabulary": summary}


def _vocabulary_warning(share: float, known: int, items: int, scorer: str | None) -> str:
    """The line that says the Transformer knows too few of the items judged."""
    return (f"warning: the Transformer ({scorer}) knows only {share:.0%} of the {items:,} distinct items judged "
            f"({known:,} in its vocabulary): it was trained on other items, so it adds little or nothing to "
            "'served' here; give --scorer-model a version trained on this data (streamrec train)")


__all__ = ["BASELINES", "DEFAULT_MODELS", "SERVED", "SESSION_MODELS", "Contender", "Retraining", "admit",
           "build_contender", "contender_names", "prequential", "session_rec", "session_rec_units", "verdict"]
