"""The worker's scorer (stream.shell.load_scorer) takes the STREAMREC_SCORER_* CUDA settings:
to OnnxScorer where the model runs on CUDA, nowhere on the CPU (the worker scores as before)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("torch")  # to train the tiny model the worker serves

from tiny_models import register_tiny  # noqa: E402

import gpu_scorer.hotswap as hotswap  # noqa: E402
import gpu_scorer.registry as registry_module  # noqa: E402
import gpu_scorer.runtime as runtime  # noqa: E402
from gpu_scorer.runtime import CPU_CHUNK, CPU_EP, OnnxScorer  # noqa: E402
from stream.errors import ConfigError  # noqa: E402
from stream.pipeline import RecommendationStep  # noqa: E402
from stream.prometheus import Metrics  # noqa: E402
from stream.serve import model_refresher  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.shell import load_scorer  # noqa: E402
from stream.state import InMemoryUserStateStore  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models")
    register_tiny(path)
    return path


def test_on_the_cpu_the_defaults_rewrite_nothing(model_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the ONNX file was rewritten for a CPU session")

    monkeypatch.setattr(runtime, "_rewrite", refuse)
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(model_dir)})
    assert settings.scorer_cuda_graph  # on by default: must cost a CPU worker nothing
    scorer = load_scorer(settings, Metrics())
    assert scorer is not None and scorer.provider == CPU_EP and scorer.current._chunk == CPU_CHUNK
    assert scorer.cuda_options == settings.scorer_cuda_options
    assert len(scorer.score([["i1", "i2"]], [["i3", "i4"]])[0]) == 2


@pytest.mark.parametrize(("env", "expected"), [
    ({}, {"threads": None, "cuda_graph": True, "fp16": False, "max_batch": 256, "max_cands": 50}),
    ({"STREAMREC_SCORER_CUDA_GRAPH": "false", "STREAMREC_SCORER_FP16": "true", "STREAMREC_SCORER_MAX_BATCH": "64",
      "STREAMREC_CANDIDATES": "120"}, {"threads": None, "cuda_graph": False, "fp16": True, "max_batch": 64, "max_cands": 120}),
])
def test_on_cuda_the_settings_reach_onnx_scorer(model_dir, monkeypatch, env, expected):
    seen = []

    def onnx_scorer(path, device, **kw):  # records what the worker asks for, builds it on the CPU
        seen.append((device, kw))
        return OnnxScorer(path, "cpu")

    monkeypatch.setattr(registry_module, "OnnxScorer", onnx_scorer)
    monkeypatch.setattr(hotswap, "cuda_available", lambda: (True, ""))
    monkeypatch.setattr(hotswap, "onnx_installed", lambda: True)
    scorer = load_scorer(Settings.from_env({"STREAMREC_MODEL_DIR": str(model_dir), **env}), Metrics())
    assert scorer is not None and seen == [("cuda", expected)]


@pytest.mark.parametrize(("env", "threads"), [({}, runtime.default_threads()), ({"STREAMREC_SCORER_THREADS": "3"}, 3)])
def test_the_cpu_threads_setting_reaches_the_session(model_dir, monkeypatch, env, threads):
    """STREAMREC_SCORER_THREADS is a setting: checked at start (a typo was a model "refused at
    start", the worker ranking without its Transformer) and given to the session."""
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.delenv("STREAMREC_SCORER_THREADS", raising=False)
    scorer = load_scorer(Settings.from_env({"STREAMREC_MODEL_DIR": str(model_dir), **env}), Metrics())
    assert scorer is not None
    assert scorer.current.session.get_session_options().intra_op_num_threads == threads


def test_cuda_asked_for_where_there_is_none_is_a_sentence_naming_the_setting(model_dir, monkeypatch):
    """STREAMREC_SCORER_DEVICE=cuda on a machine without a usable GPU: the worker died at start
    with ScorerDeviceError's traceback (and serve too, through the text model)."""
    monkeypatch.setattr(runtime, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.setattr(hotswap, "cuda_device_count", lambda: (0, "no NVIDIA driver (test)"))
    monkeypatch.setattr(hotswap, "cuda_available", lambda: (False, "no NVIDIA driver (test)"))
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(model_dir), "STREAMREC_SCORER_DEVICE": "cuda"})
    with pytest.raises(ConfigError, match=r"STREAMREC_SCORER_DEVICE=cuda: no NVIDIA driver \(test\); set it to auto"):
        load_scorer(settings, Metrics())


async def test_serve_started_before_any_model_serves_the_first_one_registered(tmp_path):
    """serve looked at the registry only through a scorer it had: started before `streamrec
    train` had registered anything, it never served a Transformer (the worker did, within 5 s)."""
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path / "models"), "STREAMREC_SCORER_DEVICE": "cpu"})
    (tmp_path / "models").mkdir()
    step = RecommendationStep.from_settings(settings, None)
    refresher = model_refresher(InMemoryUserStateStore(), step, settings, Metrics(CollectorRegistry()))
    await refresher.check_scorer()
    assert step.scorer is None
    version = register_tiny(tmp_path / "models")
    await refresher.check_scorer()
    assert step.scorer is not None and step.scorer.version == version
    await refresher.check_scorer()  # from then on, the scorer's own look for newer versions
    assert step.scorer.version == version
