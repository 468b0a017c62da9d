"""What one fetch round trip costs the consumer: the floor under a worker's fetching.

    eval "$(make -s up)"
    .venv/bin/python bench/fetch_bench.py --seconds 10

An aiokafka consumer, as the worker's consumer thread runs it, assigned ``--topics`` empty
topics of ``--partitions`` partitions each (the worker reads five: clicks, purchases,
forget, impressions, searches), asks for ``FETCH_MIN_BYTES`` or ``--wait-ms``, the way the
worker fetches under load (stream/consumer.py): nothing arrives, so each fetch returns after
the wait. Prints, per wait, the fetches a second, the consumer's CPU as a share of a core and
per fetch, alternating the waits ``--repeats`` times. Every fetch is encoded, sent, answered
and decoded in Python whether or not it brings records, so this is a fixed cost per batch at
steady rates (docs/architecture.md, "What a round trip costs").
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.consumer import FETCH_MIN_BYTES  # noqa: E402
from stream.demo import drop_topics  # noqa: E402
from stream.topics import ensure_topics  # noqa: E402


async def one_run(bootstrap: str, names: list[str], partitions: int, wait_ms: int, seconds: float) -> tuple[float, float]:
    """(fetches a second, CPU seconds a second) of a consumer fetching ``names`` for ``seconds``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                fetch_min_bytes=FETCH_MIN_BYTES, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(n, p) for n in names for p in range(partitions)])
        await consumer.seek_to_end()
        fetcher = consumer._fetcher  # noqa: SLF001 - counting its round trips, as stream/consumer.py adapts them
        proc = fetcher._proc_fetch_request  # noqa: SLF001
        count = 0

        async def counted(*args, **kwargs):
            nonlocal count
            count += 1
            return await proc(*args, **kwargs)

        fetcher._proc_fetch_request = counted  # noqa: SLF001
        settle = time.monotonic() + 1.0
        while time.monotonic() < settle:
            await consumer.getmany(timeout_ms=100)
        n0, cpu0, t0 = count, time.process_time(), time.monotonic()
        while time.monotonic() - t0 < seconds:
            await consumer.getmany(timeout_ms=100)
        wall = time.monotonic() - t0
        return (count - n0) / wall, (time.process_time() - cpu0) / wall
    finally:
        await consumer.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bootstrap", default="127.0.0.1:9092")
    p.add_argument("--topics", type=int, default=5, help="empty topics assigned (default 5, as a worker reads)")
    p.add_argument("--partitions", type=int, default=4, help="partitions a topic (default 4, STREAMREC_PARTITIONS)")
    p.add_argument("--wait-ms", type=int, nargs="+", default=[10, 20, 50],
                   help="fetch waits to compare (default 10 20 50; the worker's STREAMREC_FETCH_MAX_WAIT_MS is 10)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds a run")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    names = [f"fetchbench{int(time.time())}.t{i}" for i in range(args.topics)]
    ensure_topics(args.bootstrap, names, args.partitions)
    print(f"fetch bench: {args.topics} empty topics x {args.partitions} partitions, fetch_min_bytes {FETCH_MIN_BYTES:,}, "
          f"{args.seconds:.0f} s a run")
    try:
        for r in range(args.repeats):
            for wait in args.wait_ms:
                rate, cpu = asyncio.run(one_run(args.bootstrap, names, args.partitions, wait, args.seconds))
                per = cpu / rate * 1e6 if rate else float("nan")
                print(f"  run {r + 1}, wait {wait:>4} ms: {rate:6.1f} fetches/s, {cpu * 100:5.1f}% of a core, "
                      f"{per:6.0f} µs of CPU a fetch")
    finally:
        drop_topics(args.bootstrap, names)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
