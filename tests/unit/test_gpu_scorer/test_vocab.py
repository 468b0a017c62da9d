"""Vocabulary: rows, persistence, and the defined fallback for unknown items."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import register_tiny, tiny_result

from gpu_scorer.vocab import OOV_ROW, PAD_ROW, Vocab


def test_rows_frequency_order_and_oov():
    v = Vocab.build(["b", "a", "b", "c", "b", "a"])
    assert v.items == ("b", "a", "c")
    assert v.rows(["a", "zzz"]) == [3, OOV_ROW]
    assert len(v) == 5 and PAD_ROW == 0
    with pytest.raises(KeyError, match="OOV"):
        v.item(OOV_ROW)


def test_min_count_sends_rare_items_to_oov():
    v = Vocab.build(["a", "a", "b"], min_count=2)
    assert v.row("b") == OOV_ROW and "b" not in v


def test_save_load_round_trip(tmp_path):
    v = Vocab.build(["x", "y", "y"])
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json") == v
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a streamrec vocabulary"):
        Vocab.load(tmp_path / "bad.json")
    # JSON of another shape: said as such, not as "'list' object has no attribute 'get'"
    for other in ("[]", '{"format": "streamrec-vocab-v1", "items": 7}'.replace("streamrec-vocab-v1", v.to_json()["format"])):
        (tmp_path / "bad.json").write_text(other)
        with pytest.raises(ValueError, match="not a streamrec vocabulary"):
            Vocab.load(tmp_path / "bad.json")


def test_unknown_items_score_through_the_oov_row(tmp_path):
    from gpu_scorer.runtime import OnnxScorer

    register_tiny(tmp_path)
    scorer = OnnxScorer("latest", "cpu", model_dir=tmp_path)
    known = list(tiny_result().vocab.items[:5])
    [with_unknown, only_unknown] = scorer.score([known, ["never-seen-1", "never-seen-2"]], [known + ["new-item"], ["new-item", known[0]]])
    assert with_unknown.shape == (6,) and np.isfinite(with_unknown).all()
    assert np.isfinite(only_unknown).all()
    # the OOV row is the mean of the rarest items: an unknown candidate is not the favourite
    assert with_unknown[-1] < with_unknown[:-1].max()
