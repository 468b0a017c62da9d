"""SIMULATED: what personalisation adds to search, on a replay where the truth is known.

    .venv/bin/python bench/search_personal_bench.py --events 40000

No public log joins searches to what the searcher then clicked, so this builds one. The
synthetic shop (online_models/datasets.py) is replayed through the worker's own step
(``RecommendationStep``, default settings), and its catalogue (online_models/search/synthetic.py:
each category one kind of product, titled in English or Chinese) through the worker's
``Catalogue``. Before a sampled click is applied, its user searches for the **kind of product
they are about to click** (the category's name, in English or Chinese at random), and the
answer is judged by where the item they click comes in it: the truth is the click the log holds
next, which the search did not see.

The query alone cannot tell the items of a kind apart (their titles differ only in an adjective
and a colour), so an unpersonalised ranking is close to chance among them; what the user viewed
before, and what people co-view, is what can find the item. Compared, through
:class:`stream.search_step.SearchStep`:

- ``query only``: ``personal_weight = 0`` (the catalogue's hybrid order);
- ``served``: the default ``STREAMREC_SEARCH_PERSONAL_WEIGHT`` (0.3);
- ``personal 0.6``: more weight on the models, for comparison.

Figures are HR@10 and MRR@10 of the clicked item over the judged searches (a search is judged
once the user has 3 events). They measure the simulation, not a shop.

Then **search informs recommendation**: at the same moments, the user's home-page list (the
worker's ranking, as ``streamrec serve`` computes it for their present state: k = 20) is
judged by the same click twice, with the search in their state (``recent_queries``, within
``STREAMREC_QUERY_TTL_S``: the ``query`` source adds its 20 best matches to the candidates) and
without it.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.datasets import synthetic_interactions  # noqa: E402
from online_models.search import Catalogue, TextEmbedder  # noqa: E402
from online_models.search.synthetic import PRODUCTS, synthetic_catalogue  # noqa: E402
from stream.pipeline import RecommendationStep  # noqa: E402
from stream.records import SearchEvent  # noqa: E402
from stream.search_step import SearchConfig, SearchStep  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.state import UserState  # noqa: E402
from stream.step_inputs import to_event  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000, help="events of the synthetic shop replayed")
    parser.add_argument("--every", type=int, default=10, help="judge a search before every N-th click")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    settings = Settings.from_env({})
    t0 = time.perf_counter()
    catalogue = Catalogue(TextEmbedder(), candidates=settings.search_candidates)
    catalogue.upsert(synthetic_catalogue(seed=args.seed))
    catalogue.flush()
    print(f"catalogue: {len(catalogue):,} items embedded and indexed in {time.perf_counter() - t0:.0f} s")

    step = RecommendationStep.from_settings(settings)
    step.catalogue = catalogue  # as the worker's shell sets it
    weights = {"query only": 0.0, "served": settings.search_personal_weight, "personal 0.6": 0.6}
    searchers = {name: SearchStep(step, catalogue, SearchConfig(k=10, depth=settings.search_candidates,
                                                                personal_weight=w))
                 for name, w in weights.items()}
    home_hits = {"without the search": 0, "with the search (served)": 0}
    hits = dict.fromkeys(weights, 0)
    rr = dict.fromkeys(weights, 0.0)
    judged = 0
    states: dict[str, UserState] = {}
    rng = random.Random(args.seed)
    clicks = 0
    t0 = time.perf_counter()
    for n, x in enumerate(synthetic_interactions(args.events, seed=args.seed)):
        state = states.get(x.user_id)
        if x.kind == "click":
            clicks += 1
        if x.kind == "click" and clicks % args.every == 0 and state is not None and len(state.recent_items) >= 3:
            english, chinese = PRODUCTS[int(x.category_id[1:]) % len(PRODUCTS)]
            query = english if rng.random() < 0.5 else chinese
            search = SearchEvent(event_id=f"q{n}", type="search", user_id=x.user_id, query=query, ts=x.ts)
            ids, relevance, matched = searchers["served"].retrieve(search)
            judged += 1
            for name, searcher in searchers.items():
                ranked = [i.item_id for i in searcher.personalise(state, ids, relevance, matched)]
                if x.item_id in ranked:
                    hits[name] += 1
                    rr[name] += 1.0 / (ranked.index(x.item_id) + 1)
            searched = state.copy()
            searched.recent_queries, searched.query_ts = [query], x.ts
            for name, who in (("without the search", state), ("with the search (served)", searched)):
                home_hits[name] += x.item_id in [i.item_id for i in step.present_list(who, 20, x.ts)[0]]
        result = step([to_event(x, f"e{n}")], states, lambda ts=x.ts: ts)
        states.update(result.states)
    seconds = time.perf_counter() - t0
    print(f"replayed {args.events:,} events, judged {judged:,} searches in {seconds:.0f} s (SIMULATED truth: the "
          "click that follows each search)\n")
    print(f"{'ranking':<14} {'HR@10':>7} {'MRR@10':>7} {'HR lift':>8}")
    base = hits["query only"] / judged if judged else 0.0
    for name in weights:
        hr, mrr = hits[name] / max(judged, 1), rr[name] / max(judged, 1)
        lift = f"{hr / base:.2f}x" if base else "-"
        print(f"{name:<14} {hr:>7.4f} {mrr:>7.4f} {lift:>8}")
    print("\nsearch informs recommendation: HR@20 of the same clicks in the user's home-page list")
    for name, n in home_hits.items():
        print(f"{name:<26} {n / max(judged, 1):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
