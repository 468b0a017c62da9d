"""A static query encoder distilled from the text model on the catalogue's own texts.

A new query costs the text model (multilingual-e5-small) about 3 ms of CPU; at 100 new
queries a second that is a third of a core. :class:`QueryStudent` answers in well under a
tenth of a millisecond: a query's vector is the mean of one vector per token (the text
model's own tokenizer, on the lower-cased text), normalised. The vectors are learned so that
this mean lands where the text model puts the same text as a query:

1. **Training texts**: each catalogue title and ``spans`` random runs of 1-4 of its words,
   short texts shaped like shop queries.
2. **Targets**: the text model's query vector of each training text.
3. **Start**: each token's vector is the text model's query vector of that token alone
   (Model2Vec's distillation, Tulkens & van Dongen 2024); alone, that is a poor encoder
   (CrowdFlower NDCG@10 0.29).
4. **Fit**: Adam on ``1 - cosine(mean of the text's token vectors, target)``, a few epochs,
   with a small pull back towards the start.

Tokens the catalogue never used are left out of a query (and the bare word-start marker
is never learned); a query with no known token is not the student's (``encode`` returns None) and goes to the text model.

Off by default: ``streamrec distil-queries`` fits one on a catalogue file, and
``STREAMREC_QUERY_STUDENT`` hands it to the worker and ``serve``. On CrowdFlower it costs
NDCG@10 (docs/search.md, "A query student").
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import Callable, Sequence

import numpy as np


def _normal(text: str) -> str:
    """NFKC, whitespace collapsed: ``text.normalise_query`` without its cut (that module imports
    this one). The model embeds training texts in this form; the student reads it lower-cased."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


_CHUNK = 512  # texts the model embeds between two progress reports


def spans_of(titles: Sequence[str], spans: int, seed: int = 0) -> list[str]:
    """The titles and ``spans`` random runs of 1-4 words of each (the training texts)."""
    rng = np.random.default_rng(seed)
    out = list(titles)
    for title in titles:
        words = title.split()
        if not words:
            continue
        for _ in range(spans):
            n = int(rng.integers(1, 5))
            at = int(rng.integers(0, max(1, len(words) - n + 1)))
            out.append(" ".join(words[at:at + n]))
    return out


class QueryStudent:
    """Token vectors whose mean encodes a query (see the module's docstring)."""

    def __init__(self, tokens: np.ndarray, vectors: np.ndarray) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int64)
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if self.tokens.ndim != 1 or self.vectors.ndim != 2 or len(self.tokens) != len(self.vectors):
            raise ValueError(f"expected one vector per token, saw {self.tokens.shape} tokens and {self.vectors.shape} vectors")
        self._row = {int(t): i for i, t in enumerate(self.tokens.tolist())}
        self._tokenize: Callable[[str], list[int]] | None = None

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def bind(self, tokenize: Callable[[str], list[int]]) -> QueryStudent:
        """Read queries with ``tokenize(text) -> token ids`` (the text model's tokenizer, which
        the student was fitted with); returns the student."""
        self._tokenize = tokenize
        return self

    def _rows(self, text: str) -> list[int]:
        """The table's rows of the tokens of ``text`` it knows (lower-cased, as it learned)."""
        if self._tokenize is None:
            raise RuntimeError("QueryStudent used before bind(tokenizer)")
        row = self._row
        return [r for r in map(row.get, self._tokenize(_normal(text).lower())) if r is not None]

    def reads(self, text: str) -> bool:
        """Whether :meth:`encode` gives ``text`` a vector (one of its tokens is known)."""
        return bool(self._rows(text))

    def encode(self, text: str) -> np.ndarray | None:
        """The query's unit vector, or None when none of its tokens is known (then the text
        model's turn). Tokens the catalogue never used are left out."""
        rows = self._rows(text)
        if not rows:
            return None
        v = self.vectors[rows].mean(axis=0)
        return v / max(float(np.linalg.norm(v)), 1e-6)

    @classmethod
    def fit(cls, model, titles: Sequence[str], spans: int = 3, epochs: int = 2, lr: float = 3e-3,
            pull: float = 1e-3, batch: int = 256, seed: int = 0,
            progress: Callable[[int, int], None] | None = None) -> QueryStudent:
        """Learn from ``model`` (an :class:`~online_models.search.e5_onnx.E5Onnx`) on ``titles``.
        ``progress(done, total)`` hears of the texts the model has embedded (most of the time)."""
        texts = spans_of([_normal(t) for t in titles], spans, seed)
        if not texts:
            raise ValueError("no titles to learn from")
        tokenize = model.weights.tokens
        space = set(tokenize(" "))  # the bare word-start marker carries no meaning: never learned, never read
        token_lists = [[t for t in tokenize(t.lower()) if t not in space] for t in texts]
        vocab = np.array(sorted({t for ts in token_lists for t in ts}), dtype=np.int64)
        if not len(vocab):
            raise ValueError("the titles hold no words to learn from")
        pieces = [model.weights.piece(int(t)).replace("\u2581", " ").strip() or model.weights.piece(int(t))
                  for t in vocab.tolist()]
        todo = [*texts, *pieces]
        vectors = []
        for at in range(0, len(todo), _CHUNK):
            vectors.append(model.encode(todo[at:at + _CHUNK], True))
            if progress is not None:
                progress(min(at + _CHUNK, len(todo)), len(todo))
        embedded = np.concatenate(vectors)
        targets, start = embedded[:len(texts)], embedded[len(texts):].astype(np.float64)
        row = {int(t): i for i, t in enumerate(vocab.tolist())}
        table = start.copy()
        m, v = np.zeros_like(table), np.zeros_like(table)
        beta1, beta2, step = 0.9, 0.999, 0
        rows = [np.array([row[t] for t in ts], dtype=np.int64) for ts in token_lists]
        keep = [i for i, r in enumerate(rows) if len(r)]
        rng = np.random.default_rng(seed)
        for _ in range(epochs):
            order = rng.permutation(keep)
            for at in range(0, len(order), batch):
                idx = order[at:at + batch]
                flat = np.concatenate([rows[i] for i in idx])
                counts = np.array([len(rows[i]) for i in idx])
                owner = np.repeat(np.arange(len(idx)), counts)
                x = np.zeros((len(idx), table.shape[1]))
                np.add.at(x, owner, table[flat])
                x /= counts[:, None]
                norm = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)
                u = x / norm
                y = targets[idx].astype(np.float64)
                # d(1 - u.y)/dx = -(y - (u.y) u) / |x|; a token's share of its text's mean is 1/count
                gx = -(y - np.sum(u * y, axis=1, keepdims=True) * u) / norm / len(idx)
                grad = np.zeros_like(table)
                np.add.at(grad, flat, (gx / counts[:, None])[owner])
                touched = np.unique(flat)
                grad[touched] += 2 * pull * (table[touched] - start[touched]) / len(idx)
                step += 1
                m[touched] = beta1 * m[touched] + (1 - beta1) * grad[touched]
                v[touched] = beta2 * v[touched] + (1 - beta2) * grad[touched] ** 2
                mh = m[touched] / (1 - beta1 ** step)
                vh = v[touched] / (1 - beta2 ** step)
                table[touched] -= lr * mh / (np.sqrt(vh) + 1e-8)
        return cls(vocab, table.astype(np.float32)).bind(tokenize)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, tokens=self.tokens, vectors=self.vectors)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> QueryStudent:
        """A student from :meth:`to_bytes`; ValueError for anything else."""
        if not data.startswith(b"PK"):  # numpy would take it for a pickle, and say to load it "unsafely"
            raise ValueError("not a query student (not a NumPy .npz archive: `streamrec distil-queries` writes one)")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(z["tokens"], z["vectors"])
        except Exception as exc:  # noqa: BLE001 - numpy says a foreign file many ways
            raise ValueError(f"not a query student ({type(exc).__name__}: {exc})") from None


__all__ = ["QueryStudent", "spans_of"]
