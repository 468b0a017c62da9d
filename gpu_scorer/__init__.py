"""The Transformer scorer: PyTorch model -> ONNX -> ONNX Runtime (CUDA, else CPU), hot-swapped.

The package exports the serving names, which need no torch: ``OnnxScorer``,
``ModelRegistry``, ``HotSwapScorer``, ``MicroBatcher``, ``Vocab`` and the errors. Training
and export (``gpu_scorer.model``, ``gpu_scorer.training``, ``gpu_scorer.export``) need
torch (``pip install 'streamrec[train]'``) and are imported from their modules.
Never imports faust, redis or the ``stream`` package.
"""

from __future__ import annotations

from gpu_scorer.coalescing import MicroBatcher
from gpu_scorer.errors import ModelLoadError, ScorerDeviceError, ScorerError
from gpu_scorer.hotswap import HotSwapScorer
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.runtime import OnnxScorer, make_session
from gpu_scorer.vocab import OOV_ROW, PAD_ROW, Vocab

__all__ = [
    "OOV_ROW", "PAD_ROW", "HotSwapScorer", "MicroBatcher", "ModelLoadError", "ModelRegistry", "OnnxScorer",
    "ScorerDeviceError", "ScorerError", "Vocab", "make_session",
]
