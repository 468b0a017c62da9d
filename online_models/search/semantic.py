"""Approximate nearest neighbours over item vectors: a usearch HNSW graph.

usearch (Apache-2.0, Unum) was chosen over faiss-cpu and hnswlib because it does what a
catalogue that changes all day needs, in a 2 MB wheel: vectors are added and removed by key
at any time (faiss's HNSW cannot remove; hnswlib only marks deletions and ships as a source
package that needs a compiler), it stores them in half precision (100,000 items of 384
dimensions take about 100 MB with the graph), and the whole index serialises to bytes and
back without a file.
"""

from __future__ import annotations

import numpy as np
import onnxruntime  # noqa: F401 - before usearch: see below
from usearch.index import Index

# ONNX Runtime's extension loaded after usearch's crashes the interpreter (SIGSEGV while
# importing onnxruntime; usearch 2.26.6, onnxruntime-gpu 1.31.1): usearch's extension carries
# its own copy of the C++ runtime and exports its symbols (2,295 of them, std::locale's among
# them), which then stand in for the system libstdc++ that ONNX Runtime loads. With libstdc++
# loaded first (by ONNX Runtime, scipy or onnx) both load. Every process that searches also runs
# the text model, so ONNX Runtime is loaded here first whatever the caller imported before.


class VectorIndex:
    """Unit vectors under integer keys; :meth:`search` finds the closest by cosine.

    >>> index = VectorIndex(ndim=2)
    >>> index.upsert(np.array([1, 2]), np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    >>> [key for key, _ in index.search(np.array([0.9, 0.1], dtype=np.float32), 1)]
    [1]
    >>> index.remove(1); len(index), [key for key, _ in index.search(np.array([0.9, 0.1], dtype=np.float32), 2)]
    (1, [2])
    >>> len(VectorIndex.from_bytes(index.to_bytes()))
    1
    """

    def __init__(self, ndim: int, dtype: str = "f16", connectivity: int = 16,
                 expansion_add: int = 128, expansion_search: int = 64) -> None:
        self.ndim = ndim
        self._index = Index(ndim=ndim, metric="cos", dtype=dtype, connectivity=connectivity,
                            expansion_add=expansion_add, expansion_search=expansion_search)

    def __len__(self) -> int:
        return int(self._index.size)

    def __contains__(self, key: int) -> bool:
        return bool(self._index.contains(key))

    def upsert(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        """Add ``vectors`` (one row per key), replacing the vectors of keys already there."""
        keys = np.asarray(keys, dtype=np.uint64)
        if len(keys) == 0:
            return
        present = np.asarray(self._index.contains(keys), dtype=bool).reshape(-1)
        if present.any():
            self._index.remove(keys[present])
        self._index.add(keys, np.ascontiguousarray(vectors, dtype=np.float32))

    def remove(self, key: int) -> None:
        if self._index.contains(key):
            self._index.remove(key)

    def vector(self, key: int) -> np.ndarray | None:
        """The stored vector of ``key`` (in float32), or None."""
        if not self._index.contains(key):
            return None
        return np.asarray(self._index.get(key), dtype=np.float32).reshape(-1)

    def vectors(self, keys: np.ndarray) -> list[np.ndarray | None]:
        """The stored vectors (float32) of ``keys``, in one call; None for a key not here."""
        if len(keys) == 0:
            return []
        got = self._index.get(np.asarray(keys, dtype=np.uint64))  # a tuple: a row or None per key
        return [None if row is None else np.asarray(row, dtype=np.float32).reshape(-1) for row in got]

    def search(self, vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The ``k`` closest keys with their cosine similarity, closest first."""
        if k <= 0 or len(self) == 0:
            return []
        matches = self._index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self)))
        return [(int(key), 1.0 - float(distance)) for key, distance in zip(matches.keys, matches.distances, strict=True)]

    @property
    def memory_bytes(self) -> int:
        return int(self._index.memory_usage)

    def to_bytes(self) -> bytes:
        return bytes(self._index.save())

    @classmethod
    def from_bytes(cls, data: bytes) -> VectorIndex:
        index = cls.__new__(cls)
        index._index = Index.restore(bytearray(data), view=False)
        index.ndim = int(index._index.ndim)
        return index
