"""Retrain the Transformer on what the stream has seen so far: one fit, registered.

The online learners learn every event as it comes; the Transformer knows only the log it was
trained on. :class:`Retrainer` trains a new one, with the architecture of the version it
replaces, on every interaction up to now (the training log and the events since), exports
it, checks ONNX Runtime against PyTorch and registers it as ``CURRENT``: running workers
hot-swap to it within seconds (gpu_scorer/hotswap.py). ``streamrec retrain`` does that
every ``--every`` seconds over the events topics (stream/retrain_cli.py), and ``streamrec
evaluate --retrain-every`` does it at the same interval of the log's own time, so that what is
measured is what such a deployment serves (docs/evaluation.md).

Torch-bound, like :mod:`gpu_scorer.training`: imported only by the commands that train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.export import export_and_register
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.training import TrainConfig, sequences_from_interactions, train

#: the architecture's fields a retrained model copies from the version it replaces
ARCHITECTURE = ("dim", "n_blocks", "n_heads", "max_len", "dropout", "ffn_mult")


def architecture_of(registry: ModelRegistry, version: str | None = None) -> dict:
    """The architecture of ``version`` (default: the current one), as ``train``'s model config;
    empty (the defaults) when the registry holds no version yet."""
    version = version or registry.latest()
    if version is None:
        return {}
    config = registry.manifest(version).get("config", {})
    return {key: config[key] for key in ARCHITECTURE if key in config}


class Retrainer:
    """Fits a Transformer on interactions and registers it in ``registry``.

    ``model_config``: the architecture (``architecture_of`` the served version, so a retrained
    model is the same model on more data); ``train_config``: ``streamrec train``'s defaults
    unless given (progress bar off); ``threads``: PyTorch's CPU threads while fitting (1, as
    ``streamrec train``: this model's matrices are too small to gain from more)."""

    def __init__(self, registry: ModelRegistry, model_config: Mapping | None = None,
                 train_config: TrainConfig | None = None, serve_device: str = "cpu", threads: int = 1) -> None:
        self.registry = registry
        self.model_config = dict(model_config or {})
        self.train_config = train_config or TrainConfig(progress=False)
        self.serve_device = serve_device
        self.threads = threads

    def fit(self, interactions: Sequence, data: Mapping | None = None, console=None) -> tuple[str, dict]:
        """Train on ``interactions`` (``online_models.Interaction``, any order), register the
        model as ``CURRENT``; returns ``(version, its metrics)``. Raises ``ValueError`` when no
        user has two interactions, :class:`ModelLoadError` when the export's parity check
        failed (the version is written for inspection, not made current)."""
        sequences = sequences_from_interactions(interactions)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # for this fit only: the caller's setting comes back after it
        try:
            result = train(sequences, self.model_config, self.train_config, console=console)
        finally:
            torch.set_num_threads(threads)
        version, parity = export_and_register(result, self.registry,
                                              {"events": len(interactions), "retrained": True, **(data or {})})
        if not parity["ok"]:
            raise ModelLoadError(f"retrained version {version} failed its parity check "
                                 f"(max |diff| {parity['max_abs_diff']:.2e}); the current version stays")
        return version, result.metrics

    def load(self, version: str):
        """The registered ``version``, loaded and parity-checked as a worker loads it."""
        return self.registry.load(version, self.serve_device)


__all__ = ["ARCHITECTURE", "Retrainer", "architecture_of"]
