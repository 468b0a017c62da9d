"""Docstring examples are tests: a module's examples that stop being true fail here."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ["stream", "online_models", "gpu_scorer"]
# every module of the three packages, so a new module's examples are run without a list to keep
MODULES = sorted(
    info.name
    for package in PACKAGES
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, prefix=f"{package}.")
)


def test_the_modules_with_examples_are_found():
    assert {"stream.records", "stream.state", "online_models.metrics", "online_models.datasets"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run: python -m doctest -v {module.__file__})"
