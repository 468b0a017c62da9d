"""Live HR@20 with 1, 2 and 4 real workers: does quality hold as the group scales out?

    make up  # or point STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL at a running stack
    .venv/bin/python bench/multiworker_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao

For each worker count of ``--workers-list`` and each of ``--repeats`` repeats, on fresh topics of
``--partitions`` partitions (a fresh consumer group, no user state, empty models): that many
`streamrec worker` processes join one group; once all of them answer /readyz, `streamrec
produce` sends ``--events`` events of the log at ``--rate`` events/s (paced, so batches stay
small: the live figure judges each event against the list its user held when the batch began,
so big batches would cost hit rate whatever the models know); the run ends when the workers
have applied every event (consumed, dead-lettered or skipped as duplicates, by their metrics),
and, where the models learn every partition, when every worker's models have learned them all.

Printed per worker count: the live HR@20 of each repeat (``streamrec_live_hits_total{k="20"}``
over ``streamrec_live_judged_total``, summed over the workers' /metrics: the worker's own
judgement, docs/evaluation.md "What a list is judged against"), their mean, the min-max
spread, the difference to one worker, the batch size, and what learning cost: seconds the
step's learn stage took plus seconds the models spent on the other workers' partitions
(stream/peers.py), per event produced, summed over the workers, and the workers' CPU per event.

By default the workers run WITHOUT the Transformer scorer (an empty STREAMREC_MODEL_DIR), to
keep each run short on a small machine; ``--model-dir`` gives them a registry. Other worker
settings come from the environment (e.g. STREAMREC_LEARN_ALL_PARTITIONS=false for each worker
learning its own partitions only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline_bench import cpu_seconds, drop_run, env_for, produce, start_workers  # noqa: E402
from stream.demo import scrape, stop_worker, wait_ready  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

TAOBAO = ROOT.parent / "shared" / "data" / "taobao-userbehavior" / "UserBehavior_jason-wang1.csv"


def total(metrics: dict[str, float], name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` (with these labels, when given) in one scrape."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for key, v in metrics.items()
               if (key == name or key.startswith(name + "{")) and all(w in key for w in want))


def done(scrapes: list[dict[str, float]], events: int, learn_all: bool) -> bool:
    """Every event handled by the group (applied, dead-lettered or a duplicate), and, when the
    models learn every partition, learned by every worker's models (by their blend's count)."""
    handled = sum(total(m, "streamrec_events_consumed_total") + total(m, "streamrec_events_invalid_total")
                  + total(m, "streamrec_duplicates_skipped_total") for m in scrapes)
    if handled < events:
        return False
    if learn_all:
        return all(total(m, "streamrec_model_events_learned", model="recommender") >= events for m in scrapes)
    return True


def one_run(args, n_workers: int, repeat: int, model_dir: Path) -> dict[str, float]:
    tag = f"mw{os.getpid()}n{n_workers}r{repeat}t{int(time.time())}"
    env, settings = env_for(f"{tag}.", {"STREAMREC_MODEL_DIR": str(model_dir),
                                        "STREAMREC_PARTITIONS": str(args.partitions)})
    ensure_topics(settings.kafka_bootstrap, settings.topics.all, args.partitions)
    workers = start_workers(env, n_workers, tag)
    try:
        wait_ready(workers, args.warmup)
        cpu0 = sum(cpu_seconds(proc.pid) for proc, _, _ in workers)
        start = time.monotonic()
        produce(env, args, args.events, args.rate)
        sent_s = time.monotonic() - start
        deadline = time.monotonic() + args.timeout
        while True:
            scrapes = [scrape(port) for _, port, _ in workers]
            if done(scrapes, args.events, settings.learn_all_partitions):
                break
            for proc, _, log in workers:
                if proc.poll() is not None:
                    raise SystemExit("worker exited:\n" + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise SystemExit(f"not every event handled and learned {args.timeout:.0f} s after the producer finished")
            time.sleep(0.5)
        behind_s = time.monotonic() - start - sent_s
        cpu = sum(cpu_seconds(proc.pid) for proc, _, _ in workers) - cpu0
    finally:
        for proc, _, _ in workers:
            stop_worker(proc)
        drop_run(settings)
    judged = sum(total(m, "streamrec_live_judged_total") for m in scrapes)
    hits = sum(total(m, "streamrec_live_hits_total", k="20") for m in scrapes)
    batches = sum(total(m, "streamrec_batch_size_events_count") for m in scrapes)
    learn_s = sum(total(m, "streamrec_stage_seconds_sum", stage="learn") for m in scrapes)
    peer_s = sum(total(m, "streamrec_peer_learn_seconds_total") for m in scrapes)
    peer_n = sum(total(m, "streamrec_peer_events_learned_total") for m in scrapes)
    return {"hr": hits / judged if judged else float("nan"), "judged": judged, "batch": args.events / max(1.0, batches),
            "learn_us": 1e6 * learn_s / args.events, "peer_us": 1e6 * peer_s / args.events, "peer_events": peer_n,
            "cpu_us": 1e6 * cpu / args.events, "behind_s": behind_s, "sent_s": sent_s}


def report(n: int, runs: list[dict[str, float]], base: float | None) -> str:
    hrs = [r["hr"] for r in runs]
    mean = statistics.fmean(hrs)
    rel = f"{(mean / base - 1) * 100:+.1f}%" if base else "-"
    learn = statistics.fmean(r["learn_us"] + r["peer_us"] for r in runs)
    return (f"| {n} | {', '.join(f'{h:.4f}' for h in hrs)} | **{mean:.4f}** | {min(hrs):.4f}-{max(hrs):.4f} | {rel} "
            f"| {statistics.fmean(r['batch'] for r in runs):.1f} "
            f"| {learn:.1f} ({statistics.fmean(r['learn_us'] for r in runs):.1f} + {statistics.fmean(r['peer_us'] for r in runs):.1f}) "
            f"| {statistics.fmean(r['cpu_us'] for r in runs):.0f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, default=TAOBAO if TAOBAO.exists() else None,
                   help="log to replay (default: the Taobao log under ../shared/data when present)")
    p.add_argument("--format", default="taobao")
    p.add_argument("--events", type=int, default=110_300, help="events per run (default: the whole Taobao log)")
    p.add_argument("--rate", type=float, default=2500.0, help="events per second sent (default 2500)")
    p.add_argument("--repeats", type=int, default=3, help="runs per worker count (default 3)")
    p.add_argument("--workers-list", default="1,2,4", help="worker counts, comma-separated (default 1,2,4)")
    p.add_argument("--partitions", type=int, default=4, help="partitions of each input topic (default 4)")
    p.add_argument("--model-dir", type=Path, help="a Transformer registry for the workers (default: none, an empty directory)")
    p.add_argument("--warmup", type=float, default=120.0, help="most seconds to wait for the workers to be ready")
    p.add_argument("--timeout", type=float, default=300.0, help="most seconds to wait for the end after the producer finished")
    args = p.parse_args(argv)
    counts = [int(n) for n in args.workers_list.split(",") if n.strip()]
    if max(counts) > args.partitions:
        p.error(f"--workers-list: at most --partitions ({args.partitions}) workers get partitions")
    if args.dataset is None and args.format != "synthetic":
        p.error("--dataset: no log given and none found under ../shared/data")
    learn_all = env_for("mwprobe.")[1].learn_all_partitions
    with tempfile.TemporaryDirectory(prefix="mw-models-") as empty:
        model_dir = args.model_dir or Path(empty)
        print(f"multiworker bench: {os.cpu_count()} cores, {args.events:,} events of "
              f"{args.dataset.name if args.dataset else 'the synthetic shop'} at {args.rate:,.0f} events/s, "
              f"{args.partitions} partitions, STREAMREC_LEARN_ALL_PARTITIONS={str(learn_all).lower()}, "
              f"model dir {model_dir if args.model_dir else '(none: no Transformer)'}", flush=True)
        results: dict[int, list[dict[str, float]]] = {}
        for repeat in range(args.repeats):  # worker counts alternate, so drift over time hits each alike
            for n in counts:
                r = one_run(args, n, repeat, model_dir)
                results.setdefault(n, []).append(r)
                print(f"  {n} worker(s), repeat {repeat + 1}: HR@20 {r['hr']:.4f} over {r['judged']:,.0f} judged, "
                      f"batches of {r['batch']:.1f}, learn {r['learn_us']:.1f} + peers {r['peer_us']:.1f} µs/event "
                      f"({r['peer_events']:,.0f} peer events), CPU {r['cpu_us']:.0f} µs/event, "
                      f"sent in {r['sent_s']:.1f} s, done {r['behind_s']:.1f} s after", flush=True)
    base = statistics.fmean(r["hr"] for r in results[counts[0]]) if counts[0] == 1 else None
    print()
    print("| workers | live HR@20 per repeat | mean | spread (min-max) | vs 1 worker | events per batch "
          "| learn µs per event, all workers (step + peers) | workers' CPU µs per event |")
    print("|---|---|---|---|---|---|---|---|")
    for n in counts:
        print(report(n, results[n], base))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
