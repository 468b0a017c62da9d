"""MicroBatcher: concurrent requests coalesce into fewer scorer calls, same results."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from tiny_models import register_tiny, tiny_result

from gpu_scorer.coalescing import MicroBatcher
from gpu_scorer.runtime import OnnxScorer


class CountingScorer:
    def __init__(self, inner):
        self.inner, self.calls, self.sizes = inner, 0, []

    def score(self, seqs, cands):
        self.calls += 1
        self.sizes.append(len(seqs))
        return self.inner.score(seqs, cands)


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    register_tiny(d)
    return OnnxScorer("latest", "cpu", model_dir=d)


async def test_concurrent_calls_coalesce_and_match_direct_calls(scorer):
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(1)
    reqs = [(list(rng.choice(items, 8)), list(rng.choice(items, int(rng.integers(1, 20))))) for _ in range(20)]
    counting = CountingScorer(scorer)
    async with MicroBatcher(counting, max_batch=8, max_wait_ms=20) as batcher:
        results = await asyncio.gather(*(batcher.score(s, c) for s, c in reqs))
    assert counting.calls < len(reqs) and max(counting.sizes) <= 8
    assert batcher.requests == 20 and batcher.runs == counting.calls
    for (s, c), got in zip(reqs, results, strict=True):
        np.testing.assert_allclose(got, scorer.score([s], [c])[0], atol=1e-4, rtol=1e-4)


async def test_wait_is_bounded_for_a_lone_request(scorer):
    items = list(tiny_result().vocab.items)
    loop = asyncio.get_running_loop()
    async with MicroBatcher(scorer, max_batch=64, max_wait_ms=5) as batcher:
        t = loop.time()
        await batcher.score(items[:3], items[:4])
        assert loop.time() - t < 1.0


async def test_a_failing_run_fails_only_its_batch():
    class Flaky:
        calls = 0

        def score(self, seqs, cands):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("boom")
            return [[1.0] * len(c) for c in cands]

    async with MicroBatcher(Flaky(), max_batch=4, max_wait_ms=1) as batcher:
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.score(["a"], ["b"])
        assert await batcher.score(["a"], ["b", "c"]) == [1.0, 1.0]
