"""How long a snapshot of the online models stops the worker: written in-process, or in a fork.

    .venv/bin/python bench/snapshot_bench.py --dataset ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv --format taobao

Trains the worker's default Recommender on the log (as the worker would after that many
events), then alternates the two ways the worker can snapshot (stream/snapshots.py):
``snapshot()`` on the calling thread, which is how long the event loop stops; and
``fork_call``, where the loop stops only for the fork and a child encodes. Prints both pauses,
the child's total time and the snapshot size.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from online_models import Recommender, UserContext  # noqa: E402
from online_models.datasets import read_interactions  # noqa: E402
from stream import snapshots  # noqa: E402


def train(path: Path, fmt: str, limit: int | None) -> Recommender:
    rec = Recommender.default()
    recent: dict[str, tuple[str, ...]] = {}
    n = 0
    for n, x in enumerate(read_interactions(path, fmt, limit=limit), start=1):
        before = recent.get(x.user_id, ())
        rec.learn_one(x, UserContext(x.user_id, before, frozenset(), x.session_id, x.ts))
        recent[x.user_id] = (*before, x.item_id)[-50:]
        if n % 20_000 == 0:
            print(f"  learned {n:,} events", file=sys.stderr)
    print(f"trained on {n:,} events")
    return rec


async def forked(rec: Recommender, out: Path) -> tuple[float, float]:
    start = time.perf_counter()
    pid = snapshots.fork_call(lambda: out.write_bytes(rec.snapshot()))
    paused = time.perf_counter() - start
    code = await snapshots.wait_child(pid, timeout_s=600)
    if code != 0:
        raise SystemExit(f"the snapshot child exited with {code}")
    return paused, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", type=Path, required=True)
    p.add_argument("--format", default="taobao")
    p.add_argument("--events", type=int, default=None, help="events to learn first (default: the whole log)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not snapshots.can_fork():
        raise SystemExit("os.fork is not available here: the worker snapshots in-process")
    rec = train(args.dataset, args.format, args.events)
    inline, fork_pause, child = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "snapshot"
        for _ in range(args.rounds):
            start = time.perf_counter()
            size = len(rec.snapshot())
            inline.append(time.perf_counter() - start)
            paused, total = asyncio.run(forked(rec, out))
            fork_pause.append(paused)
            child.append(total)
            assert out.stat().st_size > 0

    def ms(xs: list[float]) -> str:
        return f"median {statistics.median(xs) * 1000:.1f} ms (" + ", ".join(f"{x * 1000:.1f}" for x in xs) + ")"

    print(f"snapshot: {size / 1e6:.1f} MB")
    print(f"  written in-process: the worker stops for {ms(inline)}")
    print(f"  forked:             the worker stops for {ms(fork_pause)}; the child is done after {ms(child)}")
    print(f"  pause ratio in-process / fork: {statistics.median(inline) / statistics.median(fork_pause):.0f}x")


if __name__ == "__main__":
    main()
