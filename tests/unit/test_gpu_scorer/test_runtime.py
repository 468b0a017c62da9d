"""OnnxScorer: the provider really in use, explicit device errors, ragged batches."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tiny_models import register_tiny, tiny_result

from gpu_scorer import runtime
from gpu_scorer.errors import ModelLoadError, ScorerDeviceError
from gpu_scorer.runtime import CPU_EP, CUDA_EP, OnnxScorer, cuda_device_count

NO_CUDA = cuda_device_count()[0] == 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    register_tiny(d)
    return d


def test_cpu_provider_is_reported(model_dir):
    scorer = OnnxScorer("latest", "cpu", model_dir=model_dir)
    assert scorer.provider == CPU_EP == scorer.session.get_providers()[0]
    assert scorer.version == "v0001"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: tests/gpu covers CUDA")
def test_cuda_without_gpu_is_a_clear_error(model_dir):
    with pytest.raises(ScorerDeviceError, match="device='cuda' requested but .*use device='cpu'"):
        OnnxScorer("latest", "cuda", model_dir=model_dir)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: tests/gpu covers CUDA")
def test_auto_without_gpu_runs_on_cpu_and_says_so(model_dir, caplog):
    with caplog.at_level(logging.INFO, logger="gpu_scorer"):
        scorer = OnnxScorer("latest", "auto", model_dir=model_dir)
    assert scorer.provider == CPU_EP
    assert "CUDA is not usable" in caplog.text and "running on CPUExecutionProvider" in caplog.text


@pytest.mark.parametrize(("device_id", "named"), [(0, None), (1, "1")])
def test_cuda_options_name_a_device_only_when_it_is_not_the_first(monkeypatch, device_id, named):
    """ONNX Runtime 1.26+ logs a misleading plugin-EP WARNING on every session given a
    device_id (seen on an H200 with 1.31.1); 0 is the CUDA provider's default, so it is not named."""
    seen = {}

    class Session:
        def __init__(self, model, so, providers):
            seen["providers"] = providers

        def get_providers(self):
            return [CUDA_EP, CPU_EP]

    monkeypatch.setattr(runtime, "cuda_device_count", lambda: (1, ""))
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: [CUDA_EP, CPU_EP])
    monkeypatch.setattr(runtime.ort, "preload_dlls", lambda: None, raising=False)
    monkeypatch.setattr(runtime.ort, "InferenceSession", Session)
    runtime._cuda_session(b"model", runtime.ort.SessionOptions(), device_id, cuda_graph=True)
    (ep, opts), cpu = seen["providers"]
    assert (ep, cpu) == (CUDA_EP, CPU_EP)
    assert opts.get("device_id") == named and opts["enable_cuda_graph"] == "1"


def test_bad_device_and_missing_model(model_dir, tmp_path):
    with pytest.raises(ValueError, match="device must be one of"):
        OnnxScorer("latest", "tpu", model_dir=model_dir)
    with pytest.raises(ModelLoadError, match="no model registered"):
        OnnxScorer("latest", "cpu", model_dir=tmp_path / "empty")


def test_ragged_batches_match_one_at_a_time(model_dir):
    scorer = OnnxScorer("latest", "cpu", model_dir=model_dir, max_batch=3)
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(0)
    seqs = [list(rng.choice(items, size=int(n))) for n in rng.integers(0, 30, size=8)]
    cands = [list(rng.choice(items, size=int(n))) for n in rng.integers(0, 15, size=8)]
    batched = scorer.score(seqs, cands)
    assert [len(s) for s in batched] == [len(c) for c in cands]
    for s, c, got in zip(seqs, cands, batched, strict=True):
        (alone,) = scorer.score([s], [c])
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, alone, atol=1e-4, rtol=1e-4)


def test_only_the_last_max_len_items_count(model_dir):
    scorer = OnnxScorer("latest", "cpu", model_dir=model_dir)
    items = list(tiny_result().vocab.items)
    long_seq = items[:40]
    [a, b] = scorer.score([long_seq, long_seq[-scorer.max_len :]], [items[:10], items[:10]])
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_mismatched_lengths_are_rejected(model_dir):
    scorer = OnnxScorer("latest", "cpu", model_dir=model_dir)
    with pytest.raises(ValueError, match="2 sequences but 1 candidate lists"):
        scorer.score([["a"], ["b"]], [["c"]])


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_io_binding_logic_on_cpu_buffers(model_dir, cuda_graph):
    """The CUDA IO-binding code path (per-call binding, or fixed buffers for CUDA graphs),
    run with CPU OrtValues so that its bookkeeping is tested without a GPU."""
    from gpu_scorer.runtime import _CudaBinding

    scorer = OnnxScorer("latest", "cpu", model_dir=model_dir, max_batch=8, max_cands=30)
    binding = _CudaBinding(scorer, cuda_graph, device_type="cpu")
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(3)
    seqs = [list(rng.choice(items, int(n))) for n in (1, 5, 12, 3)]
    cands = [list(rng.choice(items, int(n))) for n in (4, 30, 1, 17)]
    seq_ids, cand_ids, lengths = scorer.encode(seqs, cands)
    for _ in range(2):
        np.testing.assert_allclose(binding.run(seq_ids, cand_ids), scorer.run_ids(seq_ids, cand_ids), atol=1e-5)
    if cuda_graph:
        with pytest.raises(ValueError, match="exceeds the CUDA graph shape"):
            binding.run(np.ones((9, 3), np.int64), np.ones((9, 3), np.int64))
