"""The Transformer itself: shapes, causality, padding invariance, the last-position shortcut."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_scorer.model import SASRecScorer, ScorerConfig


@pytest.fixture(scope="module")
def model() -> SASRecScorer:
    torch.manual_seed(0)
    return SASRecScorer(ScorerConfig(n_items=40, dim=16, n_heads=2, n_blocks=2, max_len=10)).eval()


def test_forward_shapes(model):
    for b, n, c in [(1, 1, 1), (3, 10, 7), (5, 4, 20)]:
        out = model(torch.randint(1, 40, (b, n)), torch.randint(1, 40, (b, c)))
        assert out.shape == (b, c) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_future_positions_do_not_change_earlier_hidden_states(model):
    seq = torch.randint(2, 40, (2, 10))
    changed = seq.clone()
    changed[:, 6:] = torch.randint(2, 40, (2, 4))
    with torch.no_grad():
        a, b = model.encode_all(seq), model.encode_all(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_last_position_shortcut_equals_full_computation(model):
    seq = torch.randint(1, 40, (4, 10))
    seq[0, :7] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.encode_last(seq), model.encode_all(seq)[:, -1], atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(items=st.lists(st.integers(2, 39), min_size=1, max_size=10), pad=st.integers(0, 9))
def test_score_does_not_depend_on_left_padding(model, items, pad):
    cands = torch.arange(2, 40)[None]
    bare = torch.tensor([items])
    padded = torch.tensor([[0] * min(pad, 10 - len(items)) + items])
    with torch.no_grad():
        torch.testing.assert_close(model(bare, cands), model(padded, cands), atol=1e-4, rtol=1e-4)


def test_padding_candidate_scores_zero(model):
    with torch.no_grad():
        out = model(torch.tensor([[3, 4]]), torch.tensor([[5, 0]]))
    assert out[0, 1].item() == 0.0


def test_config_validates_heads_and_round_trips():
    with pytest.raises(ValueError, match="divisible"):
        ScorerConfig(n_items=10, dim=10, n_heads=3)
    cfg = ScorerConfig(n_items=10, dim=8)
    assert ScorerConfig.from_dict({**cfg.to_dict(), "unknown": 1}) == cfg
