"""Every OnlineLearner in online_models passes the conformance suite (online_models.checks).

Learner classes are discovered: every module of the package is imported, then every
concrete subclass of OnlineLearner is checked, so a new learner is covered by adding it.
"""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import online_models
from online_models.base import learner_classes
from online_models.checks import learner_instance, yield_checks

for _module in pkgutil.iter_modules(online_models.__path__):
    importlib.import_module(f"online_models.{_module.name}")

LEARNERS = learner_classes()
CASES = [
    pytest.param(cls, check, id=f"{cls.__name__}-{check.__name__}")
    for cls in LEARNERS
    for check in yield_checks(learner_instance(cls))
]


def test_the_standard_learners_are_discovered():
    names = {cls.name for cls in LEARNERS}
    assert {"covisit", "mf", "trending", "popularity", "recent_popularity"} <= names


@pytest.mark.parametrize("cls, check", CASES)
def test_conformance(cls, check):
    check(learner_instance(cls))
