"""Training: windows, hold-out split, metrics, determinism."""

from __future__ import annotations

import copy

import numpy as np
import torch
from tiny_models import tiny_result, tiny_train

from gpu_scorer.training import rank_metrics, split_last, windows
from gpu_scorer.vocab import FIRST_ITEM_ROW


def test_windows_cover_every_transition_left_padded():
    x, y = windows([[1, 2, 3], list(range(2, 9))], max_len=4)
    targets = sorted(int(t) for t in y[y != 0])
    assert targets == [2, 3, 3, 4, 5, 6, 7, 8]
    assert (x[0] == [0, 0, 1, 2]).all() and (y[0] == [0, 0, 2, 3]).all()


def test_split_holds_out_the_last_item():
    train, valid = split_last({"u1": ["a", "b", "c"], "u2": ["a", "b"], "u3": ["a"]})
    assert train == [["a", "b"], ["a", "b"]]
    assert valid == [(["a", "b"], "c")]


def test_metrics_and_history():
    res = tiny_result()
    assert 0.0 <= res.metrics["val_hr@10"] <= 1.0
    assert res.metrics["val_ndcg@10"] <= res.metrics["val_hr@10"]
    assert len(res.history) == res.metrics["epochs_run"] and res.data["items"] > 0


def test_same_seed_same_model_other_seed_other_model():
    a, b = tiny_result(0), tiny_train(0)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k
    assert a.metrics["val_ndcg@10"] == b.metrics["val_ndcg@10"]
    c = tiny_result(1)
    assert not torch.equal(a.model.item_emb.weight, c.model.item_emb.weight)



def test_sampled_softmax_trains_and_rare_items_share_the_oov_row():
    from tiny_models import TINY, tiny_sequences

    from gpu_scorer.training import TrainConfig, train
    from gpu_scorer.vocab import OOV_ROW

    seqs = tiny_sequences()
    tc = TrainConfig(epochs=1, batch_size=64, loss="sampled", n_negatives=32, min_item_count=3, progress=False)
    res = train(seqs, TINY, tc)
    assert 0.0 <= res.metrics["val_hr@10"] <= 1.0 and res.history[0]["loss"] > 0
    counts = {}
    for s in seqs.values():
        for it in s:
            counts[it] = counts.get(it, 0) + 1
    rare = [it for it, n in counts.items() if n == 1]
    assert rare and all(res.vocab.row(it) == OOV_ROW for it in rare)


def test_a_diverged_model_scores_no_hit():
    """NaN scores compare false with everything: every target ranked first, so a diverged
    epoch scored a perfect HR@10 and early stopping kept it."""
    model = copy.deepcopy(tiny_result(0).model)
    max_len = model.pos_emb.shape[0]
    inputs = np.full((8, max_len), FIRST_ITEM_ROW, dtype=np.int64)
    targets = np.arange(FIRST_ITEM_ROW, FIRST_ITEM_ROW + 8, dtype=np.int64)
    assert rank_metrics(model, inputs, targets)["hr@10"] > 0
    with torch.no_grad():
        model.item_emb.weight.fill_(float("nan"))
    assert rank_metrics(model, inputs, targets) == {"hr@10": 0.0, "ndcg@10": 0.0}
