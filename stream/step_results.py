"""What one :class:`~stream.pipeline.RecommendationStep` call returns: the new states and
lists, the events it could not handle (:class:`Failure`), and how each applied event is
judged against the list published before it (:func:`judge`, the live hit rate's counts)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from online_models.metrics import target_rank
from stream.errors import clipped
from stream.experiments import GROUP_FIELDS, VARIANCE_GROUPS, variance_group
from stream.records import Event, Recommendation
from stream.state import UserState

LIVE_CUTOFFS = (10, 20)


@dataclass
class LiveQuality:
    """Counts for online HR@K / MRR@K, added up by the caller into metrics."""

    judged: int = 0
    hits: dict[int, int] = field(default_factory=lambda: dict.fromkeys(LIVE_CUTOFFS, 0))
    reciprocal_rank_sum: float = 0.0

    def add(self, rank: int | None) -> None:
        self.judged += 1
        if rank is None:
            return
        for k in LIVE_CUTOFFS:
            if rank <= k:
                self.hits[k] += 1
        self.reciprocal_rank_sum += 1.0 / rank


@dataclass
class VariantCounts:
    """What one experiment arm served and what it got, in one batch (or a whole replay): the
    counters of ``streamrec report`` (stream/experiments.py defines the attribution), and the
    same again per group of users (``groups``: :func:`~stream.experiments.variance_group` ->
    counts in the order of :data:`~stream.experiments.GROUP_FIELDS`), from which the report
    works out intervals that take each user's lists together."""

    lists: int = 0
    #: users served their first home-page list of the arm (:func:`~stream.experiments.new_to_arm`)
    users: int = 0
    impressions: int = 0
    clicked_lists: int = 0
    clicks: int = 0
    purchased_lists: int = 0
    purchases: int = 0
    revenue: float = 0.0
    live: LiveQuality = field(default_factory=LiveQuality)
    groups: dict[int, list[float]] = field(default_factory=dict)

    def group(self, site_user_id: str) -> list[float]:
        """The counts of the user's group (to add to, by :data:`~stream.experiments.GROUP_FIELDS` index)."""
        g = variance_group(site_user_id)
        counts = self.groups.get(g)
        if counts is None:
            counts = self.groups[g] = [0] * len(GROUP_FIELDS)
        return counts

    def add(self, other: VariantCounts) -> None:
        for name in ("lists", "users", "impressions", "clicked_lists", "clicks", "purchased_lists", "purchases",
                     "revenue"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.live.judged += other.live.judged
        for k, n in other.live.hits.items():
            self.live.hits[k] += n
        self.live.reciprocal_rank_sum += other.live.reciprocal_rank_sum
        for g, counts in other.groups.items():
            mine = self.groups.setdefault(g, [0] * len(GROUP_FIELDS))
            for i, n in enumerate(counts):
                mine[i] += n

    def as_json(self) -> dict:
        """The counters as ``streamrec report --json`` reads them (``groups``: field -> one count per group)."""
        groups = {name: [round(self.groups[g][i], 6) if g in self.groups else 0 for g in range(VARIANCE_GROUPS)]
                  for i, name in enumerate(GROUP_FIELDS)}
        return {"lists": self.lists, "users": self.users, "impressions": self.impressions, "clicked_lists": self.clicked_lists,
                "clicks": self.clicks, "purchased_lists": self.purchased_lists, "purchases": self.purchases,
                "revenue": round(self.revenue, 6), "judged": self.live.judged,
                "hits": {str(k): n for k, n in self.live.hits.items()}, "groups": groups}


#: where each count sits in a group's counts (:attr:`VariantCounts.groups`)
G_LISTS, G_IMPRESSIONS, G_CLICKED, G_PURCHASED, G_REVENUE, G_JUDGED, G_HITS20 = range(len(GROUP_FIELDS))


@dataclass(frozen=True)
class Failure:
    """An event the step could not handle: where in the batch, in which stage, and why."""

    index: int
    stage: str  # "prepare", "rank", "learn" or "search"
    error: BaseException

    @property
    def reason(self) -> str:
        """A sentence for the dead letter: what failed, with the exception's type and message."""
        what = {"prepare": "applying it to the user's state", "rank": "ranking the user's recommendations",
                "learn": "teaching it to the online models", "search": "answering the search"}.get(self.stage, self.stage)
        message = exception_text(self.error)
        return (f"the event is valid, but {what} raised {type(self.error).__name__}"
                f"{': ' + message if message else ''}; the other events of its batch were applied")


def exception_text(exc: BaseException, limit: int = 300) -> str:
    """``str(exc)`` on one line, at most ``limit`` characters, as text a dead letter can carry:
    an exception whose ``__str__`` raises, or whose message holds a lone surrogate (not UTF-8),
    must not stop its dead letter from being written.

    >>> exception_text(ValueError("bad id 'u\\udcff'\\nsecond line"))
    "bad id 'u\\\\udcff' second line"
    """
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - whatever a bug's exception does
        message = f"(its message could not be read: {type(exc).__name__}.__str__ raised)"
    message = message.replace("\r", " ").replace("\n", " ").strip()
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return clipped(message, limit)


@dataclass
class StepResult:
    #: the new state of every user whose state changed, and the same encoded for the store
    states: dict[str, UserState]
    docs: dict[str, bytes]
    recommendations: list[Recommendation]
    #: the recommendations encoded (same order), ready to publish
    payloads: list[bytes]
    applied: list[Event]
    duplicates: int
    timings: dict[str, float]
    live: LiveQuality
    #: events the models learned without a change of state (the state already held them)
    learned_only: int = 0
    failures: list[Failure] = field(default_factory=list)
    #: every applied event of a user with an earlier event, with the list it was judged
    #: against: ``(index in the batch, the latest list published to the user before it)``
    judged: list[tuple[int, list[str]]] = field(default_factory=list)
    #: events refused because their user was forgotten after them (``Recommender.refuses``)
    refused: int = 0
    #: per experiment arm ("default" without an experiment): lists, attributed clicks and
    #: purchases, live hit rate
    variants: dict[str, VariantCounts] = field(default_factory=dict)
    #: each user's applied events (indices in the batch, in order): what the handler applies
    #: again to a state another writer saved meanwhile (``RecommendationStep.merged_docs``)
    by_user: dict[str, list[int]] = field(default_factory=dict)


def judge(events: Sequence[Event], states: dict[str, UserState], applied: dict[str, list[int]]
           ) -> tuple[LiveQuality, list[tuple[int, list[str]]], list[int | None]]:
    """Judge every applied event of a user who had an earlier event against the latest list
    published to them before it: the list their state held when the batch began (no list
    is published within a batch). A user with history but no list yet is judged a miss.
    Returns the live hit rate, the judged events ``(index in the batch, the list)`` in batch
    order, and each one's rank in its list (None: not in it), in the same order, so that
    the per-arm counts need not look for the item again."""
    live = LiveQuality()
    ranked: list[tuple[int, list[str], int | None]] = []
    empty: list[str] = []
    for uid, idx in applied.items():
        before = states.get(uid)
        had_history = before is not None and (before.clicks or before.purchases or before.recent_items)
        shown = before.last_recommended if before is not None else empty
        for n in (idx if had_history else idx[1:]):
            rank = target_rank(shown, events[n].item_id, len(shown))
            ranked.append((n, shown, rank))
            live.add(rank)
    ranked.sort(key=itemgetter(0))  # each index once
    return live, [(n, shown) for n, shown, _ in ranked], [rank for _, _, rank in ranked]


__all__ = ["G_CLICKED", "G_HITS20", "G_IMPRESSIONS", "G_JUDGED", "G_LISTS", "G_PURCHASED", "G_REVENUE", "LIVE_CUTOFFS", "Failure", "LiveQuality", "StepResult", "VariantCounts", "exception_text", "judge"]
