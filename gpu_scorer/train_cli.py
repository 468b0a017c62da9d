"""``streamrec train``: event log -> Transformer -> ONNX -> parity check -> registered version.

Registered by the stream CLI as ``app.command("train")(gpu_scorer.train_cli.train)``; the
parameters carry their typer options, so ``streamrec train --help`` documents them.

Every ``streamrec`` command imports this module, the worker included, and the worker runs
without torch (``pip install streamrec``; training is ``pip install 'streamrec[train]'``).
So this module imports nothing that needs torch, and the command checks for torch before
anything else: without it, one line names the extra to install. Then it imports the two
torch-bound modules, :mod:`gpu_scorer.training` and :mod:`gpu_scorer.export`, inside the
command: the one project import inside a function in the package. It cannot move to the
top without every command loading torch (a second or more, and failing where it is
absent), and it cannot move into those modules: :mod:`gpu_scorer.model` subclasses
``torch.nn.Module``, so torch is needed to define the model at all.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gpu_scorer.layout import MANIFEST, model_dir_problem
from gpu_scorer.registry import ModelRegistry
from gpu_scorer.runtime import DEVICES, cuda_unavailable
from online_models.datasets import FORMATS, SEED_MAX, read_interactions

DEFAULT_MODEL_DIR = Path("models")
TRAIN_PACKAGES = ("torch", "onnx")  # what training and the export import (onnx is a core dependency now)
INSTALL_TRAIN = "pip install 'streamrec[train]'"


def missing_train_packages() -> list[str]:
    """The packages of the train extra that cannot be imported here (importing torch takes a
    second or more: only ``streamrec train`` calls this)."""
    missing = []
    for name in TRAIN_PACKAGES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise  # installed, but broken: its own error says more
            missing.append(name)
    return missing


def registry_path(text: str) -> Path:
    """``--model-dir`` as given: an empty one (``--model-dir ""``, a variable that was not set)
    is refused; ``Path("")`` is the current folder, and train wrote its versions and CURRENT
    there. (An empty STREAMREC_MODEL_DIR is no value: the default, as the workers read it.)"""
    if not text:
        raise typer.BadParameter(f"an empty path; give a folder, or leave the option out for the default "
                                 f"({DEFAULT_MODEL_DIR}, or STREAMREC_MODEL_DIR)")
    return Path(text)


def check_registry_dir(model_dir: Path) -> None:
    """A usage error unless a version can be registered under ``model_dir``: it is (or can be
    made) a folder, and it can be written (the workers' models volume is often mounted
    read-only). Found before the training, not after it."""
    problem = model_dir_problem(str(model_dir))
    if problem:  # typer takes '~/models' from STREAMREC_MODEL_DIR as a folder named '~'
        raise typer.BadParameter(f"{str(model_dir)!r}: {problem}", param_hint="--model-dir")
    nearest = next(p for p in (model_dir, *model_dir.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise typer.BadParameter(f"{model_dir}: {nearest} is a file, not a folder", param_hint="--model-dir")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise typer.BadParameter(f"{model_dir}: {nearest} cannot be written (permissions, or a read-only file system)",
                                 param_hint="--model-dir")
    if (model_dir / MANIFEST).is_file():  # a registry inside a version: the workers refuse this path
        raise typer.BadParameter(f"{model_dir}: one registered version (it holds {MANIFEST}), not a registry; give the "
                                 "registry's folder, its parent (its CURRENT names the version served)",
                                 param_hint="--model-dir")


@contextlib.contextmanager
def sigterm_exits(command: str):
    """SIGTERM (a job's stop: Kubernetes, systemd, cron's timeout) as an exit raised where the
    command is, status 143, with one line: the clean-ups on the way out run, as for a Ctrl-C. By
    the signal's default the process died where it stood, and a stop while the model was being
    registered left a hidden staging folder with its files in the registry, which nothing removes."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def stop(signum, frame) -> None:
        typer.secho(f"{command}: stopped by SIGTERM", fg="red", err=True)
        raise SystemExit(128 + signal.SIGTERM)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _sigterm_exits(command):
    @functools.wraps(command)  # typer reads the options from the wrapped signature
    def run(*args, **kwargs):
        with sigterm_exits("streamrec train"):
            return command(*args, **kwargs)
    return run


@_sigterm_exits
def train(
    dataset: Annotated[
        Path | None, typer.Option("--dataset", "-d", help="Event log to train on; omit for the built-in synthetic stream.")
    ] = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="Log format: taobao, yoochoose, otto or synthetic.")
    ] = "synthetic",
    model_dir: Annotated[
        Path,
        typer.Option("--model-dir", envvar="STREAMREC_MODEL_DIR", parser=registry_path, metavar="PATH", help="Model registry directory; the new version is written under it and made CURRENT."),
    ] = DEFAULT_MODEL_DIR,
    limit: Annotated[int | None, typer.Option(min=1, help="Read at most this many events (synthetic default: 20000).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Maximum epochs; early stopping on validation NDCG@10 may end sooner.")] = 20,
    patience: Annotated[int, typer.Option(min=1, help="Stop after this many epochs without a better NDCG@10.")] = 3,
    dim: Annotated[int, typer.Option(min=8, max=4096, help="Embedding / hidden size.")] = 64,
    blocks: Annotated[int, typer.Option(min=1, max=64, help="Transformer blocks.")] = 2,
    heads: Annotated[int, typer.Option(min=1, max=64, help="Attention heads (must divide --dim).")] = 2,
    max_len: Annotated[int, typer.Option(min=2, max=4096, help="Most recent items the model reads per user.")] = 50,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Dropout rate while training.")] = 0.2,
    batch_size: Annotated[int, typer.Option(min=1, max=65536, help="Training windows per step.")] = 128,
    lr: Annotated[float, typer.Option(help="Adam learning rate, above 0 and at most 10.")] = 3e-3,
    loss: Annotated[str, typer.Option(help="'ce' (full softmax) or 'sampled' (sampled softmax, big catalogues).")] = "ce",
    min_item_count: Annotated[int, typer.Option(min=1, help="Items seen fewer times share the OOV row.")] = 1,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Random seed; the same seed and data give the same model.")] = 0,
    threads: Annotated[
        int, typer.Option(min=1, max=1024, help="PyTorch CPU threads for training. 1 by default: this model's matmuls are too small to gain from more, and on a busy 2-core machine 2 threads trained 3x slower.")
    ] = 1,
    device: Annotated[
        str, typer.Option(help="Training device: auto (CUDA when torch sees one), cuda or cpu. CPU training is deterministic.")
    ] = "auto",
    serve_device: Annotated[
        str, typer.Option(envvar="STREAMREC_SCORER_DEVICE", help="Provider the registered model is loaded on as a final check: auto, cuda or cpu.")
    ] = "auto",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar.")] = True,
) -> None:
    """Train the Transformer scorer on an event log, export it to ONNX, check ONNX Runtime
    against PyTorch and register it as a new version (made CURRENT, so running workers
    hot-swap to it)."""
    missing = missing_train_packages()
    if missing:
        typer.secho(f"streamrec train needs {' and '.join(missing)}, not installed here: {INSTALL_TRAIN}", fg="red", err=True)
        raise typer.Exit(code=1)
    import torch

    from gpu_scorer import export, training  # torch-bound; see the module docstring

    console = Console()
    if format not in FORMATS:  # was said of --dataset ("needs a dataset path", or "unknown" under its name)
        raise typer.BadParameter(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}", param_hint="--format")
    if format == "synthetic" and limit is None:
        limit = 20_000
    if dataset is not None and dataset.is_dir():
        logs = sorted(p.name for p in dataset.iterdir() if p.is_file() and p.suffix in (".txt", ".csv", ".jsonl"))
        hint = f" (it holds {', '.join(logs[:6])})" if logs else ""
        raise typer.BadParameter(f"{dataset} is a folder; train on one log file in it{hint}, e.g. "
                                 f"--dataset {dataset}/yoochoose-clicks-100k_train_full.txt --format yoochoose",
                                 param_hint="--dataset")
    if dataset is not None and format == "synthetic":  # the generator reads no file: it trained on the shop
        raise typer.BadParameter(f"--dataset needs --format: taobao, yoochoose or otto (the synthetic shop reads no "
                                 f"file), e.g. --dataset {dataset} --format taobao", param_hint="--format")
    # found out before the training, not after it: the learning rate, the devices, and a registry made where a
    # folder can be
    if not 0 < lr <= 10:  # also nan and inf, which trained a model of NaN
        raise typer.BadParameter(f"{lr} is not a learning rate above 0 and at most 10", param_hint="--lr")
    check_device(device, "--device", training=True)
    check_device(serve_device, "--serve-device / STREAMREC_SCORER_DEVICE")
    check_registry_dir(model_dir)
    if dim % heads:
        raise typer.BadParameter(f"{heads} heads must divide --dim {dim}", param_hint="--heads")
    if loss not in ("ce", "sampled"):
        raise typer.BadParameter(f"{loss!r}: the loss is 'ce' or 'sampled'", param_hint="--loss")
    torch.set_num_threads(threads)  # once every check passed: a refused command changes nothing in the process
    try:
        events = list(read_interactions(dataset, format, limit))
    except (ValueError, OSError) as exc:  # DatasetError names the file and line
        raise typer.BadParameter(str(exc), param_hint="--dataset") from None
    sequences = training.sequences_from_interactions(events)
    if sequences and not any(len(seq) >= 3 for seq in sequences.values()):
        # validation holds out each sampled user's last item, from users of three or more: with
        # none, the model's HR@10 is never measured, and it went live (CURRENT) unchecked
        raise typer.BadParameter(f"none of the {len(sequences):,} users of the {len(events):,} events read has three or "
                                 "more events: none can be held out to check the model, which would go live (CURRENT) "
                                 "unchecked; train on a longer log", param_hint="--dataset")
    console.print(f"read {len(events):,} events, {len(sequences):,} users from {dataset or 'the synthetic generator'} ({format})")
    tc = training.TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, loss=loss, patience=patience,
                     min_item_count=min_item_count, seed=seed, progress=progress, device=device)
    model_cfg = {"dim": dim, "n_blocks": blocks, "n_heads": heads, "max_len": max_len, "dropout": dropout}
    try:
        result = training.train(sequences, model_cfg, tc, console=console)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    except (MemoryError, RuntimeError) as exc:  # torch's allocators raise RuntimeError ("can't allocate memory")
        if not isinstance(exc, MemoryError) and "alloc" not in str(exc).lower() and "out of memory" not in str(exc).lower():
            raise
        raise typer.BadParameter(f"the model does not fit in memory ({str(exc).splitlines()[0][:200]}); lower --dim, "
                                 "--max-len, --batch-size or --blocks", param_hint="--dim") from None
    registry = ModelRegistry(model_dir)
    # the newest event it was fitted on: retrain's gate compares the next fit with it on the events after it;
    # not one dated ahead of the clock (a log dated in the future), after which the next fit would find none
    data = {"dataset": str(dataset) if dataset else None, "format": format, "limit": limit, "events": len(events),
            "seed": seed, "trained_through": training.trained_through(events, not_after=time.time_ns() // 1_000_000)}
    try:
        version, parity = export.export_and_register(result, registry, data)
    except OSError as exc:  # a disk that filled up, a folder made read-only while it trained: one line, not a traceback
        typer.secho(f"streamrec train: the trained model could not be registered in {model_dir} "
                    f"({exc.strerror or exc}); CURRENT is as it was", fg="red", err=True)
        raise typer.Exit(code=1) from None
    status = "[green]ok[/]" if parity["ok"] else "[red]FAILED[/]"
    table = Table(title=f"registered {version}", show_header=False)
    table.add_row("path", str(registry.path(version)))
    for key, value in result.metrics.items():
        table.add_row(key, (f"{value:.1f}" if key.endswith("seconds") else f"{value:.4f}") if isinstance(value, float) else str(value))
    table.add_row("parity (ORT vs PyTorch)", f"{status} max |diff| {parity['max_abs_diff']:.2e} (atol {parity['atol']})")
    table.add_row("items / users", f"{result.data['items']:,} / {result.data['users']:,}")
    if parity["ok"]:
        scorer = registry.load(version, serve_device)
        table.add_row("runs on", scorer.provider)
        table.add_row("CURRENT", version)
    console.print(table)
    if not parity["ok"]:
        console.print(f"[red]version {version} failed its parity check and was not made current[/]")
        raise typer.Exit(code=1)


def check_device(value: str, hint: str, training: bool = False) -> None:
    """A usage error naming ``hint`` unless ``value`` is a device the scorer and training know
    (:data:`gpu_scorer.runtime.DEVICES`) and, for ``cuda``, one this machine has: for ``training``
    one torch sees, else one ONNX Runtime can run on. Found before the work, not after minutes of it."""
    if value not in DEVICES:
        raise typer.BadParameter(f"{value!r}: expected {', '.join(DEVICES[:-1])} or {DEVICES[-1]}", param_hint=hint)
    if value != "cuda":
        return
    reason = _torch_cuda_unavailable() if training else cuda_unavailable()
    if reason:
        raise typer.BadParameter(f"'cuda', but {reason} on this machine: use cpu, or auto (the GPU where there is one)",
                                 param_hint=hint)


def _torch_cuda_unavailable() -> str | None:
    """Why torch cannot train on CUDA here, or None (also None without torch: the command says that)."""
    try:
        import torch  # the train extra's; only a command that trains asks
    except ModuleNotFoundError:
        return None
    return None if torch.cuda.is_available() else "torch sees no CUDA device"


__all__ = ["INSTALL_TRAIN", "check_device", "missing_train_packages", "train"]
