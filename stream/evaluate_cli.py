"""``streamrec evaluate``: the offline evaluation through the worker's own step (docs/evaluation.md).

Registered by the stream's CLI as ``app.command("evaluate")(stream.evaluate_cli.evaluate)``;
it also runs alone: ``python -m stream.evaluate_cli --help``. The evaluation itself is
:mod:`stream.evaluation`; this module reads the log, loads the scorer and prints.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from gpu_scorer import ModelRegistry
from gpu_scorer.errors import ModelLoadError, ScorerError
from gpu_scorer.train_cli import INSTALL_TRAIN, check_device, missing_train_packages
from online_models import Recommender
from online_models.datasets import (
    FORMATS,
    SEED_MAX,
    SPLITS,
    DatasetError,
    load_folder,
    read_interactions,
)
from stream.errors import ConfigError, StreamrecError, counted, path_problem, resolved, run_command
from stream.evaluation import (
    DEFAULT_MODELS,
    SESSION_MODELS,
    Retraining,
    contender_names,
    prequential,
    session_rec,
    session_rec_units,
)
from stream.experiments import load_experiment
from stream.report import counters_from_json, format_table, shares_from_json, summarize
from stream.settings import Settings
from stream.step_inputs import recommender_config


class EvalProtocol(StrEnum):
    prequential = "prequential"
    session_rec = "session-rec"


class Split(StrEnum):
    test = "test"
    valid = "valid"


class Mode(StrEnum):
    frozen = "frozen"
    learning = "learning"


_MODELS_HELP = (
    "Contenders (repeat the option, or comma-separate). 'served': the worker as the STREAMREC_* settings "
    "configure it (defaults where unset), with the --scorer-model Transformer when given. A learner by name "
    "(popularity, recent_popularity, trending, covisit, reminder, mf, session_hybrid, session_knn, "
    "sequential_rules, ...): a baseline, the same step over that learner alone. "
    "Default: served and the baselines popularity, recent_popularity, covisit (session-rec: served, "
    "session_hybrid, covisit, popularity)."
)


def evaluate(
    dataset: Annotated[
        Path | None,
        typer.Option(
            "--dataset", "-d",
            help="Log to replay (prequential), or the session-rec folder holding "
            "yoochoose-clicks-100k_train_full.txt, ..._test.txt and recommendations/ (session-rec). "
            "Omit for the built-in synthetic stream (prequential only).",
        ),
    ] = None,
    format: Annotated[
        str, typer.Option("--format", "-f", help="Log format: taobao, yoochoose, otto or synthetic.")
    ] = "synthetic",
    protocol: Annotated[
        EvalProtocol,
        typer.Option(
            "--protocol", "-p",
            help="prequential: replay the log in time order; each event of a user with history is judged "
            "against the last list published to them. session-rec: learn train_full, then predict each next "
            "click of the test sessions (frozen and learning), and score the framework's saved lists.",
        ),
    ] = EvalProtocol.prequential,
    k: Annotated[
        list[int] | None,
        typer.Option("--k", "-k", help="Cut-offs for HR/MRR/NDCG/coverage (repeatable; at most STREAMREC_TOP_K)."),
    ] = None,
    models: Annotated[list[str] | None, typer.Option("--model", "--models", "-m", help=_MODELS_HELP)] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n", min=1,
            help="prequential: read at most N events of the log. session-rec: keep the first N test "
            "sessions (99 covers the 387 saved predictions).",
        ),
    ] = None,
    mode: Annotated[
        list[Mode] | None,
        typer.Option("--mode", help="session-rec modes: frozen, learning (default both; repeatable)."),
    ] = None,
    split: Annotated[
        Split | None,
        typer.Option(
            "--split",
            help="session-rec: 'test' (learn train_full, predict the test sessions; the final figures) or "
            "'valid' (learn train_tr, predict train_valid; where every choice is made). Default: test.",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", min=1,
            help="Events per step call while judging. 1 (default): each event alone, test-then-learn. "
            "More: the log as a busy worker batches it (several events of a user meet the same list). "
            "session-rec's frozen mode always goes click by click.",
        ),
    ] = 1,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the summary JSON here (with --variants, `streamrec report --json` reads it).")] = None,
    variants: Annotated[
        Path | None,
        typer.Option("--variants", metavar="FILE", help="Rehearse an experiment (STREAMREC_VARIANTS's file): users split "
                     "by the worker's hash, each arm served as the worker would; prints per arm the lists, the clicks "
                     "and purchases credited to them (by the attribution window: a log echoes no rec_id), CTR, "
                     "conversion and HR@20 with 95% intervals and the lift over the control (prequential only)."),
    ] = None,
    png_out: Annotated[
        Path | None, typer.Option("--png-out", help="Write a PNG chart here (metrics over the replay).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary JSON to stdout (no table; the progress goes to stderr).")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", min=0, max=SEED_MAX, help="Seed handed to every model.")] = 0,
    scorer_model: Annotated[
        Path | None,
        typer.Option(
            "--scorer-model",
            help="The Transformer 'served' scores with: a model registry (STREAMREC_MODEL_DIR; its CURRENT "
            "version), a version directory in it, or that version's model.onnx. Loaded and checked as the "
            "worker loads it, on STREAMREC_SCORER_DEVICE. The report warns when its vocabulary holds fewer than "
            "half of the distinct items judged (a model trained on other items).",
        ),
    ] = None,
    retrain_every: Annotated[
        float | None,
        typer.Option(
            "--retrain-every", min=1, metavar="SECONDS",
            help="Retrain 'served''s Transformer every SECONDS of the log's own time on every event before that "
            "moment, with the --scorer-model architecture, as `streamrec retrain --every SECONDS` does beside the "
            "workers (session-rec: learning mode only). Needs the train extra; each retraining takes minutes.",
        ),
    ] = None,
    retrain_delay: Annotated[
        float | None,
        typer.Option(
            "--retrain-delay", min=0, metavar="SECONDS",
            help="With --retrain-every: seconds of the log's time between a retraining's moment and the model's "
            "first use (the time `streamrec retrain` takes to train and register it). Default 600.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Evaluate what the worker serves, offline, through the worker's own step and settings.

    Every contender is the worker's RecommendationStep over an in-memory user-state store,
    configured by the same STREAMREC_* settings the worker reads. Prints HR@K, MRR@K,
    NDCG@K, catalogue coverage, intra-list category diversity, novelty (mean popularity
    rank of the items shown), HR by the user's history length and the time per step.
    Examples:

      streamrec evaluate -d ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv -f taobao

      streamrec evaluate -p session-rec -d ../shared/data/yoochoose-100k --split valid --scorer-model models
    """

    try:
        settings = Settings.from_env(**({"variants": str(variants)} if variants is not None else {}))
        recommender_config(settings)  # STREAMREC_BLEND_WEIGHTS names known sources
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="the STREAMREC_* environment") from None
    unknown = Settings.unknown_names_said()
    if unknown:  # a misspelt setting evaluated the default, without a word
        typer.secho(unknown, fg="yellow", err=True)
    if settings.variants:
        try:
            load_experiment(settings.variants, [*Recommender.DEFAULT_LEARNERS, *Recommender.EXTRA_SOURCES])
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--variants" if variants else "STREAMREC_VARIANTS") from None
        if protocol is EvalProtocol.session_rec:
            raise typer.BadParameter("an experiment is rehearsed with the prequential protocol (the live traffic's "
                                     "order); session-rec judges saved test sessions", param_hint="--variants")
    for path, hint in ((json_out, "--json-out"), (png_out, "--png-out")):
        if path is not None:  # found out before the run, not after it
            _check_writable(path, hint)
            _check_not_an_input(path, hint, dataset, variants)
    if json_out is not None and png_out is not None and resolved(json_out) == resolved(png_out):
        raise typer.BadParameter(f"{png_out} is --json-out too: the chart would overwrite the summary; give two files",
                                 param_hint="--png-out")
    ks = tuple(sorted(set(k))) if k else (10, 20)
    top_k = f"STREAMREC_TOP_K={settings.top_k}" + (" (set in the environment)" if "STREAMREC_TOP_K" in os.environ
                                                   else ", its default")
    if k and ks[0] < 1:
        raise typer.BadParameter(f"cut-offs start at 1, saw {ks[0]}", param_hint="--k")
    if not k and ks[-1] > settings.top_k:  # the user gave no --k: the environment's list is the shorter one
        raise typer.BadParameter(f"the default cut-offs 10 and 20 are longer than the published list, {top_k}: "
                                 f"give --k 1 to {settings.top_k}, or raise STREAMREC_TOP_K",
                                 param_hint="STREAMREC_TOP_K")
    if ks[-1] > settings.top_k:
        raise typer.BadParameter(f"cut-off {ks[-1]} is longer than the published list, {top_k}: give cut-offs 1 to "
                                 f"{settings.top_k}, or raise STREAMREC_TOP_K", param_hint="--k")
    names = [n.strip() for m in (models or []) for n in m.split(",") if n.strip()] or None
    known = contender_names()
    for name in names or ():
        if name not in known:
            raise typer.BadParameter(f"unknown model {name!r}; choose from {', '.join(known)}", param_hint="--model")
    for value, option in ((retrain_every, "--retrain-every"), (retrain_delay, "--retrain-delay")):
        if value is not None and not math.isfinite(value):
            raise typer.BadParameter(f"{value} is not a number of seconds", param_hint=option)
    if retrain_delay is not None and retrain_every is None:
        raise typer.BadParameter("--retrain-delay needs --retrain-every", param_hint="--retrain-delay")
    if retrain_every is not None and names is not None and "served" not in names:
        raise typer.BadParameter("--retrain-every retrains 'served''s Transformer: add -m served",
                                 param_hint="--retrain-every")
    if names is not None and "served" not in names:  # only 'served' would use them: the run would ignore them
        if variants is not None:
            raise typer.BadParameter("an experiment's arms are served by 'served': add -m served (or drop --variants)",
                                     param_hint="--variants")
        if scorer_model is not None:
            raise typer.BadParameter("--scorer-model is the Transformer 'served' scores with: add -m served (or drop "
                                     "--scorer-model)", param_hint="--scorer-model")
    if protocol is EvalProtocol.prequential:  # session-rec's options: the replay of one log has no modes or splits
        for given, option in ((mode, "--mode"), (split, "--split")):
            if given:
                raise typer.BadParameter(f"{option} is for --protocol session-rec; the prequential protocol replays "
                                         "the log once, learning as it goes", param_hint=option)
    elif format not in ("synthetic", "yoochoose"):  # the folder is read as YooChoose whatever --format says
        raise typer.BadParameter(f"--format {format}: the session-rec folder's logs are YooChoose's (SessionId, ItemId, "
                                 "Time), read as such; drop --format", param_hint="--format")
    elif retrain_every is not None and mode and Mode.learning not in mode:  # the frozen mode was run, never retrained
        raise typer.BadParameter("session-rec retrains in learning mode only, and --mode frozen leaves it out: add "
                                 "--mode learning (or drop --retrain-every)", param_hint="--retrain-every")
    split = split or Split.test
    if scorer_model is not None or retrain_every is not None:  # a GPU this machine lacks: said before the replay
        check_device(settings.scorer_device, "STREAMREC_SCORER_DEVICE")
        if retrain_every is not None:  # the retrainings train on it too
            check_device(settings.scorer_device, "STREAMREC_SCORER_DEVICE", training=True)
    scorer = _load_scorer(scorer_model, settings.scorer_device) if scorer_model is not None else None
    show = True  # on stderr: stdout is the table or the JSON
    with tempfile.TemporaryDirectory(prefix="streamrec-retrain-") as retrained:
        retraining = None
        if retrain_every is not None:
            retraining = _retraining(Path(retrained), scorer_model, retrain_every,
                                     600.0 if retrain_delay is None else retrain_delay, seed,
                                     settings.scorer_device)
        report = _run(protocol, dataset, format, limit, mode, split, batch_size, seed, names, settings, scorer, ks,
                      show, retraining)
    report["command"] = " ".join(["streamrec evaluate", *sys.argv[2:]]) if len(sys.argv) > 1 else "streamrec evaluate"
    try:
        if json_out is not None:
            json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        if png_out is not None:
            title = f"{report['protocol']} on {report['dataset']}"
            plot_curves(report, str(png_out), title)
    except OSError as exc:
        raise StreamrecError(f"cannot write {exc.filename or json_out or png_out}: {exc.strerror or exc}") from None
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        out = Console()
        _print_tables(out if out.is_terminal else Console(width=240), report)
    warning = report.get("scorer_vocabulary", {}).get("warning")
    if warning:  # after the table (or the JSON, on stderr), where it is read last
        typer.secho(warning, fg="yellow", err=as_json)


def _check_writable(path: Path, hint: str) -> None:
    """A usage error unless ``path`` names a file that can be written (not a folder, in a folder
    that exists and can be written): found before the replay, which may take hours."""
    if path.is_dir():
        raise typer.BadParameter(f"{path} is a folder; give the file to write", param_hint=hint)
    if not path.parent.is_dir():
        raise typer.BadParameter(f"{path}: the folder {path.parent} does not exist", param_hint=hint)
    try:  # is_dir and exists answer False for a loop of symbolic links, which no write gets through
        path.stat()
    except FileNotFoundError:  # a new file, or a link to one
        pass
    except OSError as exc:
        raise typer.BadParameter(f"{path_problem(exc)}; give the file to write", param_hint=hint) from None
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise typer.BadParameter(f"{path} cannot be written (permissions, or a read-only file system)", param_hint=hint)


def _check_not_an_input(path: Path, hint: str, dataset: Path | None, variants: Path | None) -> None:
    """A usage error when writing ``path`` would overwrite what the run reads: the log, a file of
    the session-rec folder, or the experiment file (found out after the replay, with the input lost)."""
    out = resolved(path)
    for source, option in ((dataset, "--dataset"), (variants, "--variants")):
        if source is None:
            continue
        try:
            src = resolved(source)
        except OSError as exc:  # -d loop: said now, not as "does not exist" after the check
            raise typer.BadParameter(path_problem(exc), param_hint=option) from None
        if out == src or (src.is_dir() and out.is_file() and out.is_relative_to(src)):
            raise typer.BadParameter(f"{path} is {'in ' if out != src else ''}the {option} input: writing there "
                                     "would overwrite it; give another file", param_hint=hint)


def _run(protocol: EvalProtocol, dataset: Path | None, format: str, limit: int | None, mode, split: Split,
         batch_size: int, seed: int, names: list[str] | None, settings: Settings, scorer, ks: tuple[int, ...],
         show: bool, retraining) -> dict[str, Any]:
    """The protocol's replay, with its progress bar; the report."""
    if protocol is EvalProtocol.session_rec:
        if dataset is None or not dataset.is_dir():
            raise typer.BadParameter("session-rec needs --dataset pointing at the yoochoose-100k folder",
                                     param_hint="--dataset")
        try:
            train, test, refs = load_folder(dataset, limit, split.value)
        except DatasetError as exc:
            raise typer.BadParameter(str(exc), param_hint="--dataset") from None
        if not test:  # was a table of zeros, as if every prediction had missed: the prequential log's check
            raise typer.BadParameter(f"{dataset / SPLITS[split.value][1]} holds no test events to predict",
                                     param_hint="--dataset")
        modes = tuple(m.value for m in mode) if mode else ("frozen", "learning")
        names = names or list(SESSION_MODELS)
        total = session_rec_units(len(train), test, len(names), len(modes))
        with _progress(show, total, "session-rec") as tick:
            try:  # the saved lists are scored first: one for another test log is said before the learning
                report = session_rec(train, test, names, settings, scorer, ks, refs, modes, seed, batch_size,
                                     progress=tick, retraining=retraining)
            except DatasetError as exc:
                raise typer.BadParameter(str(exc), param_hint="--dataset") from None
        report["dataset"] = str(dataset)
        report["split"] = split.value
    else:
        if format not in FORMATS:  # was said of --dataset, or as "needs --dataset" without one
            raise typer.BadParameter(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}",
                                     param_hint="--format")
        if dataset is not None and dataset.is_dir():
            raise typer.BadParameter(f"{dataset} is a folder; the prequential protocol replays one log file "
                                     "(the session-rec folder goes with --protocol session-rec)", param_hint="--dataset")
        if dataset is None and format != "synthetic":  # was: the synthetic shop, reported as if the log was read
            raise typer.BadParameter(f"--format {format} describes --dataset, which is not given: add --dataset LOG "
                                     "or drop --format (the synthetic shop)", param_hint="--format")
        if dataset is not None and format == "synthetic":  # the generator reads no file
            raise typer.BadParameter(f"--dataset needs --format: taobao, yoochoose or otto (the synthetic shop reads "
                                     f"no file), e.g. -d {dataset} -f taobao", param_hint="--format")
        try:
            events = list(read_interactions(dataset, format if dataset is not None else "synthetic", limit))
        except (DatasetError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="--dataset") from None
        if not events:
            raise typer.BadParameter(f"{dataset} holds no events to replay", param_hint="--dataset")
        names = names or list(DEFAULT_MODELS)
        with _progress(show, len(events) * len(names), "prequential") as tick:
            report = prequential(events, names, settings, scorer, ks, seed, batch_size, progress=tick,
                                 retraining=retraining)
        report["dataset"] = str(dataset) if dataset is not None else "synthetic"
        report["format"] = format if dataset is not None else "synthetic"
    return report


def _retraining(registry_dir: Path, scorer_model: Path | None, every_s: float, delay_s: float, seed: int,
                device: str):
    """``Retraining(history=...)`` for ``--retrain-every``: fits registered in ``registry_dir``,
    with the architecture of the ``--scorer-model`` version (the defaults without one)."""
    missing = missing_train_packages()
    if missing:
        raise typer.BadParameter(f"retraining needs {' and '.join(missing)}, not installed here: {INSTALL_TRAIN}",
                                 param_hint="--retrain-every")
    # torch-bound, as in `streamrec train` (gpu_scorer/train_cli.py)
    from gpu_scorer import retraining, training

    try:
        architecture = retraining.architecture_of(*_registry_of(scorer_model)) if scorer_model is not None else {}
    except ModelLoadError as exc:  # a hand-edited manifest: refused before the replay, as retrain refuses it
        raise typer.BadParameter(f"{exc}: fix or remove that version, or point CURRENT at a good one",
                                 param_hint="--scorer-model") from None
    retrainer = retraining.Retrainer(ModelRegistry(registry_dir), architecture,
                                     training.TrainConfig(seed=seed, progress=False, device=device), device)

    def fit(interactions: list):
        try:
            version, _ = retrainer.fit(interactions)
        except ValueError as exc:  # the first moments may come before any user has two events
            raise StreamrecError(f"--retrain-every {every_s:g}: a retraining had {len(interactions)} events before "
                                 f"its moment and could not fit ({exc}); retrain less often (a larger "
                                 "--retrain-every) or replay a log with more events early on") from None
        return retrainer.load(version)

    return partial(Retraining, fit, every_s, delay_s)


def _registry_of(path: Path) -> tuple[ModelRegistry, str | None]:
    """``--scorer-model``'s registry and version: a version directory or its model.onnx names
    one; a registry directory, None (its CURRENT)."""
    if path.is_file():
        path = path.parent
    if (path / "manifest.json").is_file():
        return ModelRegistry(path.parent), path.name
    return ModelRegistry(path), None


def _load_scorer(path: Path, device: str):
    """The registered Transformer at ``path``, loaded and parity-checked as the worker does."""
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist; give a model registry (STREAMREC_MODEL_DIR), a version "
                                 "directory in it or its model.onnx (`streamrec train` makes one)",
                                 param_hint="--scorer-model")
    registry, version = _registry_of(path)
    if version is None and path.is_file():  # junk.onnx: no manifest.json beside it
        raise typer.BadParameter(f"{path} is a file, but not the model.onnx of a registered version (no manifest.json "
                                 "beside it): give a model registry (STREAMREC_MODEL_DIR), a version directory in it "
                                 "or its model.onnx, as `streamrec train` writes them", param_hint="--scorer-model")
    try:
        latest = registry.latest() if version is None else version
    except (ScorerError, OSError) as exc:  # a CURRENT that names no version, an unreadable folder
        raise typer.BadParameter(f"cannot read the model registry {path}: {exc}", param_hint="--scorer-model") from None
    if latest is None:
        if any(path.iterdir()):
            raise typer.BadParameter(f"{path} is neither a model version (no manifest.json in it) nor a model registry "
                                     "(no version directory with one): give STREAMREC_MODEL_DIR, a version directory "
                                     "in it or its model.onnx", param_hint="--scorer-model")
        raise typer.BadParameter(f"{path} is an empty folder, not a model registry yet (`streamrec train --model-dir "
                                 f"{path}` registers a version there)", param_hint="--scorer-model")
    try:
        return registry.load(version, device)
    except (ScorerError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load the scorer in {path}: {exc}", param_hint="--scorer-model") from None


class _progress:
    """The replay's progress on stderr (stdout is the table or the JSON), whose ``__enter__``
    gives the ``progress`` callback: a rich bar on a terminal, else a line every ``every_s``
    seconds and at the end (a long run's log, ``--json > report.json``); nothing unless ``show``."""

    def __init__(self, show: bool, total: int, label: str, every_s: float = 30.0):
        self.show, self.total, self.label, self.every_s = show, total, label, every_s
        self._bar: Any = None

    def __enter__(self):
        if not self.show:
            return None
        console = Console(stderr=True)
        if not console.is_terminal:
            return self._lines()
        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), transient=True, console=console)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        bar = self._bar
        state = {"last": 0}

        def tick(done: int) -> None:
            if done - state["last"] >= 500 or done >= self.total:
                bar.update(task, completed=done)
                state["last"] = done

        return tick

    def _lines(self):
        started = time.monotonic()
        state = {"said": started, "ended": False}

        def tick(done: int) -> None:
            if state["ended"]:
                return
            now = time.monotonic()
            state["ended"] = done >= self.total
            if state["ended"] or now - state["said"] >= self.every_s:
                state["said"] = now
                typer.echo(f"{self.label}: {done:,}/{self.total:,} steps ({100 * done / max(self.total, 1):.0f}%) "
                           f"in {now - started:.0f} s", err=True)

        return tick

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_tables(console, report: dict[str, Any]) -> None:
    ks = report["ks"]
    kk = ks[-1]
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "MRR", "NDCG")]
    extra = [f"cov@{kk}", "divers.", "novelty", *(f"HR@{kk} h{label}" for label in ("1-2", "3-10", ">10")),
             "step p50 ms"]

    def cells(m: dict[str, Any]) -> list[str]:
        hist = m.get("history", {})
        return [*(f"{m[c]:.4f}" for c in cols), f"{m.get(f'coverage@{kk}', float('nan')):.4f}",
                "-" if m.get("diversity") is None else f"{m['diversity']:.3f}",
                "-" if m.get("novelty") is None else f"{m['novelty']:.0f}",
                *(f"{hist[b][f'HR@{kk}']:.4f}" if hist.get(b, {}).get("predictions") else "-"
                  for b in ("1-2", "3-10", ">10")),
                f"{m['latency_ms'].get('step_p50', 0):.3f}"]

    settings = ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items())
    scorer = report.get("scorer") or "none"
    if report["protocol"] == "prequential":
        title = (f"prequential on {report['dataset']}: {counted(report['events'], 'event')}, "
                 f"{counted(report['users'], 'user')}, {counted(report['catalogue'], 'item')}; batches of {report['batch_size']}; Transformer: {scorer}")
        table = Table(title=title, caption=settings)
        for c in ["model", "judged", *cols, *extra]:
            table.add_column(c, justify="left" if c == "model" else "right", no_wrap=c == "model")
        for name, m in report["models"].items():
            table.add_row(name, str(m["predictions"]), *cells(m))
        console.print(table)
        _print_failures(console, report)
        for name, v in report.get("verdict", {}).items():
            word = "beats" if v["beats_every_baseline"] else "does NOT beat"
            console.print(f"{name} {word} every baseline on HR@{kk} (best baseline {v['best_baseline']}, "
                          f"margin {v['margin']:+.4f})")
        if "variants" in report:  # the same table `streamrec report` prints for a live experiment
            counters, control = counters_from_json(report)
            console.print(f"\nexperiment {report['experiment']!r}, rehearsed on the replay (served; clicks and "
                          "purchases credited by the attribution window):")
            console.print(format_table(summarize(counters, control, shares_from_json(report))), markup=False,
                          highlight=False)
        return
    table = Table(title=f"session-rec ({report.get('split', 'test')} split): "
                        f"{counted(report['test_sessions'], 'test session')}, "
                        f"{counted(report['test_predictions'], 'next-click prediction')}; saved lists: "
                        f"{counted(report['saved_pairs'], 'pair')}; Transformer: {scorer}", caption=settings)
    for c in ["model", "mode", "judged", *cols, f"saved HR@{kk}", f"saved MRR@{kk}", *extra]:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right", no_wrap=c in ("model", "mode"))
    for algo, m in report["references"].items():
        table.add_row(f"{algo} (session-rec list)", "saved", str(m["predictions"]), *(f"{m[c]:.4f}" for c in cols),
                      f"{m[f'HR@{kk}']:.4f}", f"{m[f'MRR@{kk}']:.4f}", *([""] * len(extra)))
    for name, by_mode in report["models"].items():
        for mode, m in by_mode.items():
            saved = m.get("saved_pairs", {})
            row = cells(m)
            table.add_row(name, mode, str(m["predictions"]), *row[:len(cols)],
                          f"{saved.get(f'HR@{kk}', float('nan')):.4f}", f"{saved.get(f'MRR@{kk}', float('nan')):.4f}",
                          *row[len(cols):])
    console.print(table)
    _print_failures(console, report)


def _print_failures(console, report: dict[str, Any]) -> None:
    """Say which contender's step raised on events (the worker would dead-letter them)."""
    if report.get("refused"):
        codes = ", ".join(f"{code} {n}" for code, n in sorted(report["refused"].items()))
        console.print(f"[yellow]refused at the worker's door (dead-lettered, never replayed): {codes}[/]")
    for name, m in report["models"].items():
        for label, r in ((name, m),) if "dead_lettered" in m else ((f"{name} ({mode})", r) for mode, r in m.items()):
            if r.get("dead_lettered"):
                console.print(f"[red]{label}: the step raised on {counted(r['dead_lettered'], 'event')}; the worker "
                              "would dead-letter them as processing_error[/]")


def plot_curves(report: Mapping[str, Any], path: str, title: str | None = None) -> None:
    """PNG of cumulative HR@K and MRR@K over the replay for each contender (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kmax = max(report["ks"])
    fig, (ax_hr, ax_mrr) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, points in report["curves"].items():
        if not points:
            continue
        xs = [p[0] for p in points]
        style = {"lw": 2 if name.startswith("served") else 1.2, "ls": ":" if "frozen" in name else "-"}
        ax_hr.plot(xs, [p[1] for p in points], label=name, **style)
        ax_mrr.plot(xs, [p[2] for p in points], label=name, **style)
    for ax, metric in ((ax_hr, "HR"), (ax_mrr, "MRR")):
        ax.set_xlabel(report.get("x_label", "events replayed"))
        ax.set_ylabel(f"cumulative {metric}@{kmax}")
        ax.grid(alpha=0.3)
    ax_hr.legend(fontsize=8)
    fig.suptitle(title or f"{report['protocol']} evaluation")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # at the path given: matplotlib went by its suffix (.txt: a traceback)
    plt.close(fig)


def main() -> None:
    """``python -m stream.evaluate_cli evaluate ...``: as ``streamrec evaluate``, errors included
    (one red line and exit 2, as stream.cli's ``main``, not a traceback)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("evaluate")(evaluate)

    @app.callback()
    def _root() -> None:
        """streamrec's offline evaluation."""

    run_command(app, "streamrec evaluate", (StreamrecError, DatasetError))


if __name__ == "__main__":  # pragma: no cover
    main()
