"""Retrain the Transformer on what the stream has seen so far: one fit, registered.

The online learners learn every event as it comes; the Transformer knows only the log it was
trained on. :class:`Retrainer` trains a new one, with the architecture of the version it
replaces, on every interaction up to now (the training log and the events since), exports
it, checks ONNX Runtime against PyTorch and registers it as ``CURRENT``: running workers
hot-swap to it within seconds (gpu_scorer/hotswap.py). With a ``gate_tolerance`` (``streamrec
retrain``'s champion/challenger gate) it is made ``CURRENT`` unless its HR@10 is worse than that
of the version ``CURRENT`` names, on the same held-out events, by more than the tolerance and by
more than chance explains (a paired sign test); then it is registered and ``CURRENT`` stays
(:meth:`Retrainer.gate`). The held-out events
are ones neither model trained on: each sampled user's last event *newer than the data the
``CURRENT`` version was fitted on* (its manifest's ``data.trained_through``) and not dated ahead
of the fit's clock, set aside from the fit. Scored on events it had trained on, ``CURRENT`` would
win by memory: on YooChoose it had 0.735 against 0.627 on the fit's own validation users, and
held back a fit on a day more data. A version's ``data.trained_through`` is the newest ``ts`` it
trained on that is not ahead of its fit's clock: with the newest of all, one event dated a day
ahead (a producer's clock, a log dated in the future) left no event newer than it for the next
gates, undecided until that day came. The version made ``CURRENT`` has not trained on the
held-out events (at most 2,000, each a user's last one): the next fit does. ``streamrec retrain`` does that
every ``--every`` seconds over the events topics (stream/retrain_cli.py), and ``streamrec
evaluate --retrain-every`` does it at the same interval of the log's own time, so that what is
measured is what such a deployment serves (docs/evaluation.md).

Torch-bound, like :mod:`gpu_scorer.training`: imported only by the commands that train.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch

from gpu_scorer.errors import ModelLoadError
from gpu_scorer.export import export_and_register
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.training import (
    TRAINED_KINDS,
    TrainConfig,
    TrainResult,
    model_ranks,
    sample_users,
    scorer_ranks,
    sequences_from_interactions,
    train,
    trained_through,
    validation_rows,
)
from online_models.datasets import sequences_by_user

#: the architecture's fields a retrained model copies from the version it replaces
ARCHITECTURE = ("dim", "n_blocks", "n_heads", "max_len", "dropout", "ffn_mult")
#: the figure the gate compares: the validation metric training reports (``val_hr@10``)
GATE_METRIC = "hr@10"
#: the list length of :data:`GATE_METRIC`
GATE_K = 10
#: the fewest held-out events the gate compares on; with fewer it lets the fit through (undecided)
MIN_GATE_EVENTS = 50
#: a fit is held back only when ``CURRENT``'s lead is this unlikely to be chance (one-sided, on
#: the events one model hits and the other misses: :func:`paired_p_value`)
GATE_SIGNIFICANCE = 0.05


def paired_p_value(current_only: int, new_only: int) -> float:
    """How likely ``CURRENT`` would win at least ``current_only`` of the ``current_only +
    new_only`` held-out events that exactly one of the two models hits, were the two models
    equally good: the one-sided exact sign (McNemar) test. Events both hit or both miss say
    nothing about which is better. 1.0 when no event tells them apart.

    >>> paired_p_value(0, 0), paired_p_value(3, 1), round(paired_p_value(20, 5), 4)
    (1.0, 0.3125, 0.002)
    """
    n = current_only + new_only
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(current_only, n + 1)) / 2**n


def hold_out_newer(interactions: Sequence, after_ts: int, max_users: int = 2000,
                   seed: int = 0, *, not_after: int | None = None) -> tuple[list, list[tuple[list[str], str]]]:
    """(the interactions to fit on, the held-out ``(input items, item)`` pairs): of the users
    whose last click or purchase is newer than ``after_ts`` (and not dated after ``not_after``,
    the fit's clock) and who have three, at most ``max_users`` (a seeded sample, users in sorted
    order) give up that last one, which a model fitted on events up to ``after_ts`` never saw
    either. A last event dated ahead of the clock is no such event: an earlier fit may have
    trained on it (its ``trained_through`` leaves out what was ahead of its own clock), so its
    user is not held out, and the fit trains on it.

    >>> from online_models.types import Interaction
    >>> log = [Interaction("u", f"i{n}", ts) for n, ts in enumerate((1, 2, 3, 9))] + [Interaction("v", "j", 9)]
    >>> fit_on, held = hold_out_newer(log, after_ts=5)
    >>> held, [x.item_id for x in fit_on]
    ([(['i0', 'i1', 'i2'], 'i3')], ['i0', 'i1', 'i2', 'j'])
    >>> hold_out_newer(log, after_ts=5, not_after=8)[1]  # u's last event is dated ahead of the clock
    []
    """
    users = {}
    for user, xs in sequences_by_user(interactions).items():
        xs = [x for x in xs if x.kind in TRAINED_KINDS]
        if len(xs) >= 3 and after_ts < xs[-1].ts and (not_after is None or xs[-1].ts <= not_after):
            users[user] = xs
    eligible = sample_users(sorted(users), max_users, seed)
    held = [([x.item_id for x in users[u][:-1]], users[u][-1].item_id) for u in eligible]
    aside = {id(users[u][-1]) for u in eligible}
    return [x for x in interactions if id(x) not in aside], held


def architecture_of(registry: ModelRegistry, version: str | None = None) -> dict:
    """The architecture of ``version`` (default: the current one), as ``train``'s model config;
    empty (the defaults) when the registry holds no version yet."""
    version = version or registry.latest()
    if version is None:
        return {}
    config = registry.manifest(version).get("config", {})
    if not isinstance(config, dict):
        raise ModelLoadError(f"version {version}: its manifest's config is not an object")
    architecture = {key: config[key] for key in ARCHITECTURE if key in config}
    for key, value in architecture.items():  # a hand-edited manifest: said here, not as a fit's traceback
        whole = key != "dropout"
        if (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
                or not (value >= 1 if whole else 0 <= value < 1)):
            raise ModelLoadError(f"version {version}: its manifest's config has {key}={value!r}, "
                                 f"expected {'a whole number of at least 1' if whole else 'a number from 0 to below 1'}")
    if architecture.get("dim", 64) % architecture.get("n_heads", 2):
        raise ModelLoadError(f"version {version}: its manifest's config has dim={architecture.get('dim', 64)}, which "
                             f"n_heads={architecture.get('n_heads', 2)} does not divide")
    return architecture


class Retrainer:
    """Fits a Transformer on interactions and registers it in ``registry``.

    ``model_config``: the architecture (``architecture_of`` the served version, so a retrained
    model is the same model on more data); ``train_config``: ``streamrec train``'s defaults
    unless given (progress bar off); ``threads``: PyTorch's CPU threads while fitting (1, as
    ``streamrec train``: this model's matrices are too small to gain from more); ``gate_tolerance``:
    None (every fit that passes its parity check becomes ``CURRENT``), or how much lower than
    the ``CURRENT`` version's a fit's held-out HR@10 may be and still replace it (:meth:`gate`);
    ``clock``: the time now, in unix ms (the wall clock): an event dated after it when a fit
    starts is trained on, but neither held out nor counted in ``data.trained_through``."""

    def __init__(self, registry: ModelRegistry, model_config: Mapping | None = None,
                 train_config: TrainConfig | None = None, serve_device: str = "cpu", threads: int = 1,
                 gate_tolerance: float | None = None,
                 clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.registry = registry
        self.model_config = dict(model_config or {})
        self.train_config = train_config or TrainConfig(progress=False)
        self.serve_device = serve_device
        self.threads = threads
        self.gate_tolerance = gate_tolerance
        self.clock = clock

    def fit(self, interactions: Sequence, data: Mapping | None = None, console=None,
            overrule: str | None = None) -> tuple[str, dict]:
        """Train on ``interactions`` (``online_models.Interaction``, any order), register the
        model as ``CURRENT`` (with a ``gate_tolerance``: only when it passes :meth:`gate`);
        returns ``(version, its metrics)``, the metrics with ``"gate"``, the gate's record (also
        the manifest's ``gate``), when a gate was run. ``overrule``: why the fit must replace
        ``CURRENT`` whatever the gate says (an erasure ``CURRENT`` does not honour): the gate's
        figures are still recorded, with ``overruled``. Raises ``ValueError`` when no user has two
        interactions, :class:`ModelLoadError` when the export's parity check failed (the version
        is written for inspection, not made current). The manifest's ``data.trained_through`` is
        the newest ``ts`` of the events the fit trained on (the held-out ones left out), not
        counting those dated after ``clock()`` at its start (:func:`trained_through`)."""
        now = self.clock()
        fit_on, held = interactions, None
        if self.gate_tolerance is not None:
            after_ts = self._trained_through()
            if after_ts is not None:
                fit_on, held = hold_out_newer(interactions, after_ts, seed=self.train_config.seed, not_after=now)
        sequences = sequences_from_interactions(fit_on)
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # for this fit only: the caller's setting comes back after it
        try:
            result = train(sequences, self.model_config, self.train_config, console=console)
            gate = self.gate(result, held) if self.gate_tolerance is not None else None
            if gate is not None and overrule is not None:
                gate["overruled"] = overrule
        finally:
            torch.set_num_threads(threads)
        version, parity = export_and_register(result, self.registry,
                                              {"events": len(interactions), "retrained": True,
                                               "trained_through": trained_through(fit_on, not_after=now), **(data or {})},
                                              make_current=gate is None or gate["passed"] or overrule is not None,
                                              extra=None if gate is None else {"gate": gate})
        if not parity["ok"]:
            raise ModelLoadError(f"retrained version {version} failed its parity check "
                                 f"(max |diff| {parity['max_abs_diff']:.2e}); the current version stays")
        return version, result.metrics if gate is None else {**result.metrics, "gate": gate}

    def _trained_through(self) -> int | None:
        """The newest event ``ts`` the ``CURRENT`` version was fitted on (its manifest's
        ``data.trained_through``); None without one (no ``CURRENT``, or a version that does not
        say: one of an older ``streamrec train`` or retrain)."""
        try:
            current = self.registry.pointed()
            through = self.registry.manifest(current).get("data", {}).get("trained_through") if current else None
        except ModelLoadError:
            return None
        return through if isinstance(through, int) and not isinstance(through, bool) else None

    def gate(self, result: TrainResult, held: Sequence[tuple[Sequence[str], str]] | None) -> dict | None:
        """Champion/challenger: the fit's HR@10 and the ``CURRENT`` version's on ``held``, the
        events :func:`hold_out_newer` set aside from the fit (newer than ``CURRENT``'s data, so
        neither model trained on them), each model reading them through its own vocabulary (an
        item the ``CURRENT`` version lacks is a miss for it) and ranking the item among all of
        its items (:func:`~gpu_scorer.training.model_ranks`). ``passed`` unless the fit's figure
        is below the ``CURRENT`` one's minus ``gate_tolerance`` *and* that lead is unlikely to be
        chance: :func:`paired_p_value` below :data:`GATE_SIGNIFICANCE` (over a few hundred events
        one event is several thousandths of HR@10, so a lead of a few events is noise, and the
        fit knows newer items and honours newer erasures). The record gives both figures, the
        events only one model hit (``current_only``, ``new_only``) and ``p_value``. None without a ``CURRENT``
        (the first model: no gate). The fit passes, ``undecided`` saying why, where nothing fair
        can be compared: ``held`` is None (``CURRENT``'s manifest does not say what it was fitted
        on) or holds fewer than :data:`MIN_GATE_EVENTS`. A ``CURRENT`` that names no registered
        version, or whose version does not load (no worker serves it), passes the fit too, with
        ``current_error``."""
        try:
            current, error = self.registry.pointed(), None
        except ModelLoadError as exc:
            current, error = None, str(exc)
        if current is None and error is None:
            return None
        if error is not None:  # CURRENT names no registered version: nothing is served from it
            return self._gate_record(None, None, None, 0, True, error)
        if held is None:
            return self._gate_record(current, None, None, 0, True, None,
                                     f"{current}'s manifest does not say which events it was fitted on "
                                     "(data.trained_through: a version of an older streamrec train or retrain)")
        if len(held) < MIN_GATE_EVENTS:
            return self._gate_record(current, None, None, len(held), True, None,
                                     f"only {len(held)} held-out event(s) newer than {current}'s data "
                                     f"(at least {MIN_GATE_EVENTS} to compare on)")
        try:
            served = self.registry.load(current, "cpu", threads=self.threads)
        except ModelLoadError as exc:  # the workers refuse it too: the fit can only do better
            return self._gate_record(current, None, None, len(held), True, str(exc))
        inputs, targets = validation_rows(held, result.vocab, result.config.max_len)
        new_hits = [0 < r <= GATE_K for r in model_ranks(result.model, inputs, targets)]
        old_hits = [0 < r <= GATE_K for r in scorer_ranks(served, held)]
        new, old = sum(new_hits) / len(held), sum(old_hits) / len(held)
        current_only = sum(o and not n for o, n in zip(old_hits, new_hits, strict=True))
        new_only = sum(n and not o for o, n in zip(old_hits, new_hits, strict=True))
        p = paired_p_value(current_only, new_only)
        passed = new >= old - self.gate_tolerance or p >= GATE_SIGNIFICANCE
        record = self._gate_record(current, new, old, len(held), passed, None)
        record.update(current_only=current_only, new_only=new_only, p_value=p)
        return record

    def _gate_record(self, current: str | None, new: float | None, old: float | None, held_out: int,
                     passed: bool, error: str | None, undecided: str | None = None) -> dict:
        record = {"metric": GATE_METRIC, "held_out": held_out, "tolerance": self.gate_tolerance,
                  "current": current, f"current_{GATE_METRIC}": old, f"new_{GATE_METRIC}": new, "passed": passed}
        if error is not None:
            record["current_error"] = error
        if undecided is not None:
            record["undecided"] = undecided
        return record

    def load(self, version: str):
        """The registered ``version``, loaded and parity-checked as a worker loads it."""
        return self.registry.load(version, self.serve_device)


__all__ = ["ARCHITECTURE", "GATE_K", "GATE_METRIC", "GATE_SIGNIFICANCE", "MIN_GATE_EVENTS", "Retrainer", "architecture_of",
           "hold_out_newer", "paired_p_value"]
