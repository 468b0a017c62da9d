"""Serve the registry's current model and swap in a newly registered one without a restart.

``HotSwapScorer.score`` reads the current :class:`~gpu_scorer.runtime.OnnxScorer` reference
once and scores with it, so a request in flight during a swap finishes on the model it
started with (the old session is freed when its last request returns). Swapping is one
attribute assignment: atomic under the GIL, no lock on the scoring path.

``maybe_reload()`` is cheap enough to call on every micro-batch: at most once per
``poll_interval_s`` it ``stat``s the registry's ``CURRENT`` pointer; when that changed and
names a version not yet served or refused, the new model is loaded and verified (parity
sample) on a background thread (or inline with ``background=False``), then swapped in.
It returns True when a swap completed since the previous call (so a caller can log the new
``version``/``provider`` then); ``on_swap`` is called at the moment of the swap.
At start the CURRENT version is loaded, or, when it is refused, the newest older version
that loads (a newer one only where none older does: CURRENT may have been rolled back from
it). A version that fails to load or verify is refused: logged, counted in
``reload_failures``, remembered in ``refused`` (not retried) and reported to
``on_failure``; the old model keeps serving.

``cuda_options`` are :class:`~gpu_scorer.runtime.OnnxScorer` keyword arguments applied only
where a version runs on CUDA (the worker's ``cuda_graph``, ``fp16``, ``max_batch`` and
``max_cands``; ``**scorer_kw`` apply everywhere). OnnxScorer rewrites the ONNX file for
``cuda_graph``/``fp16`` before its session picks a provider, and a rewritten file would not
run on the CPU as the CPU path calls it (fixed shapes). So every (re)load decides first:
``device="cpu"``, or ``"auto"`` where no CUDA device or no CUDA-enabled ONNX Runtime is
found, loads without them, exactly as without ``cuda_options`` (no rewrite, no ``onnx``
import); otherwise the version is loaded on ``"cuda"`` with them, and ``"auto"`` falls back
to the CPU, without them, when that CUDA session cannot start. ``cuda_graph``/``fp16`` need
the ``onnx`` package (the ``gpu`` extra): where it is missing they are left out with a
warning rather than refusing every version.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gpu_scorer.errors import ModelLoadError, ScorerDeviceError
from gpu_scorer.layout import POINTER, version_key
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.runtime import CPU_EP, CUDA_EP, cuda_device_count

log = logging.getLogger("gpu_scorer")

SwapHook = Callable[[str | None, str, str], None]  # (old version, new version, provider)
FailureHook = Callable[[str, BaseException], None]  # (refused version, error)

#: cuda_options that OnnxScorer implements by rewriting the ONNX file with the onnx package
REWRITING_OPTIONS = ("cuda_graph", "fp16")


def cuda_available() -> tuple[bool, str]:
    """(whether a CUDA session may start, why not): the checks make_session runs before it
    tries one, without building a session. True can still end on the CPU (a missing CUDA
    library shows only when the session starts)."""
    n, reason = cuda_device_count()
    if n == 0:
        return False, reason
    if CUDA_EP not in ort.get_available_providers():
        return False, f"this onnxruntime build has no {CUDA_EP}"
    return True, ""


def onnx_installed() -> bool:
    return find_spec("onnx") is not None


class HotSwapScorer:
    def __init__(
        self,
        registry: ModelRegistry | str | Path,
        device: str = "auto",
        *,
        poll_interval_s: float = 5.0,
        background: bool = True,
        on_swap: SwapHook | None = None,
        on_failure: FailureHook | None = None,
        cuda_options: Mapping[str, object] | None = None,
        **scorer_kw,
    ) -> None:
        self.registry = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry)
        self.device = device
        self.poll_interval_s = poll_interval_s
        self.background = background
        self.on_swap, self.on_failure = on_swap, on_failure
        self._scorer_kw = scorer_kw
        self.cuda_options = dict(cuda_options or {})
        self.swaps = 0
        self._swaps_reported = 0
        self.reload_failures = 0
        self.refused: dict[str, str] = {}
        self._loader: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._last_poll = time.monotonic()
        self._stamp = self.registry.pointer_stamp()
        #: each refused version's files as they were when it was refused: tried again once they change
        self._refused_stamps: dict[str, tuple] = {}
        self._served_stamp: tuple = ()
        #: the last problem of the registry said (CURRENT naming no version, no version at all), None when none
        self._problem: str | None = None
        #: poll even when CURRENT has not changed: the version it names is missing or was refused, and may yet
        #: arrive or be completed (a copy still being written)
        self._unsettled = False
        self._current = self._load_at_start()
        try:
            pointed = self.registry.pointed()
        except ModelLoadError as exc:  # said by layout.latest at the start; said again only when it changes
            self._problem, self._unsettled = str(exc), True
        else:
            self._unsettled = pointed is not None and pointed != self._current.version
        log.info("scorer serving %s on %s", self._current.version, self._current.provider)
        if on_swap:
            on_swap(None, self._current.version, self._current.provider)

    def _load_at_start(self):
        """The CURRENT version, or (refusing it loudly) the newest older one that loads; a newer
        one only where none older loads (CURRENT rolled back from it: it is the last resort)."""
        latest = self.registry.latest()
        if latest is None:
            raise ModelLoadError(f"no model registered in {self.registry.root}")
        others = [v for v in reversed(self.registry.versions()) if v != latest]
        older = [v for v in others if version_key(v) < version_key(latest)]
        newer = [v for v in others if v not in older]
        for version in [latest, *older, *newer]:
            stamp = self.registry.version_stamp(version)
            try:
                scorer = self._open(version)
            except ScorerDeviceError:  # the device's fault, not the version's: every version would fail
                raise
            except Exception as exc:  # noqa: BLE001 - as in _load: any other failure refuses the version
                self.reload_failures += 1
                self.refused[version] = str(exc)
                self._refused_stamps[version] = stamp
                log.error("scorer: refused version %s at start: %s", version, exc)
                if self.on_failure:
                    self.on_failure(version, exc)
                continue
            self._served_stamp = stamp
            return scorer
        raise ModelLoadError(f"no loadable model in {self.registry.root}; refused: {self.refused}")

    def _open(self, version: str):
        """``registry.load`` of ``version``, with ``cuda_options`` only where it runs on CUDA."""
        options = self._options_for_cuda()
        if options is None:
            return self.registry.load(version, self.device, **self._scorer_kw)
        log.info("scorer: loading %s on CUDA with %s", version, ", ".join(f"{k}={v}" for k, v in options.items()))
        try:
            return self.registry.load(version, "cuda", **{**self._scorer_kw, **options})
        except ScorerDeviceError as exc:
            if self.device == "cuda":
                raise
            log.warning("scorer: device='auto' and CUDA is not usable (%s); running %s on %s, without the CUDA options",
                        exc.__cause__ or exc, version, CPU_EP)
            return self.registry.load(version, "cpu", **self._scorer_kw)

    def _options_for_cuda(self) -> dict[str, object] | None:
        """The cuda_options to load with on CUDA, or None to load as if there were none."""
        if not self.cuda_options or self.device not in ("auto", "cuda"):
            return None  # "cpu" (or a device OnnxScorer refuses itself)
        usable, _ = cuda_available()
        if not usable:
            return None  # "auto": make_session logs why it runs on the CPU; "cuda": it raises
        options = dict(self.cuda_options)
        rewriting = [name for name in REWRITING_OPTIONS if options.get(name)]
        if rewriting and not onnx_installed():
            log.warning("scorer: %s need the onnx package (pip install 'streamrec[gpu]'), not installed: "
                        "serving on CUDA without them", " and ".join(rewriting))
            for name in rewriting:
                options[name] = False
        return options

    @property
    def current(self):
        return self._current

    @property
    def version(self) -> str:
        return self._current.version

    @property
    def provider(self) -> str:
        return self._current.provider

    def score(self, sequences: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
        return self._current.score(sequences, candidates)

    def run_ids(self, seq_ids: np.ndarray, cand_ids: np.ndarray) -> np.ndarray:
        return self._current.run_ids(seq_ids, cand_ids)

    def maybe_reload(self, force: bool = False) -> bool:
        """Check for a newly registered version (at most once per ``poll_interval_s`` unless
        ``force``) and start loading it. Returns True when the served version changed since
        the previous call, i.e. a swap has completed (with ``background=False``, the load
        happens inside this call; otherwise a later call reports it)."""
        now = time.monotonic()
        if force or now - self._last_poll >= self.poll_interval_s:
            self._last_poll = now
            self._poll(force)
        return self._take_swap_news()

    def _take_swap_news(self) -> bool:
        with self._state_lock:
            changed = self.swaps != self._swaps_reported
            self._swaps_reported = self.swaps
        return changed

    def _poll(self, force: bool) -> None:
        stamp = self.registry.pointer_stamp()
        if stamp == self._stamp and not force and not self._unsettled:
            return
        with self._state_lock:
            if self._loader is not None and self._loader.is_alive():
                return  # poll again later; the stamp is not consumed
            self._stamp = stamp
            self._unsettled = True  # until this poll ends on the version served, or starts loading one
            try:
                version = self.registry.pointed() or self.registry.latest()
            except ModelLoadError as exc:  # refused once for each thing CURRENT says
                if str(exc) != self._problem:
                    self._problem = str(exc)
                    self.reload_failures += 1
                    self.refused[str(exc)] = str(exc)
                    log.error("scorer: %s; still serving %s", exc, self._current.version)
                    if self.on_failure:
                        self.on_failure(POINTER, exc)
                return
            if version is None:  # said once: the loaded model serves on
                problem = f"{self.registry.root} holds no registered version now"
                if problem != self._problem:
                    self._problem = problem
                    log.warning("scorer: %s (moved, unmounted or emptied?); still serving %s", problem,
                                self._current.version)
                return
            self._problem = None
            on_disk = self.registry.version_stamp(version)
            if version == self._current.version and on_disk == self._served_stamp:
                self._unsettled = False
                return
            if version in self.refused and self._refused_stamps.get(version) == on_disk:
                return  # not retried while its files stay as they were (unsettled: a copy may yet complete it)
            if version == self._current.version:  # the registry made again, or the version's files replaced
                log.warning("scorer: the files of %s changed since it was loaded (another model under the same "
                            "name: the registry made again?); loading it again", version)
            self._unsettled = False
            if self.background:
                self._loader = threading.Thread(target=self._load, args=(version,), name=f"scorer-load-{version}", daemon=True)
                self._loader.start()
                return
        self._load(version)

    def _load(self, version: str) -> None:
        stamp = self.registry.version_stamp(version)  # before the load: files changed during it are loaded again
        try:
            new = self._open(version)
        except Exception as exc:  # noqa: BLE001 - any failure refuses the version
            self.reload_failures += 1
            self.refused[version] = str(exc)
            self._refused_stamps[version] = stamp
            self._unsettled = True
            log.error("scorer: refused version %s, still serving %s: %s", version, self._current.version, exc)
            if self.on_failure:
                self.on_failure(version, exc)
            return
        old = self._current
        if new.provider != old.provider:
            log.warning("scorer: version %s runs on %s, the previous one on %s", version, new.provider, old.provider)
        with self._state_lock:
            self._current = new
            self._served_stamp = stamp
            self.refused.pop(version, None)
            self._refused_stamps.pop(version, None)
            self.swaps += 1
        log.info("scorer: swapped %s -> %s on %s", old.version, new.version, new.provider)
        if self.on_swap:
            self.on_swap(old.version, new.version, new.provider)

    def wait(self, timeout: float | None = None) -> None:
        """Block until a background load in progress has finished (tests, CLI)."""
        loader = self._loader
        if loader is not None:
            loader.join(timeout)

    close = wait

    def __repr__(self) -> str:
        return f"HotSwapScorer(version={self.version!r}, provider={self.provider!r}, swaps={self.swaps}, reload_failures={self.reload_failures})"


__all__ = ["HotSwapScorer"]
