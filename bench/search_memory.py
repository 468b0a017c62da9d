"""Memory of the catalogue's indexes (BM25 and vectors) at a given size: does 100,000 items fit in 500 MB?

    .venv/bin/python bench/search_memory.py --items 100000

Memory does not depend on what the vectors say, so the items get random unit vectors (a stub in
place of the text model, which would take about 35 minutes to embed 100,000 texts here) and
titles of 8 words drawn from a vocabulary of 20,000, with a 40-word description each. Prints the
process's resident memory before and after building :class:`online_models.search.Catalogue`,
the vector index's own figure, and the size of the catalogue's snapshot.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from online_models.search import Catalogue, CatalogueItem  # noqa: E402


class RandomVectors:
    """The text model's interface with random unit vectors (memory only, no meaning)."""

    dim = 384
    name = "random unit vectors (memory bench)"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def _unit(self, n: int) -> np.ndarray:
        v = self.rng.standard_normal((n, self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def queries(self, texts):
        return self._unit(len(texts))

    def passages(self, texts):
        return self._unit(len(texts))


def rss_mib() -> float:
    """Resident memory now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    vocabulary = [f"w{i}" for i in range(20_000)]
    words = rng.integers(0, len(vocabulary), size=(args.items, 48))
    items = [CatalogueItem(item_id=f"item-{n}", title=" ".join(vocabulary[w] for w in row[:8]),
                           description=" ".join(vocabulary[w] for w in row[8:]), category_path=("c", f"c{n % 300}"))
             for n, row in enumerate(words)]
    del words
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    catalogue = Catalogue(RandomVectors(args.seed))
    catalogue.upsert(items)
    while catalogue.pending:
        catalogue.flush(limit=5000)
    built_s = time.perf_counter() - started
    gc.collect()
    after = rss_mib()
    snapshot = catalogue.to_bytes()
    print(f"{len(catalogue):,} items indexed in {built_s:.1f} s (no text model: random vectors)")
    print(f"resident memory: {before:,.0f} MiB before, {after:,.0f} MiB after: the catalogue takes {after - before:,.0f} MiB "
          f"(both indexes and the tables; the items' own objects, made before, are in the first figure)")
    print(f"vector index (usearch, f16, its own count): {catalogue.memory_bytes / 2**20:,.0f} MiB")
    print(f"snapshot (items and f16 vectors): {len(snapshot) / 2**20:,.0f} MiB")
    t0 = time.perf_counter()
    for _ in range(200):
        catalogue.search(" ".join(vocabulary[w] for w in rng.integers(0, len(vocabulary), 3)), 20)
    print(f"hybrid search over {len(catalogue):,} items: {(time.perf_counter() - t0) / 200 * 1000:.2f} ms per query "
          "(random query vector; the text model's query time not included)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
