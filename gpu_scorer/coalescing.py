"""Coalesce concurrent scoring requests into one session run, with a bounded wait.

``await batcher.score(seq, cands)`` queues one user's request. A single consumer task takes
the first waiting request, then keeps collecting until ``max_batch`` users are queued or
``max_wait_ms`` has passed since that first request, and runs ``scorer.score`` on the whole
batch in a one-thread executor (the event loop is never blocked by ONNX Runtime; one run at
a time, so requests arriving during a run form the next batch). A failing run fails the
requests of that batch only. When the scorer has ``maybe_reload`` (a
:class:`~gpu_scorer.hotswap.HotSwapScorer`), it is called before each run, so a worker picks
up newly registered models without any other timer.

>>> import asyncio
>>> class Doubler:
...     calls = 0
...     def score(self, seqs, cands):
...         Doubler.calls += 1
...         return [[2 * len(s)] * len(c) for s, c in zip(seqs, cands)]
>>> async def main():
...     async with MicroBatcher(Doubler(), max_batch=8, max_wait_ms=5) as b:
...         return await asyncio.gather(*(b.score(["x"] * i, ["a", "b"]) for i in range(4)))
>>> asyncio.run(main()), Doubler.calls
([[0, 0], [2, 2], [4, 4], [6, 6]], 1)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor


class MicroBatcher:
    def __init__(self, scorer, max_batch: int = 64, max_wait_ms: float = 2.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        self.scorer = scorer
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.runs = 0  # scorer calls made
        self.requests = 0  # requests served
        self.last_run_seconds = 0.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scorer")
        self._reload = getattr(scorer, "maybe_reload", None)

    async def score(self, sequence: Sequence[str], candidates: Sequence[str]):
        """Scores for one user's candidates (whatever ``scorer.score`` returns per user)."""
        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._consume(), name="scorer-microbatch")
        fut = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((sequence, candidates, fut))
        return await fut

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            batch = [b for b in batch if not b[2].done()]  # drop requests cancelled meanwhile
            if not batch:
                continue
            if self._reload is not None:
                self._reload()  # HotSwapScorer: a stat at most once per poll interval; loads off-thread
            seqs = [b[0] for b in batch]
            cands = [b[1] for b in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.scorer.score, seqs, cands)
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            finally:
                self.runs += 1
                self.last_run_seconds = time.perf_counter() - started
            self.requests += len(batch)
            for (*_, fut), res in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(res)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            *_, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(RuntimeError("MicroBatcher closed before this request ran"))
        self._executor.shutdown(wait=True)

    async def __aenter__(self) -> MicroBatcher:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


__all__ = ["MicroBatcher"]
