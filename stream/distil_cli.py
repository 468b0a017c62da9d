"""``streamrec distil-queries``: fit a query student on a catalogue, for STREAMREC_QUERY_STUDENT.

The student (:class:`online_models.search.QueryStudent`) reads a query as the mean of one
vector per token, learned so that it lands where the text model would put the query: about
0.1 ms a query instead of 3, for some NDCG@10 (docs/search.md, "A query student"). It learns
the words of the catalogue it is fitted on, so fit it again when the catalogue's vocabulary
moves (a query with no known word goes to the text model anyway).
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Annotated

import typer

from online_models.datasets import SEED_MAX
from online_models.search import QueryStudent, TextEmbedder
from stream.errors import StreamrecError, counted, existing_file, resolved
from stream.produce_catalogue import read_catalogue_file, synthetic_items
from stream.settings import Settings

DEFAULT_FILE = "query-student.npz"  # in STREAMREC_MODEL_DIR, beside the Transformer's versions


def distil_queries(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="File to write (default: query-student.npz in STREAMREC_MODEL_DIR); hand it to the "
        "worker and serve as STREAMREC_QUERY_STUDENT.", dir_okay=False)] = None,
    catalogue: Annotated[Path | None, typer.Option(
        "--catalogue", help="Catalogue to learn the words of: JSON Lines, one item per line, as `streamrec produce "
        "--catalogue` reads (only the titles are used).", dir_okay=False, readable=True, callback=existing_file)] = None,
    demo_catalogue: Annotated[bool, typer.Option(
        "--demo-catalogue", help="Learn the synthetic shop's catalogue (the one `make demo` sends), for --seed.")] = False,
    seed: Annotated[int, typer.Option(min=0, max=SEED_MAX, help="Seed of the demo catalogue and of the fit.")] = 42,
    spans: Annotated[int, typer.Option(min=0, max=20, help="Random runs of 1-4 words of each title learned beside it "
                                       "(query-shaped texts).")] = 3,
    epochs: Annotated[int, typer.Option(min=1, max=50, help="Passes over the texts.")] = 2,
) -> None:
    """Fit a query student on a catalogue's titles: a static query encoder distilled from the text model.

    The text model embeds every title, runs of its words and each word piece once (about 3 ms of
    CPU each: some 40 s for the demo's 2,000 items, 20 minutes for 100,000), then the student
    learns for a few seconds. Examples:

      streamrec distil-queries --demo-catalogue

      streamrec distil-queries --catalogue items.jsonl -o /srv/models/query-student.npz
    """
    if (catalogue is None) == (not demo_catalogue):
        raise typer.BadParameter("give one catalogue: --catalogue FILE or --demo-catalogue", param_hint="--catalogue")
    if out is None:
        model_dir = Path(Settings.from_env().model_dir)
        nearest = next(p for p in (model_dir, *model_dir.absolute().parents) if p.exists())
        if not nearest.is_dir():  # the folder itself, or one above it
            raise typer.BadParameter(f"{model_dir}: {nearest} is a file, not a folder: point STREAMREC_MODEL_DIR at the model "
                                     "registry's folder, or give the file to write with --out",
                                     param_hint="STREAMREC_MODEL_DIR")
        out = model_dir / DEFAULT_FILE
    if catalogue is not None and resolved(out) == resolved(catalogue):
        raise typer.BadParameter(f"{out} is the --catalogue: writing the student there would overwrite the catalogue; "
                                 "give another file", param_hint="--out")
    try:  # found out now, not after minutes of fitting
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise typer.BadParameter(f"cannot make the folder {out.parent} ({exc.strerror or exc})", param_hint="--out") from None
    if not os.access(out.parent, os.W_OK):
        raise typer.BadParameter(f"the folder {out.parent} is not writable", param_hint="--out")
    staged = out.parent / f".{out.name}.{uuid.uuid4().hex}"  # written here, then renamed over --out
    try:  # a file really made (a read-only mount, /proc: os.access says yes to root), before minutes of fitting
        staged.touch(exist_ok=False)
    except OSError as exc:
        raise typer.BadParameter(f"cannot write a file in {out.parent} ({exc.strerror or exc})", param_hint="--out") from None
    try:
        _fit_and_write(out, staged, catalogue, demo_catalogue, seed, spans, epochs)
    finally:
        staged.unlink(missing_ok=True)


def _fit_and_write(out: Path, staged: Path, catalogue: Path | None, demo_catalogue: bool, seed: int, spans: int,
                   epochs: int) -> None:
    """The fit, written to ``staged`` and renamed over ``out``: a worker or serve starting meanwhile
    reads the old student or the new one, never half of one (nor one a Ctrl-C cut short)."""
    now = int(time.time() * 1000)
    items = synthetic_items(seed, now) if demo_catalogue else read_catalogue_file(catalogue, now)
    titles = [item.title for item in items if item.available]
    if not titles:
        raise StreamrecError(f"{catalogue}: no available item to learn from")
    typer.echo(f"learning the words of {counted(len(titles), 'title')} ({counted(spans, 'run')} of words each)")
    embedder = TextEmbedder()  # every core: nothing else runs here
    t0 = time.monotonic()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now_s = time.monotonic()
        if now_s - last[0] >= 5 or done == total:
            last[0] = now_s
            typer.echo(f"  text model: {done:,}/{total:,} texts embedded ({done / max(now_s - t0, 1e-9):.0f}/s)")

    try:
        student = QueryStudent.fit(embedder.model, titles, spans=spans, epochs=epochs, seed=seed, progress=progress)
    except ValueError as exc:
        raise StreamrecError(f"cannot fit a query student: {exc}") from None
    try:
        staged.write_bytes(student.to_bytes())
        os.replace(staged, out)
    except OSError as exc:
        raise StreamrecError(f"cannot write {out}: {exc.strerror or exc}") from None
    typer.echo(f"wrote {out} ({counted(len(student.tokens), 'word piece')}, {out.stat().st_size / 2**20:.1f} MiB) in "
               f"{time.monotonic() - t0:.0f} s; use it with STREAMREC_QUERY_STUDENT={out}")


__all__ = ["distil_queries"]
