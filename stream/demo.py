"""``make demo``: the whole pipeline on the local stack, start to finish, in about a minute.

1. trains a small Transformer scorer on the synthetic shop when the registry has none,
2. starts a ``streamrec worker``,
3. replays the synthetic stream (or ``--dataset``) with ``streamrec produce`` at a given rate,
   plus a handful of bad values to show the dead-letter topic,
4. shows recommendations as they arrive,
5. stops the worker with SIGTERM and prints a summary: events/s, event→recommendation
   latency p50/p99, dead letters, the scorer's provider, the live hit rate.

Each run uses its own topic prefix (``demo<time>.``), so runs never see each other's
events or user state; its topics are deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from online_models.metrics import percentile
from stream.connections import KafkaConnection, started_reader
from stream.errors import StreamrecError
from stream.experiments import load_experiment
from stream.records import decode_dead_letter, decode_recommendation
from stream.report import counters_from_metrics_text, format_table, summarize_experiment
from stream.settings import Settings, mask_url

BAD_VALUES = [
    b'{"event_id": "bad-1", "type": "click", "user_id": "u1"',
    b'{"event_id": "bad-2", "type": "click", "user_id": "u1", "ts": 1}',
    b'{"event_id": "bad-3", "type": "wishlist", "user_id": "u1", "item_id": "i1", "ts": 1}',
    b'{"event_id": "bad-4", "type": "click", "user_id": 42, "item_id": "i1", "ts": 1}',
    b"\xff\xfe not utf-8",
]

#: records the demo's reader takes a fetch at most (its latency figures are read as they arrive)
READ_RECORDS = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Watcher(threading.Thread):
    """Consumes the recommendation and dead-letter topics, measuring latency on arrival.

    It reads as a downstream service would, and as ``bench/pipeline_bench.py``'s reader does:
    aiokafka, a batch of records per fetch, in this thread's own event loop. The reader it had
    before (kafka-python, record by record) added its own delay to every figure: about 6 ms at
    p50 and 10-30 ms at p99 at 1,000 events/s (docs/architecture.md)."""

    def __init__(self, kafka: KafkaConnection | str, recommendations: str, dlq: str, show_every: int) -> None:
        super().__init__(daemon=True)
        self.client_options = KafkaConnection.of(kafka).client_options()
        self.recommendations_topic, self.dlq_topic, self.show_every = recommendations, dlq, show_every
        self.latencies_ms: list[float] = []
        #: event ts to the record's timestamp (when the worker's producer took it): the reader's delay left out
        self.to_publication_ms: list[float] = []
        self.dead: list = []
        self.users: set[str] = set()
        self.last_model: dict[str, str] = {}
        self.first_at = self.last_at = None
        self.stop_flag = threading.Event()
        #: set once the reader has started (or failed to: then ``error`` says why)
        self.ready = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._consume())
        except BaseException as exc:  # noqa: BLE001 - said here, or by the demo, which waits on ready
            self.error = exc
            if self.ready.is_set():
                print(f"  the demo's reader stopped: {exc!r}; the summary counts what it read before")
            self.ready.set()

    async def _consume(self) -> None:
        # streamrec's reader (committed data only, from the oldest record, no group), whose stop
        # while the broker is away ends a fetch in flight quietly (fetches_end_empty_at_close):
        # the demo's own consumer lacked that guard, and its stop raised the cancelled fetch
        consumer = await started_reader(self.client_options, READ_RECORDS)
        try:
            consumer.subscribe([self.recommendations_topic, self.dlq_topic])  # no group: every partition
            self.ready.set()
            while not self.stop_flag.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                now = time.time() * 1000
                for records in batch.values():
                    for msg in records:
                        self._take(msg, now)
        finally:
            await consumer.stop()

    def _take(self, msg, now: float) -> None:
        if msg.topic != self.recommendations_topic:
            letter = decode_dead_letter(msg.value)
            self.dead.append(letter)
            print(f"  dead letter [{letter.code}] {letter.reason}")
            return
        rec = decode_recommendation(msg.value)
        self.latencies_ms.append(now - rec.event_ts)
        self.to_publication_ms.append(msg.timestamp - rec.event_ts)
        self.users.add(rec.user_id)
        self.last_model = rec.model
        self.first_at = self.first_at or now
        self.last_at = now
        n = len(self.latencies_ms)
        if n == 1 or n % self.show_every == 0:
            top = ", ".join(f"{it.item_id}({it.score:.2f})" for it in rec.items[:5])
            print(f"  rec #{n:>6} user {rec.user_id:<8} {now - rec.event_ts:6.1f} ms  top: {top}")


def stop_worker(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGTERM (the worker finishes its batch, commits and exits), SIGKILL if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def faust_leader_topic(app_id: str) -> str:
    """The topic Faust's leader assignor creates for the group ``app_id``
    (faust/assignor/leader_assignor.py): a run under its own app id drops it with its topics."""
    return f"{app_id}-__assignor-__leader"


def drop_topics(bootstrap: KafkaConnection | str, names) -> None:
    """Delete a run's topics (those that exist); the run's result does not depend on this clean-up."""
    try:
        admin = KafkaAdminClient(**KafkaConnection.of(bootstrap).client_options())
        existing = set(admin.list_topics())
        names = [name for name in names if name in existing]
        if names:
            admin.delete_topics(names)
        admin.close()
    except Exception as exc:
        print(f"(could not delete the topics {', '.join(names)}: {exc})")


def wait_ready(workers, timeout_s: float) -> None:
    """Until every ``(process, metrics port, log)`` worker's /readyz answers 200 (joined, partitions
    assigned, Redis up); SystemExit with the log's tail if one exits, or after ``timeout_s``."""
    start = time.time()
    pending = {port for _, port, _ in workers}
    while pending and time.time() - start < timeout_s:
        for port in list(pending):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        pending.discard(port)
            except OSError:
                pass
        for proc, _, log in workers:
            if proc.poll() is not None:
                raise SystemExit("worker exited:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    if pending:
        raise SystemExit(f"workers on ports {sorted(pending)} not ready after {timeout_s:.0f} s")
    time.sleep(1.0)


def scrape(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("streamrec_") and " " in line:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def scrape_text(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3).read().decode()
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stream.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, help="replay this log instead of the synthetic shop")
    parser.add_argument("--format", default="synthetic", help="taobao, yoochoose, otto or synthetic")
    parser.add_argument("--events", type=int, default=20_000, help="events to replay (default 20000)")
    parser.add_argument("--rate", type=float, default=1_000,
                        help="events per second (default 1000: the synthetic shop's dense co-visitation lists make "
                             "~450 µs of worker CPU per event, so one worker on 2 cores saturates near 2000)")
    parser.add_argument("--train-events", type=int, default=20_000, help="events the scorer trains on when none is registered")
    parser.add_argument("--variants", type=Path, help="run an experiment (a STREAMREC_VARIANTS file, e.g. "
                        "deploy/experiments/example.toml) and print streamrec report's table at the end")
    args = parser.parse_args(argv)

    settings = Settings.from_env()
    exe = [sys.executable, "-m", "stream.cli"]
    stamp = time.strftime("%Y%m%d%H%M%S")
    prefix = f"demo{stamp}."
    metrics_port = free_port()
    env = dict(os.environ, STREAMREC_TOPIC_PREFIX=prefix, STREAMREC_APP_ID=f"demo{stamp}",
               STREAMREC_METRICS_PORT=str(metrics_port), PYTHONUNBUFFERED="1")
    if args.variants is not None:
        env["STREAMREC_VARIANTS"] = str(args.variants)
    topics = Settings.from_env(env).topics

    print(f"== streamrec demo: Kafka {settings.kafka.describe()}, Redis {mask_url(settings.redis_url)}, topics {prefix}*")
    if not (Path(settings.model_dir) / "CURRENT").exists():
        print(f"== 1/4 training a small Transformer scorer on {args.train_events} synthetic events (once; kept in {settings.model_dir}/)")
        subprocess.run(exe + ["train", "--limit", str(args.train_events), "--epochs", "4", "--dim", "32",
                              "--max-len", "30"], env=env, check=True)
    else:
        print(f"== 1/4 using the registered scorer in {settings.model_dir}/ (delete it to retrain)")

    log_path = Path(".run") / f"demo-worker-{stamp}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"== 2/4 starting a worker (log: {log_path}, metrics: http://127.0.0.1:{metrics_port}/metrics)")
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(exe + ["worker"], env=env, stdout=log, stderr=subprocess.STDOUT)
    watcher = Watcher(settings.kafka, topics.recommendations, topics.dlq, show_every=max(1, args.events // 15))
    try:
        # until it is in its group with partitions assigned: events sent before then would wait
        # for the start-up, and the latency summary would measure that
        wait_ready([(worker, metrics_port, log_path)], timeout_s=120)
        watcher.start()
        if not watcher.ready.wait(60) or watcher.error is not None:
            raise SystemExit(f"could not read the recommendations topic: {watcher.error or 'no answer in 60 s'}")
        print(f"== 3/4 replaying {args.events} events at {args.rate:.0f}/s, plus {len(BAD_VALUES)} bad values")
        producer = KafkaProducer(**settings.kafka.client_options())
        for value in BAD_VALUES:
            producer.send(topics.clicks, key=b"u1", value=value)
        producer.flush()
        producer.close()
        cmd = exe + ["produce", "--limit", str(args.events), "--rate", str(args.rate), "--format", args.format]
        if args.dataset:
            cmd += ["--dataset", str(args.dataset)]
        started = time.time()
        subprocess.run(cmd, env=env, check=True)
        # wait until recommendations stop arriving
        quiet_since, seen = time.time(), 0
        while time.time() - quiet_since < 3 and time.time() - started < 300:
            time.sleep(0.5)
            if len(watcher.latencies_ms) != seen:
                seen, quiet_since = len(watcher.latencies_ms), time.time()
            if worker.poll() is not None:
                print("worker exited early:\n" + log_path.read_text()[-3000:])
                return 1
        metrics = scrape(metrics_port)
        metrics_text = scrape_text(metrics_port)
    finally:
        print("== 4/4 stopping the worker (SIGTERM: it finishes its batch, commits and exits)")
        stop_worker(worker)
        watcher.stop_flag.set()
        watcher.join(5)
        drop_topics(settings.kafka, [*topics.all, faust_leader_topic(env["STREAMREC_APP_ID"])])

    lat = watcher.latencies_ms
    span_s = ((watcher.last_at or 0) - (watcher.first_at or 0)) / 1000
    applied = sum(v for k, v in metrics.items() if k.startswith("streamrec_events_consumed_total"))
    judged = metrics.get("streamrec_live_judged_total", 0)
    hits = metrics.get('streamrec_live_hits_total{k="20"}', 0)
    print("\n== summary")
    print(f"  events applied by the worker   {applied:,.0f}")
    print(f"  recommendations received       {len(lat):,} for {len(watcher.users):,} users")
    print(f"  throughput                     {len(lat) / span_s if span_s > 0 else 0:,.0f} recommendations/s over {span_s:.1f} s (paced at {args.rate:.0f} events/s)")
    print(f"  event -> recommendation        p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms")
    published = watcher.to_publication_ms
    print(f"  event -> publication           p50 {percentile(published, 50):.1f} ms, p99 {percentile(published, 99):.1f} ms "
          "(the record's timestamp: this reader's own delay left out)")
    print(f"  dead letters                   {len(watcher.dead)} ({', '.join(sorted({d.code for d in watcher.dead}))})")
    print(f"  scorer                         {watcher.last_model.get('transformer', '?')} on {watcher.last_model.get('scorer_provider', 'no provider')}")
    if judged:
        print(f"  live HR@20                     {hits / judged:.3f} over {judged:,.0f} next events")
    print(f"  worker exit code               {worker.returncode}")
    if env.get("STREAMREC_VARIANTS"):
        print(f"\n== the experiment ({env['STREAMREC_VARIANTS']}), as `streamrec report --metrics` reads the worker")
        try:
            experiment = load_experiment(env["STREAMREC_VARIANTS"])
            print(format_table(summarize_experiment(counters_from_metrics_text(metrics_text), experiment)))
        except StreamrecError as exc:
            print(f"  no report: {exc}")
    ok = worker.returncode == 0 and len(lat) > 0 and len(watcher.dead) == len(BAD_VALUES)
    print("== demo " + ("finished" if ok else "FAILED: see the worker log " + str(log_path)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
