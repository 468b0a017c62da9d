"""The pure step of the worker: (user states, valid events) → (new states, recommendations).

No Kafka, no Redis, no clock of its own: the Faust agent loads state, calls
:class:`RecommendationStep` (handing it the worker's clock) and writes back what it returns;
the benchmarks and tests call the very same object.

Per micro-batch the step

1. **prepares** each event on a copy of its user's state: skips a redelivery (an event the
   user's state already holds), notes one the state holds but the models have not learned
   (after a crash, the models restart from an older snapshot: *learn only*), and moves the
   user's state forward (:func:`stream.state.apply_event`). The states it was given are
   never touched;
2. **ranks** once per user whose state changed: the models propose candidates, the
   Transformer scores every user's candidates in ONE batched call, the blend ranks, and the
   new state and the recommendation are encoded;
3. **learns**: feeds each event to the online models (``Recommender.learn_one``), in order,
   then records the lists it publishes (the re-ranker's labels);
4. returns one :class:`~stream.records.Recommendation` per changed user, the encoded states
   to save, the events it could not handle, and its judgement of each applied event of a user
   with history: the latest list published to the user before it (:attr:`StepResult.judged`,
   counted in :attr:`StepResult.live` for the live hit rate; ``streamrec evaluate`` adds up
   the same judgements offline).

**Failures stay with the events that cause them.** Any exception in steps 1 to 3 is caught:
in step 1 and 3 it belongs to one event; in step 2 to one user, found by splitting the users
in halves until the failing ones are alone (ranking has no lasting effect, so a user may be
ranked again). That user's events, or that one event, come back in :attr:`StepResult.failures`
(the worker dead-letters them as ``processing_error``) and every other event is applied
once. Learning comes last, once an event is known good, so a user whose ranking fails
teaches the models nothing; an event whose learning raises is taken out and its user's state
and list are worked out again without it. What cannot be undone is what the learners that ran
before the failing one took from that event (docs/architecture.md).

Ranking comes before learning within a batch: a list reflects the models as they were at
the start of the batch and the user's state after all of the user's events in it.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from online_models import Interaction, Recommender, ScoredItem, UserContext
from online_models.base import trim_oldest
from online_models.recommender import ForgetError
from online_models.search.catalogue import CatalogueMemo
from online_models.search.cold_start import ContentMatcher
from stream.errors import ConfigError
from stream.experiments import (
    DEFAULT_VARIANT,
    RECS_KEPT,
    Arm,
    Attribution,
    Experiment,
    attribute,
    home_list,
    load_experiment,
    new_to_arm,
    rec_tag,
    remembered,
    serving_view,
    shuffled,
    tag_of,
)
from stream.records import (
    Event,
    ForgetRequest,
    PurchaseEvent,
    Recommendation,
    RecommendedItem,
    encode,
)
from stream.settings import Settings
from stream.state import UserState, apply_event, encode_state, fingerprint
from stream.step_inputs import (
    StepConfig,
    check_proposers,
    recommender_config,
    to_interaction,
    user_context,
)
from stream.step_results import (
    G_CLICKED,
    G_HITS20,
    G_JUDGED,
    G_LISTS,
    G_PURCHASED,
    G_REVENUE,
    Failure,
    LiveQuality,
    StepResult,
    VariantCounts,
    judge,
)

#: users ranked per ``rank_many`` call: few enough that a chunk's numpy work stays in cache
_RANK_CHUNK = 64

#: items of the catalogue that a user's latest search adds to their home-page candidates
QUERY_CANDIDATES = 20
#: queries whose matches are remembered between batches (until the catalogue changes)
QUERY_CACHE = 4096
#: the numbers of rec ids under one random prefix: 9 hex digits, so that the prefix (10), the
#: number, "-" and the arm's tag (4) fit in 24 characters; past them a fresh prefix is drawn
REC_NUMBERS = 16 ** 9


@dataclass(slots=True)
class _Plan:
    """What step 1 worked out: per user, the state after their events, on a copy."""

    #: user -> their new state (a copy), and the indices of their events applied to it
    states: dict[str, UserState] = field(default_factory=dict)
    applied: dict[str, list[int]] = field(default_factory=dict)
    #: index -> (the interaction, the user's context before it) for every event to learn
    lessons: dict[int, tuple[Interaction, UserContext | None]] = field(default_factory=dict)
    #: the lessons of events the user's state held already (learn only)
    learn_only: set[int] = field(default_factory=set)
    learned_only: int = 0
    duplicates: int = 0
    #: events of a user forgotten after them: neither applied nor learned
    refused: int = 0
    #: index -> the list the event is credited to (stream/experiments.py)
    attributed: dict[int, Attribution] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class _Ranked:
    items: list[RecommendedItem]
    state: UserState
    doc: bytes
    recommendation: Recommendation
    payload: bytes
    #: whether the list labels the re-ranker's training data (a baseline arm's lists do not:
    #: their features mean something else, and the blend arms' re-ranker must not learn them)
    teaches: bool = True


def _merged_recs(theirs: list, ours: list) -> list:
    """The lists two copies of a user's state remember (``UserState.recs``, each entry ``[rec_id,
    ts, flags, ...]``), as one: each list once, with the flags either set, oldest first, the
    newest :data:`~stream.experiments.RECS_KEPT`.

    >>> _merged_recs([["a", 1, 1], ["b", 3, 0]], [["a", 1, 2], ["c", 2, 0]])
    [['a', 1, 3], ['c', 2, 0], ['b', 3, 0]]
    """
    merged = {entry[0]: entry for entry in theirs}
    for entry in ours:
        held = merged.get(entry[0])
        merged[entry[0]] = entry if held is None else [*entry[:2], entry[2] | held[2], *entry[3:]]
    return sorted(merged.values(), key=lambda entry: entry[1])[-RECS_KEPT:]


def _join(scores: list[dict[str, float] | None], candidates: list[list[str]]) -> list[dict[str, float] | None] | None:
    """Add each user's scored items to their candidates (in place, once each); ``scores``, or
    None when no user has any."""
    found = False
    for i, scored in enumerate(scores):
        if scored:
            found = True
            have = set(candidates[i])
            candidates[i].extend(item for item in scored if item not in have)
    return scores if found else None


def default_models(settings: Settings, experiment: Experiment | None = None, seed: int = 0) -> Recommender:
    """The worker's models under ``settings``: :func:`recommender_config`'s blend, plus every
    learner an experiment's arm turns on (a learner off in the blend, say ``mf``, is not built
    otherwise); the blend still serves with its own weights, and such a learner learns every
    event for the arms that use it."""
    config = recommender_config(settings)
    if experiment is None:
        return Recommender.default(config, seed=seed)
    wanted = dict(config.weights)
    for arm in experiment.arms:
        served = arm.config(config)
        check_proposers(served, f"STREAMREC_VARIANTS arm {arm.name!r}")
        if served.n_candidates < served.k:
            raise ConfigError(f"STREAMREC_VARIANTS arm {arm.name!r}: candidates = {served.n_candidates} is fewer than "
                              f"STREAMREC_TOP_K={served.k}: its lists would hold at most {served.n_candidates} items")
        for name, weight in served.weights.items():  # a popularity baseline's trending too
            wanted[name] = max(wanted.get(name, 0.0), weight)
    recommender = Recommender.default(replace(config, weights=wanted), seed=seed)
    recommender.config = config
    return recommender


class RecommendationStep:
    """Learn from a batch of events and rank fresh top-K lists for the users it touched.

    ``scorer`` is anything with ``score(sequences, candidates) -> list[array]``, ``version``
    and ``provider`` (the Transformer from :mod:`gpu_scorer`), or ``None`` to rank with
    the online models alone.
    """

    #: positions of the latest dead letters remembered, so that Kafka redelivering one (to a
    #: worker whose state write was fenced) does not apply it after all
    DEAD_LETTERS_KEPT = 65_536

    #: the variant name counters go under when no experiment is set
    DEFAULT_VARIANT = DEFAULT_VARIANT

    def __init__(self, recommender: Recommender, scorer=None, config: StepConfig | None = None,
                 experiment: Experiment | None = None, arm_scorers: Mapping[str, object] | None = None) -> None:
        self.recommender = recommender
        self.scorer = scorer
        self.config = config or StepConfig()
        self._dead_letters: dict[tuple[str, int], None] = {}
        #: the arms users are split into (None: everyone gets the recommender's own blend)
        self.experiment = experiment
        #: scorers of arms that pin a model version (arm name -> scorer); other arms use ``scorer``
        self.arm_scorers = dict(arm_scorers or {})
        # rec ids: unique across workers and restarts (a random prefix per step), bounded (<= 24 chars)
        self._rec_prefix = os.urandom(5).hex()
        self._rec_numbers = itertools.count()
        #: per user of the batch, their remembered lists before ranking (a retried ranking starts from them)
        self._pre_rank_recs: dict[str, list[list]] = {}
        #: the catalogue searches retrieve from (online_models.search.Catalogue; the worker's shell
        #: sets it): a user's latest query adds its matches to their candidates (query_candidates),
        #: and new items close to their recent ones join them too (content_candidates)
        self.catalogue = None
        self._content: ContentMatcher | None = None
        self._query_memo: CatalogueMemo | None = None

    @classmethod
    def from_settings(cls, settings: Settings, scorer=None, recommender: Recommender | None = None
                      ) -> RecommendationStep:
        """The step the worker runs under ``settings``: :func:`recommender_config`'s blend
        (unless ``recommender`` is given), ``scorer`` and the state knobs. The worker, the
        evaluation and the benchmarks all build their step here."""
        experiment = None
        if settings.variants:
            sources = [*Recommender.DEFAULT_LEARNERS, *Recommender.EXTRA_SOURCES]
            experiment = load_experiment(settings.variants, sources)
        if recommender is None:
            recommender = default_models(settings, experiment)
        return cls(recommender, scorer, StepConfig(max_recent=settings.recent_items,
                                                   dedupe_window=settings.dedupe_window,
                                                   attribution_window_ms=settings.attribution_window_s * 1000,
                                                   query_ttl_ms=settings.query_ttl_s * 1000),
                   experiment)

    def variant_of(self, site_user_id: str) -> str:
        """The name of the arm the user (by the id the site sends) is in."""
        return self.experiment.arm_of(site_user_id).name if self.experiment is not None else self.DEFAULT_VARIANT

    def served_by(self, rec_id: str) -> str | None:
        """The arm that served the list ``rec_id``, as its id names it (:meth:`new_rec_id`), when
        that is one of this step's arms (``"default"`` without an experiment); else None."""
        if self.experiment is not None:
            return self.experiment.arm_named(rec_id)
        return self.DEFAULT_VARIANT if tag_of(rec_id) == rec_tag(self.DEFAULT_VARIANT) else None

    def variant_credited(self, rec_id: str, site_user_id: str) -> str | None:
        """The arm an event credited to the list ``rec_id`` counts under: the arm that served the
        list (:meth:`served_by`), whatever arm its user is in now; the user's arm
        (:meth:`variant_of`) when the id names no arm (a list remembered from before rec ids
        named it, or an id the site made); None, counted under no arm, when it names an arm this
        step does not have (removed or renamed since the list was served): the counters' labels
        stay the configured arms."""
        if tag_of(rec_id) is None:
            return self.variant_of(site_user_id)
        return self.served_by(rec_id)

    def scorer_of(self, arm: Arm) -> object | None:
        """The Transformer that ranks for ``arm``: its pinned version's, else the step's; none
        for an arm that uses no model."""
        return self.arm_scorers.get(arm.name, self.scorer) if arm.uses_model else None

    def present_list(self, state: UserState, k: int, now_ts: int, site_user_id: str | None = None
                     ) -> tuple[list[ScoredItem], str]:
        """The list the worker would rank for ``state`` now, learning nothing (``streamrec serve``'s
        recommendations), and the name of the arm that ranked it (``"default"`` without an
        experiment): the user's arm's blend and Transformer under an experiment, the arm chosen by
        the id the site sends (``site_user_id``, default the state's), as the worker chooses it,
        baselines included: a popularity arm's trending items, a shuffle arm's candidates in a
        random order fixed by the user's id (the blend's ranking, shown to a user of the shuffle
        arm, would credit that arm with what ranking adds)."""
        recommender = self.recommender
        config, scorer, arm = recommender.config, self.scorer, None
        if self.experiment is not None:
            arm = self.experiment.arm_of(site_user_id or state.user_id)
            config, scorer = arm.config(config), self.scorer_of(arm)
        view = serving_view(recommender, replace(config, k=k))
        contexts = [user_context(state)]
        candidates = view.candidates_many(contexts)  # as _rank_arm does for a batch
        queried = self.query_candidates([state], [now_ts], candidates)
        content = self.content_candidates(contexts, candidates)
        variant = arm.name if arm is not None else self.DEFAULT_VARIANT
        if arm is not None and arm.baseline == "shuffle":  # as _rank_arm: no ranking at all
            picked = shuffled(candidates[0], site_user_id or state.user_id)[:k]
            return [RecommendedItem(item, 1.0 - i / max(1, k), "shuffle") for i, item in enumerate(picked)], variant
        (items,) = view.rank_many(contexts, candidates, k, self.extra_scores(scorer, contexts, candidates, queried,
                                                                             content))
        recommender.forget_ranked(state.user_id)
        return items, variant

    def new_rec_id(self, variant: str = DEFAULT_VARIANT) -> str:
        """A fresh ``rec_id`` for a list ``variant`` (an arm's name) serves: unique across workers
        and restarts (a random prefix per step, and a number), at most 24 characters, ending
        with ``-`` and the arm's :func:`~stream.experiments.rec_tag`, so that an event echoing
        it, or credited to it, counts under that arm (:meth:`variant_credited`)."""
        n = next(self._rec_numbers)
        if n >= REC_NUMBERS:  # 68 billion lists under one prefix: a fresh one keeps the id short
            self._rec_prefix, self._rec_numbers = os.urandom(5).hex(), itertools.count(1)
            n = 0
        return f"{self._rec_prefix}{n:x}-{rec_tag(variant)}"

    def model_versions(self) -> dict[str, str]:
        versions = {name: str(v) for name, v in self.recommender.versions.items()}
        if self.scorer is not None:
            versions["transformer"] = str(self.scorer.version)
            versions["scorer_provider"] = str(self.scorer.provider)
        else:
            versions["transformer"] = "none"
        return versions

    def __call__(self, events: Sequence[Event], states: dict[str, UserState], now_ms: Callable[[], int],
                 positions: Sequence[tuple[str, int]] | None = None, learn: bool = True,
                 site_ids: Mapping[str, str] | None = None, clock_ms: int | None = None) -> StepResult:
        """``states`` holds the loaded state of every user in ``events`` (missing users start
        fresh); it is read, never changed. ``now_ms`` stamps ``generated_ts``.

        ``clock_ms``: the worker's clock when it took the batch (the one its decoder's ``ts``
        window used). The models learn an event dated after it as of it
        (:func:`~stream.step_inputs.to_interaction`); the user's state, the published list's
        ``event_ts`` and attribution keep the event's own ``ts``. None (the evaluator, the
        benchmarks: a replayed log has no clock): every event is learned at its own ``ts``.

        ``site_ids`` (pseudonym -> the id the site sent, under ``STREAMREC_PSEUDONYM_KEY``): the
        recommendations name, and are published under, the site's ids; everything else keeps
        the events' (pseudonymous) ids.

        ``positions``, where the events come from Kafka, gives each event's ``("topic:partition",
        offset)``: an event at or below the offset its user's state already applied is a
        redelivery, and one at or below the models' watermark for its partition
        (``Recommender.learned_offsets``) was learned already.
        """
        clock = time.perf_counter
        timings = dict.fromkeys(("learn", "candidates", "score", "rank"), 0.0)
        t0 = clock()
        plan = self._prepare(events, states, positions, range(len(events)), clock_ms)
        timings["learn"] += clock() - t0

        versions = self.model_versions()
        self._pre_rank_recs = {}
        ranked, rank_failed = self._rank_isolated(plan.states, events, plan.applied, versions, now_ms, timings,
                                                  site_ids)
        failures = plan.failures
        for uid, exc in rank_failed.items():  # the user's events are neither applied nor learned
            failures.extend(Failure(i, "rank", exc) for i in plan.applied.pop(uid))
            del plan.states[uid]

        t1 = clock()
        if not learn:
            plan.lessons.clear()
            plan.learn_only.clear()
        failed_learning = self._learn(events, positions, plan, failures)
        if failed_learning:  # their users' states and lists, again without the events taken out
            out = {f.index for f in failures}
            redo = self._prepare(events, states, positions,
                                 sorted(i for u in failed_learning for i in plan.applied[u] if i not in out), clock_ms)
            for uid in failed_learning:
                for i in plan.applied.get(uid, ()):  # their attributions, as worked out again
                    plan.attributed.pop(i, None)
                self._pre_rank_recs.pop(uid, None)
                if uid in redo.states:
                    plan.states[uid], plan.applied[uid] = redo.states[uid], redo.applied[uid]
                    plan.attributed.update({i: redo.attributed[i] for i in redo.applied[uid] if i in redo.attributed})
                else:  # nothing of theirs left to apply
                    plan.states.pop(uid, None)
                    plan.applied.pop(uid, None)
                    ranked.pop(uid, None)
            again, failed_again = self._rank_isolated({u: plan.states[u] for u in failed_learning if u in plan.states},
                                                      events, plan.applied, versions, now_ms, timings, site_ids)
            ranked.update(again)
            for uid in failed_again:  # learned already: applied, but no list this time
                ranked.pop(uid, None)
        record_shown, forget_ranked = self.recommender.record_shown, self.recommender.forget_ranked
        for uid, r in ranked.items():
            (record_shown if learn and r.teaches else forget_ranked)(uid, r.items)
        self._advance(positions)
        if positions is not None and failures:
            self._remember_dead([positions[f.index] for f in failures])
        timings["learn"] += clock() - t1

        docs: dict[str, bytes] = {}
        new_states: dict[str, UserState] = {}
        recommendations, payloads, served_users = [], [], []
        for uid, state in plan.states.items():
            r = ranked.get(uid)
            if r is not None:
                new_states[uid], docs[uid] = r.state, r.doc
                recommendations.append(r.recommendation)
                served_users.append(uid)
                payloads.append(r.payload)
            else:  # ranked before its learning failed, or not at all: saved without a new list
                state.last_recommended = []
                new_states[uid], docs[uid] = state, encode_state(state)
        applied = sorted(i for idx in plan.applied.values() for i in idx)
        live, judged, ranks = judge(events, states, plan.applied)
        failures.sort(key=lambda f: f.index)
        variants = self._count_variants(events, plan, recommendations, served_users, judged, ranks, site_ids, live,
                                        states)
        return StepResult(new_states, docs, recommendations, payloads, [events[i] for i in applied], plan.duplicates,
                          timings, live, learned_only=plan.learned_only, failures=failures, judged=judged,
                          refused=plan.refused, variants=variants, by_user=plan.applied)

    def _count_variants(self, events: Sequence[Event], plan: _Plan, recommendations: list[Recommendation],
                        served_users: list[str], judged: list[tuple[int, list[str]]], ranks: list[int | None],
                        site_ids: Mapping[str, str] | None, live: LiveQuality,
                        states: Mapping[str, UserState]) -> dict[str, VariantCounts]:
        """Per arm: the lists published (``served_users``: whose, in the same order) and the users
        new to the arm among them, the applied events credited to a list (under the arm
        that served that list: :meth:`variant_credited`), and the live hit rate: each applied
        event judged against the list its user had when the batch began (``states``), under the
        arm that served that list (its ``rec_id``: :func:`~stream.experiments.home_list`), or
        the user's arm where that names none. ``ranks``: each judged event's rank in its list,
        as :func:`judge` found it."""
        out: defaultdict[str, VariantCounts] = defaultdict(VariantCounts)
        variant_of = self.variant_of
        names: dict[str, str] = {}

        def site_id(uid: str) -> str:
            return site_ids.get(uid, uid) if site_ids else uid

        def counts_for(uid: str) -> VariantCounts:
            name = names.get(uid)
            if name is None:
                name = names[uid] = variant_of(site_id(uid))
            return out[name]

        for rec, uid in zip(recommendations, served_users, strict=True):  # named by their arm already
            c = out[rec.variant]
            c.lists += 1
            c.group(rec.user_id)[G_LISTS] += 1  # published under the site's id
            before = states.get(uid)
            if before is None or new_to_arm(before.recs, rec.variant):
                c.users += 1
        attributed = plan.attributed
        if attributed:
            for uid, idx in plan.applied.items():
                for n in idx:
                    credit = attributed.get(n)
                    if credit is None:
                        continue
                    if tag_of(credit.rec_id) is None:  # a list whose id names no arm: the user's
                        c = counts_for(uid)
                    else:
                        name = self.served_by(credit.rec_id)
                        if name is None:  # an arm not in the experiment (any more): under none
                            continue
                        c = out[name]
                    ev = events[n]
                    group = c.group(site_id(uid))
                    if isinstance(ev, PurchaseEvent):
                        c.purchases += 1
                        c.purchased_lists += credit.first
                        group[G_PURCHASED] += credit.first
                        if ev.price is not None:
                            c.revenue += ev.price * ev.quantity
                            group[G_REVENUE] += ev.price * ev.quantity
                    else:
                        c.clicks += 1
                        c.clicked_lists += credit.first
                        group[G_CLICKED] += credit.first
        served: dict[str, VariantCounts | None] = {}  # user -> the counts of the arm of the list judged
        for (n, _), rank in zip(judged, ranks, strict=True):
            uid = events[n].user_id
            if uid not in served:
                state = states.get(uid) if self.experiment is not None else None  # one variant: "default"
                rec_id = home_list(state.recs) if state is not None else None
                if rec_id is None or tag_of(rec_id) is None:  # a list from before rec ids named arms
                    served[uid] = counts_for(uid)
                else:
                    name = self.served_by(rec_id)
                    served[uid] = out[name] if name is not None else None  # an arm no longer configured: none
            c = served[uid]
            if c is not None:
                if self.experiment is not None:
                    c.live.add(rank)
                group = c.group(site_id(uid))
                group[G_JUDGED] += 1
                if rank is not None and rank <= 20:
                    group[G_HITS20] += 1
        if self.experiment is None and live.judged:
            out[self.DEFAULT_VARIANT].live = live
        return dict(out)

    def relearn(self, events: Sequence[Event], positions: Sequence[tuple[str, int]],
                seen: set[tuple[str, str]] | None = None, clock_ms: int | None = None) -> int:
        """Teach the models events their state already holds (a replay after a restart from an
        older snapshot): those above the models' watermark are learned, in order, without a
        user context; returns how many. One that raises is skipped, as the live step would
        have dead-lettered it; a repeated ``(user, event_id)`` (in ``seen``, which collects
        them over a replay's calls) is skipped as the live step's duplicate. ``clock_ms``: the
        worker's clock, as for the live step (an event dated after it is learned as of it)."""
        watermark = self.recommender.learned_offsets
        learn = self.recommender.learn_one
        refuses = self.recommender.refuses if self.recommender.forgotten_users else None
        seen = set() if seen is None else seen
        n = 0
        for ev, (source, offset) in zip(events, positions, strict=True):
            key = (ev.user_id, ev.event_id)
            if offset <= watermark.get(source, -1) or key in seen:
                continue
            if refuses is not None and refuses(ev.user_id, ev.ts):  # forgotten since: never learned again
                watermark[source] = offset
                continue
            seen.add(key)
            try:
                learn(to_interaction(ev, clock_ms), None)
                n += 1
            except Exception:  # noqa: BLE001 - the live step dead-letters such an event
                pass
            watermark[source] = offset
        return n

    def forget(self, requests: Sequence[ForgetRequest], positions: Sequence[tuple[str, int]] | None = None,
               now_ms: int | None = None) -> list[tuple[ForgetRequest, BaseException]]:
        """Erase each request's user from the models (``Recommender.forget_user``: their
        histories, sessions and factors; what stays is anonymous item statistics) and refuse
        their events up to the request's ``ts`` from now on, in this step and in
        :meth:`relearn`. ``positions``: where the requests come from (the watermark moves past
        them); ``now_ms``: the worker's clock, by which the models stop remembering the user
        once Kafka holds none of their older events (``Recommender.trim_forgotten``).
        Idempotent: a request delivered again changes nothing more.

        Never raises: a model whose purge raises (a bug) comes back as ``(request, error)``;
        the user is refused all the same (``Recommender.forget_user`` records that first)."""
        failed = []
        for req in requests:
            try:
                self.recommender.forget_user(req.user_id, req.ts, now_ms)
            except ForgetError as exc:  # names the learner; says nothing of the user
                failed.append((req, exc))
            except Exception as exc:  # noqa: BLE001 - reported (never its text: it may hold the id); the erasure goes on
                failed.append((req, ForgetError("the models", exc)))
        self._advance(positions)
        return failed

    def merged_docs(self, events: Sequence[Event], positions: Sequence[tuple[str, int]] | None, result: StepResult,
                    stored: Mapping[str, UserState]) -> dict[str, bytes]:
        """The documents to save in place of ``result.docs`` for the users of ``stored``: what
        the store holds now, which another writer saved after this batch loaded them
        (:class:`~stream.state.StateConflict`: their events reached two workers). Each user's
        events of the batch are applied to it, in order, save those it holds already; the list
        the batch published to them is their latest, and the lists both remember are kept, with
        the clicks and purchases either credited them. Each document counts one save more than
        the stored one. The models are not touched: they learned the batch once already.

        >>> import msgspec
        >>> from stream.records import ClickEvent
        >>> step = RecommendationStep(Recommender.default())
        >>> ev = [ClickEvent(event_id="e2", user_id="u1", item_id="i2", ts=2_000)]
        >>> result = step(ev, {"u1": UserState("u1")}, lambda: 2_001)
        >>> theirs = apply_event(UserState("u1", version=1), "e1", "i1", 1_000, "click", max_recent=50, dedupe_window=8)
        >>> merged = step.merged_docs(ev, None, result, {"u1": theirs})
        >>> state = msgspec.json.decode(merged["u1"], type=UserState)
        >>> state.recent_items, state.clicks, state.version
        (['i1', 'i2'], 2, 2)
        """
        cfg = self.config
        out: dict[str, bytes] = {}
        for uid, now in stored.items():
            state = now.copy()
            for n in result.by_user.get(uid, ()):
                ev = events[n]
                source, offset = positions[n] if positions is not None else (None, None)
                if state.has_seen(ev.event_id, source, offset):
                    continue
                state = apply_event(state, ev.event_id, ev.item_id, ev.ts,
                                    "purchase" if isinstance(ev, PurchaseEvent) else "click",
                                    max_recent=cfg.max_recent, dedupe_window=cfg.dedupe_window,
                                    session_id=ev.session_id, source=source, offset=offset)
            ours = result.states.get(uid)
            if ours is not None:
                state.last_recommended = list(ours.last_recommended)
                state.recs = _merged_recs(state.recs, ours.recs)
            state.version = now.version + 1
            out[uid] = encode_state(state)
        return out

    def advance(self, positions: Sequence[tuple[str, int]], dead: bool = False) -> None:
        """Move the models' watermark past ``positions``; ``dead``: they were dead-lettered
        (the step passes over them if Kafka delivers them again)."""
        self._advance(positions)
        if dead:
            self._remember_dead(positions)

    def start_reading(self, starts: Mapping[str, int]) -> None:
        """The models begin to learn a partition they know nothing of at ``starts[source]``
        (where a reader starts it): their watermark for it is set just before, so that what
        they miss of it from there (the reader behind the commits when the partition becomes
        this worker's) is replayed from there (stream/replay.py).

        >>> step = RecommendationStep(Recommender.default())
        >>> step.recommender.learned_offsets["c:0"] = 4
        >>> step.start_reading({"c:0": 9, "c:1": 7, "f:0": 0})
        >>> dict(sorted(step.recommender.learned_offsets.items()))
        {'c:0': 4, 'c:1': 6, 'f:0': -1}
        """
        watermark = self.recommender.learned_offsets
        for source, offset in starts.items():
            watermark.setdefault(source, offset - 1)

    def align_topics(self, ids: Mapping[str, str]) -> list[str]:
        """The topics of ``ids`` (topic -> the broker's topic id, :func:`stream.topics.topic_ids`)
        that the models learned under another id: deleted and created again, their offsets
        started over, so the models' watermark of their partitions (and the dead letters the
        step passes over) name records that are gone. Those are dropped: the models learn the
        new topic's events as those of a partition they never saw. The models remember ``ids``
        (their snapshot carries them); a topic they never knew by id is taken as the same.

        >>> step = RecommendationStep(Recommender.default())
        >>> step.recommender.learned_offsets.update({"c:0": 41, "c:1": 7, "p:0": 3})
        >>> step.align_topics({"c": "id1", "p": "id2"}), step.align_topics({"c": "id3", "p": "id2"})
        ([], ['c'])
        >>> step.recommender.learned_offsets
        {'p:0': 3}
        """
        known = self.recommender.topic_ids
        changed = sorted(t for t, i in ids.items() if known.get(t, i) != i)
        if changed:
            prefixes = tuple(f"{t}:" for t in changed)  # a topic's name has no ":" (stream.topics.check_topic_name)
            watermark = self.recommender.learned_offsets
            for source in [s for s in watermark if s.startswith(prefixes)]:
                del watermark[source]
            for pos in [p for p in self._dead_letters if p[0].startswith(prefixes)]:
                del self._dead_letters[pos]
        known.update(ids)
        return changed

    def _remember_dead(self, positions) -> None:
        kept = self._dead_letters
        for pos in positions:
            kept[pos] = None
        trim_oldest(kept, self.DEAD_LETTERS_KEPT)

    # -- step 1 ---------------------------------------------------------------------------
    def _prepare(self, events: Sequence[Event], states: dict[str, UserState],
                 positions: Sequence[tuple[str, int]] | None, indices, clock_ms: int | None = None) -> _Plan:
        cfg = self.config
        plan = _Plan()
        watermark = self.recommender.learned_offsets
        with_context = self.recommender.learns_with_context  # else no context is built per event
        dead_letters = self._dead_letters
        refuses = self.recommender.refuses if self.recommender.forgotten_users else None
        seen_ids: set[tuple[str, str]] = set()
        for n in indices:
            ev = events[n]
            try:
                uid = ev.user_id
                if refuses is not None and refuses(uid, ev.ts):
                    plan.refused += 1  # the user asked to be forgotten after it: applied to nothing, ever
                    continue
                source, offset = positions[n] if positions is not None else (None, None)
                current = plan.states.get(uid)
                first = current is None  # the user's first event applied in this batch
                if first:
                    current = states.get(uid)
                    if current is None:
                        current = UserState(uid)
                key = (uid, ev.event_id)
                if dead_letters and source is not None and (source, offset) in dead_letters:
                    plan.duplicates += 1  # dead-lettered when it came before
                    continue
                # a redelivery by Kafka (at or below the offset the state applied) may still be
                # news to the models, restored from an older snapshot; an id seen before under a
                # new offset is the producer's duplicate, news to nobody
                redelivery = source is not None and offset <= current.offsets.get(source, -1)
                fp = None if redelivery else fingerprint(ev.event_id)
                if key in seen_ids or (fp is not None and current.saw(fp)):
                    plan.duplicates += 1
                    continue
                if redelivery:
                    if offset > watermark.get(source, -1):
                        plan.lessons[n] = (to_interaction(ev, clock_ms), None)
                        plan.learn_only.add(n)
                        seen_ids.add(key)
                    else:
                        plan.duplicates += 1
                    continue
                learned = source is not None and offset <= watermark.get(source, -1)
                before = user_context(current) if with_context and not learned else None
                lesson = (to_interaction(ev, clock_ms), before)
                kind = "purchase" if isinstance(ev, PurchaseEvent) else "click"
                new = apply_event(current.copy(), ev.event_id, ev.item_id, ev.ts, kind,
                                  max_recent=cfg.max_recent, dedupe_window=cfg.dedupe_window,
                                  session_id=ev.session_id, source=source, offset=offset, fp=fp)
                if first:  # one save more than the loaded document: StateConflict says if another came between
                    new.version += 1
                if new.recs or ev.rec_id is not None:
                    credit = attribute(new.recs, new.last_recommended, ev.rec_id, ev.item_id, ev.ts, kind,
                                       cfg.attribution_window_ms)
                    if credit is not None:
                        plan.attributed[n] = credit
            except Exception as exc:  # noqa: BLE001 - this event alone; its user's state is as before it
                plan.failures.append(Failure(n, "prepare", exc))
                continue
            seen_ids.add(key)
            plan.states[uid] = new
            plan.applied.setdefault(uid, []).append(n)
            if not learned:  # the models learned it before: applied to the state only
                plan.lessons[n] = lesson
        return plan

    # -- step 2 ---------------------------------------------------------------------------
    def _rank_isolated(self, states: dict[str, UserState], events: Sequence[Event], applied: dict[str, list[int]],
                       versions: dict[str, str], now_ms: Callable[[], int], timings: dict[str, float],
                       site_ids: Mapping[str, str] | None = None) -> tuple[dict[str, _Ranked], dict[str, BaseException]]:
        """:meth:`_rank` of every user; a group that raises is split in halves until each
        failing user is alone (ranking changes nothing that a second attempt would repeat)."""
        ranked: dict[str, _Ranked] = {}
        failed: dict[str, BaseException] = {}
        pending = [list(states)] if states else []
        while pending:
            users = pending.pop()
            try:
                ranked.update(self._rank(users, states, events, applied, versions, now_ms, timings, site_ids))
            except Exception as exc:  # noqa: BLE001 - isolated below
                if len(users) == 1:
                    failed[users[0]] = exc
                else:
                    half = len(users) // 2
                    pending += [users[half:], users[:half]]
        return ranked, failed

    def _rank(self, users: list[str], states: dict[str, UserState], events: Sequence[Event],
              applied: dict[str, list[int]], versions: dict[str, str], now_ms: Callable[[], int],
              timings: dict[str, float], site_ids: Mapping[str, str] | None = None) -> dict[str, _Ranked]:
        """Rank ``users``: in one group, or, under an experiment, one group per arm (each with
        its own blend, candidates and scorer over the same models)."""
        experiment = self.experiment
        if experiment is None:
            return self._rank_arm(None, self.recommender, self.scorer, users, states, events, applied, versions,
                                  now_ms, timings, site_ids)
        groups: dict[str, tuple[Arm, list[str]]] = {}
        for uid in users:
            arm = experiment.arm_of(site_ids.get(uid, uid) if site_ids else uid)
            groups.setdefault(arm.name, (arm, []))[1].append(uid)
        out: dict[str, _Ranked] = {}
        base = self.recommender.config
        for arm, members in groups.values():
            scorer = self.scorer_of(arm)
            view = serving_view(self.recommender, arm.config(base))
            out.update(self._rank_arm(arm, view, scorer, members, states, events, applied, versions, now_ms, timings,
                                      site_ids))
        return out

    def _rank_arm(self, arm: Arm | None, recommender: Recommender, scorer, users: list[str],
                  states: dict[str, UserState], events: Sequence[Event], applied: dict[str, list[int]],
                  versions: dict[str, str], now_ms: Callable[[], int], timings: dict[str, float],
                  site_ids: Mapping[str, str] | None) -> dict[str, _Ranked]:
        clock = time.perf_counter
        t1 = clock()
        contexts = [user_context(states[u]) for u in users]
        candidates = recommender.candidates_many(contexts)
        queried = self.query_candidates([states[u] for u in users], [events[applied[u][-1]].ts for u in users],
                                        candidates)
        content = self.content_candidates(contexts, candidates)
        t2 = clock()
        extra = self.extra_scores(scorer, contexts, candidates, queried, content)
        t3 = clock()
        variant = arm.name if arm is not None else self.DEFAULT_VARIANT  # every list says which arm served it
        rec_ids = [self.new_rec_id(variant) for _ in users]
        lists: list[list[RecommendedItem]] = []
        if arm is not None and arm.baseline == "shuffle":  # the candidates in a random order: no ranking at all
            k = recommender.config.k
            for rec_id, cands in zip(rec_ids, candidates, strict=True):
                picked = shuffled(cands, rec_id)[:k]
                lists.append([RecommendedItem(item, 1.0 - i / max(1, k), "shuffle") for i, item in enumerate(picked)])
        else:
            rank_many = recommender.rank_many
            for at in range(0, len(contexts), _RANK_CHUNK):
                chunk = contexts[at:at + _RANK_CHUNK]
                # ScoredItem is RecommendedItem: published as ranked (purchased items are out already)
                lists.extend(rank_many(chunk, candidates[at:at + _RANK_CHUNK], None, extra[at:at + _RANK_CHUNK]))
        generated = now_ms()
        teaches = arm is None or arm.baseline is None
        if arm is not None:
            versions = {**versions, "transformer": "none" if scorer is None else str(scorer.version)}
        out: dict[str, _Ranked] = {}
        for uid, items, rec_id in zip(users, lists, rec_ids, strict=True):
            state = states[uid]
            state.last_recommended = [r.item_id for r in items]
            trigger = events[applied[uid][-1]]
            state.recs = remembered(self._pre_rank_recs.setdefault(uid, state.recs), rec_id, trigger.ts)
            rec = Recommendation(user_id=site_ids.get(uid, uid) if site_ids else uid, items=items,
                                 trigger_event_id=trigger.event_id, event_ts=trigger.ts, generated_ts=generated,
                                 model=versions, rec_id=rec_id, variant=variant)
            out[uid] = _Ranked(items, state, encode_state(state), rec, encode(rec), teaches)
        t4 = clock()
        timings["candidates"] += t2 - t1
        timings["score"] += t3 - t2
        timings["rank"] += t4 - t3
        return out

    def query_candidates(self, states: Sequence[UserState], now_ts: Sequence[int], candidates: list[list[str]]
                         ) -> list[dict[str, float] | None] | None:
        """Search informs recommendation: for each user whose latest query is at most
        ``StepConfig.query_ttl_ms`` older than ``now_ts`` (the event being answered), the
        catalogue's best :data:`QUERY_CANDIDATES` matches of it join their candidates
        (``candidates`` is extended in place) and are returned as the ``query`` source's scores
        (the hybrid relevance, 0..1); None when no user has one, or there is no catalogue."""
        catalogue = self.catalogue
        ttl = self.config.query_ttl_ms
        if catalogue is None or not ttl or not len(catalogue) or not any(s.recent_queries for s in states):
            return None
        out: list[dict[str, float] | None] = [None] * len(candidates)
        for i, (state, now) in enumerate(zip(states, now_ts, strict=True)):
            if not state.recent_queries or now - state.query_ts > ttl:
                continue  # never searched, or too long ago (a query_ts of 0: from before it was kept);
                # a search newer than the event (events out of order) is the user's latest intent
            scores = self._query_matches(catalogue, state.recent_queries[-1])
            if scores:
                out[i] = scores
        return _join(out, candidates)

    def _query_matches(self, catalogue, query: str) -> dict[str, float]:
        """The catalogue's :data:`QUERY_CANDIDATES` best matches of ``query`` with their relevance,
        remembered until the catalogue changes: a user who searched gets a list at each of their
        events for ``query_ttl_ms``, and a hybrid search costs about 0.3 ms."""
        memo = self._query_memo
        if memo is None or memo.catalogue is not catalogue:
            memo = self._query_memo = CatalogueMemo(catalogue, QUERY_CACHE)
        return memo.get_many([query], lambda queries: {
            q: {h.item_id: h.score for h in catalogue.search(q, QUERY_CANDIDATES)} for q in queries}).get(query, {})

    def content_candidates(self, contexts: Sequence[UserContext], candidates: list[list[str]]
                           ) -> list[dict[str, float] | None] | None:
        """Cold start: for each user, the new items that no event has named yet and whose text
        is closest to their recent items' (:class:`~online_models.search.ContentMatcher`) join
        their candidates (``candidates`` is extended in place), scored as the ``content``
        source (their cosine); None when there is no catalogue or no such item."""
        catalogue = self.catalogue
        if catalogue is None or not len(catalogue):
            return None
        matcher = self._content
        if matcher is None or matcher.catalogue is not catalogue:
            # the recommender is read at each call: a restored or refreshed one replaces it
            matcher = self._content = ContentMatcher(catalogue, lambda item: self.recommender.has_events(item))
        return _join(matcher.matches([c.recent_items for c in contexts]), candidates)

    def extra_scores(self, scorer, contexts: Sequence[UserContext], candidates: Sequence[list[str]],
                     queried: Sequence[dict[str, float] | None] | None = None,
                     content: Sequence[dict[str, float] | None] | None = None) -> list[dict | None]:
        """Each user's scores from the sources beside the learners: the Transformer (aligned
        with the candidates) and, where there are any, the query's relevance
        (:meth:`query_candidates`) and the new items' content similarity (:meth:`content_candidates`)."""
        extra: list[dict | None] = [None] * len(contexts)
        if scorer is not None and contexts:
            todo = [i for i, c in enumerate(candidates) if c and contexts[i].recent_items]
            if todo:
                scores = scorer.score([contexts[i].recent_items for i in todo], [candidates[i] for i in todo])
                for i, s in zip(todo, scores, strict=False):
                    s = np.asarray(s, dtype=float)  # aligned with the candidates: no dict to build
                    extra[i] = {"transformer": s if s.shape == (len(candidates[i]),)
                                else dict(zip(candidates[i], s.tolist(), strict=False))}
        for name, source in (("query", queried), ("content", content)):
            if source is not None:
                for i, scores in enumerate(source):
                    if scores:
                        extra[i] = {**(extra[i] or {}), name: scores}
        return extra

    # -- step 3 ---------------------------------------------------------------------------
    def _learn(self, events: Sequence[Event], positions: Sequence[tuple[str, int]] | None, plan: _Plan,
               failures: list[Failure]) -> set[str]:
        """Teach the models, in batch order, every learn-only event and every event still
        applied (its user was ranked); returns the users of applied events whose learning raised."""
        learn = self.recommender.learn_one
        # only when a user's ranking failed are some lessons no longer to be learned
        kept = {i for idx in plan.applied.values() for i in idx} if any(f.stage == "rank" for f in failures) else None
        learn_only = plan.learn_only
        watermark = self.recommender.learned_offsets
        failed_users: set[str] = set()
        learned_only = 0
        for n, (x, before) in plan.lessons.items():  # in batch order: _prepare added them so
            only = n in learn_only
            if kept is not None and not only and n not in kept:
                continue  # its user's ranking failed: dead-lettered, never learned
            try:
                learn(x, before)
            except Exception as exc:  # noqa: BLE001 - this event alone goes to the dead letters
                failures.append(Failure(n, "learn", exc))
                if not only:
                    failed_users.add(events[n].user_id)
            else:
                learned_only += only
            if positions is not None:  # at once: a second attempt at this batch must not teach it again
                source, offset = positions[n]
                watermark[source] = offset  # a partition's events come in order, each above the mark
        plan.learned_only = learned_only
        return failed_users

    def _advance(self, positions: Sequence[tuple[str, int]] | None) -> None:
        if not positions:
            return
        watermark = self.recommender.learned_offsets
        for source, offset in positions:
            if offset > watermark.get(source, -1):
                watermark[source] = offset
