"""Bounded memory under a flood: a real worker takes millions of events, every one of a new
user and a new item, and its memory stays within its caps.

    make up  # or point STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL at a running stack
    .venv/bin/python bench/flood_bench.py --events 2000000

Loads the events into fresh topics (the project's own batch publisher), starts one
`streamrec worker` with the default settings (its caps: STREAMREC_MAX_ITEMS, STREAMREC_MAX_USERS),
and samples the worker's resident memory (RSS, /proc) as it works through them. Prints the peak
RSS and its course over the run, the snapshot of the models the worker writes to Redis at the
end (size, and how many items and users each learner holds against its cap), and what Redis
holds per user (MEMORY USAGE of a sample of the users' documents, and used_memory over users).
``--users-of PREFIX`` measures instead the users a finished run left under that key prefix
(for example ``streamrec.`` after `make demo`), without producing anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench.pipeline_bench import drop_run  # noqa: E402
from online_models import Recommender  # noqa: E402
from stream.app import publisher_for  # noqa: E402
from stream.connections import RedisConnection  # noqa: E402
from stream.demo import free_port, scrape, stop_worker, wait_ready  # noqa: E402
from stream.records import ClickEvent, PurchaseEvent, encode  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

EXE = [sys.executable, "-m", "stream.cli"]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


async def load(settings: Settings, n: int, chunk: int = 20_000) -> None:
    """``n`` events, each of a new user and a new item (one in ten a purchase)."""
    publisher = publisher_for(settings, linger_ms=5)
    topics = settings.topics
    now = time.time_ns() // 1_000_000
    start = time.time()
    try:
        for at in range(0, n, chunk):
            records = []
            for i in range(at, min(n, at + chunk)):
                if i % 10 == 9:
                    ev = PurchaseEvent(event_id=f"f{i}", user_id=f"u{i}", item_id=f"i{i}", ts=now, quantity=1)
                    records.append((topics.purchases, ev.user_id.encode(), encode(ev)))
                else:
                    ev = ClickEvent(event_id=f"f{i}", user_id=f"u{i}", item_id=f"i{i}", ts=now, category_id=f"c{i % 5000}")
                    records.append((topics.clicks, ev.user_id.encode(), encode(ev)))
            failed = await publisher.publish(records)
            if failed:
                raise SystemExit(f"{len(failed)} events were not accepted by Kafka")
            if (at // chunk) % 25 == 0:
                print(f"  loaded {at + len(records):,} events ({time.time() - start:.0f} s)", flush=True)
    finally:
        await publisher.stop()


def redis_per_user(conn: RedisConnection, prefix: str, sample: int = 2000) -> str:
    """What Redis holds per user under ``prefix``: MEMORY USAGE of a sample of documents."""
    client = conn.client()
    try:
        sizes, docs = [], []
        for key in client.scan_iter(match=f"{prefix}user:*", count=1000):
            sizes.append(client.memory_usage(key, samples=0) or 0)
            docs.append(client.strlen(key))
            if len(sizes) >= sample:
                break
        if not sizes:
            return f"  no users under {prefix!r}"
        sizes.sort()
        mean = sum(sizes) / len(sizes)
        return (f"  Redis per user ({len(sizes):,} sampled): MEMORY USAGE mean {mean:,.0f} B, median {sizes[len(sizes) // 2]:,} B, "
                f"max {sizes[-1]:,} B; the JSON document itself mean {sum(docs) / len(docs):,.0f} B, max {max(docs):,} B; "
                f"at the mean, {mean * 1e6 / 2**30:.2f} GiB per million users")
    finally:
        client.close()


def learner_sizes(model: Recommender) -> str:
    rows = [f"blend counts {len(model._counts):,}/{model.config.max_items:,} items"]
    for name, learner in model.learners.items():
        parts = []
        for attr, label in (("_items", "items"), ("_totals", "items"), ("_sessions", "sessions"), ("_history", "users")):
            table = getattr(learner, attr, None)
            if table is not None:
                cap = getattr(learner, "max_items" if label == "items" else "max_sessions" if label == "sessions" else "max_users")
                parts.append(f"{len(table):,}/{cap:,} {label}")
        rows.append(f"{name} " + ", ".join(parts))
    return "; ".join(rows)


def flood(args) -> None:
    prefix = f"flood{int(time.time())}."
    env = dict(os.environ, STREAMREC_TOPIC_PREFIX=prefix, STREAMREC_APP_ID=prefix.rstrip("."),
               STREAMREC_METRICS_PORT=str(free_port()), STREAMREC_SNAPSHOT_INTERVAL_S=str(args.snapshot_every),
               PYTHONUNBUFFERED="1")
    settings = Settings.from_env(env)
    print(f"flood: {args.events:,} events, each a new user and a new item; caps STREAMREC_MAX_ITEMS={settings.max_items:,}, "
          f"STREAMREC_MAX_USERS={settings.max_users:,}")
    ensure_topics(settings.kafka, settings.topics.all, settings.partitions)
    client = settings.redis.client()
    used_before = client.info("memory")["used_memory"]
    asyncio.run(load(settings, args.events))
    log = ROOT / ".run" / "bench-flood-worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(EXE + ["worker"], env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    port = int(env["STREAMREC_METRICS_PORT"])
    try:
        wait_ready([(proc, port, log)], 120)
        start, last_print, course = time.time(), 0.0, []
        while True:
            if proc.poll() is not None:
                raise SystemExit("worker exited:\n" + log.read_text()[-3000:])
            metrics = scrape(port)
            done = sum(v for k, v in metrics.items() if k.startswith("streamrec_events_consumed_total"))
            rss, peak = rss_mb(proc.pid)
            if time.time() - last_print >= 15:
                course.append((done, rss))
                print(f"  {time.time() - start:5.0f} s: {done:12,.0f} events applied, RSS {rss:,.0f} MiB (peak {peak:,.0f})", flush=True)
                last_print = time.time()
            if done >= args.events:
                break
            if time.time() - start > args.timeout:
                raise SystemExit(f"timed out with {done:,.0f} of {args.events:,} events applied")
            time.sleep(1)
        elapsed = time.time() - start
        # the snapshot written after the last event
        key = f"{prefix}models:snapshot"
        deadline = time.time() + 3 * args.snapshot_every + 60
        model = None
        while time.time() < deadline:
            blob = client.get(key)
            if blob:
                model = Recommender.restore(blob)
                if model.n_learned >= args.events:
                    break
            time.sleep(2)
        rss, peak = rss_mb(proc.pid)
        print(f"worker: {args.events:,} events in {elapsed:.0f} s; RSS at the end {rss:,.0f} MiB, peak {peak:,.0f} MiB "
              f"({peak / 1024:.2f} GiB)")
        print("  RSS over the run (events applied: MiB): " + ", ".join(f"{d / 1e6:.2f}M: {r:,.0f}" for d, r in course))
        if model is not None:
            print(f"snapshot: {client.strlen(key) / 2**20:,.1f} MiB, {model.n_learned:,} events learned; "
                  + learner_sizes(model))
        used_after = client.info("memory")["used_memory"]
        print(f"Redis used_memory grew {(used_after - used_before) / 2**20:,.0f} MiB for {args.events:,} users: "
              f"{(used_after - used_before) / args.events:,.0f} B per user")
        print(redis_per_user(settings.redis, prefix))
    finally:
        stop_worker(proc)
        if not args.keep:
            drop_run(settings)
        client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--snapshot-every", type=int, default=30, help="the worker's STREAMREC_SNAPSHOT_INTERVAL_S")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--keep", action="store_true", help="leave the run's topics and Redis keys in place")
    p.add_argument("--users-of", metavar="PREFIX", help="only measure Redis per user for users under this key prefix")
    args = p.parse_args()
    if args.users_of is not None:
        print(redis_per_user(Settings.from_env().redis, args.users_of))
        return
    flood(args)


if __name__ == "__main__":
    main()
