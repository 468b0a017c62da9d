"""Writers of the registry as an operator's folder has them: stray names, lost name races."""

from __future__ import annotations

import time

from tiny_models import register_tiny

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

