"""Scorer latency: PyTorch eager vs ONNX Runtime for the same model and batch.

CPU (default):   .venv/bin/python bench/scorer_bench.py
GPU:             .venv/bin/python bench/scorer_bench.py --device cuda [--cuda-graph] [--fp16]

The model is the serving architecture with random weights (speed does not depend on the
weights; ``--model`` benchmarks a registered version instead). Torch and ORT run in
alternating rounds so that both see the same machine load (this CPU is shared); the
ratio is reported per round and over all rounds. Candidate scores/second = batch x
candidates / median latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scorer.errors import ScorerDeviceError  # noqa: E402
from gpu_scorer.export import export_onnx, random_inputs  # noqa: E402
from gpu_scorer.model import SASRecScorer, ScorerConfig  # noqa: E402
from gpu_scorer.runtime import OnnxScorer, default_threads  # noqa: E402
from gpu_scorer.vocab import Vocab  # noqa: E402
from online_models.metrics import percentile  # noqa: E402


def timed(fn, iters: int, sync=None) -> list[float]:
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        out.append((time.perf_counter() - t) * 1000)
    return out


def build(args, tmp: Path) -> tuple[SASRecScorer, Path]:
    if args.model:
        from gpu_scorer.registry import ModelRegistry
        from gpu_scorer.runtime import resolve_model_dir

        vdir = resolve_model_dir(args.model, args.model_dir)
        cfg = ScorerConfig.from_dict(ModelRegistry(vdir.parent).manifest(vdir.name)["config"])
        print(f"note: --model gives the ORT graph of {vdir.name}; PyTorch runs the same architecture with random weights")
        return SASRecScorer(cfg).eval(), vdir
    torch.manual_seed(0)
    cfg = ScorerConfig(n_items=args.items + 2, dim=args.dim, n_blocks=args.blocks, n_heads=args.heads, max_len=args.seq_len)
    model = SASRecScorer(cfg).eval()
    export_onnx(model, tmp / "model.onnx")
    Vocab([f"i{k}" for k in range(args.items)]).save(tmp / "vocab.json")
    return model, tmp


def bench_shape(model, scorer, b, seq_len, c, args, dev, sync) -> dict:
    seq, cand = random_inputs(model, b, seq_len, c, np.random.default_rng(b))
    tseq, tcand = torch.from_numpy(seq).to(dev), torch.from_numpy(cand).to(dev)
    mdl = model.to(dev)

    def torch_call():
        with torch.inference_mode():
            return mdl(tseq, tcand).cpu()  # the caller needs the scores on the host either way

    def ort_call():
        return scorer.run_ids(seq, cand)

    for _ in range(args.warmup):
        torch_call(), ort_call()
    tt, oo, ratios = [], [], []
    for _ in range(args.rounds):
        t = timed(torch_call, args.iters, sync)
        o = timed(ort_call, args.iters)
        tt += t
        oo += o
        ratios.append(statistics.median(t) / statistics.median(o))
    return {
        "batch": b, "seq_len": seq_len, "cands": c,
        "torch_p50_ms": percentile(tt, 50), "torch_p99_ms": percentile(tt, 99),
        "ort_p50_ms": percentile(oo, 50), "ort_p99_ms": percentile(oo, 99),
        "ratio_p50": percentile(tt, 50) / percentile(oo, 50),
        "ratio_rounds": [round(r, 2) for r in ratios],
        "ort_scores_per_s": b * c / (percentile(oo, 50) / 1000),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: runtime default)")
    ap.add_argument("--spin", action="store_true", help="let ORT's CPU threads spin (lower latency on an idle machine)")
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=50)
    ap.add_argument("--cands", type=int, default=100)
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default cpu 1,16,64,256; cuda 64,256,1024,4096)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--fp16", action="store_true")
    ap.add_argument("--model", help="a registered version (name, 'latest' or path) instead of random weights")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    cuda = args.device == "cuda"
    batches = [int(x) for x in (args.batches or ("64,256,1024,4096" if cuda else "1,16,64,256")).split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, path = build(args, Path(tmp))
        try:
            scorer = OnnxScorer(path, args.device, threads=threads, spin=args.spin, cuda_graph=args.cuda_graph,
                                fp16=args.fp16, max_batch=max(batches), max_cands=args.cands)
        except ScorerDeviceError as exc:
            print(f"cannot benchmark on {args.device}: {exc}", file=sys.stderr)
            return 2
        dev = torch.device("cuda" if cuda else "cpu")
        sync = torch.cuda.synchronize if cuda else None
        print(f"ORT {scorer.provider} vs PyTorch eager on {dev}; threads={threads} spin={args.spin} "
              f"model dim={model.cfg.dim} blocks={model.cfg.n_blocks} items={model.cfg.n_items:,}; "
              f"{args.rounds} rounds x {args.iters} calls, alternating")
        rows = []
        if cuda and args.cuda_graph and len(set(batches)) > 1:
            print(f"--cuda-graph captures one shape: measuring batch {max(batches)} only (run each size on its own "
                  f"for the others: a graph of N users answers any batch up to N, padded)")
        for b in batches:
            if cuda and args.cuda_graph and b != max(batches):
                continue  # one captured shape
            rows.append(bench_shape(model, scorer, b, model.cfg.max_len, args.cands, args, dev, sync))
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"{'batch':>6} {'seq':>4} {'cands':>5} | {'torch p50':>9} {'p99':>7} | {'ORT p50':>8} {'p99':>7} | {'ratio':>5}  per-round      | ORT scores/s")
    for r in rows:
        print(f"{r['batch']:>6} {r['seq_len']:>4} {r['cands']:>5} | {r['torch_p50_ms']:>7.2f}ms {r['torch_p99_ms']:>5.2f}ms | "
              f"{r['ort_p50_ms']:>6.2f}ms {r['ort_p99_ms']:>5.2f}ms | {r['ratio_p50']:>4.2f}x  {r['ratio_rounds']} | {r['ort_scores_per_s']:,.0f}")
    if cuda:
        ref = next((r for r in rows if r["batch"] == 64), rows[0])
        best = max(rows, key=lambda r: r["ort_scores_per_s"])
        print(f"GPU targets: p99 at {ref['batch']}x{ref['cands']}x{ref['seq_len']} = {ref['ort_p99_ms']:.3f} ms (target <= 2 ms); "
              f"best throughput {best['ort_scores_per_s'] / 1e6:.1f}M scores/s at batch {best['batch']} (target >= 20M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
