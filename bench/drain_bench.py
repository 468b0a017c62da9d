"""The consumer's per-message hand-over: Faust's ``wait_first`` against stream/consumer.py.

    .venv/bin/python bench/drain_bench.py

Hands N messages to a coroutine shaped like Faust's conductor callback (it checks two
flow-control gates that are open and puts the message on a queue with room, so it never
waits), first as Faust's ``Consumer._drain_messages`` does (``await service.wait_first(
callback(message), suspend_flow.wait())``), then as ``stream.consumer.Consumer`` does
(``start`` inline, ``resume`` under ``wait_first`` only if it waited), alternating, and
prints µs per message for each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mode import Service  # noqa: E402
from mode.utils.locks import Event  # noqa: E402

from stream.consumer import resume, start  # noqa: E402


class Drainer(Service):
    pass


async def run(n: int, rounds: int) -> None:
    service, suspend_flow, flow_open = Drainer(), Event(), Event()
    flow_open.set()
    queue: asyncio.Queue = asyncio.Queue()

    async def callback(message: int) -> None:  # the conductor's on_message, minus decoding
        await flow_open.wait()
        await flow_open.wait()
        queue.put_nowait(message)

    async def faust_way() -> float:
        t = time.perf_counter()
        for m in range(n):
            await service.wait_first(callback(m), suspend_flow.wait())
        return (time.perf_counter() - t) / n

    async def inline_way() -> float:
        t = time.perf_counter()
        for m in range(n):
            handover = callback(m)
            done, yielded = start(handover)
            if not done:
                await service.wait_first(resume(handover, yielded), suspend_flow.wait())
        return (time.perf_counter() - t) / n

    faust, inline = [], []
    for _ in range(rounds):
        faust.append(await faust_way())
        inline.append(await inline_way())
        while not queue.empty():
            queue.get_nowait()
    f, i = statistics.median(faust) * 1e6, statistics.median(inline) * 1e6
    print(f"{n:,} messages x {rounds} rounds, median µs per message:")
    print(f"  Faust (wait_first per message):  {f:.2f}  ({', '.join(f'{x * 1e6:.2f}' for x in faust)})")
    print(f"  stream.consumer (inline):        {i:.2f}  ({', '.join(f'{x * 1e6:.2f}' for x in inline)})")
    print(f"  ratio: {f / i:.0f}x; at 2,000 messages/s the difference is {(f - i) * 2000 / 1e4:.1f} % of a core")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    asyncio.run(run(args.messages, args.rounds))


if __name__ == "__main__":
    main()
