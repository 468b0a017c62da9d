"""A running scorer and what an operator does to the registry by hand: a registry deleted and
made again (its first version is v0001 again), a CURRENT written before the version it names
was copied in, a version read while its files were still being copied. Each of these left the
scorer on its old model for good, and said nothing more."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from tiny_models import register_tiny, tiny_result

from gpu_scorer.hotswap import HotSwapScorer
from gpu_scorer.registry import ModelRegistry
from stream.lag import LagMetrics


def _scores(scorer):
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(5)
    seqs, cands = [list(rng.choice(items, 8)) for _ in range(3)], [list(rng.choice(items, 12)) for _ in range(3)]
    return np.concatenate(scorer.score(seqs, cands))


@pytest.fixture(scope="module")
def spare(tmp_path_factory):
    """A registry elsewhere with the seed-0 model as v0001 and the seed-1 model as v0002, to copy from."""
    root = tmp_path_factory.mktemp("spare")
    register_tiny(root, seed=0)
    register_tiny(root, seed=1)
    return root


def test_a_registry_made_again_serves_its_new_v0001(tmp_path):
    root = tmp_path / "models"
    register_tiny(root, seed=0)
    scorer = HotSwapScorer(root, "cpu", poll_interval_s=0.0, background=False)
    lag = LagMetrics(CollectorRegistry())
    lag.set_scorer(scorer)
    before = _scores(scorer)
    shutil.rmtree(root)
    scorer.maybe_reload()
    assert register_tiny(root, seed=1) == "v0001"  # the new registry's first version: another model, the same name
    manifest = json.loads((root / "v0001" / "manifest.json").read_text())
    manifest["created"] = "2030-01-02T00:00:00+00:00"
    (root / "v0001" / "manifest.json").write_text(json.dumps(manifest))
    assert scorer.maybe_reload() and scorer.version == "v0001" and scorer.swaps == 1
    after = _scores(scorer)
    np.testing.assert_allclose(after, _scores(ModelRegistry(root).load("v0001", "cpu")), rtol=1e-6)
    assert not np.allclose(after, before)
    lag.set_scorer(scorer)  # the model's age is the new one's
    assert lag.model_created.labels("v0001")._value.get() == datetime(2030, 1, 2, tzinfo=UTC).timestamp()
    assert not scorer.maybe_reload() and scorer.swaps == 1  # and it settles there


def test_current_written_before_its_version_arrives_serves_it_once_it_does(tmp_path, spare):
    register_tiny(tmp_path, seed=0)
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False)
    (tmp_path / "CURRENT").write_text("v0002\n")  # rsync copies CURRENT before the folder v0002/
    scorer.maybe_reload()
    assert scorer.version == "v0001" and scorer.reload_failures == 1
    scorer.maybe_reload()
    assert scorer.reload_failures == 1  # said once while it stands
    shutil.copytree(spare / "v0002", tmp_path / "v0002")
    assert scorer.maybe_reload() and scorer.version == "v0002"
    np.testing.assert_allclose(_scores(scorer), _scores(ModelRegistry(spare).load("v0002", "cpu")), rtol=1e-6)


def test_a_version_read_while_still_being_copied_is_served_once_complete(tmp_path, spare):
    register_tiny(tmp_path, seed=0)
    failures = []
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False,
                           on_failure=lambda version, exc: failures.append(version))
    onnx = (spare / "v0002" / "model.onnx").read_bytes()
    shutil.copytree(spare / "v0002", tmp_path / "v0002")
    (tmp_path / "v0002" / "model.onnx").write_bytes(onnx[: len(onnx) // 4])  # the copy is still under way
    (tmp_path / "CURRENT").write_text("v0002\n")
    scorer.maybe_reload()
    assert scorer.version == "v0001" and failures == ["v0002"] and "v0002" in scorer.refused
    scorer.maybe_reload()
    assert failures == ["v0002"]  # not tried again while its files stay as they are
    (tmp_path / "v0002" / "model.onnx").write_bytes(onnx)  # the copy completes
    assert scorer.maybe_reload() and scorer.version == "v0002" and "v0002" not in scorer.refused
    assert failures == ["v0002"]


def test_at_start_a_refused_current_is_tried_again_once_its_files_change(tmp_path, spare):
    register_tiny(tmp_path, seed=0)
    shutil.copytree(spare / "v0002", tmp_path / "v0002")
    onnx = (tmp_path / "v0002" / "model.onnx").read_bytes()
    (tmp_path / "v0002" / "model.onnx").write_bytes(onnx[:100])
    ModelRegistry(tmp_path).set_current("v0002")
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False)
    assert scorer.version == "v0001" and "v0002" in scorer.refused
    assert not scorer.maybe_reload() and scorer.reload_failures == 1
    (tmp_path / "v0002" / "model.onnx").write_bytes(onnx)
    assert scorer.maybe_reload() and scorer.version == "v0002"
