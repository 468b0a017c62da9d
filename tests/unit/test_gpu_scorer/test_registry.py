"""Registry layout and the hot-swapping scorer (swap under load, refusal of bad models)."""

from __future__ import annotations

import json
import logging
import shutil
import threading

import numpy as np
import pytest
from tiny_models import register_tiny, tiny_result

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.hotswap import HotSwapScorer
from gpu_scorer.registry import ModelRegistry, verify_parity
from online_models.search import QueryStudent


def test_register_load_latest(tmp_path):
    reg = ModelRegistry(tmp_path)
    assert reg.latest() is None and reg.versions() == []
    v1 = register_tiny(tmp_path)
    v2 = register_tiny(tmp_path, seed=1)
    assert (v1, v2) == ("v0001", "v0002") and reg.versions() == [v1, v2]
    assert reg.latest() == v2 == (tmp_path / "CURRENT").read_text().strip()
    manifest = reg.manifest(v1)
    for key in ("version", "created", "data", "metrics", "parity", "config"):
        assert key in manifest
    assert manifest["parity"]["ok"] and manifest["data"]["source"] == "synthetic"
    assert sorted(p.name for p in (tmp_path / v1).iterdir()) == ["manifest.json", "model.onnx", "parity.npz", "vocab.json"]
    reg.set_current(v1)
    assert reg.latest() == v1 and reg.load().version == v1
    assert reg.load(v2, "cpu").provider == "CPUExecutionProvider"
    with pytest.raises(ModelLoadError):
        reg.set_current("v0099")


def _sample(n=16):
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(2)
    return [list(rng.choice(items, 10)) for _ in range(n)], [list(rng.choice(items, 25)) for _ in range(n)]


def test_hot_swap_while_scoring_concurrently(tmp_path):
    register_tiny(tmp_path)
    swaps = []
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, on_swap=lambda old, new, p: swaps.append((old, new, p)))
    seqs, cands = _sample()
    errors, versions, stop = [], set(), threading.Event()

    def client():
        while not stop.is_set():
            try:
                out = scorer.score(seqs, cands)
                assert len(out) == len(seqs) and all(np.isfinite(o).all() for o in out)
                versions.add(scorer.version)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        register_tiny(tmp_path, seed=1)
        news = scorer.maybe_reload()  # starts the background load (True only if it already swapped)
        scorer.wait(30)
        news = scorer.maybe_reload() or news  # the swap is reported once...
        assert news and not scorer.maybe_reload()  # ...and only once
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert scorer.version == "v0002" and scorer.swaps == 1
    assert swaps == [(None, "v0001", "CPUExecutionProvider"), ("v0001", "v0002", "CPUExecutionProvider")]
    assert "v0001" in versions


def test_poll_interval_throttles_checks(tmp_path):
    register_tiny(tmp_path)
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=3600, background=False)
    register_tiny(tmp_path, seed=1)
    assert not scorer.maybe_reload() and scorer.version == "v0001"
    assert scorer.maybe_reload(force=True) and scorer.version == "v0002"


@pytest.mark.parametrize("damage", ["truncate_onnx", "wrong_weights", "parity_failed"])
def test_bad_model_is_refused_and_old_keeps_serving(tmp_path, damage):
    register_tiny(tmp_path)
    failures = []
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False, on_failure=lambda v, e: failures.append(v))
    v2 = register_tiny(tmp_path, seed=1)
    vdir = tmp_path / v2
    if damage == "truncate_onnx":
        data = (vdir / "model.onnx").read_bytes()
        (vdir / "model.onnx").write_bytes(data[: len(data) // 3])
    elif damage == "wrong_weights":  # a valid graph that is not the model the manifest describes
        v1_onnx = (tmp_path / "v0001" / "model.onnx").read_bytes()
        (vdir / "model.onnx").write_bytes(v1_onnx)
    else:
        manifest = json.loads((vdir / "manifest.json").read_text())
        manifest["parity"]["ok"] = False
        (vdir / "manifest.json").write_text(json.dumps(manifest))
    seqs, cands = _sample(4)
    scorer.maybe_reload(force=True)
    assert scorer.version == "v0001" and scorer.reload_failures == 1 and failures == [v2]
    assert v2 in scorer.refused
    assert len(scorer.score(seqs, cands)) == 4
    scorer.maybe_reload(force=True)  # a refused version is not retried
    assert scorer.reload_failures == 1


def test_a_refused_version_deleted_then_trained_again_is_served_under_a_new_name(tmp_path):
    """The fix StreamrecScorerReloadFailed gives (remove the bad version, train again) handed
    the new model the deleted version's name, which a running worker had refused: it never
    served it, and said nothing."""
    register_tiny(tmp_path)
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False)
    bad = register_tiny(tmp_path, seed=1)
    (tmp_path / bad / "model.onnx").write_bytes(b"not a model")
    scorer.maybe_reload(force=True)
    assert scorer.version == "v0001" and bad in scorer.refused
    shutil.rmtree(tmp_path / bad)
    again = register_tiny(tmp_path, seed=1)
    assert again != bad and again == "v0003"
    scorer.maybe_reload(force=True)
    assert scorer.version == again
    shutil.rmtree(tmp_path / again)  # the newest deleted too, with CURRENT pointed back
    ModelRegistry(tmp_path).set_current("v0001")
    assert register_tiny(tmp_path, seed=0) == "v0004"


def test_a_registry_that_vanishes_under_a_serving_scorer_is_said_once_and_the_model_serves_on(tmp_path, caplog):
    """A models volume unmounted (or the folder moved) under a running worker was silent: the
    loaded version served on, and nothing told the operator that no new one could arrive."""
    registry = tmp_path / "models"
    register_tiny(registry)
    scorer = HotSwapScorer(registry, "cpu", poll_interval_s=0.0, background=False)
    registry.rename(tmp_path / "moved")
    with caplog.at_level(logging.WARNING, "gpu_scorer"):
        for _ in range(3):
            scorer.maybe_reload()
    said = [r.getMessage() for r in caplog.records if "holds no registered version" in r.getMessage()]
    assert len(said) == 1 and "still serving v0001" in said[0], said
    seqs, cands = _sample(2)
    assert scorer.version == "v0001" and len(scorer.score(seqs, cands)) == 2


def test_a_parity_sample_that_is_not_an_npz_is_said_so_not_advised_to_load_unsafely(tmp_path):
    """numpy took a damaged parity.npz for a pickle and its refusal said "If you trust the file
    you can load it unsafely using allow_pickle=": advice no operator should take."""
    register_tiny(tmp_path)
    (tmp_path / "v0001" / "parity.npz").write_bytes(b"garbage, not a zip archive")
    with pytest.raises(ModelLoadError) as info:
        verify_parity(None, tmp_path / "v0001")
    assert "not a NumPy .npz archive" in str(info.value) and "unsafely" not in str(info.value)
    with pytest.raises(ValueError) as info:
        QueryStudent.from_bytes(b"garbage, not a zip archive")
    assert "not a NumPy .npz archive" in str(info.value) and "unsafely" not in str(info.value)


@pytest.mark.parametrize("pointer", ["v002", "../v0001", "", "dir", "\xff\xfe"])
def test_a_current_pointer_that_names_no_version_is_refused_and_the_served_one_kept(tmp_path, pointer, caplog):
    """An operator rolling back by hand (`echo v002 > CURRENT`, a typo) must not get the newest
    version instead without a word: the running scorer keeps what it serves and says why."""
    register_tiny(tmp_path)
    register_tiny(tmp_path, seed=1)
    ModelRegistry(tmp_path).set_current("v0001")
    failures = []
    scorer = HotSwapScorer(tmp_path, "cpu", poll_interval_s=0.0, background=False,
                           on_failure=lambda v, e: failures.append(str(e)))
    assert scorer.version == "v0001"
    (tmp_path / "CURRENT").unlink()
    if pointer == "dir":
        (tmp_path / "CURRENT").mkdir()
    else:
        (tmp_path / "CURRENT").write_bytes(pointer.encode("latin-1") + b"\n")
    scorer.maybe_reload(force=True)
    if pointer == "":  # an empty pointer is no pointer: the newest, as without CURRENT
        assert scorer.version == "v0002"
        return
    assert scorer.version == "v0001" and scorer.reload_failures == 1 and len(failures) == 1
    assert "CURRENT" in failures[0] and "still serving v0001" in caplog.text
    scorer.maybe_reload(force=True)  # the same pointer is not refused again
    assert scorer.reload_failures == 1


def test_at_start_a_current_pointer_that_names_no_version_serves_the_newest_and_says_so(tmp_path, caplog):
    register_tiny(tmp_path)
    (tmp_path / "CURRENT").write_text("v9999\n")
    assert HotSwapScorer(tmp_path, "cpu").version == "v0001"
    assert "CURRENT names 'v9999', which is not a registered version" in caplog.text


@pytest.mark.parametrize("damage", ["manifest_a_list", "parity_a_string", "manifest_deep", "vocab_longer",
                                    "vocab_of_numbers"])
def test_at_start_a_damaged_current_version_falls_back_to_the_older_one(tmp_path, damage):
    """Each of these crashed the worker and serve at start (an AttributeError, a RecursionError),
    or loaded a model that then failed every call (a vocabulary longer than its model)."""
    register_tiny(tmp_path)
    v2 = register_tiny(tmp_path, seed=1)
    manifest, vocab = tmp_path / v2 / "manifest.json", tmp_path / v2 / "vocab.json"
    if damage == "manifest_a_list":
        manifest.write_text("[]")
    elif damage == "parity_a_string":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "parity": "yes"}))
    elif damage == "manifest_deep":
        manifest.write_text("[" * 100_000 + "]" * 100_000)
    else:
        data = json.loads(vocab.read_text())
        data["items"] = data["items"] + [f"new{n}" for n in range(2000)] if damage == "vocab_longer" else \
            list(range(len(data["items"])))
        vocab.write_text(json.dumps(data))
    scorer = HotSwapScorer(tmp_path, "cpu")
    assert scorer.version == "v0001" and v2 in scorer.refused


def test_a_current_pointer_too_long_for_a_file_name_is_refused_not_raised(tmp_path):
    register_tiny(tmp_path)
    (tmp_path / "CURRENT").write_text("v" * 256)
    assert ModelRegistry(tmp_path).latest() == "v0001"
    with pytest.raises(ModelLoadError, match="not a registered version"):
        ModelRegistry(tmp_path).pointed()


def test_leftover_staging_folders_and_stray_folders_are_not_versions(tmp_path):
    """A writer killed after writing its manifest leaves ``.staging-<hex>``: it is no version,
    and its hex digits must not number the next one."""
    v1 = register_tiny(tmp_path)
    staging = tmp_path / ".staging-0badc0de9"
    staging.mkdir()
    for f in (tmp_path / v1).iterdir():
        (staging / f.name).write_bytes(f.read_bytes())
    (tmp_path / "v0004").mkdir()  # no manifest: not a version, but its name is taken
    (tmp_path / "CURRENT").unlink()
    assert ModelRegistry(tmp_path).versions() == [v1] and ModelRegistry(tmp_path).latest() == v1
    assert register_tiny(tmp_path, seed=1) == "v0005"


def test_no_model_at_start_is_an_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no model registered"):
        HotSwapScorer(tmp_path, "cpu")


def test_start_falls_back_to_the_newest_loadable_version(tmp_path):
    register_tiny(tmp_path)
    v2 = register_tiny(tmp_path, seed=1)
    (tmp_path / v2 / "model.onnx").write_bytes(b"not an onnx file")
    scorer = HotSwapScorer(tmp_path, "cpu")
    assert scorer.version == "v0001" and scorer.reload_failures == 1 and v2 in scorer.refused


def test_a_registry_whose_path_is_not_utf8_loads(tmp_path):
    """Bytes that are not UTF-8 in a path arrive as lone surrogates, which ONNX Runtime's
    constructor refused ("incompatible constructor arguments") for every version."""
    root = tmp_path / "models\udcff"
    register_tiny(root)
    assert HotSwapScorer(root, "cpu").version == "v0001"
