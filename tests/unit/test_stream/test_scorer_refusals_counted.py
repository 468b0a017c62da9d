"""What the worker (and serve) count in ``streamrec_scorer_reload_failures_total``, which the
StreamrecScorerReloadFailed alert watches, and what they try again: a second typo in CURRENT
weeks after a first was not counted (each was counted as "CURRENT", once a process), and a
registry whose only version was refused at start (still being copied) was never tried again
once complete: the online models ranked alone until a restart."""

from __future__ import annotations

import shutil

import pytest
from prometheus_client import CollectorRegistry

pytest.importorskip("torch")  # to train the tiny models the worker serves

from tiny_models import register_tiny  # noqa: E402

import gpu_scorer.hotswap as hotswap  # noqa: E402
from stream.prometheus import Metrics  # noqa: E402
from stream.settings import Settings  # noqa: E402
from stream.shell import load_scorer  # noqa: E402


def _failures(metrics: Metrics) -> float:
    return metrics.scorer_reload_failures._value.get()


def test_each_thing_current_says_that_names_no_version_is_counted(tmp_path):
    register_tiny(tmp_path)
    metrics, refused = Metrics(CollectorRegistry()), set()
    scorer = load_scorer(Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path)}), metrics, refused)
    for typo, counted in (("v0009", 1), ("v0009", 1), ("v0001", 1), ("v001", 2)):
        (tmp_path / "CURRENT").write_text(typo + "\n")
        scorer.maybe_reload(force=True)
        assert scorer.version == "v0001" and _failures(metrics) == counted, typo


def test_a_version_refused_at_start_is_served_once_its_copy_completes(tmp_path):
    spare = tmp_path / "spare"
    register_tiny(spare)
    models = tmp_path / "models"
    shutil.copytree(spare, models)
    onnx = (models / "v0001" / "model.onnx").read_bytes()
    (models / "v0001" / "model.onnx").write_bytes(onnx[:200])  # the copy is still under way
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(models)})
    metrics, refused = Metrics(CollectorRegistry()), set()
    assert load_scorer(settings, metrics, refused) is None and _failures(metrics) == 1
    assert load_scorer(settings, metrics, refused, False) is None and _failures(metrics) == 1  # not again as it is
    (models / "v0001" / "model.onnx").write_bytes(onnx)
    scorer = load_scorer(settings, metrics, refused, False)
    assert scorer is not None and scorer.version == "v0001" and _failures(metrics) == 1


def test_the_workers_5_s_timer_looks_at_current_at_every_tick(tmp_path, monkeypatch):
    """The scorer's own 5 s poll interval under the worker's 5 s timer: a tick that came a
    little early (timers jitter) was too soon, so CURRENT was read every other tick, 10 s."""
    register_tiny(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr(hotswap.time, "monotonic", lambda: clock[0])
    scorer = load_scorer(Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path)}), Metrics(CollectorRegistry()))
    for seed in (1, 2):
        new = register_tiny(tmp_path, seed=seed)
        clock[0] += 4.99  # the next tick of a 5 s timer, a little early
        scorer.maybe_reload()
        scorer.wait(30)
        assert scorer.maybe_reload() is True and scorer.version == new
