"""RESEARCH, not what the worker serves: validation search for the SessionHybrid +
Transformer blend (bench/transformer_blend.py; docs/evaluation.md). It ranks with
SessionHybrid and PyTorch Transformers directly, not through the worker's
``RecommendationStep``: its figures are research contenders and are reported as such, apart
from the served figure (``streamrec evaluate``, contender ``served``).

    .venv/bin/python bench/blend_search.py -d ../shared/data/yoochoose-100k

Runs on the validation split only (``train_tr`` -> ``train_valid``, session-rec protocol,
frozen): trains the Transformer on ``train_tr`` (seeds given), records for every
validation prediction SessionHybrid's scores and the Transformer's 300 most probable
items, then scores every (exponent, top_n, weight) of the grid without recomputing.
Prints HR@20 / MRR@20 for each; ``--dump`` keeps the raw records (pickle) for more analysis.
It never reads the test file. Training the Transformers takes minutes (``nice -n 19`` to
leave the cores to others).
"""

from __future__ import annotations

import argparse
import heapq
import json
import pickle
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from transformer_blend import SequenceModel, blend_scores  # noqa: E402

from online_models.base import session_key  # noqa: E402
from online_models.datasets import load_folder, sessions_of  # noqa: E402
from online_models.metrics import RankingMetrics  # noqa: E402
from online_models.types import Interaction, UserContext  # noqa: E402


def prefix_context(seq: list[Interaction], pos: int, max_recent: int) -> UserContext:
    """The session read up to click ``pos``: its last ``max_recent`` items, no purchases."""
    x = seq[pos]
    items = tuple(e.item_id for e in seq[max(0, pos + 1 - max_recent) : pos + 1])
    return UserContext(x.user_id, items, frozenset(), x.session_id, x.ts)


def collect(folder: Path, seed: int, keep: int = 300, session_params: dict | None = None, max_recent: int = 50,
            n_models: int = 1, model_config: dict | None = None, train_config: dict | None = None):
    """``[(target, hybrid top-keep scores, transformer top-keep probs)]`` over the validation
    predictions (frozen), and the Transformer's training metrics."""
    from online_models.session_knn import SessionHybrid

    train, valid, _ = load_folder(folder, split="valid")
    train.sort(key=lambda x: x.ts)
    hybrid = SessionHybrid(**(session_params or {}), seed=seed)
    seqs: dict[str, list[str]] = {}
    for x in train:
        hybrid.learn_one(x)
        seqs.setdefault(session_key(x), []).append(x.item_id)
    t0 = time.perf_counter()
    model = SequenceModel.fit(seqs, tuple(range(seed, seed + n_models)), model_config, train_config)
    train_s = time.perf_counter() - t0
    rows = []
    for seq in sessions_of(valid).values():
        for pos in range(len(seq) - 1):
            ctx = prefix_context(seq, pos, max_recent)
            h = hybrid._scores(ctx)
            htop = dict(heapq.nlargest(keep, h.items(), key=lambda kv: kv[1]))
            rows.append((seq[pos + 1].item_id, htop, model.probabilities(ctx.recent_items, keep)))
    return rows, {"models": model.metrics, "train_s": round(train_s, 1)}


def score(rows, weight: float, top_n: int, exponent: float = 1.0, ks=(10, 20)) -> dict[str, float]:
    m = RankingMetrics(ks)
    kmax = max(ks)
    for target, h, t in rows:
        s = blend_scores(h, t[:top_n], weight, exponent)
        m.update([i for i, _ in heapq.nsmallest(kmax, s.items(), key=lambda kv: (-kv[1], kv[0]))], target)
    return m.summary()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-d", "--data", type=Path, default=Path("../shared/data/yoochoose-100k"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.8,1.0,1.5,2.0,1000")
    ap.add_argument("--top-n", default="20,50,100,300")
    ap.add_argument("--exponents", default="1")
    ap.add_argument("--models", type=int, default=1, help="Transformers averaged (seeds seed..seed+models-1)")
    ap.add_argument("--model-config", type=json.loads, default=None,
                    help='Transformer settings over transformer_blend.MODEL_CONFIG, JSON: \'{"dropout": 0.3}\'')
    ap.add_argument("--train-config", type=json.loads, default=None,
                    help='training settings over transformer_blend.TRAIN_CONFIG, JSON: \'{"lr": 1e-3}\'')
    ap.add_argument("--dump", type=Path, default=None, help="pickle the raw records here (one file per seed: {seed})")
    args = ap.parse_args(argv)
    for seed in (int(s) for s in args.seeds.split(",")):
        rows, info = collect(args.data, seed, n_models=args.models, model_config=args.model_config,
                             train_config=args.train_config)
        print(f"seed {seed}: {len(rows)} validation predictions; transformer {info}", flush=True)
        if args.dump is not None:
            Path(str(args.dump).format(seed=seed)).write_bytes(pickle.dumps(rows))
        for a in (float(a) for a in args.exponents.split(",")):
            for top_n in (int(n) for n in args.top_n.split(",")):
                for w in (float(w) for w in args.weights.split(",")):
                    r = score(rows, w, top_n, a)
                    print(f"  exponent {a:4.2f} top_n {top_n:4d} weight {w:7.2f}: HR@20 {r['HR@20']:.4f} "
                          f"MRR@20 {r['MRR@20']:.4f} HR@10 {r['HR@10']:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
