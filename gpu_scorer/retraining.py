"""Retrain the Transformer on what the stream has seen so far: one fit, registered.

The online learners learn every event as it comes; the Transformer knows only the log it was
trained on. :class:`Retrainer` trains a new one, with the architecture of the version it
replaces, on every interaction up to now (the training log and the events since), exports
it, checks ONNX Runtime against PyTorch and registers it as ``CURRENT``: running workers
hot-swap to it within seconds (gpu_scorer/hotswap.py). With a ``gate_tolerance`` (``streamrec
retrain``'s champion/challenger gate) it is made ``CURRENT`` only when its validation HR@10 is no
worse than that of the version ``CURRENT`` names, on the same held-out events, by more than the
tolerance; otherwise it is registered and ``CURRENT`` stays (:meth:`Retrainer.gate`). ``streamrec retrain`` does that
every ``--every`` seconds over the events topics (stream/retrain_cli.py), and ``streamrec
evaluate --retrain-every`` does it at the same interval of the log's own time, so that what is
measured is what such a deployment serves (docs/evaluation.md).

Torch-bound, like :mod:`gpu_scorer.training`: imported only by the commands that train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.export import export_and_register
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.training import (
    TrainConfig,
    TrainResult,
    rank_metrics,
    scorer_rank_metrics,
    sequences_from_interactions,
    train,
    validation_rows,
)

#: the architecture's fields a retrained model copies from the version it replaces
ARCHITECTURE = ("dim", "n_blocks", "n_heads", "max_len", "dropout", "ffn_mult")
#: the figure the gate compares: the validation metric training reports (``val_hr@10``)
GATE_METRIC = "hr@10"


def architecture_of(registry: ModelRegistry, version: str | None = None) -> dict:
    """The architecture of ``version`` (default: the current one), as ``train``'s model config;
    empty (the defaults) when the registry holds no version yet."""
    version = version or registry.latest()
    if version is None:
        return {}
    config = registry.manifest(version).get("config", {})
    return {key: config[key] for key in ARCHITECTURE if key in config}


class Retrainer:
    """Fits a Transformer on interactions and registers it in ``registry``.

    ``model_config``: the architecture (``architecture_of`` the served version, so a retrained
    model is the same model on more data); ``train_config``: ``streamrec train``'s defaults
    unless given (progress bar off); ``threads``: PyTorch's CPU threads while fitting (1, as
    ``streamrec train``: this model's matrices are too small to gain from more); ``gate_tolerance``:
    None (every fit that passes its parity check becomes ``CURRENT``), or how much lower than
    the ``CURRENT`` version's a fit's held-out HR@10 may be and still replace it (:meth:`gate`)."""

    def __init__(self, registry: ModelRegistry, model_config: Mapping | None = None,
                 train_config: TrainConfig | None = None, serve_device: str = "cpu", threads: int = 1,
                 gate_tolerance: float | None = None) -> None:
        self.registry = registry
        self.model_config = dict(model_config or {})
        self.train_config = train_config or TrainConfig(progress=False)
        self.serve_device = serve_device
        self.threads = threads
        self.gate_tolerance = gate_tolerance

    def fit(self, interactions: Sequence, data: Mapping | None = None, console=None,
            overrule: str | None = None) -> tuple[str, dict]:
        """Train on ``interactions`` (``online_models.Interaction``, any order), register the
        model as ``CURRENT`` (with a ``gate_tolerance``: only when it passes :meth:`gate`);
        returns ``(version, its metrics)``, the metrics with ``"gate"``, the gate's record (also
        the manifest's ``gate``), when a gate was run. ``overrule``: why the fit must replace
        ``CURRENT`` whatever the gate says (an erasure ``CURRENT`` does not honour): the gate's
        figures are still recorded, with ``overruled``. Raises ``ValueError`` when no user has two
        interactions, :class:`ModelLoadError` when the export's parity check failed (the version
        is written for inspection, not made current)."""
        sequences = sequences_from_interactions(interactions)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # for this fit only: the caller's setting comes back after it
        try:
            result = train(sequences, self.model_config, self.train_config, console=console)
            gate = self.gate(result) if self.gate_tolerance is not None else None
            if gate is not None and overrule is not None:
                gate["overruled"] = overrule
        finally:
            torch.set_num_threads(threads)
        version, parity = export_and_register(result, self.registry,
                                              {"events": len(interactions), "retrained": True, **(data or {})},
                                              make_current=gate is None or gate["passed"] or overrule is not None,
                                              extra=None if gate is None else {"gate": gate})
        if not parity["ok"]:
            raise ModelLoadError(f"retrained version {version} failed its parity check "
                                 f"(max |diff| {parity['max_abs_diff']:.2e}); the current version stays")
        return version, result.metrics if gate is None else {**result.metrics, "gate": gate}

    def gate(self, result: TrainResult) -> dict | None:
        """Champion/challenger: the fit's HR@10 and the ``CURRENT`` version's, on the fit's own
        held-out events (``result.validation``: each validation user's last item, after the
        items before it), each model reading them through its own vocabulary (an item the
        ``CURRENT`` version lacks is a miss for it) and ranking the item among all of its items
        (:func:`~gpu_scorer.training.rank_metrics`). ``passed`` when the fit's figure is at
        least the ``CURRENT`` one's minus ``gate_tolerance``. None without a ``CURRENT``
        (the first model: no gate). A ``CURRENT`` that names no registered version, or whose
        version does not load (no worker serves it), passes the fit, with ``current_error``;
        no held-out event (no user with three) holds it back: nothing shows it is no worse."""
        try:
            current, error = self.registry.pointed(), None
        except ModelLoadError as exc:
            current, error = None, str(exc)
        if current is None and error is None:
            return None
        new, held_out = self._new_figure(result), len(result.validation)
        if error is not None:  # CURRENT names no registered version: nothing is served from it
            return self._gate_record(None, new, None, held_out, True, error)
        if not held_out:
            return self._gate_record(current, new, None, 0, False, None)
        try:
            served = self.registry.load(current, "cpu", threads=self.threads)
        except ModelLoadError as exc:  # the workers refuse it too: the fit can only do better
            return self._gate_record(current, new, None, held_out, True, str(exc))
        old = scorer_rank_metrics(served, result.validation)[GATE_METRIC]
        return self._gate_record(current, new, old, held_out, new >= old - self.gate_tolerance, None)

    @staticmethod
    def _new_figure(result: TrainResult) -> float:
        """The fit's HR@10 on its held-out events, as trained (the weights it registers)."""
        if not result.validation:
            return 0.0
        inputs, targets = validation_rows(result.validation, result.vocab, result.config.max_len)
        return rank_metrics(result.model, inputs, targets)[GATE_METRIC]

    def _gate_record(self, current: str | None, new: float | None, old: float | None, held_out: int,
                     passed: bool, error: str | None) -> dict:
        record = {"metric": GATE_METRIC, "held_out": held_out, "tolerance": self.gate_tolerance,
                  "current": current, f"current_{GATE_METRIC}": old, f"new_{GATE_METRIC}": new, "passed": passed}
        if error is not None:
            record["current_error"] = error
        return record

    def load(self, version: str):
        """The registered ``version``, loaded and parity-checked as a worker loads it."""
        return self.registry.load(version, self.serve_device)


__all__ = ["ARCHITECTURE", "GATE_METRIC", "Retrainer", "architecture_of"]
