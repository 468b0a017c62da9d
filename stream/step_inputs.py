"""What the step hands the online models, built from the worker's own terms: the models'
configuration from :class:`~stream.settings.Settings`, an ``Interaction`` from an event (and
the event a producer sends for an ``Interaction``: ``streamrec produce`` and the evaluator), a
``UserContext`` from a user's state, and the name of the partition an event came from."""

from __future__ import annotations

from dataclasses import dataclass

from online_models import Interaction, Recommender, RecommenderConfig, UserContext
from online_models.recommender import parse_weights
from stream.errors import ConfigError
from stream.records import ClickEvent, Event, PurchaseEvent
from stream.settings import Settings
from stream.state import UserState


@dataclass(frozen=True)
class StepConfig:
    """The step's own knobs: what a user's state keeps. How many items a list holds, how many
    candidates are scored and whether purchased items are excluded are the recommender's
    (:class:`~online_models.RecommenderConfig`); :meth:`RecommendationStep.from_settings` sets
    both from one :class:`~stream.settings.Settings`, whose defaults are these."""

    max_recent: int = int(Settings.recent_items)
    dedupe_window: int = int(Settings.dedupe_window)
    #: a click or purchase without a rec_id is credited to the user's last list this long after it
    attribution_window_ms: int = int(Settings.attribution_window_s) * 1000
    #: a user's latest search steers their home-page lists this long after it (0: never)
    query_ttl_ms: int = int(Settings.query_ttl_s) * 1000


def source_of(topic: str, partition: int) -> str:
    """The name a position gives the input partition an event came from: ``"topic:partition"``
    (the user state's offsets and the models' watermark are keyed by it)."""
    return f"{topic}:{partition}"


def recommender_config(settings: Settings) -> RecommenderConfig:
    """The blend the worker runs: the defaults, with ``STREAMREC_BLEND_WEIGHTS`` over them."""
    config = RecommenderConfig(k=settings.top_k, n_candidates=settings.n_candidates,
                               exclude_purchased=settings.exclude_purchased, max_items=settings.max_items,
                               max_users=settings.max_users)
    try:
        overrides = parse_weights(settings.blend_weights)
    except ValueError as exc:
        raise ConfigError(f"STREAMREC_BLEND_WEIGHTS={settings.blend_weights!r}: {exc}") from None
    known = {*Recommender.DEFAULT_LEARNERS, *Recommender.EXTRA_SOURCES, "reranker"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"STREAMREC_BLEND_WEIGHTS names {', '.join(unknown)}; the sources are {', '.join(sorted(known))}")
    if "reranker" in overrides:  # the click re-ranker's weight (0: it learns, but never reorders a list)
        config.reranker_weight = overrides.pop("reranker")
    config.weights = {**config.weights, **overrides}
    check_proposers(config, f"STREAMREC_BLEND_WEIGHTS={settings.blend_weights!r}")
    return config


def check_proposers(config: RecommenderConfig, given_by: str) -> None:
    """ConfigError when ``config`` leaves every learner at weight 0: only learners propose a
    home-page list's candidates (the Transformer, a query and item content score them or add to
    them), so every list would be empty, as a worker served them without a word."""
    if not any(config.weights.get(name, 0.0) > 0.0 for name in Recommender.DEFAULT_LEARNERS):
        raise ConfigError(f"{given_by} leaves every learner at weight 0 ({', '.join(Recommender.DEFAULT_LEARNERS)}), "
                          "and only they propose a list's candidates: every list would be empty. Give at least one "
                          "of them a weight above 0 (the Transformer then ranks what they propose)")


def to_event(x: Interaction, eid: str, ts: int | None = None) -> Event:
    """The event for one interaction; ``ts`` replaces the log's timestamp when given."""
    when = x.ts if ts is None else ts
    if x.kind == "purchase":
        return PurchaseEvent(event_id=eid, user_id=x.user_id, item_id=x.item_id, ts=when, quantity=x.quantity,
                             category_id=x.category_id, session_id=x.session_id)
    return ClickEvent(event_id=eid, user_id=x.user_id, item_id=x.item_id, ts=when,
                      session_id=x.session_id, category_id=x.category_id)


def to_interaction(ev: Event, clock_ms: int | None = None) -> Interaction:
    """What the models learn of ``ev``. ``clock_ms`` (the worker's clock; None for a replayed
    log, which has none): an event dated after it is learned as of it, so that an event accepted
    from ahead of the clock (up to ``STREAMREC_MAX_FUTURE_S``) counts no more in trending, and
    moves the models' event time no further, than one sent now. The event itself keeps its ``ts``.

    >>> ev = ClickEvent(event_id="e1", user_id="u1", item_id="i1", ts=5_000)
    >>> to_interaction(ev).ts, to_interaction(ev, clock_ms=3_000).ts, to_interaction(ev, clock_ms=9_000).ts
    (5000, 3000, 5000)
    """
    purchase = isinstance(ev, PurchaseEvent)
    ts = ev.ts
    return Interaction(
        user_id=ev.user_id,
        item_id=ev.item_id,
        ts=ts if clock_ms is None or ts <= clock_ms else clock_ms,
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


__all__ = ["StepConfig", "recommender_config", "source_of", "to_event", "to_interaction", "user_context"]
