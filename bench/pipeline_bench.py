"""Throughput and latency of the whole pipeline through the real broker and server.

    make up  # or point STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL at a running stack
    .venv/bin/python bench/pipeline_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao

Three measurements in one run, each on fresh topics:

1. throughput: the log is loaded into the input topics first, then one `streamrec worker`
   (whole pipeline on: validation, dedupe, Redis state, online models, Transformer scorer
   when one is registered, blend, publication) works through it; events/s = events applied
   / time from its first to its last recommendation.
2. the same events through a bare aiokafka consume→produce loop (one output message per
   input, nothing else), for scale; the ratio is printed.
3. latency: once every worker answers /readyz, events produced at --latency-rate events/s
   with ts = send time; p50/p95/p99 of (arrival of the recommendation at a consumer − event
   ts), over the events after the first --latency-warmup seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import logging  # noqa: E402

logging.getLogger("aiokafka").setLevel(logging.ERROR)  # a fresh topic's first fetches warn until its leader is known


class _FreshLeader(logging.Filter):
    """Drop aiokafka's error line for a fresh topic whose leader does not serve yet: the reader
    starts right after the run's topics are created, and aiokafka retries the offsets lookup
    until the leader answers, so the line reports nothing a reader of the figures must act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Failed fetch offsets") and "NotLeaderForPartition" in record.getMessage())


logging.getLogger("aiokafka.consumer.fetcher").addFilter(_FreshLeader())

from online_models.metrics import percentile  # noqa: E402
from stream.connections import KafkaConnection  # noqa: E402
from stream.demo import drop_topics, faust_leader_topic, free_port, scrape, stop_worker, wait_ready  # noqa: E402
from stream.records import decode_recommendation  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402

EXE = [sys.executable, "-m", "stream.cli"]


def produce(env: dict, args, limit: int, rate: float | None) -> None:
    cmd = EXE + ["produce", "--format", args.format, "--limit", str(limit), "--no-progress"]
    if args.dataset:
        cmd += ["--dataset", str(args.dataset)]
    if rate:
        cmd += ["--rate", str(rate)]
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)


#: what ``--worker`` runs: the worker, or the research contender on librdkafka (bench/cshell_worker.py)
WORKERS = {"faust": EXE + ["worker"], "cshell": [sys.executable, str(ROOT / "bench" / "cshell_worker.py")]}


def start_workers(env: dict, n: int, name: str, kind: str = "faust") -> list[tuple[subprocess.Popen, int, Path]]:
    """``n`` workers of one consumer group, each with its own metrics port and log."""
    out = []
    for i in range(n):
        port = free_port()
        log = ROOT / ".run" / f"bench-worker-{name}-{i}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(WORKERS[kind], env=dict(env, STREAMREC_METRICS_PORT=str(port)),
                                    stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        out.append((proc, port, log))
    return out


class Arrivals(threading.Thread):
    """A downstream service reading the recommendations topic (aiokafka, in its own thread):
    when each recommendation arrived and how long after its event's ts."""

    def __init__(self, kafka: KafkaConnection, topic: str) -> None:
        super().__init__(daemon=True)
        self.kafka, self.topic = kafka, topic
        self.times: list[float] = []
        self.latencies_ms: list[float] = []
        self.event_ts: list[int] = []
        self.to_publication_ms: list[float] = []  # event ts to the record's timestamp (the worker's producer took it)
        self.stop_flag = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        asyncio.run(self._consume())

    async def _consume(self) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(self.topic, **self.kafka.client_options(), auto_offset_reset="earliest",
                                    group_id=None, enable_auto_commit=False, fetch_max_wait_ms=100)
        await consumer.start()
        self.ready.set()
        try:
            while not self.stop_flag.is_set():
                batch = await consumer.getmany(timeout_ms=200, max_records=5000)
                now = time.time()
                for records in batch.values():
                    for msg in records:
                        rec = decode_recommendation(msg.value)
                        self.times.append(now)
                        self.latencies_ms.append(now * 1000 - rec.event_ts)
                        self.event_ts.append(rec.event_ts)
                        self.to_publication_ms.append(msg.timestamp - rec.event_ts)
        finally:
            await consumer.stop()

    def wait_first(self, timeout_s: float, workers) -> None:
        start = time.time()
        while not self.times and time.time() - start < timeout_s:
            time.sleep(0.05)
            for proc, _, log in workers:
                if proc.poll() is not None:
                    raise SystemExit("worker exited:\n" + log.read_text()[-3000:])

    def wait_quiet(self, quiet_s: float, timeout_s: float, workers) -> None:
        start, seen, since = time.time(), -1, time.time()
        while time.time() - since < quiet_s and time.time() - start < timeout_s:
            time.sleep(0.5)
            if len(self.times) != seen:
                seen, since = len(self.times), time.time()
            for proc, _, log in workers:
                if proc.poll() is not None:
                    raise SystemExit("worker exited:\n" + log.read_text()[-3000:])


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process so far (Linux /proc); of its thread ``tid`` if given."""
    try:
        stat = Path(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat")
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def breakdown(metrics: list[dict[str, float]], cpu_s: float) -> str:
    """Where a worker's time went: mean ms per batch by stage, events per batch, CPU µs per event."""
    def total(name: str) -> float:
        return sum(v for m in metrics for k, v in m.items() if k.startswith(name))

    batches = total('streamrec_batch_size_events_count')
    events = total('streamrec_batch_size_events_sum')
    if not batches:
        return "  (no batches)"
    stages = sorted({k.split('stage="')[1].split('"')[0] for m in metrics for k in m if k.startswith("streamrec_stage_seconds_sum")})
    stage_key = 'streamrec_stage_seconds_sum{stage="'
    stage_ms = {st: total(stage_key + st + '"}') / batches * 1000 for st in stages}
    per = ", ".join(f"{st} {ms:.2f}" for st, ms in stage_ms.items())
    snaps = [(m.get("streamrec_model_snapshot_pause_seconds", 0.0), m.get("streamrec_model_snapshot_seconds", 0.0))
             for m in metrics if m.get('streamrec_model_snapshots_total{result="ok"}')]
    taken = "; last snapshot of each worker: " + ", ".join(f"{pause * 1000:.1f} ms paused, {took * 1000:.0f} ms in all"
                                                          for pause, took in snaps) if snaps else ""
    return (f"  worker: {batches:,.0f} batches of {events / batches:.1f} events; ms per batch: {per}; "
            f"worker CPU {cpu_s / events * 1e6:.0f} µs per event (start-up excluded){taken}")


def workers_cpu(workers) -> float:
    return sum(cpu_seconds(proc.pid) for proc, _, _ in workers)


def local_broker() -> int | None:
    """The pid of the Kafka broker on this machine (a ``kafka.Kafka`` JVM, as deploy/kafka
    starts it), when there is exactly one: its CPU is a large share of the run's."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"kafka.Kafka" in cmdline.read_bytes().split(b"\0"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids[0] if len(pids) == 1 else None


def broker_cpu(pid: int | None) -> float:
    """The broker's CPU seconds so far (0 when no single local broker was found)."""
    return cpu_seconds(pid) if pid is not None else 0.0


def broker_line(pid: int | None, cpu_s: float, events: float) -> str:
    if pid is None or not events:
        return "  broker: CPU not measured (not exactly one local kafka.Kafka process)"
    return f"  broker (pid {pid}): {cpu_s / events * 1e6:.0f} µs of CPU per event"


def stop_all(workers, arrivals: Arrivals) -> None:
    for proc, _, _ in workers:
        stop_worker(proc)
    arrivals.stop_flag.set()
    arrivals.join(5)


def drop_run(settings: Settings) -> None:
    """The run's topics and its user state in Redis."""
    drop_topics(settings.kafka, [*settings.topics.all, faust_leader_topic(settings.app_id)])
    drop_state(settings)


def drop_state(settings: Settings) -> None:
    """Delete the run's user state from Redis (it would otherwise stay for STREAMREC_STATE_TTL_S)."""
    client = settings.redis.client()
    try:
        batch = []
        for key in client.scan_iter(match=f"{settings.topic_prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    finally:
        client.close()


def env_for(prefix: str, extra: dict | None = None) -> tuple[dict, Settings]:
    env = dict(os.environ, STREAMREC_TOPIC_PREFIX=prefix, STREAMREC_APP_ID=prefix.rstrip("."),
               STREAMREC_METRICS_PORT=str(free_port()), PYTHONUNBUFFERED="1", **(extra or {}))
    return env, Settings.from_env(env)


def throughput(args) -> tuple[float, int]:
    env, settings = env_for(f"bench{int(time.time())}t.")
    ensure_topics(settings.kafka, settings.topics.all, settings.partitions)
    t = time.time()
    produce(env, args, args.events, None)
    print(f"  loaded {args.events:,} events in {time.time() - t:.1f} s")
    arrivals = Arrivals(settings.kafka, settings.topics.recommendations)
    arrivals.start()
    arrivals.ready.wait(30)
    workers = start_workers(env, args.workers, "throughput", args.worker)
    broker = local_broker()
    try:
        arrivals.wait_first(args.timeout, workers)
        cpu0, broker0 = workers_cpu(workers), broker_cpu(broker)  # start-up (imports, model load) excluded
        arrivals.wait_quiet(5, args.timeout, workers)
        metrics = [scrape(port) for _, port, _ in workers]
        cpu, broker_s = workers_cpu(workers) - cpu0, broker_cpu(broker) - broker0
    finally:
        stop_all(workers, arrivals)
    applied = sum(v for m in metrics for k, v in m.items() if k.startswith("streamrec_events_consumed_total"))
    span = arrivals.times[-1] - arrivals.times[0]
    rate = applied / span if span > 0 else 0.0
    print(f"  {args.workers} worker(s): {applied:,.0f} events applied, {len(arrivals.times):,} recommendations in {span:.1f} s: {rate:,.0f} events/s")
    print(breakdown(metrics, cpu))
    print(broker_line(broker, broker_s, applied))
    drop_run(settings)
    return rate, int(applied)


async def bare_loop(kafka: KafkaConnection, source: list[str], sink: str, n: int) -> float:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(*source, **kafka.client_options(), auto_offset_reset="earliest",
                                group_id=f"bare{time.time_ns()}", enable_auto_commit=True)
    producer = AIOKafkaProducer(**kafka.client_options(), linger_ms=2)
    await consumer.start()
    await producer.start()
    seen, first = 0, None
    try:
        while seen < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=1000)
            for records in batch.values():
                for msg in records:
                    first = first or time.perf_counter()
                    await producer.send(sink, msg.value, key=msg.key)
                    seen += 1
        await producer.flush()
        return seen / (time.perf_counter() - first)
    finally:
        await consumer.stop()
        await producer.stop()


def bare(args) -> float:
    env, settings = env_for(f"bench{int(time.time())}b.")
    ensure_topics(settings.kafka, settings.topics.all, settings.partitions)
    produce(env, args, args.events, None)
    rate = asyncio.run(bare_loop(settings.kafka, list(settings.topics.inputs), settings.topics.recommendations, args.events))
    print(f"  bare aiokafka consume->produce: {rate:,.0f} events/s")
    drop_run(settings)
    return rate


def latency(args) -> list[float]:
    env, settings = env_for(f"bench{int(time.time())}l.")
    ensure_topics(settings.kafka, settings.topics.all, settings.partitions)
    arrivals = Arrivals(settings.kafka, settings.topics.recommendations)
    arrivals.start()
    arrivals.ready.wait(30)
    workers = start_workers(env, args.workers, "latency", args.worker)
    try:
        wait_ready(workers, args.warmup)  # in the group, partitions assigned, no rebalance going on
        broker = local_broker()
        cpu0, broker0 = workers_cpu(workers), broker_cpu(broker)
        start_ms = time.time() * 1000
        seconds = args.latency_warmup + args.latency_seconds
        sent = int(args.latency_rate * seconds)
        produce(env, args, sent, args.latency_rate)
        arrivals.wait_quiet(3, args.timeout, workers)
        metrics = [scrape(port) for _, port, _ in workers]
        cpu, broker_s = workers_cpu(workers) - cpu0, broker_cpu(broker) - broker0
    finally:
        stop_all(workers, arrivals)
    measured_from = start_ms + args.latency_warmup * 1000
    lat = [ms for ms, ts in zip(arrivals.latencies_ms, arrivals.event_ts, strict=True) if ts >= measured_from]
    pub = [ms for ms, ts in zip(arrivals.to_publication_ms, arrivals.event_ts, strict=True) if ts >= measured_from]
    print(f"  {len(lat):,} recommendations at {args.latency_rate:,.0f} events/s "
          f"(the first {args.latency_warmup:g} s of events are warm-up, not counted): latency p50 {percentile(lat, 50):.1f} ms, "
          f"p95 {percentile(lat, 95):.1f} ms, p99 {percentile(lat, 99):.1f} ms, max {max(lat):.1f} ms")
    print(f"  to publication (the record's timestamp, the reader's own delays left out): p50 {percentile(pub, 50):.1f} ms, "
          f"p99 {percentile(pub, 99):.1f} ms, max {max(pub):.1f} ms")
    print(breakdown(metrics, cpu))
    print(broker_line(broker, broker_s, sent))
    print(tail_windows(arrivals.event_ts, arrivals.latencies_ms, measured_from, percentile(lat, 99)))
    if args.latency_out:
        with open(args.latency_out, "w") as fh:  # one "event ts (ms), latency (ms)" per line
            fh.writelines(f"{ts:.0f},{ms:.2f}\n" for ts, ms in zip(arrivals.event_ts, arrivals.latencies_ms, strict=True))
    drop_run(settings)
    return lat


def tail_windows(event_ts: list[float], latencies_ms: list[float], start_ms: float, p99: float,
                 window_ms: float = 250.0) -> str:
    """Where the slowest 1 % sits in time: spread out (the worker is slow) or bunched in a few
    windows (a pause: a collector, the broker, the machine)."""
    over: dict[int, int] = {}
    for ts, ms in zip(event_ts, latencies_ms, strict=True):
        if ts >= start_ms and ms > p99:
            w = int((ts - start_ms) // window_ms)
            over[w] = over.get(w, 0) + 1
    total = sum(over.values())
    if not total:
        return "  latency tail: nothing above p99"
    worst = sorted(over.items(), key=lambda kv: -kv[1])[:3]
    share = sum(n for _, n in worst) / total
    where = ", ".join(f"{w * window_ms / 1000:.2f} s ({n})" for w, n in worst)
    return (f"  latency tail: the {total} events above p99 fall in {len(over)} windows of {window_ms:.0f} ms; "
            f"the worst three hold {share:.0%}: {where}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path)
    p.add_argument("--format", default="synthetic")
    p.add_argument("--events", type=int, default=110_300, help="events for the throughput runs (default: the whole Taobao log)")
    p.add_argument("--latency-rate", type=float, default=2000.0)
    p.add_argument("--latency-seconds", type=float, default=20.0)
    p.add_argument("--warmup", type=float, default=60.0, help="most seconds to wait for the workers to be ready (/readyz)")
    p.add_argument("--latency-warmup", type=float, default=3.0,
                   help="seconds of events at the latency rate sent first and not counted (cold caches, first batches)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--workers", type=int, default=1, help="worker processes in the consumer group (at most the partitions)")
    p.add_argument("--latency-out", type=Path, help="write each recommendation's event ts and latency (ms) here, as CSV")
    p.add_argument("--worker", choices=sorted(WORKERS), default="faust",
                   help="faust: `streamrec worker`; cshell: the research contender on librdkafka (bench/cshell_worker.py, "
                        "needs confluent-kafka; not the worker)")
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "bare", "latency"])
    args = p.parse_args()
    print(f"streamrec pipeline bench: {os.cpu_count()} cores, {args.workers} {args.worker} worker(s), dataset {args.dataset or 'synthetic'}, "
          f"model dir {Settings.from_env().model_dir}")
    results = {}
    if "throughput" not in args.skip:
        print("1. throughput (whole pipeline)")
        results["pipeline"], _ = throughput(args)
    if "bare" not in args.skip:
        print("2. bare aiokafka loop over the same events")
        results["bare"] = bare(args)
    if "latency" not in args.skip:
        print(f"3. latency at {args.latency_rate:,.0f} events/s")
        latency(args)
    if "pipeline" in results and "bare" in results:
        print(f"ratio pipeline / bare loop: {results['pipeline'] / results['bare']:.2f}")


if __name__ == "__main__":
    main()
