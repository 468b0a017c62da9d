"""Int8 dynamic quantisation of the scorer on the CPU: speed against fp32, and what it costs in quality.

    .venv/bin/python bench/quant_bench.py --model /tmp/models-valid --data ../shared/data/yoochoose-100k

What it does, in order:

1. **Quantise.** ``onnxruntime.quantization.shape_inference.quant_pre_process`` on the
   registered ``model.onnx`` (symbolic shape inference needs ``auto_merge``: the position
   slice ``50 - seq_len`` cannot be decided otherwise), then ``quantize_dynamic`` once per
   variant: weights ``QInt8`` or ``QUInt8``, per-tensor or per-channel (``--variants``).
   ``quantize_dynamic`` rewrites the Linear layers whose weight is a constant (``Gemm``) into
   ``MatMulInteger`` with a dynamically quantised activation and stores the embedding tables
   as int8 (``Gather`` + ``DequantizeLinear``). ``MatMulConstBOnly`` (its default for dynamic
   mode) leaves in fp32 the activation x activation MatMuls (attention, candidate scoring) and
   the last block's q and k/v projections, whose weight ``forward_last`` slices by the input's
   width (7 of the 9 Linear layers of the serving model are quantised; the script prints it).
2. **Register.** Each int8 graph becomes a version of a registry of its own (``<out>/registry``),
   with the fp32 version's vocab, config and manifest data, so that it is loaded by
   ``ModelRegistry.load`` and checked like any version. Its ``parity.npz`` keeps the fp32
   version's parity *inputs*, and as reference the scores of **this int8 graph** on ONNX
   Runtime's CPU provider when it was made (an int8 graph cannot meet the fp32 PyTorch
   reference at the registry's 1e-4; the check then proves the file loads and runs as it did
   when it was registered). The manifest says so (``parity.reference``) and records the int8
   graph's max |diff| against the fp32 PyTorch reference on that sample.
3. **Speed.** fp32 (the registered graph, as served), fp32 after ``quant_pre_process`` alone,
   and every int8 variant, in one process, on the CPU provider, ``--threads`` intra-op threads
   (default 1), in alternating rounds (the order rotates each round; the CPU is shared). Inputs:
   ``gpu_scorer.export.random_inputs`` at the worker's batch shapes (``--batches``, default 16
   and 256 users; ``--cands`` 50 candidates; the model's ``max_len`` as the padded width), cut
   into the chunks of ``gpu_scorer.runtime.CPU_CHUNK`` users that ``OnnxScorer.score`` sends to
   ONNX Runtime on the CPU. Figure: process CPU µs per scored user (``time.process_time``),
   median over rounds, and the fp32 / int8 ratio (per round and over the medians). Wall µs is
   printed too. The fastest int8 variant (geometric mean of its ratios over the batch shapes) is
   the one measured for quality.
4. **Agreement** of each int8 variant with fp32 on the largest speed batch: max |score diff|,
   the mean overlap of the top 20 of the candidates and the top-1 agreement. **Where the time
   goes**: ONNX Runtime's profiler on one chunk, fp32 and the fastest int8 called in turn
   (``--profile-calls``, 0 skips it): kernel µs by op type, the Linear layers' share, and the
   bound on any speed-up of those layers alone (the call with them at zero cost).
5. **Quality.** ``streamrec evaluate -p session-rec --split <split> -m served`` (the worker's own
   step and settings, ``--mode learning`` by default) once with the fp32 version and once with
   the int8 version as ``--scorer-model``, back to back with the same code, on
   ``STREAMREC_SCORER_DEVICE=cpu`` and ``STREAMREC_SCORER_THREADS=--threads``. HR@20 / MRR@20 and
   the step's p50 are read from its ``--json-out``. The split must match the model: ``valid``
   for a model trained on ``train_tr``, ``test`` for one trained on ``train_full`` (the script
   warns when the manifest says otherwise).

Verdict (issue 15, item 5): offered as an option only if int8 is at least ``--min-speedup``
(1.3) times faster at every batch shape AND loses at most ``--max-hr-loss`` (0.005) HR@20.

Every figure printed comes from this run. ``--json-out`` writes them all. The quantised graphs,
the registry, the evaluate JSONs and the profiles stay in ``--out`` (default: a temporary folder,
removed). ``Cannot determine if 50 - seq_len < 0`` on stderr is symbolic shape inference's warning;
``auto_merge`` gets past it. The results of this script are in docs/evaluation.md ("Int8 dynamic
quantisation of the scorer").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpu_scorer import layout  # noqa: E402
from gpu_scorer.export import random_inputs  # noqa: E402
from gpu_scorer.model import ScorerConfig  # noqa: E402
from gpu_scorer.registry import ModelRegistry  # noqa: E402
from gpu_scorer.runtime import CPU_CHUNK, CPU_EP, OnnxScorer, make_session, session_options  # noqa: E402
from gpu_scorer.vocab import Vocab  # noqa: E402

# name -> (weight type, per-channel)
VARIANTS = {"s8": ("QInt8", False), "s8-pc": ("QInt8", True), "u8": ("QUInt8", False), "u8-pc": ("QUInt8", True)}
TRAIN_FILE = {"valid": "yoochoose-clicks-100k_train_tr.txt", "test": "yoochoose-clicks-100k_train_full.txt"}
# the Linear layers (fp32: Gemm, FusedGemm with the ReLU; int8: the fused dynamic-quantised MatMul)
DENSE_OPS = ("Gemm", "FusedGemm", "DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat")
PARITY_REFERENCE = ("this int8 graph on ONNX Runtime's CPUExecutionProvider when it was quantised "
                    "(not PyTorch: int8 cannot meet the fp32 reference at the registry's tolerance)")


def version_dir(model: Path) -> Path:
    """A registered version: a registry (its CURRENT version), a version directory or its model.onnx."""
    if model.is_file():
        model = model.parent
    if (model / layout.MANIFEST).is_file():
        return model
    version = layout.latest(model)
    if version is None:
        raise SystemExit(f"{model}: no registered model version (a registry, a version directory or its model.onnx)")
    return layout.version_path(model, version)


# -- 1. quantise --------------------------------------------------------------------------------


def pre_process(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization.shape_inference import quant_pre_process  # needs the onnx package

    with contextlib.chdir(dst.parent):  # a failed symbolic shape inference leaves its files in the cwd
        quant_pre_process(str(src.resolve()), str(dst.resolve()), auto_merge=True)
    return dst


def linear_layers(path: Path) -> tuple[int, int]:
    """(Gemm nodes, those whose weight is an initializer): what dynamic quantisation can reach."""
    import onnx

    graph = onnx.load(str(path)).graph
    consts = {t.name for t in graph.initializer}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    return len(gemms), sum(n.input[1] in consts for n in gemms)


def quantise(pre: Path, dst: Path, weight_type: str, per_channel: bool) -> dict:
    """``quantize_dynamic`` of the pre-processed graph; returns its op counts."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(pre), str(dst), weight_type=getattr(QuantType, weight_type), per_channel=per_channel)
    ops: dict[str, int] = {}
    for node in onnx.load(str(dst)).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {k: ops.get(k, 0) for k in ("MatMulInteger", "DynamicQuantizeLinear", "DequantizeLinear", "MatMul", "Gemm")}


# -- 2. register --------------------------------------------------------------------------------


def register_quantised(fp32: Path, onnx_path: Path, registry: ModelRegistry, quantisation: dict) -> str:
    """A version of ``registry`` for an int8 graph of the fp32 version ``fp32`` (see the module docstring)."""
    manifest = layout.read_manifest(fp32)
    with np.load(fp32 / "parity.npz") as sample:
        seq, cand, ref = sample["seq_ids"], sample["cand_ids"], sample["scores"]
    own = make_session(onnx_path, "cpu", threads=1).run(["scores"], {"seq_ids": seq, "cand_ids": cand})[0]
    parity = {
        "ok": True,
        "reference": PARITY_REFERENCE,
        "provider": CPU_EP,
        "fp32_reference_max_abs_diff": float(np.max(np.abs(own - ref))),
    }
    return registry.register(
        onnx_path, Vocab.load(fp32 / "vocab.json"),
        config=manifest["config"], metrics=manifest.get("metrics"), data=manifest.get("data"), parity=parity,
        parity_sample={"seq_ids": seq, "cand_ids": cand, "scores": own}, make_current=False,
        extra={"quantised_from": str(fp32.resolve()), "quantisation": quantisation},
    )


# -- 3. speed -----------------------------------------------------------------------------------


def cost_per_user(scorer: OnnxScorer, chunks: list[tuple[np.ndarray, np.ndarray]], users: int, iters: int) -> tuple[float, float]:
    """(process CPU µs, wall µs) per scored user over ``iters`` batches."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(iters):
        for seq, cand in chunks:
            scorer.run_ids(seq, cand)
    n = iters * users
    return (time.process_time() - c0) / n * 1e6, (time.perf_counter() - w0) / n * 1e6


def bench_speed(scorers: dict[str, OnnxScorer], cfg: ScorerConfig, batch: int, cands: int, rounds: int,
                budget_s: float, warmup: int) -> dict:
    seq, cand = random_inputs(SimpleNamespace(cfg=cfg), batch, cfg.max_len, cands, np.random.default_rng(batch))
    chunks = [(seq[lo:lo + CPU_CHUNK], cand[lo:lo + CPU_CHUNK]) for lo in range(0, batch, CPU_CHUNK)]
    names = list(scorers)
    for name in names:
        cost_per_user(scorers[name], chunks, batch, warmup)
    probe = cost_per_user(scorers[names[0]], chunks, batch, 3)[1] * batch / 1e6  # seconds per batch
    iters = max(3, int(budget_s / max(probe, 1e-6)))
    cpu: dict[str, list[float]] = {n: [] for n in names}
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c, w = cost_per_user(scorers[name], chunks, batch, iters)
            cpu[name].append(c)
            wall[name].append(w)
    base = names[0]
    rows = {}
    for name in names:
        rows[name] = {
            "cpu_us_per_user": statistics.median(cpu[name]),
            "wall_us_per_user": statistics.median(wall[name]),
            "ratio": statistics.median(cpu[base]) / statistics.median(cpu[name]),
            "ratio_rounds": [round(b / x, 2) for b, x in zip(cpu[base], cpu[name], strict=True)],
        }
    return {"batch": batch, "seq_len": cfg.max_len, "cands": cands, "iters": iters, "rounds": rounds, "rows": rows,
            "inputs": (seq, cand)}


def agreement(fp32: OnnxScorer, other: OnnxScorer, seq: np.ndarray, cand: np.ndarray, k: int = 20) -> dict:
    """max |score diff| against fp32, the mean overlap of the top ``k`` candidates, the top-1 agreement."""
    a = np.concatenate([fp32.run_ids(seq[lo:lo + CPU_CHUNK], cand[lo:lo + CPU_CHUNK]) for lo in range(0, len(seq), CPU_CHUNK)])
    b = np.concatenate([other.run_ids(seq[lo:lo + CPU_CHUNK], cand[lo:lo + CPU_CHUNK]) for lo in range(0, len(seq), CPU_CHUNK)])
    k = min(k, a.shape[1])
    ta, tb = np.argsort(-a, axis=1)[:, :k], np.argsort(-b, axis=1)[:, :k]
    overlap = np.mean([len(set(x) & set(y)) / k for x, y in zip(ta, tb, strict=True)])
    return {"max_abs_diff": float(np.max(np.abs(a - b))), "k": k, "topk_overlap": float(overlap),
            "top1_agree": float(np.mean(ta[:, 0] == tb[:, 0]))}


def profile(paths: dict[str, Path], seq: np.ndarray, cand: np.ndarray, threads: int, calls: int, out: Path) -> dict:
    """ONNX Runtime's own kernel times by op type, µs per call, over ``calls`` calls of one chunk per graph,
    the graphs called in turn (the same machine load for each): where the time goes."""
    import onnxruntime as ort

    sessions = {}
    for name, path in paths.items():
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = str(out / f"profile-{name}")
        sessions[name] = ort.InferenceSession(str(path), so, providers=[CPU_EP])
    for _ in range(calls):
        for sess in sessions.values():
            sess.run(["scores"], {"seq_ids": seq, "cand_ids": cand})
    result = {}
    for name, sess in sessions.items():
        by_op: dict[str, float] = {}
        for e in json.loads(Path(sess.end_profiling()).read_text(encoding="utf-8")):
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e["args"]["op_name"]
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / calls
        result[name] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return result


# -- 5. quality ---------------------------------------------------------------------------------


def streamrec_cmd() -> list[str]:
    exe = Path(sys.executable).with_name("streamrec")
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from stream.cli import main; main()"]


def evaluate(scorer_model: Path, data: Path, split: str, modes: list[str], threads: int, json_out: Path) -> tuple[str, dict]:
    """One ``streamrec evaluate`` run, served only; returns (the command, the served figures by mode)."""
    env_add = {"STREAMREC_SCORER_DEVICE": "cpu", "STREAMREC_SCORER_THREADS": str(threads)}
    args = ["evaluate", "-p", "session-rec", "-d", str(data), "--split", split, "--scorer-model", str(scorer_model),
            "-m", "served", *[a for m in modes for a in ("--mode", m)], "--json-out", str(json_out), "--json"]
    shown = " ".join(f"{k}={v}" for k, v in env_add.items()) + " streamrec " + shlex.join(args)
    t0 = time.perf_counter()
    proc = subprocess.run([*streamrec_cmd(), *args], env={**os.environ, **env_add}, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed ({proc.returncode}): {shown}\n{proc.stderr[-3000:]}")
    report = json.loads(json_out.read_text(encoding="utf-8"))
    out = {"scorer": report.get("scorer"), "predictions": report.get("test_predictions"),
           "seconds": round(time.perf_counter() - t0, 1)}
    for mode, m in report["models"]["served"].items():
        out[mode] = {"HR@20": m["HR@20"], "MRR@20": m["MRR@20"], "step_p50_ms": m["latency_ms"]["step_p50"],
                     "dead_lettered": m.get("dead_lettered")}
    return shown, out


# -- main ---------------------------------------------------------------------------------------


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True,
                    help="the fp32 scorer: a registry (its CURRENT version), a version directory or its model.onnx")
    ap.add_argument("--data", type=Path, default=Path("../shared/data/yoochoose-100k"),
                    help="the session-rec folder (yoochoose-100k) for the quality runs")
    ap.add_argument("--split", choices=["valid", "test"], default="valid",
                    help="session-rec split: valid (model trained on train_tr) or test (on train_full)")
    ap.add_argument("--mode", action="append", choices=["learning", "frozen"],
                    help="evaluate modes (repeatable; default learning)")
    ap.add_argument("--out", type=Path, default=None, help="keep the quantised graphs, registry and JSONs here")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"int8 variants to make and time, comma-separated from {', '.join(VARIANTS)} "
                    "(s8: QInt8 weights, u8: QUInt8, -pc: per channel)")
    ap.add_argument("--quality", default="fastest",
                    help="int8 variants to evaluate: 'fastest' (default), 'all', 'none', or names")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (timing and evaluate)")
    ap.add_argument("--batches", default="16,256", help="users per batch (comma-separated)")
    ap.add_argument("--cands", type=int, default=50, help="candidates per user")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds")
    ap.add_argument("--round-seconds", type=float, default=0.25, help="about this long per model per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profile-calls", type=int, default=200,
                    help="calls profiled with ONNX Runtime's profiler (fp32 and the fastest int8; 0: skip)")
    ap.add_argument("--min-speedup", type=float, default=1.3)
    ap.add_argument("--max-hr-loss", type=float, default=0.005)
    ap.add_argument("--json-out", type=Path, default=None, help="write every figure here")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    modes = args.mode or ["learning"]

    fp32_dir = version_dir(args.model)
    manifest = layout.read_manifest(fp32_dir)
    cfg = ScorerConfig.from_dict(manifest["config"])
    trained_on = str(manifest.get("data", {}).get("dataset", ""))
    if args.quality != "none" and not trained_on.endswith(TRAIN_FILE[args.split]):
        print(f"WARNING: {fp32_dir} was trained on {trained_on or '?'}; --split {args.split} learns "
              f"{TRAIN_FILE[args.split]}", flush=True)

    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="quant_bench-")
        out = Path(tmp.name)
    else:
        out = args.out
        out.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, names, modes, fp32_dir, cfg, out)
    finally:
        if tmp is not None:
            tmp.cleanup()


def run(args, names: list[str], modes: list[str], fp32_dir: Path, cfg: ScorerConfig, out: Path) -> int:
    import onnxruntime as ort

    print(f"fp32: {fp32_dir} (dim {cfg.dim}, {cfg.n_blocks} blocks, max_len {cfg.max_len}, {cfg.n_items:,} rows); "
          f"onnxruntime {ort.__version__}; {args.threads} intra-op thread(s); work dir {out}", flush=True)
    (out / "fp32-pre").mkdir(exist_ok=True)  # a bare version dir (graph + vocab) for OnnxScorer; speed only
    shutil.copyfile(fp32_dir / "vocab.json", out / "fp32-pre" / "vocab.json")
    pre = pre_process(fp32_dir / "model.onnx", out / "fp32-pre" / "model.onnx")
    n_gemm, n_const = linear_layers(pre)
    print(f"pre-processed fp32 graph: {n_gemm} Gemm (Linear layers), {n_const} with a constant weight (the others "
          "slice the packed qkv weight by the input's width, so dynamic quantisation leaves them in fp32)", flush=True)
    registry = ModelRegistry(out / "registry")
    made: dict[str, dict] = {}
    for name in names:
        wt, pc = VARIANTS[name]
        q = out / f"model.{name}.onnx"
        ops = quantise(pre, q, wt, pc)
        quant = {"method": "quant_pre_process(auto_merge=True) + quantize_dynamic", "weight_type": wt,
                 "per_channel": pc, "onnxruntime": ort.__version__, "ops": ops}
        version = register_quantised(fp32_dir, q, registry, quant)
        made[name] = {"version": version, "path": str(registry.path(version)), "size_bytes": q.stat().st_size, **quant}
        print(f"  {name}: {wt} weights, per_channel={pc} -> {registry.path(version)} "
              f"({q.stat().st_size / 1024:.0f} KiB against {(fp32_dir / 'model.onnx').stat().st_size / 1024:.0f}); "
              f"ops {ops}", flush=True)

    # every version through the registry's own load and parity check
    fp32_reg = ModelRegistry(fp32_dir.parent)
    scorers = {"fp32": fp32_reg.load(fp32_dir.name, "cpu", threads=args.threads)}
    scorers["fp32-pre"] = OnnxScorer(pre.parent, "cpu", threads=args.threads)  # speed only: pre-processing alone
    for name in names:
        scorers[name] = registry.load(made[name]["version"], "cpu", threads=args.threads)
        made[name]["fp32_reference_max_abs_diff"] = registry.manifest(made[name]["version"])["parity"]["fp32_reference_max_abs_diff"]

    batches = [int(b) for b in args.batches.split(",")]
    speed = []
    print(f"\nspeed: CPU µs per scored user (process time), median of {args.rounds} alternating rounds; "
          f"{args.cands} candidates, padded width {cfg.max_len}, chunks of {CPU_CHUNK} users as OnnxScorer.score sends them", flush=True)
    print(f"{'batch':>5} {'model':>8} | {'CPU µs/user':>11} {'wall µs/user':>12} | {'fp32/x':>6}  per round")
    for b in batches:
        res = bench_speed(scorers, cfg, b, args.cands, args.rounds, args.round_seconds, args.warmup)
        seq, cand = res.pop("inputs")
        for name, row in res["rows"].items():
            print(f"{b:>5} {name:>8} | {row['cpu_us_per_user']:>11.1f} {row['wall_us_per_user']:>12.1f} | "
                  f"{row['ratio']:>5.2f}x  {row['ratio_rounds']}", flush=True)
        speed.append(res)
    agree = {name: agreement(scorers["fp32"], scorers[name], seq, cand) for name in names}
    print(f"\nagreement with fp32 on the {batches[-1]}-user batch (and on the parity sample against PyTorch's fp32 scores):")
    for name in names:
        a = agree[name]
        print(f"  {name}: max |diff| {a['max_abs_diff']:.4f}, top-{a['k']} overlap {a['topk_overlap']:.4f}, "
              f"top-1 agree {a['top1_agree']:.4f}; parity sample max |diff| {made[name]['fp32_reference_max_abs_diff']:.4f}")

    score = {n: geomean([s["rows"][n]["ratio"] for s in speed]) for n in names}
    fastest = max(names, key=lambda n: score[n])
    print(f"\nfastest int8 variant: {fastest} (geometric mean of fp32/int8 over batches {batches}: "
          + ", ".join(f"{n} {score[n]:.2f}x" for n in names) + ")", flush=True)

    prof = {}
    if args.profile_calls:
        pseq, pcand = seq[:CPU_CHUNK], cand[:CPU_CHUNK]
        print(f"\nwhere the time goes: ONNX Runtime's kernel times by op type, one {len(pseq)}-user call, mean of "
              f"{args.profile_calls} calls each, in turn (profiling on, so a little slower than above)", flush=True)
        paths = {"fp32": fp32_dir / "model.onnx", fastest: registry.path(made[fastest]["version"]) / "model.onnx"}
        for name, by_op in profile(paths, pseq, pcand, args.threads, args.profile_calls, out).items():
            total = sum(by_op.values())
            dense = sum(v for k, v in by_op.items() if k in DENSE_OPS)
            prof[name] = {"total_us": total, "dense_us": dense, "by_op_us": by_op}
            print(f"  {name}: {total:.0f} µs a call ({total / len(pseq):.1f} µs/user); the projections "
                  f"({'/'.join(k for k in by_op if k in DENSE_OPS)}) {dense:.0f} µs = {dense / total:.0%}; "
                  f"the rest: " + ", ".join(f"{k} {v:.0f}" for k, v in by_op.items() if k not in DENSE_OPS and v >= 0.03 * total),
                  flush=True)
        f = prof["fp32"]
        print(f"  bound: with the fp32 projections at zero cost the call would be "
              f"{f['total_us'] / (f['total_us'] - f['dense_us']):.2f}x faster", flush=True)

    wanted = {"fastest": [fastest], "all": names, "none": []}.get(args.quality)
    if wanted is None:
        wanted = [v.strip() for v in args.quality.split(",") if v.strip() in made]
    quality: dict[str, dict] = {}
    if wanted:
        print(f"\nquality: streamrec evaluate, session-rec, split {args.split}, served, modes {modes}", flush=True)
        runs = [("fp32", fp32_dir)] + [(n, registry.path(made[n]["version"])) for n in wanted]
        for name, path in runs:
            cmd, figures = evaluate(path, args.data, args.split, modes, args.threads, out / f"evaluate.{name}.json")
            quality[name] = {"command": cmd, **figures}
            print(f"  $ {cmd}\n  {name}: {figures['scorer']}, {figures['predictions']} predictions, {figures['seconds']} s", flush=True)
            for mode in modes:
                m = figures[mode]
                print(f"    {mode}: HR@20 {m['HR@20']:.4f}  MRR@20 {m['MRR@20']:.4f}  step p50 {m['step_p50_ms']} ms  "
                      f"dead-lettered {m['dead_lettered']}", flush=True)

    verdict = None
    if fastest in quality:
        ratios = {s["batch"]: s["rows"][fastest]["ratio"] for s in speed}
        loss = quality["fp32"][modes[0]]["HR@20"] - quality[fastest][modes[0]]["HR@20"]
        fast_ok = min(ratios.values()) >= args.min_speedup
        hr_ok = loss <= args.max_hr_loss
        verdict = {"variant": fastest, "ratios": ratios, "hr20_loss": loss, "mode": modes[0],
                   "faster_enough": fast_ok, "quality_kept": hr_ok, "qualifies": fast_ok and hr_ok}
        print(f"\nverdict ({fastest}, {modes[0]} mode): speed "
              + ", ".join(f"batch {b} {r:.2f}x" for b, r in ratios.items())
              + f" (need >= {args.min_speedup}x: {'yes' if fast_ok else 'no'}); HR@20 loss {loss:+.4f} "
              f"(need <= {args.max_hr_loss}: {'yes' if hr_ok else 'no'}) -> "
              + ("QUALIFIES: offer it as an option" if fast_ok and hr_ok else "does NOT qualify"))
    if args.json_out is not None:
        report = {"fp32": str(fp32_dir), "onnxruntime": ort.__version__, "threads": args.threads, "variants": made,
                  "speed": speed, "agreement": agree, "fastest": fastest, "profile": prof, "quality": quality, "verdict": verdict,
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        args.json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
