"""Writers of the registry at once (the lock), what reaches the disk (fsync), and pruning."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
from pathlib import Path

import pytest

from gpu_scorer import registry as registry_module
from gpu_scorer.errors import ModelLoadError
from gpu_scorer.layout import POINTER
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.vocab import Vocab

#: how long a writer process waits for the other before it gives up (a hang, not a timing)
PATIENCE_S = 60


def _register(root: Path, make_current: bool = True) -> str:
    """A version that is no real model: the writers' part of the registry does not read it."""
    onnx = root.parent / "model.onnx"
    if not onnx.exists():
        onnx.write_bytes(b"not read")
    return ModelRegistry(root).register(onnx, Vocab(["i1", "i2"]), config={}, make_current=make_current)


def _lock_is_held(root: Path) -> bool:
    fd = os.open(root / registry_module.LOCK, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _writer(root: Path, role: str, orders, results, first_renamed, second_waits) -> None:
    """A writer process: one registration per order ("round"), or ``n`` without holding back
    ("free", n); its version names go to ``results``. In a round the first writer ("a") holds
    its move of CURRENT back until the second ("b") waits for the lock or has registered; the
    second starts only once the first renamed its version into place. Without the lock, that
    is the second's CURRENT overwritten by the first's older version."""
    real_rename, real_replace, real_flock = os.rename, os.replace, fcntl.flock
    holding_back = [True]

    def rename(src, dst):
        real_rename(src, dst)
        if Path(dst).parent == root and role == "a" and holding_back[0]:
            first_renamed.set()

    def replace(src, dst):
        if Path(dst) == root / POINTER and role == "a" and holding_back[0]:
            if not second_waits.wait(PATIENCE_S):
                raise AssertionError("the second writer neither waited for the lock nor registered")
        real_replace(src, dst)

    def flock(fd, operation):
        if role == "b" and holding_back[0] and operation == fcntl.LOCK_EX:
            second_waits.set()
        real_flock(fd, operation)

    os.rename, os.replace, fcntl.flock = rename, replace, flock
    try:
        for order in iter(orders.get, None):
            holding_back[0] = order[0] == "round"
            if holding_back[0] and role == "b" and not first_renamed.wait(PATIENCE_S):
                raise AssertionError("the first writer never renamed its version into place")
            names = [_register(root) for _ in range(1 if holding_back[0] else order[1])]
            if role == "b":
                second_waits.set()
            results.put(names)
    except BaseException as exc:  # noqa: BLE001 - the test says what failed, not "no result"
        results.put(repr(exc))


def test_of_two_writers_registering_at_once_current_ends_on_the_newest(tmp_path):
    """Writer A took v0001, writer B v0002; B moved CURRENT to v0002, then A moved it to v0001,
    the older. The writers' lock covers the naming, the rename and the move of CURRENT."""
    root = tmp_path / "models"
    ctx = multiprocessing.get_context("spawn")
    first_renamed, second_waits = ctx.Event(), ctx.Event()
    orders = {role: ctx.Queue() for role in "ab"}
    results = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(root, role, orders[role], results, first_renamed, second_waits))
               for role in "ab"]
    for writer in writers:
        writer.start()
    registry = ModelRegistry(root)
    try:
        for n in range(5):
            first_renamed.clear()
            second_waits.clear()
            for role in "ab":
                orders[role].put(("round",))
            got = [results.get(timeout=PATIENCE_S) for _ in "ab"]
            assert all(isinstance(names, list) for names in got), got
            assert registry.versions()[-1] == f"v{2 * n + 2:04d}"
            assert registry.pointed() == registry.versions()[-1], (n, got)
        for role in "ab":  # and racing freely, as fast as they can
            orders[role].put(("free", 20))
        got = [results.get(timeout=PATIENCE_S) for _ in "ab"]
        assert all(isinstance(names, list) for names in got), got
        assert len(registry.versions()) == 50 and registry.pointed() == registry.versions()[-1] == "v0050"
    finally:
        for role in "ab":
            orders[role].put(None)
        for writer in writers:
            writer.join(PATIENCE_S)
            if writer.is_alive():
                writer.kill()


def test_the_files_the_folder_and_the_registry_reach_the_disk_before_current_names_the_version(tmp_path, monkeypatch):
    """Nothing was synced: after a power loss CURRENT could name a version whose files were
    empty, or no version at all."""
    root = tmp_path / "models"
    _register(root)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", Path(dst).name))

    monkeypatch.setattr(registry_module.os, "fsync", fsync)
    monkeypatch.setattr(registry_module.os, "replace", replace)
    version = _register(root)
    assert version == "v0002"

    def node(path):
        st = os.stat(path)
        return ("fsync", (st.st_dev, st.st_ino))

    moved = events.index(("replace", POINTER))
    before, after = events[:moved], events[moved + 1:]
    files = sorted((root / version).iterdir())
    assert [p.name for p in files] == ["manifest.json", "model.onnx", "vocab.json"]
    for path in [*files, root / version, root]:
        assert node(path) in before, (path, events)
    assert node(root) in after  # the replace itself
    assert (root / POINTER).read_text() == "v0002\n"

    events.clear()
    version = _register(root, make_current=False)  # the version alone is durable too
    for path in [*sorted((root / version).iterdir()), root / version, root]:
        assert node(path) in events, (path, events)
    assert ("replace", POINTER) not in events


def test_prune_keeps_the_newest_and_the_current_version_and_no_number_comes_back(tmp_path):
    root = tmp_path / "models"
    for _ in range(6):
        _register(root)
    registry = ModelRegistry(root)
    registry.set_current("v0002")  # an operator's rollback
    assert registry.pointed() == "v0002"
    staging = root / ".staging-0123abcd"  # a writer's, in progress
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half")
    (root / "v0000").mkdir()  # a stray folder, no version: not ours to delete
    (root / ".trash-v0009-dead").mkdir()  # what an interrupted prune left
    (root / ".trash-v0009-dead" / "model.onnx").write_bytes(b"x")

    assert registry.prune(3) == ["v0001", "v0003"]
    assert registry.versions() == ["v0002", "v0004", "v0005", "v0006"] and registry.pointed() == "v0002"
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == sorted(
        [registry_module.ISSUED, registry_module.LOCK, ".staging-0123abcd"])
    assert (staging / "model.onnx").read_bytes() == b"half" and (root / "v0000").is_dir()
    assert registry.prune(3) == []

    assert _register(root) == "v0007" == registry.pointed()  # the newest is never pruned: its number is not given again
    assert registry.prune(1) == ["v0002", "v0004", "v0005", "v0006"]
    assert registry.versions() == ["v0007"] == [registry.pointed()]
    with pytest.raises(ValueError, match="at least 1"):
        registry.prune(0)


def test_prune_works_under_the_lock_and_a_reader_never_lists_a_version_it_deletes(tmp_path, monkeypatch):
    root = tmp_path / "models"
    for _ in range(3):
        _register(root)
    registry = ModelRegistry(root)
    seen = []
    real_rmtree = registry_module.shutil.rmtree

    def rmtree(path, *args, **kw):
        seen.append((Path(path).name, registry.versions(), _lock_is_held(root)))
        real_rmtree(path, *args, **kw)

    monkeypatch.setattr(registry_module.shutil, "rmtree", rmtree)
    assert registry.prune(1) == ["v0001", "v0002"]
    assert [name.split("-")[:2] for name, _, _ in seen] == [[".trash", "v0001"], [".trash", "v0002"]]
    assert all(versions == ["v0003"] and held for _, versions, held in seen), seen


def test_prune_of_a_registry_whose_current_names_no_version_keeps_the_newest(tmp_path):
    root = tmp_path / "models"
    for _ in range(3):
        _register(root)
    (root / POINTER).write_text("v0099\n")  # a typo in a rollback: the workers serve the newest
    registry = ModelRegistry(root)
    with pytest.raises(ModelLoadError):
        registry.pointed()
    assert registry.prune(1) == ["v0001", "v0002"] and registry.latest() == "v0003"
