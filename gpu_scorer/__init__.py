"""The Transformer scorer: PyTorch model -> ONNX -> ONNX Runtime (CUDA, else CPU), hot-swapped.

Serving names (``OnnxScorer``, ``ModelRegistry``, ``HotSwapScorer``, ``MicroBatcher``,
``Vocab``, errors) import without torch; the training names (``SASRecScorer``,
``ScorerConfig``, ``train``, ``export_onnx``, ...) load torch on first use.
Never imports faust, redis or the ``stream`` package.
"""

from __future__ import annotations

import importlib

from gpu_scorer.errors import ModelLoadError, ScorerDeviceError, ScorerError
from gpu_scorer.vocab import OOV_ROW, PAD_ROW, Vocab

_LAZY = {
    "OnnxScorer": "gpu_scorer.runtime",
    "make_session": "gpu_scorer.runtime",
    "ModelRegistry": "gpu_scorer.registry",
    "HotSwapScorer": "gpu_scorer.hotswap",
    "MicroBatcher": "gpu_scorer.batching",
    "SASRecScorer": "gpu_scorer.model",
    "ScorerConfig": "gpu_scorer.model",
    "TrainConfig": "gpu_scorer.training",
    "TrainResult": "gpu_scorer.training",
    "train": "gpu_scorer.training",
    "export_onnx": "gpu_scorer.export",
    "check_parity": "gpu_scorer.export",
    "ParityResult": "gpu_scorer.export",
    "export_and_register": "gpu_scorer.cli",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gpu_scorer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [  # noqa: F822 - the lazy names resolve through __getattr__
    "OOV_ROW", "PAD_ROW", "HotSwapScorer", "MicroBatcher", "ModelLoadError", "ModelRegistry", "OnnxScorer",
    "ParityResult", "SASRecScorer", "ScorerConfig", "ScorerDeviceError", "ScorerError", "TrainConfig",
    "TrainResult", "Vocab", "check_parity", "export_and_register", "export_onnx", "make_session", "train",
]
