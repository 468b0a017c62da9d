"""``streamrec evaluate``: the offline, test-then-learn evaluation (see docs/evaluation.md).

Registered by the stream's CLI as ``app.command("evaluate")(online_models.cli.evaluate)``;
it also runs alone: ``python -m online_models.cli --help``.
"""

from __future__ import annotations

import json
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer


class Protocol(StrEnum):
    prequential = "prequential"
    session_rec = "session-rec"


_MODELS_HELP = (
    "Contenders to run (repeat the option, or comma-separate). Learners by name: popularity, "
    "recent_popularity, trending, covisit, mf, session_hybrid, session_knn, sequential_rules; "
    "'blend' (Recommender.default), 'blend+session' (the blend with session_hybrid as a source), "
    "'session_hybrid+transformer' (session-rec only: session_hybrid plus Transformers trained on the training log). "
    "Default: all of these that the protocol lists in docs/evaluation.md."
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
        Protocol,
        typer.Option(
            "--protocol", "-p",
            help="prequential: replay in time order, recommend before each event of a user with history, "
            "then learn. session-rec: learn train_full, predict each next click of the test sessions "
            "(frozen and learning), and score the framework's saved lists on the same pairs.",
        ),
    ] = Protocol.prequential,
    k: Annotated[
        list[int] | None, typer.Option("--k", "-k", help="Cut-offs for HR/MRR/NDCG/coverage (repeatable).")
    ] = None,
    models: Annotated[list[str] | None, typer.Option("--model", "--models", "-m", help=_MODELS_HELP)] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit", "-n",
            help="prequential: read at most N events of the log. session-rec: keep the first N test "
            "sessions (99 covers the 387 saved predictions).",
        ),
    ] = None,
    mode: Annotated[
        list[str] | None,
        typer.Option("--mode", help="session-rec modes: frozen, learning (default both; repeatable)."),
    ] = None,
    split: Annotated[
        str,
        typer.Option(
            "--split",
            help="session-rec: 'test' (learn train_full, predict the test sessions; the final figures) or "
            "'valid' (learn train_tr, predict train_valid; where everything is tuned).",
        ),
    ] = "test",
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Write the summary JSON here.")] = None,
    png_out: Annotated[
        Path | None, typer.Option("--png-out", help="Write a PNG chart here (metrics over the replay).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary JSON to stdout (no table, no progress bar).")
    ] = False,
    blend_weights: Annotated[
        str | None,
        typer.Option(
            "--blend-weights",
            help="Override the blend's per-source weights, e.g. 'covisit=1,trending=0.3,session_hybrid=2'.",
        ),
    ] = None,
    max_recent: Annotated[
        int, typer.Option("--max-recent", help="Recent items kept per user (as the worker's STREAMREC_RECENT_ITEMS).")
    ] = 50,
    seed: Annotated[int, typer.Option("--seed", help="Seed handed to every model.")] = 0,
    scorer_model: Annotated[
        Path | None,
        typer.Option(
            "--scorer-model",
            help="A registered Transformer scorer (a version directory under STREAMREC_MODEL_DIR, or its "
            "model.onnx): adds the 'scorer' contender (the Transformer alone, ranking the blend's candidates) "
            "and feeds its scores to the blends as the worker does.",
        ),
    ] = None,
) -> None:
    """Evaluate the online models and the blend offline, test-then-learn.

    Prints HR@K, MRR@K, NDCG@K, catalogue coverage and per-event latency for each model
    alone, the blend and the baselines (global popularity, recent popularity,
    co-visitation). Examples:

      streamrec evaluate -d ../shared/data/taobao-userbehavior/UserBehavior_jason-wang1.csv -f taobao

      streamrec evaluate -p session-rec -d ../shared/data/yoochoose-100k --json-out ev.json --png-out ev.png
    """
    from rich.console import Console

    from online_models.evaluation import DEFAULT_MODELS, plot_curves, prequential
    from online_models.session_protocol import SESSION_MODELS, load_folder, session_rec, work_units

    ks = tuple(k) if k else (10, 20)
    scorer = None
    if scorer_model is not None:
        from gpu_scorer import OnnxScorer  # the CLI is glue: the evaluation itself stays pure
        from online_models.evaluation import batch_scorer

        scorer = batch_scorer(OnnxScorer(str(scorer_model), device="auto"))
    names = [n.strip() for m in (models or []) for n in m.split(",") if n.strip()] or None
    config = _config_with_weights(blend_weights)
    show = not as_json
    if protocol is Protocol.session_rec:
        if dataset is None or not dataset.is_dir():
            raise typer.BadParameter("session-rec needs --dataset pointing at the yoochoose-100k folder", param_hint="--dataset")
        if split not in ("test", "valid"):
            raise typer.BadParameter(f"expected test or valid, saw {split!r}", param_hint="--split")
        train, test, refs = load_folder(dataset, limit, split)
        modes = tuple(mode) if mode else ("frozen", "learning")
        names = names or list(SESSION_MODELS)
        total = work_units(len(train), test, len(names), len(modes))
        with _progress(show, total, "session-rec") as tick:
            report = session_rec(train, test, names, ks, refs, config, scorer, seed, max_recent, modes, tick)
        report["dataset"] = str(dataset)
        report["split"] = split
    else:
        from online_models.datasets import read_interactions

        events = list(read_interactions(dataset, format if dataset is not None else "synthetic", limit))
        names = names or list(DEFAULT_MODELS)
        with _progress(show, len(events), "prequential") as tick:
            report = prequential(events, names, ks, config, scorer, seed, max_recent, progress=tick)
        report["dataset"] = str(dataset) if dataset is not None else "synthetic"
        report["format"] = format if dataset is not None else "synthetic"
    report["command"] = " ".join(["streamrec evaluate", *sys.argv[2:]]) if len(sys.argv) > 1 else "streamrec evaluate"
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if png_out is not None:
        if protocol is Protocol.session_rec:
            _plot_session(report, str(png_out))
        else:
            plot_curves(report, str(png_out), f"prequential on {report['dataset']}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        out = Console()
        _print_tables(out if out.is_terminal else Console(width=200), report)


def _config_with_weights(spec: str | None):
    from online_models.evaluation import default_config
    from online_models.recommender import RecommenderConfig, parse_weights

    config = default_config()
    try:
        overrides = parse_weights(spec)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--blend-weights") from None
    if not overrides:
        return config
    return RecommenderConfig(**{**config.__dict__, "weights": {**config.weights, **overrides}})


class _progress:
    """A rich progress bar (or nothing) whose ``__enter__`` gives the ``progress`` callback."""

    def __init__(self, show: bool, total: int, label: str):
        self.show, self.total, self.label = show, total, label
        self._bar: Any = None

    def __enter__(self):
        if not self.show:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeRemainingColumn(), transient=True)
        self._bar.start()
        task = self._bar.add_task(self.label, total=self.total)
        bar = self._bar
        state = {"last": 0}

        def tick(done: int) -> None:
            if done - state["last"] >= 500 or done >= self.total:
                bar.update(task, completed=done)
                state["last"] = done

        return tick

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()


def _print_tables(console, report: dict[str, Any]) -> None:
    from rich.table import Table

    ks = report["ks"]
    cols = [f"{m}@{k}" for k in ks for m in ("HR", "MRR", "NDCG")]
    if report["protocol"] == "prequential":
        title = (f"prequential on {report['dataset']}: {report['events']} events, {report['users']} users, "
                 f"{report['catalogue']} items")
        table = Table(title=title)
        for c in ["model", "judged", *cols, f"cov@{ks[-1]}", "p50 ms", "p99 ms"]:
            table.add_column(c, justify="left" if c == "model" else "right")
        for name, m in report["models"].items():
            lat = m["latency_ms"]
            table.add_row(name, str(m["predictions"]), *(f"{m[c]:.4f}" for c in cols), f"{m[f'coverage@{ks[-1]}']:.4f}",
                          f"{lat.get('event_p50', 0):.3f}", f"{lat.get('event_p99', 0):.3f}")
        console.print(table)
        for blend, v in report.get("verdict", {}).items():
            word = "beats" if v["beats_every_baseline"] else "does NOT beat"
            console.print(f"{blend} {word} every baseline on HR@{ks[-1]} (best baseline {v['best_baseline']}, "
                          f"margin {v['margin']:+.4f})")
        return
    table = Table(title=f"session-rec ({report.get('split', 'test')} split): {report['test_sessions']} test sessions, {report['test_predictions']} "
                        f"next-click predictions; saved lists: {report['saved_pairs']} pairs")
    for c in ["model", "mode", "judged", *cols, f"saved HR@{ks[-1]}", f"saved MRR@{ks[-1]}", "p50 ms", "p99 ms"]:
        table.add_column(c, justify="left" if c in ("model", "mode") else "right")
    kk = ks[-1]
    for algo, m in report["references"].items():
        table.add_row(f"{algo} (session-rec list)", "saved", str(m["predictions"]), *(f"{m[c]:.4f}" for c in cols),
                      f"{m[f'HR@{kk}']:.4f}", f"{m[f'MRR@{kk}']:.4f}", "", "")
    for name, by_mode in report["models"].items():
        for mode, m in by_mode.items():
            saved = m.get("saved_pairs", {})
            lat = m["latency_ms"]
            table.add_row(name, mode, str(m["predictions"]), *(f"{m[c]:.4f}" for c in cols),
                          f"{saved.get(f'HR@{kk}', float('nan')):.4f}", f"{saved.get(f'MRR@{kk}', float('nan')):.4f}",
                          f"{lat.get('recommend_p50', 0):.3f}", f"{lat.get('recommend_p99', 0):.3f}")
    console.print(table)


def _plot_session(report: dict[str, Any], path: str) -> None:
    """Left: HR@K and MRR@K on the saved pairs, references and ours. Right: cumulative HR@K
    over the test predictions for each contender and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kk = report["ks"][-1]
    labels, hr, mrr = [], [], []
    for algo, m in report["references"].items():
        labels.append(f"{algo} (saved list)")
        hr.append(m[f"HR@{kk}"])
        mrr.append(m[f"MRR@{kk}"])
    for name, by_mode in report["models"].items():
        for mode, m in by_mode.items():
            if "saved_pairs" in m:
                labels.append(f"{name} ({mode})")
                hr.append(m["saved_pairs"][f"HR@{kk}"])
                mrr.append(m["saved_pairs"][f"MRR@{kk}"])
    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1.1, 1]})
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], hr, height=0.4, label=f"HR@{kk}")
    ax.barh([y + 0.2 for y in ys], mrr, height=0.4, label=f"MRR@{kk}")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0.65, ls="--", c="C0", lw=0.8)
    ax.axvline(0.36, ls="--", c="C1", lw=0.8)
    ax.set_title(f"the {report['saved_pairs']} saved predictions (dashed: targets 0.65 / 0.36)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    colours: dict[str, str] = {}
    for label, points in report.get("curves", {}).items():
        model = label.split(" (")[0]
        colour = colours.setdefault(model, f"C{len(colours) % 10}")
        if points:
            ax_curve.plot([p[0] for p in points], [p[1] for p in points], label=label, color=colour,
                          ls="-" if "learning" in label else ":")
    ax_curve.set_xlabel("test predictions")
    ax_curve.set_ylabel(f"cumulative HR@{kk}")
    ax_curve.set_title(f"all {report['test_predictions']} test predictions", fontsize=10)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=7, ncol=2)
    fig.suptitle("session-rec protocol on " + str(report.get("dataset", "")))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:  # pragma: no cover - `python -m online_models.cli`
    app = typer.Typer(add_completion=False)
    app.command("evaluate")(evaluate)

    @app.callback()
    def _root() -> None:
        """streamrec's offline evaluation."""

    app()


if __name__ == "__main__":  # pragma: no cover
    main()
