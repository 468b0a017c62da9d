"""RESEARCH measure of the Transformer alone (session-rec protocol, YooChoose / RSC15 100k sample): not what the worker serves.

The worker serves the blend of its online models and the Transformer through its
``RecommendationStep``; this script ranks all items with a freshly trained Transformer and
nothing else, to measure that one model. The served figure comes from ``streamrec evaluate``
(contender ``served``).

    .venv/bin/python bench/scorer_quality.py --data ../shared/data/yoochoose-100k

Train on ``yoochoose-clicks-100k_train_full.txt`` (a session plays the user; the training
code holds out the last click of up to ``--eval-users`` sessions for early stopping).
Then for every test session and every position i, the model reads clicks 0..i and ranks
**all** training items for click i+1: HR@20 = share of next clicks in the top 20,
MRR@20 = mean of 1/rank (0 beyond 20). A next click on an item unknown to training counts
as a miss. Reported over the whole test file and over exactly the first 99 test sessions
(387 predictions), the slice for which session-rec saved the baselines' lists
(V-SkNN 0.6098 / 0.3342, AR 0.5917 / 0.3160, GRU4Rec 0.5711 / 0.3289, SR 0.5607 / 0.3275).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scorer.training import TrainConfig, left_pad, sequences_from_interactions, train  # noqa: E402
from gpu_scorer.vocab import FIRST_ITEM_ROW  # noqa: E402
from online_models.datasets import read_yoochoose  # noqa: E402
from online_models.metrics import rank_summary  # noqa: E402

BASELINES = {"V-SkNN": (0.6098, 0.3342), "AR": (0.5917, 0.3160), "GRU4Rec": (0.5711, 0.3289), "SR": (0.5607, 0.3275)}


def test_sessions(path: Path) -> list[list[str]]:
    """Sessions in file order (first appearance), clicks in time order."""
    order: dict[str, list[tuple[int, str]]] = {}
    for x in read_yoochoose(path):
        order.setdefault(x.user_id, []).append((x.ts, x.item_id))
    return [[it for _, it in sorted(v, key=lambda p: p[0])] for v in order.values()]


def next_click_ranks(model, vocab, sessions: list[list[str]], k: int = 20, batch: int = 1024) -> np.ndarray:
    """1-based rank of each next click among all items (0 = not in the top k or unknown)."""
    prefixes, targets = [], []
    for s in sessions:
        rows = vocab.rows(s)
        for i in range(len(s) - 1):
            prefixes.append(rows[: i + 1])
            targets.append(rows[i + 1])
    x = left_pad(prefixes, model.cfg.max_len)
    t = torch.tensor(targets)
    out = []
    with torch.inference_mode():
        table = model.item_emb.weight
        for lo in range(0, len(x), batch):
            scores = model.encode_last(torch.from_numpy(x[lo : lo + batch])) @ table.T
            scores[:, :FIRST_ITEM_ROW] = -torch.inf
            top = scores.topk(k, dim=1).indices
            tt = t[lo : lo + batch, None]
            hit = (top == tt) & (tt >= FIRST_ITEM_ROW)
            rank = torch.where(hit.any(1), hit.float().argmax(1) + 1, torch.zeros(len(tt), dtype=torch.long))
            out.append(rank.numpy())
    return np.concatenate(out)


def summarize(ranks: np.ndarray) -> dict:
    m = rank_summary(ranks.tolist(), ks=(20,))
    return {"n": int(len(ranks)), "hr@20": m["HR@20"], "mrr@20": m["MRR@20"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/yoochoose-100k"))
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--patience", type=int, default=3)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=50)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--eval-users", type=int, default=2000)
    ap.add_argument("--seeds", default="0", help="comma-separated seeds; one model each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_path = args.data / "yoochoose-clicks-100k_train_full.txt"
    test_path = args.data / "yoochoose-clicks-100k_test.txt"
    sequences = sequences_from_interactions(read_yoochoose(train_path))
    sessions = test_sessions(test_path)
    model_cfg = {"dim": args.dim, "n_blocks": args.blocks, "n_heads": args.heads, "max_len": args.max_len, "dropout": args.dropout}
    print("RESEARCH: the Transformer alone, ranking all training items; not what the worker serves "
          "(the served figure: `streamrec evaluate`, contender `served`)", flush=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        t0 = time.perf_counter()
        tc = TrainConfig(epochs=args.epochs, patience=args.patience, lr=args.lr, batch_size=args.batch_size,
                         eval_users=args.eval_users, seed=seed, progress=args.progress)
        res = train(sequences, model_cfg, tc)
        ranks = next_click_ranks(res.model, res.vocab, sessions)
        n99 = sum(len(s) - 1 for s in sessions[:99])
        row = {"seed": seed, "all": summarize(ranks), "first99": summarize(ranks[:n99]),
               "val": {k: res.metrics[k] for k in ("val_hr@10", "val_ndcg@10", "best_epoch", "epochs_run")},
               "train_seconds": round(time.perf_counter() - t0, 1), "items": res.data["items"]}
        results.append(row)
        print(f"seed {seed}: all {row['all']['n']} predictions HR@20 {row['all']['hr@20']:.4f} MRR@20 {row['all']['mrr@20']:.4f} | "
              f"first 99 sessions ({row['first99']['n']}) HR@20 {row['first99']['hr@20']:.4f} MRR@20 {row['first99']['mrr@20']:.4f} | "
              f"best epoch {row['val']['best_epoch']}/{row['val']['epochs_run']}, {row['train_seconds']} s", flush=True)
    if len(results) > 1:
        for part in ("all", "first99"):
            hr = [r[part]["hr@20"] for r in results]
            mrr = [r[part]["mrr@20"] for r in results]
            print(f"mean over seeds, {part}: HR@20 {np.mean(hr):.4f} ± {np.std(hr):.4f}  MRR@20 {np.mean(mrr):.4f} ± {np.std(mrr):.4f}")
    print("session-rec baselines on the first 99 sessions (387 predictions): "
          + ", ".join(f"{k} {h:.4f}/{m:.4f}" for k, (h, m) in BASELINES.items()))
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
