"""Per-event latency of the online core: learn + candidates + rank, on a replayed log.

For each event, in the order a worker would do it: update the user's context (recent
items, purchases: what the stream keeps in Redis), ``Recommender.learn_one``, then
``candidates`` and ``rank`` for that user, then ``record_shown``. Each phase is timed
with ``perf_counter_ns`` (wall clock) and ``thread_time_ns`` (CPU time of this thread:
what the work costs when other processes share the cores); both distributions are printed.

    .venv/bin/python bench/online_models_bench.py                        # synthetic log
    .venv/bin/python bench/online_models_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models import Recommender, RecommenderConfig, UserContext  # noqa: E402
from online_models.datasets import read_interactions, time_ordered  # noqa: E402


def _summary(label: str, ns: np.ndarray) -> str:
    us = ns / 1000.0
    p50, p90, p99 = np.percentile(us, [50, 90, 99])
    return f"{label:<22} p50 {p50:8.1f} us   p90 {p90:8.1f} us   p99 {p99:8.1f} us   mean {us.mean():8.1f} us"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default=None, help="log path (default: the synthetic generator)")
    ap.add_argument("--format", default="synthetic", help="taobao, yoochoose, otto or synthetic")
    ap.add_argument("--limit", type=int, default=None, help="at most this many events")
    ap.add_argument("--k", type=int, default=20)
    ap.add_argument("--n-candidates", type=int, default=200)
    ap.add_argument("--recent", type=int, default=20, help="recent items kept per user")
    ap.add_argument("--warmup", type=int, default=1000, help="events replayed before timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    n_events = args.limit if args.limit is not None else 50_000
    events = time_ordered(read_interactions(args.dataset, args.format, limit=None if args.dataset else n_events))
    if args.limit is not None:
        events = events[: args.limit]
    rec = Recommender.default(RecommenderConfig(k=args.k, n_candidates=args.n_candidates), seed=args.seed)
    recent: dict[str, tuple[str, ...]] = {}
    bought: dict[str, frozenset[str]] = {}
    learn, cand, rank, total, cpu = [], [], [], [], []
    n_cands = []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    gc.collect()
    for i, x in enumerate(events):
        before = UserContext(x.user_id, recent.get(x.user_id, ()), bought.get(x.user_id, frozenset()), x.session_id, x.ts)
        c0, t0 = cpu_clock(), clock()
        items = (*before.recent_items, x.item_id)[-args.recent :]
        purchased = before.purchased | {x.item_id} if x.kind == "purchase" else before.purchased
        recent[x.user_id], bought[x.user_id] = items, purchased
        after = UserContext(x.user_id, items, purchased, x.session_id, x.ts)
        rec.learn_one(x, before)
        t1 = clock()
        candidates = rec.candidates(after)
        t2 = clock()
        top = rec.rank(after, candidates)
        rec.record_shown(x.user_id, top)
        t3, c3 = clock(), cpu_clock()
        if i >= args.warmup:
            cpu.append(c3 - c0)
            learn.append(t1 - t0)
            cand.append(t2 - t1)
            rank.append(t3 - t2)
            total.append(t3 - t0)
            n_cands.append(len(candidates))
    if not total:
        print(f"only {len(events)} events: fewer than --warmup {args.warmup}")
        return 1
    src = args.dataset or f"synthetic({n_events})"
    print(f"{src}: {len(events)} events, {len(total)} timed after {args.warmup} warm-up; "
          f"k={args.k}, n_candidates={args.n_candidates} (mean {statistics.fmean(n_cands):.0f} given to rank)")
    for label, xs in (("learn_one", learn), ("candidates", cand), ("rank + record_shown", rank),
                      ("per event (wall)", total), ("per event (CPU)", cpu)):
        print(_summary(label, np.asarray(xs, dtype=float)))
    mean_s = statistics.fmean(total) / 1e9
    cpu_s = statistics.fmean(cpu) / 1e9
    print(f"throughput of this loop on one core: {1 / mean_s:,.0f} events/s wall, {1 / cpu_s:,.0f} events/s by CPU time")
    print(f"models: {rec.versions}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
