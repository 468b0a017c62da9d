"""The pure step for searches: a SearchEvent in, a personalised answer out.

For each search, :class:`SearchStep`:

1. **retrieves** candidates: the shop's own ``results`` when the event carries them (re-ranked,
   never added to), else the catalogue's hybrid search (BM25 and the text model, fused:
   :class:`online_models.search.Catalogue`), narrowed by the event's ``filters``;
2. **personalises** them: the user's online models and the Transformer score the candidates
   exactly as they score a home-page list (``Recommender.rank_many`` with the scorer's column,
   purchased items kept: a shopper may search for what they bought before), and the final
   score is ``relevance * ((1 - personal_weight) + personal_weight * personal)``, relevance
   as a share of the best candidate's and the models' score scaled to 0..1 over the
   candidates: the user's taste reorders what the query matches, and never lifts what it
   does not. A user the models know nothing of gets the query's order;
3. answers with a :class:`~stream.records.Recommendation` whose ``context`` is
   ``{"kind": "search", "query": ...}``; each item's explanation says what matched the query,
   or, where the user's models moved the item above its place by the query alone, why they did;
4. remembers in the user's state the list (for attribution, as a home-page list) and the
   query (``recent_queries``; the worker's home-page lists do not read it yet).

The models learn nothing from a search: a query is not an interaction with an item.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from online_models.search import Catalogue, SearchHit
from online_models.types import Explanation, ScoredItem
from stream.experiments import SEARCHED, remembered, serving_view
from stream.pipeline import RecommendationStep
from stream.records import Recommendation, SearchEvent, encode
from stream.state import UserState, encode_state, fingerprint, remember_seen
from stream.step_inputs import user_context
from stream.step_results import Failure

#: queries remembered per user
RECENT_QUERIES = 5


@dataclass(frozen=True)
class SearchConfig:
    """``k``: items per answer; ``depth``: candidates retrieved (and personalised) per query;
    ``personal_weight``: the share of the user's models in the final score."""

    k: int = 20
    depth: int = 100
    personal_weight: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.personal_weight <= 1.0:
            raise ValueError(f"personal_weight={self.personal_weight}: expected 0 to 1")


@dataclass
class SearchResult:
    """The answers (one per search that was not a redelivery), their payloads, the users' new
    state documents, the searches that could not be answered (a bug: dead-lettered), and how
    many were refused: their user was forgotten after them (answered and remembered never)."""

    recommendations: list[Recommendation] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    docs: dict[str, bytes] = field(default_factory=dict)
    duplicates: int = 0
    refused: int = 0
    failures: list[Failure] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"retrieve": 0.0, "personalise": 0.0})
    #: each user's answered searches, in order: ``(index in the batch, the answer's rec_id)``
    #: (what :meth:`SearchStep.merged_docs` applies again to a state another writer saved)
    by_user: dict[str, list[tuple[int, str]]] = field(default_factory=dict)


def searched(state: UserState, search: SearchEvent, rec_id: str, source: str | None, offset: int | None, fp: str,
             dedupe_window: int) -> None:
    """What answering ``search`` (its answer named ``rec_id``) changes in its user's ``state``:
    the answer remembered for attribution, the query among the latest, the search applied (its
    offset and its id's fingerprint ``fp``)."""
    state.recs = remembered(state.recs, rec_id, search.ts, SEARCHED)
    queries = [q for q in state.recent_queries if q != search.query] + [search.query]
    state.recent_queries = queries[-RECENT_QUERIES:]
    state.query_ts = search.ts
    if source is not None:
        state.offsets[source] = offset
    remember_seen(state, fp, dedupe_window)


class SearchStep:
    """Answer searches with the models of ``step`` (its recommender, scorer and experiment)
    and ``catalogue`` (None: only searches that carry the shop's ``results`` get items)."""

    def __init__(self, step: RecommendationStep, catalogue: Catalogue | None = None,
                 config: SearchConfig | None = None) -> None:
        self.step = step
        self.catalogue = catalogue
        self.config = config or SearchConfig()

    def __call__(self, searches: Sequence[SearchEvent], states: Mapping[str, UserState], now_ms: Callable[[], int],
                 positions: Sequence[tuple[str, int]] | None = None,
                 site_ids: Mapping[str, str] | None = None) -> SearchResult:
        """``states`` holds the state of every user in ``searches`` (read, not changed);
        ``positions`` each search's ``("topic:partition", offset)``: one at or below the
        offset its user's state applied is a redelivery, answered before and skipped; so is one
        whose ``event_id`` is among the user's latest ids (a producer that sent it twice), as for
        events (:meth:`~stream.state.UserState.has_seen`). A search
        of a user forgotten after it (``Recommender.refuses``: a redelivery or replay after
        the erasure, or one in the erasure's batch) is refused as their events are: no answer
        is published, and no state (the query) is written again."""
        out = SearchResult()
        refuses = self.step.recommender.refuses if self.step.recommender.forgotten_users else None
        current: dict[str, UserState] = {}
        versions = self.step.model_versions()
        clock = time.perf_counter
        for n, search in enumerate(searches):
            uid = search.user_id
            if refuses is not None and refuses(uid, search.ts):
                out.refused += 1
                continue
            state = current.get(uid) or (states.get(uid) or UserState(uid)).copy()
            source, offset = positions[n] if positions is not None else (None, None)
            fp = fingerprint(search.event_id)
            if (source is not None and offset <= state.offsets.get(source, -1)) or state.saw(fp):
                out.duplicates += 1
                continue
            t0 = clock()
            try:
                ids, relevance, matched = self.retrieve(search)
                t1 = clock()
                items = self.personalise(state, ids, relevance, matched)
            except Exception as exc:  # noqa: BLE001 - this search alone is dead-lettered
                self.step.recommender.forget_ranked(uid)
                out.failures.append(Failure(n, "search", exc))
                continue
            t2 = clock()
            out.timings["retrieve"] += t1 - t0
            out.timings["personalise"] += t2 - t1
            site_uid = site_ids.get(uid, uid) if site_ids else uid
            variant = self.step.variant_of(site_uid)
            rec_id = self.step.new_rec_id(variant)
            searched(state, search, rec_id, source, offset, fp, self.step.config.dedupe_window)
            rec = Recommendation(user_id=site_uid, items=items, trigger_event_id=search.event_id, event_ts=search.ts,
                                 generated_ts=now_ms(), model=versions, rec_id=rec_id,
                                 variant=variant,
                                 context={"kind": "search", "query": search.query})
            out.recommendations.append(rec)
            out.payloads.append(encode(rec))
            if uid not in current:  # one save more than the loaded document (stream/state.py, versions)
                state.version += 1
                current[uid] = state
            out.by_user.setdefault(uid, []).append((n, rec_id))
        out.docs = {uid: encode_state(state) for uid, state in current.items()}
        return out

    def merged_docs(self, searches: Sequence[SearchEvent], positions: Sequence[tuple[str, int]] | None,
                    result: SearchResult, stored: Mapping[str, UserState]) -> dict[str, bytes]:
        """The documents to save in place of ``result.docs`` for the users of ``stored``, which
        another writer saved after the searches' batch loaded them (as
        :meth:`RecommendationStep.merged_docs` does for events): each answered search's query
        and answer applied to what is stored now, save those it holds already."""
        out: dict[str, bytes] = {}
        for uid, now in stored.items():
            state = now.copy()
            for n, rec_id in result.by_user.get(uid, ()):
                search = searches[n]
                source, offset = positions[n] if positions is not None else (None, None)
                if state.has_seen(search.event_id, source, offset):
                    continue
                searched(state, search, rec_id, source, offset, fingerprint(search.event_id),
                         self.step.config.dedupe_window)
            state.version = now.version + 1
            out[uid] = encode_state(state)
        return out

    def retrieve(self, search: SearchEvent, k: int | None = None) -> tuple[list[str], np.ndarray, list[str]]:
        """The candidates, their query relevance (higher is better) and what matched each: at
        least ``k`` of them where there are (serve's ``k`` is the request's), and never fewer
        than ``config.depth`` and ``config.k``: a small request draws on the same pool."""
        depth = max(self.config.depth, self.config.k, k or 0)
        if search.results is not None:  # [] too: the shop found nothing, and nothing is added
            ids = list(dict.fromkeys(search.results))[:depth]
            # the shop's order is its relevance: reciprocal rank, as the fusion scores a list
            return ids, 1.0 / (60.0 + np.arange(1, len(ids) + 1)), ["shop"] * len(ids)
        catalogue = self.catalogue
        if catalogue is None or len(catalogue) == 0:
            return [], np.empty(0), []
        hits: list[SearchHit] = catalogue.search(search.query, depth)
        if search.filters:
            hits = [h for h in hits if _passes(catalogue, h.item_id, search.filters)]
        return [h.item_id for h in hits], np.array([h.score for h in hits]), [h.matched for h in hits]

    def personalise(self, state: UserState, ids: list[str], relevance: np.ndarray,
                    matched: list[str], k: int | None = None) -> list[ScoredItem]:
        """The best ``k`` (default ``config.k``) of ``ids``: query relevance, scaled by the user's models."""
        k = self.config.k if k is None else k
        weight = self.config.personal_weight
        if not ids:
            return []
        top = float(np.max(relevance))
        query_part = relevance / top if top > 0 else np.ones(len(ids))
        context = user_context(state)
        personal = np.zeros(len(ids))
        reasons: list[str | None] = [None] * len(ids)  # the source that led each item's blend
        recommender = self.step.recommender
        if weight > 0 and context.recent_items:
            view = serving_view(recommender, replace(recommender.config, k=len(ids), exclude_purchased=False,
                                                     max_per_category=None))
            extra = self.step.extra_scores(self.step.scorer, [context], [ids])  # the Transformer, as for home lists
            # explained below, only the items the answer shows because the models moved them up
            (ranked,) = view.rank_many([context], [ids], len(ids), extra, explain=False)
            recommender.forget_ranked(context.user_id)  # a search answer does not teach the re-ranker
            position = {item: i for i, item in enumerate(ids)}
            raw = np.full(len(ids), np.nan)
            for scored in ranked:
                i = position[scored.item_id]
                raw[i] = scored.score
                reasons[i] = scored.reason
            personal = _scaled(np.nan_to_num(raw, nan=np.nanmin(raw) if np.isfinite(raw).any() else 0.0))
        # the models scale relevance, never replace it: an item the query does not match stays
        # down however much the user likes it, and the user's taste orders what the query matches
        final = query_part * ((1.0 - weight) + weight * personal)
        order = np.lexsort((np.arange(len(ids)), -final))[:k].tolist()
        by_query = np.empty(len(ids), dtype=int)
        by_query[np.lexsort((np.arange(len(ids)), -query_part))] = np.arange(len(ids))
        # moved up: the user's models put it above its place by the query alone
        moved = [i for rank, i in enumerate(order) if rank < by_query[i] and reasons[i] is not None]
        why = dict(zip(moved, recommender.explain(context, [ids[i] for i in moved], [reasons[i] for i in moved]),
                       strict=True)) if moved else {}
        out = []
        for i in order:
            explanation = why.get(i)
            if explanation is None:
                explanation = Explanation("search", matched=matched[i])
            out.append(ScoredItem(ids[i], float(final[i]), explanation.source, explanation))
        return out


def _scaled(x: np.ndarray) -> np.ndarray:
    """``x`` mapped onto 0..1 (min to max); all equal: all 1."""
    if len(x) == 0:
        return x
    low, high = float(np.min(x)), float(np.max(x))
    if not high > low:
        return np.ones(len(x))
    return (x - low) / (high - low)


def _passes(catalogue: Catalogue, item_id: str, filters: Mapping[str, str]) -> bool:
    item = catalogue.get(item_id)
    if item is None:
        return False
    category = filters.get("category")
    if category is not None and category.casefold() not in {c.casefold() for c in item.category_path}:
        return False
    brand = filters.get("brand")
    return brand is None or (item.brand or "").casefold() == brand.casefold()


__all__ = ["RECENT_QUERIES", "SearchConfig", "SearchResult", "SearchStep"]
