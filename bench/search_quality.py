"""Retrieval quality and speed of the catalogue search the worker serves, on real shop queries.

    .venv/bin/python bench/search_quality.py --data ../shared/data/search-relevance/crowdflower_train.csv.zip

The CrowdFlower "Search Results Relevance" sample (Kaggle 2015): 261 real queries from shops,
each with 8-113 products that people graded 1 (irrelevant) to 4 (exact match). The catalogue
is every distinct product title in the file (9,708), with the first description seen for it
(HTML tags removed). Each query ranks the **whole** catalogue three ways, through
:class:`online_models.search.Catalogue`, the class the worker and ``streamrec serve`` use, at
its default settings:

- ``bm25``: the lexical index alone;
- ``embeddings``: the e5 vectors alone (approximate nearest neighbours);
- ``hybrid``: both, fused (what ``Catalogue.search`` returns): scores scaled to 0..1 per list,
  0.2 x BM25 + 0.8 x cosine. The weight was chosen on the first half of the sorted queries
  (every other one) among reciprocal-rank fusion and this, at several weights; the second half
  is held out, and reported apart.

NDCG@10 with graded gains ``2**(grade - 1) - 1`` (grade 1 gains nothing, grade 4 gains 7).
**Unjudged products count as grade 0**, irrelevant: a product judged only for another query is
assumed not to answer this one. That under-rates every method alike (some unjudged products
would be relevant). The ideal ranking is the query's judged products, best grade first.

It also prints the text model's speed (item texts in batches, single queries), the search
latency of each method, and the memory of the vector index. ``--student`` also fits a query
student on the catalogue's titles (``streamrec distil-queries``; docs/search.md, "A query
student") and ranks with its query vectors, at several BM25 weights.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.search import Catalogue, CatalogueItem, QueryStudent, TextEmbedder, fuse  # noqa: E402

_TAG = re.compile(r"<[^>]+>")


def read_crowdflower(path: Path) -> tuple[list[CatalogueItem], dict[str, dict[str, int]]]:
    """The catalogue (one item per distinct title) and, per query, item id -> grade."""
    opener = zipfile.ZipFile(path).open("train.csv") if path.suffix == ".zip" else open(path, "rb")
    with opener as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))
    items: dict[str, CatalogueItem] = {}
    judged: dict[str, dict[str, int]] = {}
    for row in rows:
        title = " ".join(row["product_title"].split())
        if title not in items:
            description = " ".join(html.unescape(_TAG.sub(" ", row["product_description"])).split())
            items[title] = CatalogueItem(item_id=f"p{len(items)}", title=title, description=description)
        item_id = items[title].item_id
        grades = judged.setdefault(row["query"].strip(), {})
        grades[item_id] = max(grades.get(item_id, 0), int(row["median_relevance"]))
    return list(items.values()), judged


def ndcg_at(ranked: list[str], grades: dict[str, int], k: int = 10) -> float:
    gain = lambda g: 2.0 ** max(g - 1, 0) - 1.0  # noqa: E731
    dcg = sum(gain(grades.get(item, 0)) / math.log2(i + 2) for i, item in enumerate(ranked[:k]))
    ideal = sorted((gain(g) for g in grades.values()), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def rrf(lexical: list[str], semantic: list[str], k: int, lexical_weight: float, fusion_k: int) -> list[str]:
    """Weighted reciprocal-rank fusion (the research contender to :func:`fuse`)."""
    scores: dict[str, float] = {}
    for ranked, weight in ((lexical, lexical_weight), (semantic, 1.0 - lexical_weight)):
        for rank, item in enumerate(ranked, 1):
            scores[item] = scores.get(item, 0.0) + weight / (fusion_k + rank)
    return [item for item, _ in sorted(scores.items(), key=lambda p: (-p[1], p[0]))[:k]]


def fusion_grid(catalogue: Catalogue, queries: list[str], vectors: dict, judged: dict) -> None:
    """NDCG@10 of each fusion on the first half of the queries (where the served one was chosen),
    the second half (held out) and all, from the same candidates (``catalogue.candidates`` deep)."""
    depth = catalogue.candidates
    lists = {q: (catalogue.lexical_scored(q, depth), catalogue.semantic_scored(q, depth, vectors[q])) for q in queries}
    contenders = {f"rrf k={fk} bm25={w}": (lambda lex, sem, w=w, fk=fk: rrf([i for i, _ in lex], [i for i, _ in sem], 10, w, fk))
                  for fk in (10, 60) for w in (0.5, 0.4, 0.3, 0.2)}
    contenders |= {f"combsum bm25={w}": (lambda lex, sem, w=w: [h.item_id for h in fuse(lex, sem, 10, w)])
                   for w in (0.5, 0.4, 0.3, 0.2, 0.1)}
    print(f"\n{'fusion':<22} {'1st half':>9} {'held out':>9} {'all':>7}")
    for name, method in contenders.items():
        scores = [ndcg_at(method(*lists[q]), judged[q]) for q in queries]
        print(f"{name:<22} {np.mean(scores[0::2]):>9.4f} {np.mean(scores[1::2]):>9.4f} {np.mean(scores):>7.4f}")


def student_figures(catalogue: Catalogue, embedder: TextEmbedder, items: list[CatalogueItem], queries: list[str],
                    vectors: dict, judged: dict) -> dict[str, float]:
    """A query student fitted on the catalogue's titles (as ``streamrec distil-queries`` fits
    it), its vectors in place of the model's: NDCG@10 alone and fused, at several BM25 weights."""
    t0 = time.perf_counter()
    student = QueryStudent.fit(embedder.model, [item.title for item in items if item.available])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    own = {q: student.encode(q) for q in queries}  # fit binds the model's tokenizer
    query_ms = (time.perf_counter() - t0) / len(queries) * 1000
    fell_back = sum(v is None for v in own.values())
    own = {q: vectors[q] if v is None else v for q, v in own.items()}  # no known word: the model's, as served
    cosine = float(np.mean([own[q] @ vectors[q] for q in queries]))
    print(f"\nquery student: fitted in {fit_s:.0f} s on {len(items):,} titles ({len(student.tokens):,} word pieces); "
          f"{query_ms:.3f} ms a query; {fell_back} of {len(queries)} queries had no known word (the model's vector); "
          f"mean cosine to the model's vector {cosine:.3f}")
    depth = catalogue.candidates
    out: dict[str, float] = {"fit_s": fit_s, "query_ms": query_ms, "fell_back": fell_back, "cosine": cosine}
    print(f"{'student':<22} {'1st half':>9} {'held out':>9} {'all':>7}")
    rows = {"embeddings alone": lambda q: catalogue.semantic(q, 10, own[q])}
    rows |= {f"hybrid bm25={w}": (lambda q, w=w: [h.item_id for h in fuse(catalogue.lexical_scored(q, depth),
                                                                          catalogue.semantic_scored(q, depth, own[q]), 10, w)])
             for w in (0.2, 0.3, 0.4, 0.5)}
    # as served: the catalogue's own search, its embedder holding the student (as STREAMREC_QUERY_STUDENT
    # makes it), so the BM25 weight follows whose vector each query got
    rows["served (search)"] = lambda q: [h.item_id for h in catalogue.search(q, 10)]
    before = embedder.student
    embedder.use_student(student)
    embedder.clear_cache()  # the model's vectors of these queries, cached above: as served, the student reads them
    try:
        for name, method in rows.items():
            scores = [ndcg_at(method(q), judged[q]) for q in queries]
            out[name] = float(np.mean(scores))
            print(f"{name:<22} {np.mean(scores[0::2]):>9.4f} {np.mean(scores[1::2]):>9.4f} {np.mean(scores):>7.4f}")
    finally:
        embedder.use_student(before)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="crowdflower_train.csv.zip (or train.csv)")
    parser.add_argument("--limit", type=int, default=0, help="index only the first N items (0: all)")
    parser.add_argument("--embed-description-chars", type=int, default=None,
                        help="characters of the description embedded (default: the catalogue's)")
    parser.add_argument("--snapshot", type=Path, help="restore the indexed catalogue from this file when it exists "
                        "(Catalogue.from_bytes, no embedding), else index and save it there")
    parser.add_argument("--fusion-grid", action="store_true",
                        help="also compare fusions (reciprocal rank and CombSUM at several BM25 weights) on each half")
    parser.add_argument("--student", action="store_true",
                        help="also fit a query student on the catalogue's titles (streamrec distil-queries) and rank "
                        "with its query vectors: alone, and fused at several BM25 weights")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.data.exists():
        parser.error(f"--data {args.data}: no such file")

    items, judged = read_crowdflower(args.data)
    if args.limit:
        keep = {i.item_id for i in items[: args.limit]}
        items = items[: args.limit]
        judged = {q: {i: g for i, g in gs.items() if i in keep} for q, gs in judged.items()}
        judged = {q: gs for q, gs in judged.items() if gs}
    print(f"catalogue: {len(items):,} items, {len(judged)} queries, "
          f"{sum(len(g) for g in judged.values()):,} judged pairs")

    embedder = TextEmbedder()
    options = {} if args.embed_description_chars is None else {"embed_description_chars": args.embed_description_chars}
    t0 = time.perf_counter()
    if args.snapshot is not None and args.snapshot.exists():
        catalogue = Catalogue.from_bytes(args.snapshot.read_bytes(), embedder, **options)
        index_s = time.perf_counter() - t0
        print(f"restored {len(catalogue):,} items from {args.snapshot} in {index_s:.1f} s (no embedding)")
    else:
        catalogue = Catalogue(embedder, **options)
        catalogue.upsert(items)
        done = 0
        while catalogue.pending:
            done += catalogue.flush(limit=1024)
            rate = done / (time.perf_counter() - t0)
            print(f"  indexed {done:,}/{len(items):,} items ({rate:.0f}/s)", file=sys.stderr, flush=True)
        index_s = time.perf_counter() - t0
        print(f"indexing: {len(items) / index_s:.1f} items/s (embedding in batches of {catalogue.embed_batch} "
              f"+ both indexes), {index_s:.1f} s; vector index {catalogue.memory_bytes / 2**20:.1f} MiB")
        if args.snapshot is not None:
            args.snapshot.write_bytes(catalogue.to_bytes())

    queries = sorted(judged)
    t0 = time.perf_counter()
    vectors = {q: embedder.queries([q])[0] for q in queries}
    query_s = (time.perf_counter() - t0) / len(queries)
    print(f"query embedding: {1 / query_s:.0f} queries/s one at a time ({query_s * 1000:.2f} ms each, uncached)")

    methods = {
        "bm25": lambda q: catalogue.lexical(q, 10),
        "embeddings": lambda q: catalogue.semantic(q, 10, vectors[q]),
        "hybrid": lambda q: [h.item_id for h in catalogue.search(q, 10, vectors[q])],
    }
    results: dict[str, dict[str, float]] = {}
    for name, method in methods.items():
        scores, times = [], []
        for q in queries:
            t = time.perf_counter()
            ranked = method(q)
            times.append(time.perf_counter() - t)
            scores.append(ndcg_at(ranked, judged[q]))
        ms = np.array(times) * 1000
        results[name] = {"ndcg@10": float(np.mean(scores)), "ndcg@10_tuning_half": float(np.mean(scores[0::2])),
                         "ndcg@10_held_out_half": float(np.mean(scores[1::2])),
                         "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
    print("\nNDCG@10 over all queries, and over the two halves of the sorted queries: the fusion's lexical_weight")
    print("was chosen on the first half (every other query, from the first); the second half was held out")
    print(f"\n{'method':<11} {'NDCG@10':>8} {'vs bm25':>8} {'1st half':>9} {'held out':>9} {'p50 ms':>7} {'p99 ms':>7}"
          "   (search after the query's vector)")
    base = results["bm25"]["ndcg@10"]
    for name, r in results.items():
        print(f"{name:<11} {r['ndcg@10']:>8.4f} {r['ndcg@10'] / base:>7.3f}x {r['ndcg@10_tuning_half']:>9.4f} "
              f"{r['ndcg@10_held_out_half']:>9.4f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}")
    if args.fusion_grid:
        fusion_grid(catalogue, queries, vectors, judged)
    if args.student:
        results["student"] = student_figures(catalogue, embedder, items, queries, vectors, judged)
    if args.json:
        args.json.write_text(json.dumps({"items": len(items), "queries": len(queries), "index_items_per_s": len(items) / index_s,
                                         "query_embed_ms": query_s * 1000, "vector_index_mib": catalogue.memory_bytes / 2**20,
                                         "methods": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
