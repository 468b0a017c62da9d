"""Docstring examples are tests: a module's examples that stop being true fail here."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stream.records",
    "stream.settings",
    "stream.topics",
    "stream.produce",
    "stream.tail",
    "online_models.datasets",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (run: python -m doctest -v {module.__file__})"
