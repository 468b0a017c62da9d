"""CUDA execution provider: runs only where a CUDA device is present (skipped cleanly elsewhere).

    .venv/bin/python -m pytest tests/gpu -q
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gpu_scorer.runtime import CUDA_EP, OnnxScorer, cuda_device_count

N_CUDA, WHY = cuda_device_count()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(N_CUDA == 0, reason=f"no CUDA device: {WHY}")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import register_tiny

    d = tmp_path_factory.mktemp("models")
    register_tiny(d)
    return d


@pytest.fixture(scope="module")
def cpu(model_dir):
    return OnnxScorer("latest", "cpu", model_dir=model_dir)


def _requests(n=40, seed=0):
    from tiny_models import tiny_result

    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(seed)
    seqs = [list(rng.choice(items, int(k))) for k in rng.integers(1, 30, n)]
    cands = [list(rng.choice(items, int(k))) for k in rng.integers(1, 120, n)]
    return seqs, cands


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_cuda_provider_really_in_use(model_dir, device):
    scorer = OnnxScorer("latest", device, model_dir=model_dir)
    assert scorer.provider == CUDA_EP == scorer.session.get_providers()[0]


@pytest.mark.parametrize("options", [{}, {"io_binding": False}, {"cuda_graph": True, "max_batch": 64, "max_cands": 128}])
def test_cuda_scores_match_cpu(model_dir, cpu, options):
    scorer = OnnxScorer("latest", "cuda", model_dir=model_dir, **options)
    seqs, cands = _requests()
    for _ in range(2):  # the second call replays a captured CUDA graph
        for got, ref in zip(scorer.score(seqs, cands), cpu.score(seqs, cands), strict=True):
            np.testing.assert_allclose(got, ref, atol=1e-2, rtol=1e-2)  # TF32 matmuls allowed


def test_fp16_is_close(model_dir, cpu):
    scorer = OnnxScorer("latest", "cuda", model_dir=model_dir, fp16=True)
    seqs, cands = _requests(8)
    for got, ref in zip(scorer.score(seqs, cands), cpu.score(seqs, cands), strict=True):
        np.testing.assert_allclose(got, ref, atol=0.1, rtol=0.05)


def test_registry_verifies_on_cuda_and_hot_swaps(model_dir, tmp_path):
    from tiny_models import register_tiny

    from gpu_scorer.hotswap import HotSwapScorer

    register_tiny(tmp_path)
    hot = HotSwapScorer(tmp_path, "cuda", poll_interval_s=0, background=False)
    assert hot.provider == CUDA_EP
    register_tiny(tmp_path, seed=1)
    assert hot.maybe_reload() and hot.version == "v0002" and hot.provider == CUDA_EP


async def test_micro_batcher_on_cuda(model_dir, cpu):
    from gpu_scorer.coalescing import MicroBatcher

    scorer = OnnxScorer("latest", "cuda", model_dir=model_dir)
    seqs, cands = _requests(16)
    async with MicroBatcher(scorer, max_batch=16, max_wait_ms=5) as batcher:
        got = await asyncio.gather(*(batcher.score(s, c) for s, c in zip(seqs, cands, strict=True)))
    for g, r in zip(got, cpu.score(seqs, cands), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-2, rtol=1e-2)


def test_training_on_cuda_exports_a_cpu_model():
    from tiny_models import TINY, tiny_sequences

    from gpu_scorer.training import TrainConfig, train

    res = train(tiny_sequences(), TINY, TrainConfig(epochs=1, progress=False, device="cuda"))
    assert res.model.item_emb.weight.device.type == "cpu" and res.metrics["epochs_run"] == 1


def test_the_worker_settings_give_a_cuda_graph_on_every_load(tmp_path):
    """STREAMREC_SCORER_* through load_scorer: a CUDA graph of max_batch users x the worker's
    candidates, a batch above max_batch split, and the same after a hot swap."""
    from tiny_models import register_tiny

    from stream.prometheus import Metrics
    from stream.settings import Settings
    from stream.shell import load_scorer

    register_tiny(tmp_path)
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path), "STREAMREC_SCORER_MAX_BATCH": "16",
                                  "STREAMREC_CANDIDATES": "120"})
    hot = load_scorer(settings, Metrics())
    hot.background = False
    seqs, cands = _requests(40)  # 40 users: three calls of at most 16; up to 119 candidates
    for version in ("v0001", "v0002"):
        if version == "v0002":
            register_tiny(tmp_path, seed=1)
            assert hot.maybe_reload(force=True)
        scorer = hot.current
        assert hot.version == version and scorer.provider == CUDA_EP and scorer._chunk == 16
        assert scorer._binding.cuda_graph and scorer._binding.shape == (16, scorer.max_len, 120)
        ref = OnnxScorer(version, "cpu", model_dir=tmp_path).score(seqs, cands)
        for _ in range(2):  # the second call replays the captured graph
            for got, want in zip(hot.score(seqs, cands), ref, strict=True):
                np.testing.assert_allclose(got, want, atol=1e-2, rtol=1e-2)
