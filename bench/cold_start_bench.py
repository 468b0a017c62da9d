"""SIMULATED: what the ``content`` source does for new items, and what it costs the worker.

    .venv/bin/python bench/cold_start_bench.py --events 40000

The synthetic shop (online_models/datasets.py) and its catalogue (online_models/search/synthetic.py:
each category one kind of product, titled in English or Chinese) are replayed through the
worker's own step (``RecommendationStep.from_settings``, default settings, one event per call as
a paced worker sees them). A share of the items (``--new-share``) is *launched* half-way: they reach
the catalogue then (the newest items), and their events before that point are dropped, so when
the second half starts nobody has clicked them and no model knows them; only their text can
recommend them. Items of the catalogue that the log never names stay in it, unclicked.

Each click of the second half is judged against the list the worker last published to its user
(HR@20, as the live hit rate judges it), split by what the models knew of the clicked item:

- ``new, first click``: a launched item nobody has clicked yet (only its text can put it in a list);
- ``new, clicks 2-5``: a launched item with 1 to 4 clicks before;
- ``all clicks``: everything (what the content source may cost the rest).

Compared: ``served`` (the default blend, ``content`` weight 1), weights 0.3 and 3, and
``without content`` (``STREAMREC_BLEND_WEIGHTS=content=0``), in the same run over the same events. The truth is the
log's next click, which no model saw; it measures the simulation, not a shop. Then the cost:
:class:`~online_models.search.ContentMatcher` alone, per user, with pools of 100 and 1,000 cold
items, in batches of 16 and 1,800 users.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.datasets import synthetic_interactions  # noqa: E402
from online_models.search import Catalogue, ContentMatcher, TextEmbedder  # noqa: E402
from online_models.search.synthetic import synthetic_catalogue  # noqa: E402
from stream.pipeline import RecommendationStep  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.state import UserState  # noqa: E402
from stream.step_inputs import to_event  # noqa: E402
from stream.threads import one_blas_thread  # noqa: E402

K = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=40_000, help="events of the synthetic shop replayed")
    parser.add_argument("--new-share", type=float, default=0.1, help="share of the items launched half-way")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if not 0.0 < args.new_share < 1.0:
        parser.error("--new-share: expected a number between 0 and 1")
    one_blas_thread()  # as the worker runs (stream/threads.py): CPU figures without idle BLAS threads spinning

    log = list(synthetic_interactions(args.events, seed=args.seed))
    half = len(log) // 2
    items = sorted({x.item_id for x in log})
    launched = set(random.Random(args.seed).sample(items, int(len(items) * args.new_share)))
    t0 = time.perf_counter()
    catalogue = Catalogue(TextEmbedder())
    products = list(synthetic_catalogue(seed=args.seed))
    catalogue.upsert(p for p in products if p.item_id not in launched)
    catalogue.flush()
    print(f"catalogue: {len(catalogue):,} items embedded and indexed in {time.perf_counter() - t0:.0f} s")
    log = [x for n, x in enumerate(log) if n >= half or x.item_id not in launched]
    start = sum(1 for x in log[:half] if x.item_id not in launched)  # the first event of the second half
    print(f"log: {len(log):,} events; {len(launched)} of {len(items)} items launched at event {start:,}")

    variants = {"served": Settings.from_env({}),
                "content 0.3": Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "content=0.3"}),
                "content 3": Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "content=3"}),
                "without content": Settings.from_env({"STREAMREC_BLEND_WEIGHTS": "content=0"})}
    cohorts = ("new, first click", "new, clicks 2-5", "all clicks")
    hits = {v: dict.fromkeys(cohorts, 0) for v in variants}
    judged = dict.fromkeys(cohorts, 0)
    content_lists = dict.fromkeys(variants, 0)
    cpu = dict.fromkeys(variants, 0.0)
    steps = {}
    for name, settings in variants.items():
        step = RecommendationStep.from_settings(settings)
        step.catalogue = catalogue
        steps[name] = step
    states = {name: {} for name in variants}
    clicks_of: dict[str, int] = {}
    t0 = time.perf_counter()
    for n, x in enumerate(log):
        if n == start:  # the launch: the new items reach the catalogue (the items topic) now
            catalogue.upsert(p for p in products if p.item_id in launched)
            catalogue.flush()
        event = to_event(x, f"e{n}")
        if n >= start and x.kind == "click":
            prior = clicks_of.get(x.item_id, 0)
            cohort = [] if x.item_id not in launched else ["new, first click"] if prior == 0 else \
                ["new, clicks 2-5"] if prior <= 4 else []
            for c in [*cohort, "all clicks"]:
                judged[c] += 1
            for name in variants:
                state: UserState | None = states[name].get(x.user_id)
                if state is not None and x.item_id in state.last_recommended[:K]:
                    for c in [*cohort, "all clicks"]:
                        hits[name][c] += 1
        if x.kind == "click":
            clicks_of[x.item_id] = clicks_of.get(x.item_id, 0) + 1
        names = list(steps)
        for name in names[n % len(names):] + names[: n % len(names)]:  # each variant first in turn: fair CPU
            step = steps[name]
            c0 = time.process_time()
            result = step([event], states[name], lambda ts=x.ts: ts)
            cpu[name] += time.process_time() - c0
            states[name].update(result.states)
            if n >= start and any(i.reason == "content" for r in result.recommendations for i in r.items):
                content_lists[name] += 1
        if n and n % 10_000 == 0:
            print(f"  {n:,}/{len(log):,} events ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    second = len(log) - start
    print(f"\nSIMULATED: HR@{K} of the second half's clicks against the list last published to the user\n")
    print(f"{'cohort':<18} {'judged':>7} " + " ".join(f"{v:>16}" for v in variants))
    for c in cohorts:
        print(f"{c:<18} {judged[c]:>7,} " + " ".join(f"{hits[v][c] / max(judged[c], 1):>16.4f}" for v in variants))
    print(f"{'lists with content':<18} {second:>7,} " + " ".join(f"{content_lists[v] / second:>16.3f}" for v in variants))
    print(f"{'step CPU µs/event':<18} {len(log):>7,} " + " ".join(f"{cpu[v] / len(log) * 1e6:>16.0f}" for v in variants))

    print("\nContentMatcher alone (the content source's cost), per batch of users:")
    rng = random.Random(args.seed)
    ids = [i for i in items if i in catalogue]
    for pool_size in (100, 1_000):  # the default pool is 200
        known = set(ids[: len(ids) - pool_size])
        matcher = ContentMatcher(catalogue, known.__contains__, pool=pool_size, refresh_s=3600)
        for users in (16, 1_800):
            recent = [[rng.choice(ids) for _ in range(10)] for _ in range(users)]
            matcher.matches(recent)
            rounds = 20
            c0 = time.process_time()
            for _ in range(rounds):
                matcher.matches(recent)
            per = (time.process_time() - c0) / rounds
            print(f"  pool {len(matcher.pool()[0]):>5} cold items, {users:>5} users: {per * 1000:7.2f} ms CPU, "
                  f"{per / users * 1e6:5.1f} µs per user")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
