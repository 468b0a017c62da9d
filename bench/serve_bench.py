"""`GET /v1/search` under load, beside a worker that consumes events: the latency a site sees.

    eval "$(make -s up)"
    .venv/bin/python bench/serve_bench.py --rps 200 --seconds 60 --events-rate 1000

On the local Kafka and Redis, under a topic prefix of its own: sends the demo shop's catalogue
(2,000 items, English and Chinese titles), starts a worker and waits until it has embedded and
indexed it, starts the synthetic shop's events at ``--events-rate`` and ``streamrec serve``, then
sends ``--rps`` searches a second for ``--seconds`` from a real HTTP client (aiohttp), open loop:
each request leaves at its time whether or not the earlier ones have answered, so a slow server
is measured, not hidden. Half of the queries repeat one of 50 head queries; the other half are
each new (a product kind with a number no other request has), so the server embeds half of them.
Users are drawn from the shop's users. Prints the latency percentiles of the answers, the
requests shed (503: more than ``stream.serve.MAX_IN_FLIGHT`` in progress, or all but the reserved
ones from one user, whose address the client forwards as a site's backend would) and other errors,
and the worker's events handled meanwhile. Everything shares this machine's cores: the worker,
the producer, Kafka, Redis, serve and the client.

    .venv/bin/python bench/serve_bench.py --embed --seconds 20 --events-rate 1000

``--student FILE`` hands the worker and serve a query student (``streamrec distil-queries
--demo-catalogue -o FILE``): the new queries it can read skip the text model.

``--embed`` measures the text model's throughput instead, in this process with one engine
thread (as the worker and serve run it): catalogue items (the demo shop's texts, in chunks of
32 as the catalogue embeds them) and new queries one at a time (no cache), each for
``--seconds``, first while the worker is idle, then while it consumes ``--events-rate``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.pipeline_bench import cpu_seconds, drop_run, env_for, free_port  # noqa: E402
from online_models.search.synthetic import ADJECTIVES, PRODUCTS  # noqa: E402
from stream.demo import scrape, stop_worker, wait_ready  # noqa: E402
from stream.errors import described  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.topics import probe  # noqa: E402

#: what to do when the services do not answer
START_SERVICES = 'start them with `eval "$(make -s up)"` (or point STREAMREC_KAFKA_BOOTSTRAP and STREAMREC_REDIS_URL at running ones)'


def queries(n: int, repeat_share: float, seed: int) -> list[str]:
    """``n`` queries: ``repeat_share`` of them drawn from 50 head queries, the rest each new."""
    rng = random.Random(seed)
    head = [f"{rng.choice(ADJECTIVES)[0].lower()} {p[0]}" if i % 2 else p[1] for i, p in
            enumerate(rng.choices(PRODUCTS, k=50))]
    out = []
    for i in range(n):
        if rng.random() < repeat_share:
            out.append(rng.choice(head))
        else:
            english, chinese = rng.choice(PRODUCTS)
            out.append(f"{english} {i}" if rng.random() < 0.5 else f"{chinese} {i}")
    return out


async def load(base: str, rps: float, seconds: float, seed: int) -> tuple[list[float], int, int, float]:
    """Open-loop requests; (latencies in ms of the 200s, 503s (load shed), other errors, seconds
    the sending took)."""
    n = int(rps * seconds)
    qs = queries(n, 0.5, seed)
    rng = random.Random(seed + 1)
    latencies: list[float] = []
    errors = shed = 0
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        async def one(q: str) -> None:
            nonlocal errors, shed
            user = rng.randrange(500)
            url = f"{base}/v1/search?" + urllib.parse.urlencode({"q": q, "user_id": f"u{user}", "k": 20})
            # the client stands in for a site's backend, each user's address forwarded (serve
            # believes it from 127.0.0.1, STREAMREC_SERVE_TRUSTED_PROXIES): one address alone
            # would get one client's share of serve's requests in progress (stream/serve_clients.py)
            forwarded = {"X-Forwarded-For": f"198.18.{user >> 8}.{user & 255}"}
            t = time.perf_counter()
            try:
                async with session.get(url, headers=forwarded) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append((time.perf_counter() - t) * 1000)
                    elif resp.status == 503:
                        shed += 1
                    else:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1

        tasks = []
        start = time.perf_counter()
        for i, q in enumerate(qs):
            delay = start + i / rps - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(q)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return latencies, shed, errors, sent_s


def histogram(metrics: dict[str, float], name: str, label: str = "",
              before: dict[str, float] | None = None) -> list[tuple[float, float]]:
    """(bound in s, cumulative count) of the Prometheus histogram ``name`` (its series holding
    ``label``), less its counts in ``before``."""
    before = before or {}
    return sorted((float(key.split('le="')[1].split('"')[0]), count - before.get(key, 0.0))
                  for key, count in metrics.items() if key.startswith(f"{name}_bucket{{") and label in key)


def p99_bound_ms(buckets: list[tuple[float, float]]) -> float | None:
    """The bound in ms of the bucket that holds the 99th percentile (None: no observations)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    return next(bound for bound, count in buckets if count >= 0.99 * buckets[-1][1]) * 1000


def served_latency(metrics: dict[str, float]) -> tuple[float, float, float] | None:
    """From serve's ``streamrec_http_request_seconds`` histogram of searches: (the bucket bound
    in ms that holds the 99th percentile, the share within 20 ms, within 35 ms)."""
    buckets = histogram(metrics, "streamrec_http_request_seconds", 'route="/v1/search"')
    p99 = p99_bound_ms(buckets)
    if p99 is None:
        return None
    total, within = buckets[-1][1], dict(buckets)
    return p99, within.get(0.02, float("nan")) / total, within.get(0.035, float("nan")) / total


def embed_throughput(seconds: float, seed: int) -> tuple[float, float]:
    """(items/s, queries/s) the text model embeds here, each measured for ``seconds``."""
    from online_models.search import TextEmbedder
    from online_models.search.catalogue import EMBED_DESCRIPTION_CHARS, Catalogue
    from online_models.search.synthetic import synthetic_catalogue

    embedder = TextEmbedder(threads=1, cache_size=0)
    texts = [item.text(EMBED_DESCRIPTION_CHARS) for item in synthetic_catalogue(seed=seed)]
    batch = Catalogue(embedder).embed_batch
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        chunk = [texts[(done + i) % len(texts)] for i in range(batch)]
        embedder.passages(chunk)
        done += len(chunk)
    items_per_s = done / (time.perf_counter() - t0)
    asked = queries(100_000, 0.0, seed)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        embedder.queries([asked[done % len(asked)]])
        done += 1
    return items_per_s, done / (time.perf_counter() - t0)


def services_problem(settings: Settings, timeout_s: float = 3.0) -> str | None:
    """None when Kafka and Redis of ``settings`` answer; else one line saying which does not, and
    how to start them: without them the run ended in redis-py's connection traceback."""
    down = []
    kafka = probe(settings.kafka, timeout_s)
    if kafka is not None:
        down.append(f"Kafka at {settings.kafka.bootstrap} ({kafka})")
    try:
        with settings.redis.client(socket_connect_timeout=timeout_s, socket_timeout=timeout_s) as client:
            client.ping()
    except (redis.RedisError, OSError) as exc:
        down.append(f"Redis at {settings.redis.masked_url} ({described(exc)})")
    if not down:
        return None
    return f"{' and '.join(down)} {'does' if len(down) == 1 else 'do'} not answer: {START_SERVICES}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rps", type=float, default=200.0, help="searches per second (default 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the searches are sent (default 60)")
    p.add_argument("--events-rate", type=float, default=1000.0, help="events per second the worker consumes meanwhile")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--worker-nice", type=int, default=0, help="start the worker at this nice value (an operator's "
                   "choice on a shared host: the worker yields the CPU to serve's requests)")
    p.add_argument("--student", type=Path, help="a query student (streamrec distil-queries --demo-catalogue) for the "
                   "worker and serve, as STREAMREC_QUERY_STUDENT: new queries skip the text model")
    p.add_argument("--embed", action="store_true", help="measure the text model's throughput, idle and beside the "
                   "worker, instead of serve's latency")
    args = p.parse_args(argv)
    tag = f"serve{os.getpid()}"
    serve_port = free_port()
    extra = {"STREAMREC_SERVE_PORT": str(serve_port), "STREAMREC_SERVE_TRUSTED_PROXIES": "127.0.0.1"}
    if args.student is not None:
        if not args.student.is_file():
            p.error(f"--student {args.student}: no such file (make one with streamrec distil-queries --demo-catalogue)")
        extra["STREAMREC_QUERY_STUDENT"] = str(args.student.resolve())
    env, settings = env_for(f"{tag}.", extra)
    problem = services_problem(settings)
    if problem is not None:  # before the run, whose clean-up would meet them too
        print(f"serve_bench: {problem}", file=sys.stderr)
        return 2
    exe = [sys.executable, "-m", "stream.cli"]
    logs = ROOT / ".run"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []

    def start(cmd: list[str], name: str, nice: int = 0) -> subprocess.Popen:
        with open(logs / f"{tag}-{name}.log", "wb") as out:
            proc = subprocess.Popen([*exe, *cmd], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=(lambda: os.nice(nice)) if nice else None)
        procs.append(proc)
        return proc

    try:
        subprocess.run([*exe, "produce", "--demo-catalogue"], env=env, cwd=ROOT, check=True, capture_output=True)
        worker = start(["worker"], "worker", nice=args.worker_nice)
        wait_ready([(worker, settings.metrics_port, logs / f"{tag}-worker.log")], 120)
        t0 = time.monotonic()
        while scrape(settings.metrics_port).get("streamrec_catalogue_items", 0) < 2000:
            if time.monotonic() - t0 > 600 or worker.poll() is not None:
                raise SystemExit("the worker did not index the catalogue")
            time.sleep(1)
        print(f"worker indexed the 2,000-item catalogue in {time.monotonic() - t0:.0f} s")
        idle = embed_throughput(args.seconds, args.seed) if args.embed else None
        if not args.embed:  # how fast this machine is now: runs minutes apart differ by 2x or more
            probe = embed_throughput(3, args.seed)
            print(f"this machine now, the worker idle: {1000 / probe[1]:.2f} ms a new query's embedding, "
                  f"{probe[0]:.0f} items/s (compare runs by it)")
        n_events = int(args.events_rate * (args.seconds * (2 if args.embed else 1) + 60))
        if n_events:
            start(["produce", "--rate", str(args.events_rate), "--limit", str(n_events), "--no-progress",
                   "--id-prefix", tag], "producer")
        if idle is not None:
            time.sleep(5)  # the producer's rate settles
            before = scrape(settings.metrics_port)
            t0 = time.monotonic()
            busy = embed_throughput(args.seconds, args.seed)
            consumed = sum(v for k, v in scrape(settings.metrics_port).items()
                           if k.startswith("streamrec_events_consumed_total")) - \
                sum(v for k, v in before.items() if k.startswith("streamrec_events_consumed_total"))
            rate = consumed / (time.monotonic() - t0)
            print(f"text model, one engine thread, {args.seconds:g} s each:")
            print(f"{'':<34} {'items/s':>8} {'queries/s':>10}")
            print(f"{'worker idle':<34} {idle[0]:>8.1f} {idle[1]:>10.1f}")
            print(f"{f'worker consuming {rate:.0f} events/s':<34} {busy[0]:>8.1f} {busy[1]:>10.1f}")
            print(f"{'ratio':<34} {busy[0] / idle[0]:>8.2f} {busy[1] / idle[1]:>10.2f}")
            return 0
        serve = start(["serve", "--host", "127.0.0.1"], "serve")
        base = f"http://127.0.0.1:{serve_port}"
        t0 = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 300 or serve.poll() is not None:
                raise SystemExit("serve did not become ready: " + (logs / f"{tag}-serve.log").read_text()[-2000:])
            time.sleep(0.5)
        time.sleep(5)  # the producer's rate settles
        before = scrape(settings.metrics_port)
        consumed0 = sum(v for k, v in before.items() if k.startswith("streamrec_events_consumed_total"))
        cpu0 = {"serve": cpu_seconds(serve.pid), "worker": cpu_seconds(worker.pid)}
        latencies, shed, errors, sent_s = asyncio.run(load(base, args.rps, args.seconds, args.seed))
        cpu = {name: cpu_seconds(proc.pid) - cpu0[name] for name, proc in (("serve", serve), ("worker", worker))}
        after = scrape(settings.metrics_port)
        consumed = sum(v for k, v in after.items() if k.startswith("streamrec_events_consumed_total")) - consumed0
        ms = np.array(latencies) if latencies else np.array([float("nan")])
        print(f"{len(latencies):,} searches answered ({len(latencies) / sent_s:.0f}/s; asked {args.rps:g}/s, half repeating "
              f"a head query, half new), {shed:,} shed (503), {errors} other errors")
        print(f"latency ms: p50 {np.percentile(ms, 50):.1f}  p90 {np.percentile(ms, 90):.1f}  "
              f"p99 {np.percentile(ms, 99):.1f}  max {ms.max():.1f}")
        worker_p99 = p99_bound_ms(histogram(after, "streamrec_end_to_end_seconds", before=before))
        print(f"the worker handled {consumed / sent_s:.0f} events/s meanwhile (asked {args.events_rate:g}), "
              f"event to recommendation p99 at most {worker_p99} ms (its histogram)")
        print(f"CPU: serve {cpu['serve'] / max(len(latencies), 1) * 1000:.2f} ms a search answered "
              f"({cpu['serve'] / sent_s:.0%} of a core), the worker {cpu['worker'] / max(consumed, 1) * 1e6:.0f} µs "
              f"an event ({cpu['worker'] / sent_s:.0%} of a core)")
        inside = served_latency(scrape(serve_port))
        if inside:
            print(f"inside serve (its histogram, from the handler's start to the answer): p99 at most {inside[0]:g} ms, "
                  f"{inside[1]:.1%} within 20 ms, {inside[2]:.1%} within 35 ms")
    finally:
        for proc in reversed(procs):
            stop_worker(proc)
        drop_run(settings)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
