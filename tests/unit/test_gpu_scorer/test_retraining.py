"""A retrained version: the served one's architecture on more data, registered as CURRENT."""

from __future__ import annotations

import torch

from gpu_scorer.registry import ModelRegistry
from gpu_scorer.retraining import Retrainer, architecture_of
from gpu_scorer.training import TrainConfig
from online_models.datasets import synthetic_interactions

QUICK = TrainConfig(epochs=2, progress=False)


def test_a_retrained_version_keeps_the_served_architecture_and_becomes_current(tmp_path):
    registry = ModelRegistry(tmp_path)
    assert architecture_of(registry) == {}  # nothing registered: the defaults
    log = list(synthetic_interactions(n_events=600, n_users=40, n_items=80, seed=1))
    first, _ = Retrainer(registry, {"dim": 16, "n_heads": 2, "max_len": 8}, QUICK).fit(log[:400])
    served = architecture_of(registry)
    assert served["dim"] == 16 and served["max_len"] == 8
    second, metrics = Retrainer(registry, served, QUICK).fit(log, {"source": "test"})
    assert registry.latest() == second != first and metrics["epochs_run"] >= 1
    manifest = registry.manifest(second)
    assert {k: manifest["config"][k] for k in served} == served
    assert manifest["data"]["events"] == len(log) and manifest["data"]["retrained"] and manifest["parity"]["ok"]
    assert Retrainer(registry, served, QUICK).load(second).version == second


def test_a_fit_leaves_the_callers_thread_count_as_it_was(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        log = list(synthetic_interactions(n_events=200, n_users=20, n_items=40, seed=2))
        Retrainer(ModelRegistry(tmp_path), {"dim": 16, "max_len": 8}, QUICK, threads=1).fit(log)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
