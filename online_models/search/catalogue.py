"""The item catalogue and its two indexes: what search retrieves from.

Items arrive one by one (the compacted items topic in the stream, a file offline) and wait in
a queue until :meth:`Catalogue.flush` embeds them in batches with the text model and adds
them to both indexes: BM25 over their words (:class:`~online_models.search.lexical.LexicalIndex`)
and nearest neighbours over their meaning (:class:`~online_models.search.semantic.VectorIndex`).

:meth:`Catalogue.search` retrieves the best ``candidates`` of each and fuses the two lists
(:func:`fuse`): each list's scores are scaled to 0..1 over the list (BM25 scores are
unbounded; e5's cosines bunch between 0.7 and 0.9), and an item scores
``lexical_weight * bm25 + (1 - lexical_weight) * cosine``, 0 for a list it is not in
(CombSUM, Fox & Shaw 1994). ``lexical_weight = 0.2`` was chosen on half of the CrowdFlower
queries and holds on the other half, where it beats both retrievers alone and reciprocal-rank
fusion (docs/search.md). A query read by a query student (an option: ``STREAMREC_QUERY_STUDENT``)
weighs BM25 at ``student_lexical_weight = 0.5``, chosen the same way for its vectors. Items
marked unavailable stay in the catalogue but are not returned.

Pure: no Kafka, no Redis. The worker, ``streamrec serve`` and ``bench/search_quality.py`` all
search through this class.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import NamedTuple

import msgspec
import numpy as np

from online_models.search.lexical import LexicalIndex
from online_models.search.semantic import VectorIndex
from online_models.search.text import Embedder

#: the share of BM25 in the hybrid score (the rest is the text model's)
LEXICAL_WEIGHT = 0.2
#: the same for a query whose vector came from a query student (TextEmbedder.queries_by):
#: chosen on the first half of the CrowdFlower queries among 0.2-0.5 (docs/search.md)
STUDENT_LEXICAL_WEIGHT = 0.5

#: characters of an item's description that are indexed (BM25)
MAX_DESCRIPTION_CHARS = 512

#: characters of an item's description that are embedded: the model's cost grows with the
#: text, and a title already says most of what a product is (bench/search_quality.py)
EMBED_DESCRIPTION_CHARS = 160


class CatalogueItem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What search knows of an item (the fields of an ItemEvent that it uses)."""

    item_id: str
    title: str
    description: str = ""
    category_path: tuple[str, ...] = ()
    brand: str | None = None
    price: float | None = None
    available: bool = True

    def text(self, description_chars: int = MAX_DESCRIPTION_CHARS) -> str:
        """The text indexed: title, brand, categories, the start of the description.

        >>> CatalogueItem(item_id="i1", title="Down jacket", brand="Acme", category_path=("Women", "Coats")).text()
        'Down jacket. Acme. Women > Coats'
        """
        parts = [self.title]
        if self.brand:
            parts.append(self.brand)
        if self.category_path:
            parts.append(" > ".join(self.category_path))
        if self.description and description_chars > 0:
            parts.append(self.description[:description_chars])
        return ". ".join(p for p in parts if p)


class SearchHit(NamedTuple):
    """One retrieved item: fused score, and its 1-based rank in each list (None: not in it)."""

    item_id: str
    score: float
    lexical_rank: int | None
    semantic_rank: int | None

    @property
    def matched(self) -> str:
        """``"words"``, ``"meaning"`` or ``"both"``: what made the item match the query."""
        if self.lexical_rank is not None and self.semantic_rank is not None:
            return "both"
        return "words" if self.lexical_rank is not None else "meaning"


class _Snapshot(msgspec.Struct, array_like=True):
    version: int
    dim: int
    model: str
    items: list[CatalogueItem]
    keys: list[int]
    vectors: bytes
    next_key: int


SNAPSHOT_VERSION = 1


class Catalogue:
    """Items, their BM25 and vector indexes, and hybrid search over both.

    ``candidates``: how many items each index retrieves for a query before fusion.

    Thread-safe: :meth:`flush` embeds outside the lock that every change and search holds
    (the text model releases the GIL), so a feed can index items in a thread while the
    worker searches.
    """

    def __init__(self, embedder: Embedder, *, candidates: int = 100, lexical_weight: float = LEXICAL_WEIGHT,
                 embed_batch: int = 32, embed_description_chars: int = EMBED_DESCRIPTION_CHARS,
                 student_lexical_weight: float = STUDENT_LEXICAL_WEIGHT) -> None:
        self.embedder = embedder
        self.embed_description_chars = embed_description_chars
        self.candidates = candidates
        self.lexical_weight = lexical_weight
        self.student_lexical_weight = student_lexical_weight
        self.embed_batch = embed_batch
        self._items: dict[str, CatalogueItem] = {}
        self._key_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._next_key = 1
        self._pending: dict[str, CatalogueItem] = {}
        self._lexical = LexicalIndex()
        self._vectors = VectorIndex(embedder.dim)
        self._lock = threading.RLock()
        #: counts every change to what is indexed (an index, a removal, a restore)
        self.version = 0

    # ------------------------------------------------------------------ changes

    def upsert(self, items: Iterable[CatalogueItem]) -> None:
        """Queue new or changed items; :meth:`flush` indexes them. An item whose text did not
        change (a price or availability update) is updated at once and not embedded again."""
        with self._lock:
            for item in items:
                old = self._items.get(item.item_id)
                if old is not None and old.text() == item.text() and item.item_id not in self._pending:
                    self._items[item.item_id] = item
                else:
                    self._pending[item.item_id] = item

    def remove(self, item_id: str) -> bool:
        """Take ``item_id`` out of the catalogue and both indexes (a tombstone)."""
        with self._lock:
            self._pending.pop(item_id, None)
            if self._items.pop(item_id, None) is None:
                return False
            key = self._key_of.pop(item_id)
            del self._id_of[key]
            self._lexical.remove(key)
            self._vectors.remove(key)
            self._lexical.commit()
            self.version += 1
            return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def next_pending(self) -> str | None:
        """The id of the queued item :meth:`flush` takes first (None when none waits)."""
        with self._lock:
            return next(iter(self._pending), None)

    def flush(self, limit: int | None = None) -> int:
        """Embed and index up to ``limit`` queued items (all by default); returns how many.
        An item changed or removed while it was being embedded is left to the next flush."""
        with self._lock:
            take = list(self._pending.values())[: limit if limit is not None else len(self._pending)]
        done = 0
        for start in range(0, len(take), self.embed_batch):
            chunk = take[start : start + self.embed_batch]
            vectors = self.embedder.passages([item.text(self.embed_description_chars) for item in chunk])
            with self._lock:
                still = [row for row, item in enumerate(chunk) if self._pending.get(item.item_id) is item]
                if still:
                    self._index([chunk[row] for row in still], vectors[still])
                for row in still:
                    del self._pending[chunk[row].item_id]
                done += len(still)
        with self._lock:
            self._lexical.commit()
        return done

    def _index(self, items: Sequence[CatalogueItem], vectors: np.ndarray) -> None:
        keys = np.empty(len(items), dtype=np.uint64)
        for row, item in enumerate(items):
            key = self._key_of.get(item.item_id)
            if key is None:
                key = self._next_key
                self._next_key += 1
                self._key_of[item.item_id] = key
                self._id_of[key] = item.item_id
            keys[row] = key
            self._items[item.item_id] = item
            self._lexical.upsert(key, item.text())
        self._vectors.upsert(keys, vectors)
        self.version += 1

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def get(self, item_id: str) -> CatalogueItem | None:
        return self._items.get(item_id)

    def vector(self, item_id: str) -> np.ndarray | None:
        with self._lock:
            key = self._key_of.get(item_id)
            return None if key is None else self._vectors.vector(key)

    def vectors_of(self, item_ids: Iterable[str]) -> dict[str, np.ndarray]:
        """The vectors (float32) of those of ``item_ids`` that are indexed, in one lookup."""
        with self._lock:
            found = [(item_id, key) for item_id in dict.fromkeys(item_ids)
                     if (key := self._key_of.get(item_id)) is not None]
            if not found:
                return {}
            rows = self._vectors.vectors(np.fromiter((key for _, key in found), dtype=np.uint64, count=len(found)))
        return {item_id: row for (item_id, _), row in zip(found, rows, strict=True) if row is not None}

    def newest(self, exclude: Callable[[str], bool], limit: int, scan: int) -> tuple[list[str], np.ndarray]:
        """Up to ``limit`` available items, newest indexed first, for which ``exclude(item_id)``
        is false, with their vectors (one float32 row each); only the ``scan`` newest items are
        looked at. An item keeps its place when its text changes: it is not new again."""
        with self._lock:
            ids: list[str] = []
            keys: list[int] = []
            items = self._items
            for seen, (item_id, key) in enumerate(reversed(self._key_of.items())):
                if seen >= scan or len(ids) >= limit:
                    break
                if items[item_id].available and not exclude(item_id):
                    ids.append(item_id)
                    keys.append(key)
            if not ids:
                return [], np.empty((0, self.embedder.dim), dtype=np.float32)
            rows = self._vectors.vectors(np.asarray(keys, dtype=np.uint64))
        return ids, np.stack(rows).astype(np.float32, copy=False)

    def _best_available(self, search: Callable[[int], list[tuple[int, float]]], k: int,
                        skip: Collection[str] = ()) -> list[tuple[str, float]]:
        """The best ``k`` available items ``search(n)`` (best ``n`` keys of an index) finds,
        not in ``skip``: unavailable items stay in the indexes, so while they take places the
        index is asked for twice as many, until it has no more. Under the lock."""
        want = k + len(skip)
        while True:
            found = search(want)
            out = []
            for key, score in found:
                item_id = self._id_of.get(key)
                if item_id is not None and item_id not in skip and self._items[item_id].available:
                    out.append((item_id, score))
            if len(out) >= k or len(found) < want:
                return out[:k]
            want *= 2

    def lexical_scored(self, query: str, k: int) -> list[tuple[str, float]]:
        """BM25 alone: the best ``k`` available items with their BM25 scores."""
        with self._lock:
            return self._best_available(lambda n: self._lexical.search(query, n), k)

    def semantic_scored(self, query: str, k: int, vector: np.ndarray | None = None) -> list[tuple[str, float]]:
        """Embeddings alone: the ``k`` available items closest to the query, with cosines."""
        if vector is None:
            vector = self.embedder.queries([query])[0]
        with self._lock:
            return self._best_available(lambda n: self._vectors.search(vector, n), k)

    def lexical(self, query: str, k: int) -> list[str]:
        return [item for item, _ in self.lexical_scored(query, k)]

    def semantic(self, query: str, k: int, vector: np.ndarray | None = None) -> list[str]:
        return [item for item, _ in self.semantic_scored(query, k, vector)]

    def search(self, query: str, k: int, vector: np.ndarray | None = None) -> list[SearchHit]:
        """Hybrid: BM25 and embeddings, each ``candidates`` deep, fused (:func:`fuse`); best ``k``.
        A query the embedder's student read (``queries_by``) weighs BM25 at
        ``student_lexical_weight``, one the text model read (or a given ``vector``) at ``lexical_weight``."""
        depth = max(k, self.candidates)
        weight = self.lexical_weight
        if vector is None:
            queries_by = getattr(self.embedder, "queries_by", None)
            if queries_by is not None:
                vectors, by_student = queries_by([query])
                vector = vectors[0]
                if by_student[0]:
                    weight = self.student_lexical_weight
        return fuse(self.lexical_scored(query, depth), self.semantic_scored(query, depth, vector), k, weight)

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]]:
        """The ``k`` available items closest in meaning to ``item_id`` (not itself)."""
        vector = self.vector(item_id)
        if vector is None:
            return []
        return self.nearest(vector, k, exclude=(item_id,))

    def nearest(self, vector: np.ndarray, k: int, exclude: Iterable[str] = ()) -> list[tuple[str, float]]:
        """The ``k`` available items closest to ``vector``, with cosines, skipping ``exclude``."""
        with self._lock:
            return self._best_available(lambda n: self._vectors.search(vector, n), k, set(exclude))

    @property
    def memory_bytes(self) -> int:
        """The vector index's memory (the lexical index is a fraction of it)."""
        return self._vectors.memory_bytes

    # ------------------------------------------------------------------ snapshots

    def to_bytes(self) -> bytes:
        """Items and vectors as data (msgpack); queued items are flushed first."""
        self.flush()
        with self._lock:
            keys = list(self._id_of)
            vectors = (np.stack([self._vectors.vector(k) for k in keys]).astype(np.float16) if keys
                       else np.empty((0, self.embedder.dim), np.float16))
            snap = _Snapshot(SNAPSHOT_VERSION, self.embedder.dim, self.embedder.name,
                             [self._items[self._id_of[k]] for k in keys], keys, vectors.tobytes(), self._next_key)
        return msgspec.msgpack.encode(snap)

    @classmethod
    def from_bytes(cls, data: bytes, embedder: Embedder, **kwargs) -> Catalogue:
        """A catalogue restored from :meth:`to_bytes`: no item is embedded again."""
        catalogue = cls(embedder, **kwargs)
        catalogue.load(data)
        return catalogue

    def load(self, data: bytes) -> None:
        """Replace everything this catalogue holds with the snapshot ``data`` (searches see the
        old catalogue until the new one is whole); raises ValueError for a snapshot of another
        model, or bytes that are no snapshot."""
        try:
            snap = msgspec.msgpack.decode(data, type=_Snapshot)
        except msgspec.DecodeError as exc:
            raise ValueError(f"not a catalogue snapshot: {exc}") from None
        embedder = self.embedder
        if snap.version != SNAPSHOT_VERSION:
            raise ValueError(f"catalogue snapshot version {snap.version}: this code reads {SNAPSHOT_VERSION}")
        if snap.dim != embedder.dim or snap.model != embedder.name:
            raise ValueError(f"catalogue snapshot made with {snap.model} ({snap.dim} dimensions), "
                             f"not {embedder.name} ({embedder.dim}): its vectors cannot be searched with this model")
        vectors = np.frombuffer(snap.vectors, dtype=np.float16).reshape(len(snap.keys), snap.dim).astype(np.float32)
        items, key_of, id_of = {}, {}, {}
        lexical, vector_index = LexicalIndex(), VectorIndex(embedder.dim)
        for item, key in zip(snap.items, snap.keys, strict=True):
            key_of[item.item_id] = key
            id_of[key] = item.item_id
            items[item.item_id] = item
            lexical.upsert(key, item.text())
        vector_index.upsert(np.asarray(snap.keys, dtype=np.uint64), vectors)
        lexical.commit()
        with self._lock:
            self._items, self._key_of, self._id_of = items, key_of, id_of
            self._lexical, self._vectors = lexical, vector_index
            self._next_key = snap.next_key
            self._pending = {}
            self.version += 1


class CatalogueMemo:
    """Values computed from ``catalogue``, kept until it changes (its ``version`` moves) or
    holds ``capacity`` of them; then it starts empty. Thread-safe: the computing is done
    outside the lock, and a value computed while the catalogue changed is not kept.

    >>> from online_models.search.text import TextEmbedder
    >>> memo = CatalogueMemo(Catalogue(TextEmbedder(threads=1)), capacity=10)
    >>> memo.get_many(["a", "b"], lambda keys: {k: k.upper() for k in keys if k == "a"})
    {'a': 'A'}
    """

    def __init__(self, catalogue: Catalogue, capacity: int) -> None:
        self.catalogue = catalogue
        self.capacity = capacity
        self._values: dict = {}
        self._version = -1
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable, compute: Callable[[list], dict]) -> dict:
        """The values of those ``keys`` that have one; ``compute(missing)`` gives the values of
        the keys not remembered (a key it leaves out has none, and is remembered so)."""
        keys = list(dict.fromkeys(keys))
        values = self._values
        with self._lock:
            version = self.catalogue.version
            if self._version != version or len(values) >= self.capacity:
                values.clear()
                self._version = version
            missing = [key for key in keys if key not in values]
            out = {key: value for key in keys if (value := values.get(key)) is not None}
        if missing:
            found = compute(missing)
            out.update((key, value) for key, value in found.items() if value is not None)
            with self._lock:
                if self._version == version:  # not if the catalogue changed meanwhile
                    values.update((key, found.get(key)) for key in missing)
        return out


def fuse(lexical: Sequence[tuple[str, float]], semantic: Sequence[tuple[str, float]], k: int,
         lexical_weight: float = LEXICAL_WEIGHT) -> list[SearchHit]:
    """Two scored lists of item ids, each best first, as one: scores scaled to 0..1 within each
    list, then ``lexical_weight * lexical + (1 - lexical_weight) * semantic``; best ``k`` first.

    >>> [h.item_id for h in fuse([("a", 9.0), ("b", 5.0), ("c", 1.0)], [("c", 0.9), ("a", 0.85), ("d", 0.8)], 3)]
    ['c', 'a', 'b']
    >>> fuse([("a", 2.0)], [], 1)[0].matched, fuse([], [("a", 0.8)], 1)[0].matched
    ('words', 'meaning')
    >>> [h.item_id for h in fuse([("b", 0.0), ("a", 0.0)], [("b", 0.0), ("a", 0.0)], 2)]  # tied: as the lists rank them
    ['b', 'a']
    """
    scores: dict[str, float] = {}
    for pairs, weight in ((lexical, lexical_weight), (semantic, 1.0 - lexical_weight)):
        if not pairs:
            continue
        values = [score for _, score in pairs]
        low, high = min(values), max(values)
        span = high - low
        for item, score in pairs:
            scores[item] = scores.get(item, 0.0) + weight * ((score - low) / span if span > 0 else 1.0)
    lexical_rank = {item: rank for rank, (item, _) in enumerate(lexical, 1)}
    semantic_rank = {item: rank for rank, (item, _) in enumerate(semantic, 1)}
    # a tie (equal scores: a list's scores all alike) goes to the item the lists put higher, then by id
    below = len(lexical) + len(semantic) + 1

    def order(pair: tuple[str, float]) -> tuple[float, int, str]:
        item = pair[0]
        return -pair[1], lexical_rank.get(item, below) + semantic_rank.get(item, below), item

    best = sorted(scores.items(), key=order)[:k]
    return [SearchHit(item, score, lexical_rank.get(item), semantic_rank.get(item)) for item, score in best]
