"""The worker's pure step alone, in-process: events/s, per-stage µs per event and per-batch latency.

    .venv/bin/python bench/step_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao --events 30000 --scorer
    .venv/bin/python bench/step_bench.py --batch 1 --warmup 1000      # per-event latency, one event a batch
    .venv/bin/python bench/step_bench.py --batch 1 --warmup 1000 --gap-ms 20   # batches that come apart
    .venv/bin/python bench/step_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao --passes 3 --batch 110 --window 55000   # a long run's users

Runs the step the worker runs, built by ``RecommendationStep.from_settings`` from
``Settings.from_env`` (``STREAMREC_*``, defaults where unset; --candidates and --top-k
override them): dedupe, learning, candidates, one Transformer call per batch, ranking, over
micro-batches of --batch events with user state in memory, the same code the Faust worker
runs between its Redis and Kafka calls, under the worker's garbage-collector policy
(stream/gcpolicy.py). Each batch's latency is timed on the wall clock (``perf_counter_ns``)
and in CPU time of this thread (``thread_time_ns``: what the work costs when other processes
share the cores); their p50/p90/p99 are printed, per event with ``--batch 1``.
``--gap-ms`` sleeps that long after each batch, as a worker at a steady rate waits between
batches: on this project's 2-core virtual machines work that follows a pause costs more CPU
than the same work back to back (docs/architecture.md); events/s leaves the sleeps out.
--gc-threshold also runs, alternating, CPython's default collector and the plain 50,000
threshold, and prints each one's longest collector pause.

``--passes N`` replays the log N times over, each pass under new user and session ids (the
same items, time moving on by the log's span), so that the users a long run meets fill the
learners' and the blend's user tables (100,000 users by default: STREAMREC_MAX_USERS) as
they would in production, where the synthetic shop's 500 users never do; ``--window W`` then
prints the step's CPU per event over each W events, to see whether the cost stays flat. As in
the worker, the users' states live between batches as the documents Redis would hold (bytes,
decoded for each batch), so a long run does not grow the heap the collector walks.

``--documents`` then prints what the users' state documents (as the worker saves them in Redis)
weigh, and what each costs to read back (``load_many`` of the in-memory store: the worker's
decoding, without the network), to write (``encode_state``) and to copy (the step copies each
state it changes). Event ids are ``streamrec produce``'s (``<log tag>-<index>``).

    .venv/bin/python bench/step_bench.py --batch 10 --events 30000 --documents
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from online_models.datasets import read_interactions  # noqa: E402
from online_models.metrics import percentile  # noqa: E402
from stream import gcpolicy  # noqa: E402
from stream.pipeline import RecommendationStep  # noqa: E402
from stream.produce import event_id, source_tag  # noqa: E402
from stream.records import ClickEvent, PurchaseEvent  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.state import InMemoryUserStateStore, _load, encode_state  # noqa: E402


def settings_of(args) -> Settings:
    """The worker's settings, with the options given on the command line over them."""
    overrides = {name: value for name, value in (("n_candidates", args.candidates), ("top_k", args.top_k))
                 if value is not None}
    return Settings.from_env(os.environ, **overrides)


def run(events, args, settings: Settings, scorer) -> tuple[float, dict[str, float], np.ndarray, np.ndarray, dict]:
    """events/s, µs per event by stage, each timed batch's wall and CPU ns, the users' states, and
    the step's CPU µs per event over each ``--window`` events."""
    step = RecommendationStep.from_settings(settings, scorer)
    docs, timings = {}, {}
    wall, cpu = [], []
    windows, window_ns, window_n = [], 0, 0
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    start = time.perf_counter()
    slept = 0.0  # sleeps (--gap-ms) and state decoding: left out of events/s
    for i in range(0, len(events), args.batch):
        batch = events[i : i + args.batch]
        s0 = time.perf_counter()  # as the worker's store decodes them; not counted in events/s
        states = {uid: _load(uid, docs.get(uid))[0] for uid in dict.fromkeys(ev.user_id for ev in batch)}
        slept += time.perf_counter() - s0
        c0, t0 = cpu_clock(), clock()
        result = step(batch, states, lambda: 0, [("clicks:0", i + n) for n in range(len(batch))])
        t1, c1 = clock(), cpu_clock()
        if i >= args.warmup:
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
        docs.update(result.docs)  # as the store would, after saving
        window_ns += c1 - c0
        window_n += len(batch)
        if args.window and window_n >= args.window:
            windows.append(window_ns / window_n / 1000)
            window_ns = window_n = 0
        for stage, seconds in result.timings.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        if args.gap_ms:
            s0 = time.perf_counter()
            time.sleep(args.gap_ms / 1000)
            slept += time.perf_counter() - s0
    elapsed = time.perf_counter() - start - slept
    states = {uid: _load(uid, doc)[0] for uid, doc in docs.items()} if args.documents else {}
    return (len(events) / elapsed, {k: v / len(events) * 1e6 for k, v in timings.items()},
            np.asarray(wall, dtype=float), np.asarray(cpu, dtype=float), states, windows)


def replayed(xs, tag: str, passes: int):
    """The log's events ``passes`` times over: pass ``p`` > 0 under user and session ids ending in
    ``~p``, its times moved on by ``p`` spans of the log (new users, the same items)."""
    span = (max(x.ts for x in xs) - min(x.ts for x in xs) + 1) if xs else 0
    n = 0
    for p in range(passes):
        suffix = f"~{p}" if p else ""
        for x in xs:
            yield (PurchaseEvent if x.kind == "purchase" else ClickEvent)(
                event_id=event_id(tag, n), user_id=x.user_id + suffix, item_id=x.item_id, ts=x.ts + p * span,
                session_id=None if x.session_id is None else x.session_id + suffix, category_id=x.category_id)
            n += 1


def documents(states: dict) -> str:
    """The users' documents: bytes (mean, median, heaviest) and µs per user to load, encode and copy."""
    docs = {uid: encode_state(state) for uid, state in states.items()}
    sizes = np.sort(np.fromiter(map(len, docs.values()), dtype=float, count=len(docs)))
    store = InMemoryUserStateStore()
    asyncio.run(store.save_docs(docs))
    users, values = list(states), list(states.values())
    timings = {}
    for name, work in (("load", lambda: asyncio.run(store.load_many(users))),
                       ("encode", lambda: [encode_state(s) for s in values]),
                       ("copy", lambda: [s.copy() for s in values])):
        best = float("inf")
        for _ in range(5):  # the best of 5: the work itself, not this machine's interruptions
            t0 = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - t0)
        timings[name] = best / len(users) * 1e6
    return (f"  {len(docs):,} user documents: {sizes.mean():,.0f} B mean, {sizes[len(sizes) // 2]:,.0f} median, "
            f"{sizes[-1]:,.0f} heaviest; per user: load {timings['load']:.2f} us, encode {timings['encode']:.2f} us, "
            f"copy {timings['copy']:.2f} us")


def percentiles(label: str, ns: np.ndarray) -> str:
    if not len(ns):
        return f"{label}: nothing timed (fewer events than --warmup)"
    us = ns / 1000.0
    p50, p90, p99 = (percentile(us.tolist(), q) for q in (50, 90, 99))
    return f"{label:<12} p50 {p50:9.1f} us   p90 {p90:9.1f} us   p99 {p99:9.1f} us   mean {us.mean():9.1f} us"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path)
    p.add_argument("--format", default="synthetic")
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--batch", type=int, default=500, help="events a step call (1: per-event latency)")
    p.add_argument("--candidates", type=int, default=None, help="STREAMREC_CANDIDATES over the environment's")
    p.add_argument("--top-k", type=int, default=None, help="STREAMREC_TOP_K over the environment's")
    p.add_argument("--warmup", type=int, default=0, help="events replayed before batches are timed for percentiles")
    p.add_argument("--gap-ms", type=float, default=0.0, help="sleep this long after each batch (batches that come "
                   "apart, as at a steady rate; default 0: back to back)")
    p.add_argument("--scorer", action="store_true", help="score with the registered Transformer (STREAMREC_MODEL_DIR)")
    p.add_argument("--gc-threshold", action="store_true", help="also run CPython's default collector and the plain 50,000 threshold, alternating")
    p.add_argument("--passes", type=int, default=1, help="replay the log this many times, each pass under new "
                   "user and session ids (a long run's users filling the user tables)")
    p.add_argument("--window", type=int, default=0, help="also print the step's CPU us per event over each this "
                   "many events (is the cost flat?)")
    p.add_argument("--documents", action="store_true", help="then the users' state documents: size, and the cost "
                   "to load, encode and copy one")
    args = p.parse_args()
    settings = settings_of(args)
    xs = list(read_interactions(args.dataset, args.format, limit=args.events))
    tag = source_tag(args.dataset, args.format, 42)
    events = list(replayed(xs, tag, args.passes))
    scorer = None
    if args.scorer:
        from gpu_scorer import HotSwapScorer, ModelRegistry

        scorer = HotSwapScorer(ModelRegistry(settings.model_dir), device="auto")
    print(f"{args.dataset or 'synthetic'}: {len(events):,} events, batches of {args.batch}; "
          f"top_k={settings.top_k}, n_candidates={settings.n_candidates}, recent_items={settings.recent_items}, "
          f"scorer={'registered Transformer' if scorer is not None else 'none'}")
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
    unit = "event" if args.batch == 1 else f"batch of {args.batch}"
    for name, policy in configs:
        gcpolicy.configure(freeze=False)
        gc.unfreeze()
        if policy is None:
            gc.set_threshold(700, 10, 10)
        else:
            gcpolicy.configure(freeze=policy)
        gc.collect()
        pauses.clear()
        rate, per_event, wall, cpu, states, windows = run(events, args, settings, scorer)
        stages = ", ".join(f"{k} {v:.0f} us" for k, v in per_event.items())
        longest = max(pauses, default=0.0) * 1000
        print(f"{name:32s} {len(events):,} events: {rate:,.0f} events/s  ({stages}); "
              f"{len(pauses)} collections, {sum(pauses) * 1000:.0f} ms, longest {longest:.1f} ms")
        print(f"  per {unit}, {len(wall):,} timed after {args.warmup:,} warm-up events:")
        print("  " + percentiles("wall", wall))
        print("  " + percentiles("thread CPU", cpu))
        if windows:
            print(f"  step CPU us per event, each {args.window:,} events: {' '.join(f'{w:.0f}' for w in windows)}; "
                  f"last / first {windows[-1] / windows[0]:.2f}")
        if args.documents:
            print(documents(states))


if __name__ == "__main__":
    main()
