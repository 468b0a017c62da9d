"""The worker's pure step alone, in-process: events/s and per-stage µs per event.

    .venv/bin/python bench/step_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao --events 30000 --scorer

Runs RecommendationStep (dedupe, learning, candidates, one Transformer call per batch,
ranking) over micro-batches of --batch events with user state in memory, the same code
the Faust worker runs between its Redis and Kafka calls, under the worker's garbage-collector
policy (stream/gcpolicy.py). --gc-threshold also runs, alternating, CPython's default
collector and the plain 50,000 threshold, and prints each one's longest collector pause.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from online_models import Recommender, RecommenderConfig  # noqa: E402
from online_models.datasets import read_interactions  # noqa: E402
from stream import gcpolicy  # noqa: E402
from stream.pipeline import RecommendationStep, StepConfig  # noqa: E402
from stream.records import ClickEvent, PurchaseEvent  # noqa: E402


def run(events, args, scorer) -> tuple[float, dict[str, float]]:
    step = RecommendationStep(Recommender.default(RecommenderConfig(k=20, n_candidates=args.candidates)), scorer,
                              StepConfig(top_k=20, n_candidates=args.candidates))
    states, timings = {}, {}
    start = time.perf_counter()
    for i in range(0, len(events), args.batch):
        batch = events[i : i + args.batch]
        result = step(batch, states, lambda: 0, [("clicks:0", i + n) for n in range(len(batch))])
        states.update(result.states)  # as the store would, after saving
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
    elapsed = time.perf_counter() - start
    return len(events) / elapsed, {k: v / len(events) * 1e6 for k, v in timings.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path)
    p.add_argument("--format", default="synthetic")
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--scorer", action="store_true", help="score with the registered Transformer (STREAMREC_MODEL_DIR)")
    p.add_argument("--gc-threshold", action="store_true", help="also run CPython's default collector and the plain 50,000 threshold, alternating")
    args = p.parse_args()
    xs = list(read_interactions(args.dataset, args.format, limit=args.events))
    events = [(PurchaseEvent if x.kind == "purchase" else ClickEvent)(
        event_id=f"e{i}", user_id=x.user_id, item_id=x.item_id, ts=x.ts, category_id=x.category_id)
        for i, x in enumerate(xs)]
    scorer = None
    if args.scorer:
        from gpu_scorer import HotSwapScorer, ModelRegistry
        from stream.settings import Settings

        scorer = HotSwapScorer(ModelRegistry(Settings.from_env().model_dir), device="auto")
    configs: list[tuple[str, bool | None]] = [("worker policy (gcpolicy)", True)]  # None: CPython's default
    if args.gc_threshold:
        configs = [("CPython default (700, 10, 10)", None), (f"threshold {gcpolicy.PLAIN_THRESHOLDS}", False),
                   *configs] * 2
    pauses: list[float] = []
    started: list[float] = []

    def timed(phase: str, info: dict) -> None:
        if phase == "start":
            started[:] = [time.perf_counter()]
        elif started:
            pauses.append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    for name, policy in configs:
        gcpolicy.configure(freeze=False)
        gc.unfreeze()
        if policy is None:
            gc.set_threshold(700, 10, 10)
        else:
            gcpolicy.configure(freeze=policy)
        gc.collect()
        pauses.clear()
        rate, per_event = run(events, args, scorer)
        stages = ", ".join(f"{k} {v:.0f} us" for k, v in per_event.items())
        longest = max(pauses, default=0.0) * 1000
        print(f"{name:32s} {len(events):,} events: {rate:,.0f} events/s  ({stages}); "
              f"{len(pauses)} collections, {sum(pauses) * 1000:.0f} ms, longest {longest:.1f} ms")


if __name__ == "__main__":
    main()
