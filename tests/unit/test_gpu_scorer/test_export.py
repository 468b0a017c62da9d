"""ONNX export: dynamic axes and ORT-vs-PyTorch parity on several shapes (atol 1e-4)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from tiny_models import tiny_result

from gpu_scorer.export import PARITY_ATOL, check_parity, export_onnx, random_inputs, torch_scores
from gpu_scorer.runtime import make_session


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_result().model
    return model, export_onnx(model, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_graph_has_dynamic_batch_sequence_and_candidate_axes(exported):
    _, path = exported
    graph = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*graph.input, *graph.output]}
    assert dims == {"seq_ids": ["batch", "seq_len"], "cand_ids": ["batch", "n_cands"], "scores": ["batch", "n_cands"]}


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 5), (7, 12, 40), (64, 12, 100), (3, 9, 1)])
def test_parity_with_pytorch(exported, shape):
    model, path = exported
    session = make_session(path, "cpu")
    seq, cand = random_inputs(model, *shape, np.random.default_rng(sum(shape)))
    got = session.run(["scores"], {"seq_ids": seq, "cand_ids": cand})[0]
    np.testing.assert_allclose(got, torch_scores(model, seq, cand), atol=PARITY_ATOL, rtol=1e-4)


def test_check_parity_reports_and_detects_a_different_model(exported):
    model, path = exported
    result = check_parity(model, path)
    assert result.ok and result.max_abs_diff < PARITY_ATOL and result.provider == "CPUExecutionProvider"
    other = tiny_result(1).model
    assert not check_parity(other, path).ok


def test_a_model_whose_scores_are_nan_fails_parity_and_says_so(tmp_path):
    """A model trained into NaN (a learning rate of inf) scores NaN in both runtimes: parity
    fails, and its largest difference reads nan, not 0."""
    import torch

    model = copy.deepcopy(tiny_result(2).model)  # the cached one is shared: other tests register it
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    result = check_parity(model, export_onnx(model, tmp_path / "model.onnx"))
    assert not result.ok and np.isnan(result.max_abs_diff)
