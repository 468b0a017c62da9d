"""HotSwapScorer's ``cuda_options``: on every load and hot swap they reach OnnxScorer where the
model runs on CUDA, and never where it runs on the CPU (no ONNX rewrite, scores as without).

No GPU here: "CUDA" is the hotswap module's probe answering yes, and OnnxScorer is replaced by
a spy that records its arguments and builds the real model on the CPU (so the registry's
parity check still runs on what it returns).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from tiny_models import register_tiny, tiny_result

import gpu_scorer.hotswap as hotswap
import gpu_scorer.registry as registry_module
import gpu_scorer.runtime as runtime
from gpu_scorer.errors import ScorerDeviceError
from gpu_scorer.hotswap import HotSwapScorer
from gpu_scorer.runtime import CPU_CHUNK, CPU_EP, OnnxScorer

OPTIONS = {"cuda_graph": True, "fp16": True, "max_batch": 16, "max_cands": 32}


def _sample(n=70):  # more users than CPU_CHUNK and than OPTIONS' max_batch
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(5)
    return [list(rng.choice(items, 8)) for _ in range(n)], [list(rng.choice(items, 20)) for _ in range(n)]


@pytest.fixture
def no_rewrite(monkeypatch):
    """A CPU load must not rewrite the ONNX file (that is what needs onnx and fixes shapes)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the ONNX file was rewritten for a CPU session")
    monkeypatch.setattr(runtime, "_rewrite", refuse)


@pytest.fixture
def no_gpu(monkeypatch):
    """This box as a machine without an NVIDIA driver, whatever it really has."""
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_the_cuda_options_change_nothing_on_the_cpu(tmp_path, no_rewrite, no_gpu, device):
    register_tiny(tmp_path)
    plain = HotSwapScorer(tmp_path, device, background=False, poll_interval_s=0)
    tuned = HotSwapScorer(tmp_path, device, background=False, poll_interval_s=0, cuda_options=OPTIONS)
    assert tuned.provider == plain.provider == CPU_EP
    assert tuned.current._chunk == plain.current._chunk == CPU_CHUNK  # not OPTIONS' 16 users a call
    seqs, cands = _sample()
    for got, ref in zip(tuned.score(seqs, cands), plain.score(seqs, cands), strict=True):
        np.testing.assert_array_equal(got, ref)  # float32 weights, not fp16
    register_tiny(tmp_path, seed=1)
    assert tuned.maybe_reload() and tuned.version == "v0002" and tuned.provider == CPU_EP
    assert tuned.current._chunk == CPU_CHUNK and tuned.reload_failures == 0


class Spy:
    """OnnxScorer as the registry calls it: (version, device, options) recorded, the model
    built on the CPU; ``cuda_fails``: a CUDA session that cannot start (a missing library)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.cuda_fails = False

    def __call__(self, path, device, **kw):
        self.calls.append((path.name, device, kw))
        if device == "cuda" and self.cuda_fails:
            raise ScorerDeviceError("device='cuda' requested but libcublas.so.13 is missing (test)")
        return OnnxScorer(path, "cpu")


@pytest.fixture
def spy(monkeypatch):
    """A machine where CUDA looks usable and onnx is installed; OnnxScorer is the spy."""
    spy = Spy()
    monkeypatch.setattr(registry_module, "OnnxScorer", spy)
    monkeypatch.setattr(hotswap, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(hotswap, "onnx_installed", lambda: True)
    return spy


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_every_load_on_cuda_gets_the_options(tmp_path, spy, device):
    register_tiny(tmp_path)
    hot = HotSwapScorer(tmp_path, device, background=False, poll_interval_s=0, cuda_options=OPTIONS, threads=1)
    register_tiny(tmp_path, seed=1)
    assert hot.maybe_reload() and hot.version == "v0002"
    assert spy.calls == [("v0001", "cuda", {"threads": 1, **OPTIONS}), ("v0002", "cuda", {"threads": 1, **OPTIONS})]


def test_the_options_do_not_travel_to_a_cpu_device(tmp_path, spy):
    register_tiny(tmp_path)
    HotSwapScorer(tmp_path, "cpu", background=False, cuda_options=OPTIONS)
    assert spy.calls == [("v0001", "cpu", {})]


def test_auto_falls_back_to_the_cpu_without_the_options(tmp_path, spy, caplog):
    register_tiny(tmp_path)
    spy.cuda_fails = True
    with caplog.at_level(logging.WARNING, "gpu_scorer"):
        hot = HotSwapScorer(tmp_path, "auto", background=False, cuda_options=OPTIONS)
    assert hot.version == "v0001" and hot.reload_failures == 0
    assert spy.calls == [("v0001", "cuda", OPTIONS), ("v0001", "cpu", {})]
    assert "libcublas.so.13 is missing" in caplog.text and "without the CUDA options" in caplog.text


def test_cuda_that_cannot_start_still_refuses_to_start(tmp_path, spy):
    register_tiny(tmp_path)
    spy.cuda_fails = True
    with pytest.raises(ScorerDeviceError, match="libcublas"):
        HotSwapScorer(tmp_path, "cuda", background=False, cuda_options=OPTIONS)


def test_without_onnx_the_rewrites_are_left_out_with_a_warning(tmp_path, spy, monkeypatch, caplog):
    monkeypatch.setattr(hotswap, "onnx_installed", lambda: False)
    register_tiny(tmp_path)
    with caplog.at_level(logging.WARNING, "gpu_scorer"):
        hot = HotSwapScorer(tmp_path, "auto", background=False, cuda_options=OPTIONS)
    assert hot.reload_failures == 0
    assert spy.calls == [("v0001", "cuda", {**OPTIONS, "cuda_graph": False, "fp16": False})]
    assert "cuda_graph and fp16 need the onnx package" in caplog.text


def test_the_probe_reads_the_driver_and_the_onnxruntime_build(monkeypatch):
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (0, "no NVIDIA driver (libcuda) found"))
    assert hotswap.cuda_available() == (False, "no NVIDIA driver (libcuda) found")
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (1, ""))
    monkeypatch.setattr(hotswap.ort, "get_available_providers", lambda: [CPU_EP])
    usable, why = hotswap.cuda_available()
    assert not usable and "CUDAExecutionProvider" in why
    monkeypatch.setattr(hotswap.ort, "get_available_providers", lambda: [runtime.CUDA_EP, CPU_EP])
    assert hotswap.cuda_available() == (True, "")
