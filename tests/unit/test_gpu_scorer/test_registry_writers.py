"""Writers of the registry as an operator's folder has them: stray names, lost name races."""

from __future__ import annotations

import errno
import json
import time

import pytest
from tiny_models import register_tiny

from gpu_scorer import registry as registry_module
from gpu_scorer.hotswap import HotSwapScorer
from gpu_scorer.registry import ModelRegistry


def test_a_stray_file_or_dangling_link_named_like_a_version_does_not_block_registering(tmp_path):
    """A file named ``v0002`` (a copied model.onnx) or a link to an archived version whose disk
    is gone was no folder, so its name was chosen again, the rename onto it failed 100 times, and
    every later ``train`` and ``retrain`` fit failed with "could not allocate a version name"."""
    v1 = register_tiny(tmp_path)
    (tmp_path / "v0002").write_bytes(b"a stray file")
    (tmp_path / "v0003").symlink_to(tmp_path / "gone" / "v0003")
    started = time.monotonic()
    assert register_tiny(tmp_path, seed=1) == "v0004" and time.monotonic() - started < 4
    assert ModelRegistry(tmp_path).versions() == [v1, "v0004"]



def test_a_version_that_lost_the_name_race_lists_its_files_once(tmp_path, monkeypatch):
    """Another writer took the name first: the retry's manifest listed manifest.json twice
    (the first try's was in the staging folder by then)."""
    register_tiny(tmp_path)
    names = iter(["v0001", "v0002"])  # the first is taken: as when two writers count at once
    monkeypatch.setattr(ModelRegistry, "_next_version", lambda self: next(names))
    version = register_tiny(tmp_path, seed=1)
    manifest = json.loads((tmp_path / version / "manifest.json").read_text())
    assert version == manifest["version"] == "v0002"
    assert sorted(manifest["files"]) == sorted(p.name for p in (tmp_path / version).iterdir())


def test_at_start_a_rolled_back_current_that_fails_falls_back_to_an_older_version_not_the_newer_one(tmp_path):
    """An operator rolled CURRENT back from v0003 to v0002; at a worker's start v0002 failed to
    load and the worker served v0003, the version rolled back from (docs/scorer.md: the newest
    *older* version that loads). A newer one is served only where no older one loads."""
    for _ in range(3):
        register_tiny(tmp_path)
    registry = ModelRegistry(tmp_path)
    registry.set_current("v0002")
    (tmp_path / "v0002" / "model.onnx").write_bytes(b"not an onnx file")
    scorer = HotSwapScorer(tmp_path, "cpu")
    assert scorer.version == "v0001" and list(scorer.refused) == ["v0002"]
    (tmp_path / "v0001" / "model.onnx").write_bytes(b"not an onnx file")
    scorer = HotSwapScorer(tmp_path, "cpu")
    assert scorer.version == "v0003" and list(scorer.refused) == ["v0002", "v0001"]


def test_a_rename_that_fails_for_another_reason_says_so_at_once(tmp_path, monkeypatch):
    """A read-only or failing disk: register tried 100 names, then said "could not allocate a
    version name", hiding the disk's own error."""
    register_tiny(tmp_path)

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src), None, str(dst))

    monkeypatch.setattr(registry_module.os, "rename", read_only)
    with pytest.raises(OSError, match="Read-only file system"):
        register_tiny(tmp_path, seed=1)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")] == []


def test_a_pointer_that_could_not_be_written_leaves_nothing_behind(tmp_path, monkeypatch):
    v1 = register_tiny(tmp_path)
    register_tiny(tmp_path, seed=1)

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(registry_module.os, "replace", full)
    with pytest.raises(OSError, match="No space left"):
        ModelRegistry(tmp_path).set_current(v1)
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert hidden == sorted([registry_module.ISSUED, registry_module.LOCK])
    assert ModelRegistry(tmp_path).latest() == "v0002"
