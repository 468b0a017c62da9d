"""bench/quant_bench.py: an int8 version of a tiny scorer is made, registered and loaded through the
registry's own parity check, scores close to fp32, and the script runs end to end (no ../shared data)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from bench_scripts import load_bench
from tiny_models import register_tiny, tiny_result

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.registry import ModelRegistry, verify_parity

pytest.importorskip("onnx")  # onnxruntime.quantization needs it (the train extra)


def _sample(n=32):
    items = list(tiny_result().vocab.items)
    rng = np.random.default_rng(4)
    return [list(rng.choice(items, 10)) for _ in range(n)], [list(rng.choice(items, 20)) for _ in range(n)]


def test_an_int8_version_passes_the_registry_check_and_ranks_like_fp32(tmp_path):
    qb = load_bench("quant_bench")
    fp32_root = tmp_path / "fp32"
    fp32_version = register_tiny(fp32_root)
    fp32_dir = fp32_root / fp32_version
    pre = qb.pre_process(fp32_dir / "model.onnx", tmp_path / "pre.onnx")
    ops = qb.quantise(pre, tmp_path / "int8.onnx", "QInt8", False)
    assert ops["MatMulInteger"] >= 1 and ops["Gemm"] == 0
    registry = ModelRegistry(tmp_path / "int8")
    version = qb.register_quantised(fp32_dir, tmp_path / "int8.onnx", registry, {"weight_type": "QInt8"})
    manifest = registry.manifest(version)
    assert manifest["parity"]["reference"] == qb.PARITY_REFERENCE
    assert manifest["config"] == ModelRegistry(fp32_root).manifest(fp32_version)["config"]
    assert registry.latest() == version  # the only version, though not made CURRENT

    int8 = registry.load(version, "cpu", threads=1)  # the registry's own load, parity verified
    fp32 = ModelRegistry(fp32_root).load(fp32_version, "cpu", threads=1)
    seqs, cands = _sample()
    a, b = np.stack(fp32.score(seqs, cands)), np.stack(int8.score(seqs, cands))
    assert not np.array_equal(a, b)  # it is another graph
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    top_a, top_b = np.argsort(-a, axis=1)[:, :5], np.argsort(-b, axis=1)[:, :5]
    assert np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top_a, top_b, strict=True)]) > 0.8

    # the check still bites: the int8 graph does not meet the fp32 PyTorch reference
    with pytest.raises(ModelLoadError, match="differ from the PyTorch reference"):
        verify_parity(int8, fp32_dir)


def test_the_script_runs_end_to_end_without_quality(tmp_path, capsys):
    qb = load_bench("quant_bench")
    fp32_root = tmp_path / "fp32"
    register_tiny(fp32_root)
    report = tmp_path / "report.json"
    code = qb.main(["--model", str(fp32_root), "--variants", "s8,u8", "--quality", "none", "--batches", "4,8",
                    "--cands", "5", "--rounds", "2", "--round-seconds", "0.01", "--warmup", "1",
                    "--profile-calls", "2", "--out", str(tmp_path / "out"), "--json-out", str(report)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "fastest int8 variant:" in out and "where the time goes" in out
    data = json.loads(report.read_text())
    assert [s["batch"] for s in data["speed"]] == [4, 8]
    assert set(data["speed"][0]["rows"]) == {"fp32", "fp32-pre", "s8", "u8"}
    assert all(r["cpu_us_per_user"] > 0 for s in data["speed"] for r in s["rows"].values())
    assert data["fastest"] in ("s8", "u8") and data["verdict"] is None and data["quality"] == {}
    assert ModelRegistry(tmp_path / "out" / "registry").versions() == ["v0001", "v0002"]
