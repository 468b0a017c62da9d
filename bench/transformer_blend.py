"""RESEARCH, not what the worker serves: SessionHybrid + the project's Transformer (SASRec),
a two-family ensemble for the session-rec protocol. Nothing here is built by
``RecommendationStep.from_settings``; figures from it are reported as research contenders,
apart from the served figure (``streamrec evaluate``, contender ``served``).

The neighbourhood model (:class:`~online_models.session_knn.SessionHybrid`) and the
Transformer (:class:`gpu_scorer.model.SASRecScorer`) err on different clicks: kNN votes
only for items that co-occurred with the session's items in recent sessions, the
Transformer generalises through item embeddings and reads the order of the whole session.
:func:`blend_scores` adds the two scores:

    score(i) = hybrid(i) + weight * (p(i) / max p) ** exponent

where ``hybrid`` is SessionHybrid's score (kNN normalised to a maximum of 1, plus rules
and the reminder of the session's own items) and ``p`` is the Transformer's softmax
probability of ``i`` over all items it knows (averaged over ``n_models`` seeds,
:class:`SequenceModel`), kept for its ``top_n`` best items; the best one scores ``weight``,
and an exponent below 1 flattens the rest (being among the Transformer's best items counts
more than how confident it is). Candidates: the union of both models' items.

The Transformer is trained once on the training log, with early stopping on held-out last
clicks of training sessions (``gpu_scorer.training``), then frozen.

The weight, exponent, ``top_n`` and ``n_models`` were chosen on ``train_tr`` -> ``train_valid``
(validation split only) by bench/blend_search.py:

    .venv/bin/python bench/blend_search.py -d ../shared/data/yoochoose-100k

Needs torch (the ``gpu_scorer`` dependencies); imported only when a model is trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: Transformer hyper-parameters (bench/scorer_quality.py's defaults: dim 64, 2 blocks).
MODEL_CONFIG: Mapping[str, Any] = {"dim": 64, "n_blocks": 2, "n_heads": 2, "max_len": 50, "dropout": 0.2}
#: Training: full softmax, early stopping on 2,000 held-out last clicks, patience 3.
TRAIN_CONFIG: Mapping[str, Any] = {"epochs": 30, "patience": 3, "lr": 3e-3, "batch_size": 128, "eval_users": 2000}
#: Blend weight and exponent of the Transformer, how many of its items take part and how
#: many models (seeds) are averaged (tuned on validation, docs/evaluation.md).
TUNED_WEIGHT = 0.75
TUNED_EXPONENT = 0.25
TUNED_TOP_N = 100
TUNED_MODELS = 3


class SequenceModel:
    """Trained SASRec models (one per seed, trained on the same log) with their
    vocabularies: ``probabilities(recent_items, n)`` gives the ``n`` most probable next
    items with their softmax probability over all items a model knows, averaged over the
    models (an item a model does not know counts 0 for it; the vocabularies differ only
    by the few items the seeded validation hold-out removed)."""

    def __init__(self, models: Sequence[Any], vocabs: Sequence[Any], metrics: Sequence[Mapping[str, Any]] = (),
                 cache_size: int = 4096):
        import torch

        from gpu_scorer.vocab import FIRST_ITEM_ROW

        if not models or len(models) != len(vocabs):
            raise ValueError("a SequenceModel needs one vocabulary per model, and at least one model")
        self.models = [m.eval() for m in models]
        self.vocabs = list(vocabs)
        self.metrics = [dict(m) for m in metrics]
        self.max_len = min(m.cfg.max_len for m in self.models)
        self.items: list[str] = list(dict.fromkeys(it for v in self.vocabs for it in v.items))
        column = {it: c for c, it in enumerate(self.items)}
        #: for each model, the common column of each of its item rows
        self._columns = [torch.tensor([column[it] for it in v.items], dtype=torch.long) for v in self.vocabs]
        self._first = FIRST_ITEM_ROW
        self.cache_size = cache_size
        self._cache: dict[tuple[tuple[str, ...], int], list[tuple[str, float]]] = {}

    @classmethod
    def fit(cls, sequences: Mapping[str, Sequence[str]], seeds: Sequence[int] = (0,),
            model_config: Mapping[str, Any] | None = None, train_config: Mapping[str, Any] | None = None,
            threads: int | None = 1) -> SequenceModel:
        """Train one model per seed on ``{session: items in time order}`` (sessions of one
        item are dropped by the trainer). ``threads`` sets torch's CPU threads (None: as is)."""
        import torch

        from gpu_scorer.training import TrainConfig, train

        if threads is not None:
            torch.set_num_threads(threads)
        models, vocabs, metrics = [], [], []
        for seed in seeds:
            tc = TrainConfig(**{**TRAIN_CONFIG, **(train_config or {}), "seed": seed, "progress": False})
            result = train(sequences, {**MODEL_CONFIG, **(model_config or {})}, tc)
            models.append(result.model)
            vocabs.append(result.vocab)
            metrics.append({"seed": seed, **result.metrics})
        return cls(models, vocabs, metrics)

    def probabilities(self, recent_items: Sequence[str], n: int) -> list[tuple[str, float]]:
        """The ``n`` most probable next items, best first (an empty history: none)."""
        key = (tuple(recent_items[-self.max_len:]), n)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        out = self._compute(key[0], n) if key[0] else []
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[key] = out
        return out

    def _compute(self, recent: tuple[str, ...], n: int) -> list[tuple[str, float]]:
        import torch

        from gpu_scorer.training import left_pad

        probs = torch.zeros(len(self.items))
        first = self._first
        with torch.inference_mode():
            for model, vocab, columns in zip(self.models, self.vocabs, self._columns, strict=True):
                x = torch.from_numpy(left_pad([vocab.rows(list(recent))], self.max_len))
                logits = model.encode_last(x)[0] @ model.item_emb.weight[first:].T
                probs.index_add_(0, columns, torch.softmax(logits, dim=0))
            probs /= len(self.models)
            top = torch.topk(probs, min(n, len(self.items)))
        return [(self.items[int(c)], float(p)) for p, c in zip(top.values, top.indices, strict=True)]


def blend_scores(hybrid: Mapping[str, float], transformer: Sequence[tuple[str, float]], weight: float,
                 exponent: float = 1.0) -> dict[str, float]:
    """``hybrid(i) + weight * (p(i) / max p) ** exponent`` over the union of both models' items.

    >>> blend_scores({"a": 1.0, "b": 0.5}, [("b", 0.4), ("c", 0.2)], weight=1.0)
    {'a': 1.0, 'b': 1.5, 'c': 0.5}
    >>> blend_scores({}, [("b", 0.4), ("c", 0.1)], weight=1.0, exponent=0.5)
    {'b': 1.0, 'c': 0.5}
    """
    out = dict(hybrid)
    if not transformer or weight == 0:
        return out
    top = max(p for _, p in transformer)
    if top <= 0:
        return out
    for item, p in transformer:
        out[item] = out.get(item, 0.0) + weight * (p / top) ** exponent
    return out


__all__ = ["MODEL_CONFIG", "TRAIN_CONFIG", "TUNED_EXPONENT", "TUNED_MODELS", "TUNED_TOP_N", "TUNED_WEIGHT", "SequenceModel",
           "blend_scores"]
