"""A worker's cost per event over time, at a steady rate: does it stay flat?

    make up  # or point STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL at a running stack
    .venv/bin/python bench/paced_bench.py --rate 800 --seconds 600 --window 60

One `streamrec worker` (the worker's own defaults; a registered Transformer under
STREAMREC_MODEL_DIR is used) consumes what `streamrec produce` sends at ``--rate`` events/s
(the synthetic shop, or ``--dataset``/``--format``), on fresh topics. Every ``--window``
seconds it prints, for the events the worker consumed in that window: the worker process's
CPU (user + system, from /proc) per event, the mean batch size, and each stage's wall time per
event (the worker's own ``streamrec_stage_seconds``). At the end: the last window's CPU per
event as a ratio of the first's.

``--catalogue`` first sends the demo shop's catalogue (2,000 items, `streamrec produce
--demo-catalogue`) and waits until the worker has indexed it, so that its lists carry the
search features' sources too (new items by their text; ``query`` only follows searches, which
this bench does not send).

``--root DIR`` runs the worker and the producer from another checkout (a git worktree of an
older commit), with this venv's Python, for old-against-new runs in one session.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline_bench import cpu_seconds, drop_run, env_for  # noqa: E402
from stream.demo import scrape, stop_worker, wait_ready  # noqa: E402


def stage_sums(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for name, value in metrics.items():
        if name.startswith("streamrec_stage_seconds_sum{"):
            out[name.split('stage="', 1)[1].split('"', 1)[0]] = value
    return out


def total(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k == prefix or k.startswith(prefix + "{"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=800.0, help="events per second (default 800)")
    p.add_argument("--seconds", type=int, default=600, help="how long the producer sends (default 600)")
    p.add_argument("--window", type=int, default=60, help="seconds per printed line (default 60)")
    p.add_argument("--dataset", type=Path, help="a log to replay instead of the synthetic shop")
    p.add_argument("--format", default="synthetic")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout to run the worker and producer from")
    p.add_argument("--warmup", type=float, default=120.0, help="most seconds to wait for the worker to be ready")
    p.add_argument("--catalogue", action="store_true", help="send the demo catalogue first and wait until it is indexed")
    args = p.parse_args(argv)
    root = args.root.resolve()
    tag = f"paced{os.getpid()}"
    env, settings = env_for(f"{tag}.", {"PYTHONPATH": str(root)})
    port = settings.metrics_port
    log = ROOT / ".run" / f"paced-worker-{tag}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "stream.cli"]
    with open(log, "wb") as out:
        worker = subprocess.Popen([*exe, "worker"], env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    producer = None
    try:
        wait_ready([(worker, port, log)], args.warmup)
        if args.catalogue:
            subprocess.run([*exe, "produce", "--demo-catalogue"], env=env, cwd=root, check=True, capture_output=True)
            t0 = time.monotonic()
            while scrape(port).get("streamrec_catalogue_items", 0) < 2000:
                if time.monotonic() - t0 > 600 or worker.poll() is not None:
                    raise SystemExit("the worker did not index the catalogue")
                time.sleep(1)
            print(f"the worker indexed the demo catalogue in {time.monotonic() - t0:.0f} s")
        n = int(args.rate * args.seconds)
        cmd = [*exe, "produce", "--rate", str(args.rate), "--limit", str(n), "--no-progress", "--id-prefix", tag,
               "--format", args.format]
        if args.dataset:
            cmd += ["--dataset", str(args.dataset)]
        producer = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"worker from {root}, {args.rate:g} events/s for {args.seconds} s "
              f"({'synthetic shop' if not args.dataset else args.dataset.name}), a line per {args.window} s:")
        first = last = None
        m = scrape(port)
        c, e, s = cpu_seconds(worker.pid), total(m, "streamrec_events_consumed_total"), stage_sums(m)
        t = main_thread_cpu(worker.pid)
        bs, bc = total(m, "streamrec_batch_size_events_sum"), total(m, "streamrec_batch_size_events_count")
        start = time.monotonic()
        while producer.poll() is None or time.monotonic() - start < args.seconds + args.window:
            time.sleep(args.window)
            m = scrape(port)
            c2, e2, s2 = cpu_seconds(worker.pid), total(m, "streamrec_events_consumed_total"), stage_sums(m)
            t2 = main_thread_cpu(worker.pid)
            bs2, bc2 = total(m, "streamrec_batch_size_events_sum"), total(m, "streamrec_batch_size_events_count")
            events = e2 - e
            if events <= 0:
                if producer.poll() is not None:
                    break
                continue
            us = 1e6 * (c2 - c) / events
            main_us = 1e6 * (t2 - t) / events
            if events >= 0.5 * args.rate * args.window:  # a whole window (not the tail after the producer)
                first = us if first is None else first
                last = us
            stages = "  ".join(f"{k} {1e6 * (v - s.get(k, 0.0)) / events:.0f}" for k, v in sorted(s2.items())
                               if k != "batch")
            print(f"  t={time.monotonic() - start:5.0f} s  {events:7.0f} events  CPU {us:6.1f} µs/event "
                  f"(main thread {main_us:.0f}, others {us - main_us:.0f})  batch {(bs2 - bs) / max(1.0, bc2 - bc):6.1f} events  | wall µs/event: {stages}", flush=True)
            c, e, s, t, bs, bc = c2, e2, s2, t2, bs2, bc2
        if first and last:
            print(f"last whole window / first, CPU per event: {last / first:.2f}")
    finally:
        if producer is not None and producer.poll() is None:
            producer.terminate()
        stop_worker(worker)
        drop_run(settings)  # its topics and its user state in Redis
    return 0


def main_thread_cpu(pid: int) -> float:
    """User + system CPU time of a process's main thread so far (Linux /proc): the event loop,
    where Faust hands messages over and a small batch's step runs. The rest of a worker's CPU
    is its other threads: Faust's consumer thread (aiokafka's fetches), the step's thread in a
    backlog (``asyncio.to_thread``), the HTTP server."""
    return cpu_seconds(pid, pid)


if __name__ == "__main__":
    raise SystemExit(main())
