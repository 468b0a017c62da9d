"""Docstring examples of gpu_scorer run as tests."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["gpu_scorer.model", "gpu_scorer.vocab", "gpu_scorer.registry", "gpu_scorer.coalescing", "gpu_scorer.layout",
           "gpu_scorer.training", "gpu_scorer.retraining"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


def test_gpu_scorer_never_imports_stream_faust_or_redis():
    import subprocess
    import sys

    code = (
        "import sys, gpu_scorer, gpu_scorer.train_cli, gpu_scorer.registry, gpu_scorer.coalescing, gpu_scorer.training;"
        "bad = [m for m in ('faust', 'redis', 'stream') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
