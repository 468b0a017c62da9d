"""BM25 over item texts, in a tantivy index held in memory.

tantivy (MIT; the Rust engine behind Quickwit and ParadeDB, here through its Python binding)
scores with BM25 (k1 = 1.2, b = 0.75), adds and deletes documents incrementally and merges
its segments on its own threads, so items can arrive one by one for the life of a worker.

Text is cut into tokens by one analyzer, the same for items and queries: a run of letters or
digits is a word, lower-cased and stemmed with Snowball's English stemmer ("lights" and
"light" meet); a Chinese, Japanese or Korean character is a token on its own, since those
scripts do not separate words with spaces. Queries are bags of tokens (any of them may match);
nothing in a query is syntax, so a shopper's quotes or colons cannot make it fail.

The index is not snapshotted as such: it is rebuilt from the catalogue's item texts on
restore (about 20,000 items a second here), which keeps the snapshot format tantivy-free.
"""

from __future__ import annotations

import tantivy

MAX_QUERY_TOKENS = 32
"""Tokens after this many in a query are ignored."""

_TOKEN = r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]|[\p{L}\p{N}]+"
_TOKENIZER = "streamrec_text"


def _analyzer() -> tantivy.TextAnalyzer:
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.regex(_TOKEN))
        .filter(tantivy.Filter.remove_long(64))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


class LexicalIndex:
    """Items' texts under integer keys; :meth:`search` ranks them by BM25 against a query.

    Changes are seen by searches after :meth:`commit` (the catalogue commits once per batch).

    >>> index = LexicalIndex()
    >>> index.upsert(1, "Set of 10 LED Christmas Lights")
    >>> index.upsert(2, "女士冬季长款羽绒服")
    >>> index.commit()
    >>> [key for key, _ in index.search("christmas light", 5)], [key for key, _ in index.search("羽绒服", 5)]
    ([1], [2])
    >>> index.remove(1); index.commit(); index.search("lights", 5), len(index)
    ([], 1)
    """

    def __init__(self, heap_bytes: int = 15_000_000) -> None:
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("text", stored=False, tokenizer_name=_TOKENIZER)
        builder.add_integer_field("key", stored=True, indexed=True, fast=True)
        self._schema = builder.build()
        self._analyzer = _analyzer()
        self._index = tantivy.Index(self._schema)  # no path: in memory
        self._index.register_tokenizer(_TOKENIZER, self._analyzer)
        self._writer = self._index.writer(heap_size=heap_bytes, num_threads=1)
        self._dirty = False
        self._count = 0

    def tokens(self, text: str) -> list[str]:
        """The tokens ``text`` is indexed (or searched) as."""
        return self._analyzer.analyze(text)

    def upsert(self, key: int, text: str) -> None:
        """Index ``text`` under ``key``, replacing what was there."""
        self._writer.delete_documents_by_term("key", key)
        doc = tantivy.Document()
        doc.add_text("text", text)
        doc.add_integer("key", key)
        self._writer.add_document(doc)
        self._dirty = True

    def remove(self, key: int) -> None:
        self._writer.delete_documents_by_term("key", key)
        self._dirty = True

    def commit(self) -> None:
        """Make the changes since the last commit visible to searches."""
        if self._dirty:
            self._writer.commit()
            self._index.reload()
            self._count = self._index.searcher().num_docs
            self._dirty = False

    def __len__(self) -> int:
        return self._count

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """The best ``k`` keys for ``query`` with their BM25 scores, best first."""
        tokens = list(dict.fromkeys(self._analyzer.analyze(query)))[:MAX_QUERY_TOKENS]
        if not tokens or k <= 0 or self._count == 0:
            return []
        should = tantivy.Occur.Should
        clauses = [(should, tantivy.Query.term_query(self._schema, "text", token)) for token in tokens]
        searcher = self._index.searcher()
        hits = searcher.search(tantivy.Query.boolean_query(clauses), k).hits
        return [(searcher.doc(address)["key"][0], score) for score, address in hits]

    def close(self) -> None:
        """Stop the writer's merge threads (a dropped index does too, later)."""
        self._writer.wait_merging_threads()
