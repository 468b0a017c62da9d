"""Shared, cached tiny models for the gpu_scorer tests (no tests here; no ../shared data)."""

from __future__ import annotations

import functools
from pathlib import Path

from gpu_scorer.training import TrainConfig, TrainResult, sequences_from_interactions, train
from online_models.datasets import synthetic_interactions

TINY = {"dim": 16, "n_blocks": 2, "n_heads": 2, "max_len": 12, "dropout": 0.1}


@functools.cache
def tiny_sequences(n_events: int = 3000, seed: int = 3) -> dict[str, list[str]]:
    return sequences_from_interactions(synthetic_interactions(n_events=n_events, n_users=120, n_items=300, seed=seed))


def tiny_train(seed: int = 0, epochs: int = 2, **model_kw) -> TrainResult:
    tc = TrainConfig(epochs=epochs, batch_size=64, seed=seed, progress=False, patience=5)
    return train(tiny_sequences(), {**TINY, **model_kw}, tc)


@functools.cache
def tiny_result(seed: int = 0) -> TrainResult:
    return tiny_train(seed)


def register_tiny(model_dir: Path, seed: int = 0) -> str:
    from gpu_scorer.export import export_and_register
    from gpu_scorer.registry import ModelRegistry

    version, parity = export_and_register(tiny_result(seed), ModelRegistry(model_dir), {"source": "synthetic"})
    assert parity["ok"], parity
    return version
