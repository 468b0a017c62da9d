"""The worker needs no torch: ``pip install streamrec`` serves a registered Transformer with
ONNX Runtime alone, and ``streamrec train`` without the train extra says what to install.

Each check runs in a fresh interpreter where torch (the train extra) cannot be imported, as
in an install without extras (onnx is a core dependency: it writes the text model's graph); the model is trained and registered here, with
torch, as ``streamrec train`` would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("torch")  # to make the model the worker serves

# An import finder that answers like an environment where these packages are not installed.
WITHOUT_TRAIN_EXTRA = textwrap.dedent(
    """
    import sys

    class NotInstalled:
        names = ("torch",)

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.names:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    """
)

TORCH_BOUND = ("torch", "gpu_scorer.model", "gpu_scorer.training", "gpu_scorer.export")


def run_without_train_extra(code: str, cwd, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN_EXTRA + textwrap.dedent(code)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
        env={**os.environ, "STREAMREC_SCORER_THREADS": "1", **(env or {})},
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tiny_models import register_tiny

    path = tmp_path_factory.mktemp("models")
    register_tiny(path)
    return path


def test_the_finder_hides_torch(tmp_path):
    out = run_without_train_extra("import torch", tmp_path)
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in out.stderr


def test_the_worker_builds_and_scores_without_torch(tmp_path, model_dir):
    out = run_without_train_extra(
        f"""
        import asyncio, json, sys

        import stream.app, stream.cli  # everything `streamrec worker` imports
        from gpu_scorer import HotSwapScorer, MicroBatcher, ModelRegistry, OnnxScorer
        from stream.settings import Settings

        # the worker's app, with the scorer loaded from the registry (connects to nothing)
        app = stream.app.create_app(Settings.from_env({{"STREAMREC_MODEL_DIR": {str(model_dir)!r}}}))
        hot = HotSwapScorer(ModelRegistry({str(model_dir)!r}), device="auto", background=False)
        direct = OnnxScorer({str(model_dir / "v0001")!r}, "cpu")

        async def batched():
            async with MicroBatcher(hot, max_batch=8, max_wait_ms=1) as batcher:
                return await asyncio.gather(*(batcher.score(["i1", "i2"][:n], ["i3", "i4", "never-seen"]) for n in range(3)))

        scores = [s.tolist() for s in asyncio.run(batched())]
        print(json.dumps({{"scores": scores, "direct": direct.score([["i1"]], [["i3", "i4", "never-seen"]])[0].tolist(),
                           "provider": hot.provider, "version": hot.version, "max_len": direct.max_len,
                           "worker_scorer": [app.streamrec.step.scorer.version, app.streamrec.step.scorer.provider],
                           "loaded": [m for m in {TORCH_BOUND!r} if m in sys.modules]}}))
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [], f"the serving path imported {seen['loaded']}"
    assert seen["version"] == "v0001" and seen["provider"] == "CPUExecutionProvider"
    assert seen["worker_scorer"] == ["v0001", "CPUExecutionProvider"]
    assert len(seen["scores"]) == 3 and all(len(s) == 3 for s in seen["scores"])
    assert seen["scores"][1] == pytest.approx(seen["direct"], rel=1e-4, abs=1e-4)
    assert seen["max_len"] == 12  # from the manifest: tiny_models.TINY


def test_a_bare_exported_model_is_read_without_onnx(tmp_path, model_dir):
    """Without a manifest, max_len comes from the ONNX file's metadata, read by ONNX Runtime."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.onnx", "vocab.json"):
        (bare / name).write_bytes((model_dir / "v0001" / name).read_bytes())
    out = run_without_train_extra(
        f"""
        from gpu_scorer import OnnxScorer
        print(OnnxScorer({str(bare / "model.onnx")!r}, "cpu").max_len)
        """,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-1] == "12"


def test_streamrec_train_without_torch_names_the_extra(tmp_path):
    out = run_without_train_extra(
        """
        import sys
        from stream.cli import main
        sys.argv = ["streamrec", "train", "--no-progress"]
        main()
        """,
        tmp_path,
    )
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == "streamrec train needs torch, not installed here: pip install 'streamrec[train]'"
    assert not (tmp_path / "models").exists()


def test_train_help_needs_no_torch(tmp_path):
    out = run_without_train_extra(
        """
        import sys
        from stream.cli import main
        sys.argv = ["streamrec", "train", "--help"]
        main()
        """,
        tmp_path,
        env={"COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stderr
    assert "--model-dir" in out.stdout


def test_the_worker_does_not_load_torch_where_it_is_installed(tmp_path):
    """Where the train extra is installed, the worker still does not pay for importing torch."""
    code = f"import sys, gpu_scorer, stream.app, stream.cli; print([m for m in {TORCH_BOUND!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[]"
