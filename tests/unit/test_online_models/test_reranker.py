"""The re-ranker's plain-Python logistic regression learns what River's did."""

from __future__ import annotations

import random

import numpy as np
import pytest
from river import linear_model, optim

from online_models import codec
from online_models.reranker import ClickReranker, LogisticSGD


def _rows(n: int, width: int, seed: int) -> list[tuple[list[float], bool]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = [rng.uniform(-3, 3) if rng.random() < 0.8 else 0.0 for _ in range(width)]
        out.append((x, rng.random() < 0.3 + 0.1 * (x[0] > 0)))
    return out


@pytest.mark.parametrize("l2", [0.0, 1e-4, 0.05])
def test_same_weights_as_rivers_logistic_regression(l2):
    names = [f"f{j}" for j in range(15)]
    ours = LogisticSGD(learning_rate=0.05, l2=l2)
    river = linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=l2)
    for x, y in _rows(3000, len(names), seed=7):
        ours.learn_row(names, x, y)
        river.learn_one(dict(zip(names, x, strict=True)), y)
    assert ours.weights.keys() == river.weights.keys()
    for name, w in river.weights.items():
        assert ours.weights[name] == pytest.approx(w, rel=1e-9, abs=1e-12)
    assert ours.intercept == pytest.approx(river.intercept, rel=1e-9, abs=1e-12)


def test_saturated_logits_follow_rivers_gradient():
    """Beyond |logit| 18 River's log-loss gradient switches formula; so does ours."""
    for clicked in (True, False):
        ours = LogisticSGD(learning_rate=1.0)
        river = linear_model.LogisticRegression(optimizer=optim.SGD(1.0), l2=0.0)
        for value in (40.0, -40.0, 25.0, -19.0, 3.0):
            ours.learn_row(["a"], [value], clicked)
            river.learn_one({"a": value}, clicked)
            assert ours.weights["a"] == pytest.approx(river.weights["a"], rel=1e-12)
            assert ours.intercept == pytest.approx(river.intercept, rel=1e-12)


def test_a_snapshot_holding_rivers_model_restores_its_weights():
    """Snapshots written before LogisticSGD hold River's LogisticRegression: restored, the
    re-ranker keeps its weights and intercept and goes on learning."""
    rr = ClickReranker(min_samples=1)
    river = linear_model.LogisticRegression(optimizer=optim.SGD(0.05), l2=1e-4)
    for x, y in _rows(500, 3, seed=1):
        river.learn_one(dict(zip(["a", "b", "c"], x, strict=True)), y)
    rr.model = river  # what the older code kept
    rr.n_learned, rr.n_positives = 500, 150
    back = codec.decode(codec.encode(rr))
    assert isinstance(back.model, LogisticSGD)
    assert back.model.weights == pytest.approx(river.weights)
    assert back.model.intercept == river.intercept
    p = back.score(["a", "b", "c"], np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    assert p is not None and np.isfinite(p).all()
    back.learn_rows(["a", "b", "c"], ["i1", "i2"], np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), "i1")
    assert back.n_learned == 502
