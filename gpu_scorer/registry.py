"""Versioned model directory with a ``CURRENT`` pointer.

Layout::

    <model_dir>/
        CURRENT                 # one line: the version to serve (replaced atomically)
        .last-version           # one line: the highest version name given out (never given again)
        v0001/
            model.onnx          # graph I/O in export.py
            vocab.json          # item id <-> row (vocab.py)
            manifest.json       # version, created, data, metrics, parity, config, files
            parity.npz          # a small input and PyTorch's scores, re-checked on load
        v0002/ ...

A version directory is written under a hidden staging name and renamed into place, so a
reader never sees half a version; versions are never modified after that. ``CURRENT`` is
written to a temporary file and ``os.replace``d. Readers that poll (the hot-swap scorer)
only ``stat`` the pointer. Reading the layout lives in :mod:`gpu_scorer.layout`, which the
runtime shares.

Writers (``register``, ``set_current``, ``prune``) take an exclusive ``flock`` on the hidden
file ``.lock`` in the registry for the naming of a version, its rename and the move of
``CURRENT``: of two writers that register at once, the one that took the higher number moves
``CURRENT`` last, so it names the newest. Readers take no lock. Each file of a version, the
version's folder and the registry's folder are ``fsync``ed before ``CURRENT`` names the
version, and the registry's folder again after it moved: a power loss cannot leave a
``CURRENT`` that names a version whose files never reached the disk. ``prune`` renames a
version to a hidden ``.trash-`` name before deleting it, so a reader never sees half of one.

>>> import tempfile
>>> reg = ModelRegistry(tempfile.mkdtemp())
>>> reg.latest() is None
True
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from gpu_scorer import layout
from gpu_scorer.errors import ModelLoadError
from gpu_scorer.layout import MANIFEST_FORMAT, POINTER, default_model_dir
from gpu_scorer.runtime import OnnxScorer
from gpu_scorer.vocab import Vocab


def parity_tolerance(provider: str, fp16: bool = False) -> tuple[float, float]:
    """(atol, rtol) for the load-time check: tight on CPU; CUDA may use TF32 matmuls."""
    if fp16:
        return 0.1, 0.05
    if provider == "CPUExecutionProvider":
        return 1e-4, 1e-4
    return 1e-2, 1e-2


#: what ``rename`` says when the version's name is taken (a folder: not empty; a file or a link: not a folder)
log = logging.getLogger(__name__)

_NAME_TAKEN = frozenset({errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR})
#: the file the writers ``flock`` (hidden: no version, and no ``vNNNN`` name)
LOCK = ".lock"
#: the highest version number ever given out here: a deleted version's name is never given again
#: (a worker that refused ``v0004`` would take a new ``v0004`` for the refused one, and skip it)
ISSUED = ".last-version"
#: the prefix of a version being deleted by ``prune`` (hidden: no reader lists it)
TRASH = ".trash-"


def fsync_path(path: Path) -> None:
    """Flush ``path``, a file (its data) or a folder (its entries: what was created or renamed
    in it), to the disk. A file system that cannot sync a folder (``EINVAL``) is let be."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not path.is_dir():
            raise
    finally:
        os.close(fd)


class ModelRegistry:
    """Versions of the scorer on disk; see the module docstring for the layout."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_model_dir()

    def path(self, version: str) -> Path:
        return layout.version_path(self.root, version)

    def versions(self) -> list[str]:
        """Registered versions, oldest first."""
        return layout.versions(self.root)

    def latest(self) -> str | None:
        """The version ``CURRENT`` points at, else the newest registered one, else None."""
        return layout.latest(self.root)

    def pointed(self) -> str | None:
        """The version ``CURRENT`` names, None without one; :class:`ModelLoadError` where it
        names no registered version (:func:`gpu_scorer.layout.pointed`)."""
        return layout.pointed(self.root)

    def pointer_stamp(self) -> tuple[int, int, int] | None:
        """Cheap change detector for ``CURRENT`` (one stat): (inode, mtime_ns, size)."""
        try:
            st = os.stat(self.root / POINTER)
        except OSError:  # none; or a loop of links, a registry that became a file: pointed() says which
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def version_stamp(self, version: str) -> tuple:
        """What ``version``'s files are on disk now (:func:`gpu_scorer.layout.version_stamp`):
        tells a model from another of the same name."""
        return layout.version_stamp(self.root, version)

    def manifest(self, version: str) -> dict:
        return layout.read_manifest(self.path(version))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writers' lock: an exclusive ``flock`` on ``.lock`` in the registry (made
        where missing; opened read-only, which ``flock`` needs no more than, so a lock file
        another user made does not stop a writer). Freed when the block ends, or the process."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def set_current(self, version: str) -> None:
        """Point ``CURRENT`` at ``version`` (a rollback too): after a ``register`` in progress."""
        with self._locked():
            self._point(version)

    def _point(self, version: str) -> None:
        """``set_current`` under the lock."""
        if not (self.path(version) / "manifest.json").exists():
            raise ModelLoadError(f"version {version} is not registered in {self.root}")
        tmp = self.root / f".{POINTER}.{uuid.uuid4().hex}"
        try:
            tmp.write_text(version + "\n", encoding="utf-8")
            fsync_path(tmp)
            os.replace(tmp, self.root / POINTER)
        except BaseException:  # a full disk: CURRENT is as it was, and no hidden half-written pointer stays
            tmp.unlink(missing_ok=True)
            raise
        fsync_path(self.root)  # the replace itself

    def prune(self, keep: int) -> list[str]:
        """Delete all registered versions but the ``keep`` newest and the one ``CURRENT`` names;
        return the names deleted, oldest first. Under the lock, so no writer is naming or
        pointing at a version meanwhile; a writer's staging folder, hidden, is no version and is
        left alone. Each version is renamed to a hidden ``.trash-`` name, then deleted (a link
        to a version kept elsewhere: the link only); trash an interrupted prune left is deleted
        first. A version in use keeps serving: a worker holds its model in memory."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        with self._locked():
            try:
                current = self.pointed()
            except ModelLoadError:  # CURRENT names no registered version: none to spare
                current = None
            doomed = [version for version in self.versions()[:-keep] if version != current]
            trash = [p for p in self.root.iterdir() if p.name.startswith(TRASH)]
            for version in doomed:
                trash.append(self.root / f"{TRASH}{version}-{uuid.uuid4().hex}")
                os.rename(self.path(version), trash[-1])
            for path in trash:
                if path.is_symlink() or not path.is_dir():
                    path.unlink()
                else:
                    shutil.rmtree(path)
        return doomed

    def register(
        self,
        onnx_path: str | Path,
        vocab: Vocab,
        *,
        config: dict,
        metrics: dict | None = None,
        parity: dict | None = None,
        data: dict | None = None,
        parity_sample: dict[str, np.ndarray] | None = None,
        make_current: bool = True,
        extra: dict | None = None,
    ) -> str:
        """Copy a model into a new version directory, atomically; return the version name.

        The files are written and synced outside the lock; the naming, the rename and the move
        of ``CURRENT`` (with ``make_current``) happen under it."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            shutil.copyfile(onnx_path, staging / "model.onnx")
            vocab.save(staging / "vocab.json")
            if parity_sample is not None:
                np.savez(staging / "parity.npz", **parity_sample)
            for written in staging.iterdir():
                fsync_path(written)
            with self._locked():
                version = self._rename_into_place(staging, vocab, config=config, metrics=metrics, parity=parity,
                                                  data=data, extra=extra)
                if make_current:
                    self._point(version)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return version

    def _rename_into_place(self, staging: Path, vocab: Vocab, *, config: dict, metrics: dict | None,
                           parity: dict | None, data: dict | None, extra: dict | None) -> str:
        """Name the staged version, write its manifest and rename it into place, synced; under
        the lock (a writer that takes none, such as an older streamrec, may still take a name
        first: then the next one is tried)."""
        for attempt in range(100):
            version = self._next_version()
            manifest = {
                "format": MANIFEST_FORMAT,
                "version": version,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "data": data or {},
                "metrics": metrics or {},
                "parity": parity or {},
                "config": config,
                "vocab_size": len(vocab),
                "files": sorted(p.name for p in staging.iterdir() if p.name != "manifest.json") + ["manifest.json"],
                **(extra or {}),
            }
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
            fsync_path(staging / "manifest.json")
            try:
                os.rename(staging, self.root / version)  # fails if another writer took it
            except OSError as exc:
                if exc.errno not in _NAME_TAKEN:  # a read-only or failing disk: say so, not "no name" after 100 tries
                    raise
                time.sleep(0.001 * attempt)
                continue
            fsync_path(self.root / version)  # its entries
            self._note_issued(version)
            fsync_path(self.root)  # the rename (and the note)
            return version
        raise ModelLoadError(f"could not allocate a version name in {self.root}")

    def _next_version(self) -> str:
        """``v`` and one more than the largest number of a ``vNNNN`` name here, registered or
        not (a stray folder's, file's or dangling link's name is taken: the rename cannot go
        there; the hidden names, a staging folder, the lock file, a version in the trash, are
        none)."""
        names = [p.name for p in self.root.iterdir()] if self.root.is_dir() else []
        numbers = [int(name[1:]) for name in names if re.fullmatch(r"v\d{1,9}", name)]
        return f"v{max([*numbers, self._issued()]) + 1:04d}"

    def _issued(self) -> int:
        """The highest version number given out here (:data:`ISSUED`; 0 without the note)."""
        try:
            text = (self.root / ISSUED).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            return 0
        return int(text[1:]) if re.fullmatch(r"v\d{1,9}", text) else 0

    def _note_issued(self, version: str) -> None:
        """Remember ``version`` as the highest given out (best effort: without the note, a
        deleted newest version's name could be given again, as before it existed)."""
        tmp = self.root / f"{ISSUED}.{uuid.uuid4().hex}"
        try:
            tmp.write_text(version + "\n", encoding="ascii")
            fsync_path(tmp)
            os.replace(tmp, self.root / ISSUED)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.warning("could not note %s as the newest version given out in %s (%s): a version deleted later "
                        "may have its name given again", version, self.root, exc.strerror or exc)

    def load(self, version: str | None = None, device: str = "auto", *, verify: bool = True, **scorer_kw):
        """An :class:`~gpu_scorer.runtime.OnnxScorer` for ``version`` (default: latest).

        With ``verify`` the version is refused (:class:`ModelLoadError`) when its manifest
        records a failed export parity check, or when ONNX Runtime's scores on the stored
        ``parity.npz`` input differ from PyTorch's beyond :func:`parity_tolerance`.
        """
        version = version or self.latest()
        if version is None:
            raise ModelLoadError(f"no model registered in {self.root}")
        manifest = self.manifest(version)
        if verify and manifest.get("parity", {}).get("ok") is False:
            raise ModelLoadError(f"version {version} failed its export parity check; not serving it")
        scorer = OnnxScorer(self.path(version), device, **scorer_kw)
        if verify:
            verify_parity(scorer, self.path(version), fp16=scorer_kw.get("fp16", False))
        return scorer


def verify_parity(scorer, version_dir: Path, fp16: bool = False) -> float:
    """Re-run the stored parity sample; raise :class:`ModelLoadError` on a mismatch."""
    sample_path = version_dir / "parity.npz"
    if not sample_path.exists():
        raise ModelLoadError(f"{version_dir.name}: no parity.npz to verify the model against")
    if not zipfile.is_zipfile(sample_path):  # numpy would take it for a pickle, and say to load it "unsafely"
        raise ModelLoadError(f"{version_dir.name}: parity.npz is not a NumPy .npz archive (damaged, or not written "
                             "by streamrec train)")
    try:
        with np.load(sample_path, allow_pickle=False) as sample:
            seq, cand, ref = sample["seq_ids"], sample["cand_ids"], sample["scores"]
        got = scorer.run_ids(seq, cand)
    except Exception as exc:
        raise ModelLoadError(f"{version_dir.name}: parity sample failed to run ({exc})") from exc
    atol, rtol = parity_tolerance(scorer.provider, fp16)
    diff = float(np.max(np.abs(got - ref))) if got.shape == ref.shape else float("inf")
    if not (got.shape == ref.shape and np.allclose(got, ref, atol=atol, rtol=rtol)):
        raise ModelLoadError(
            f"{version_dir.name}: ONNX Runtime scores differ from the PyTorch reference "
            f"(max |diff| {diff:.3g} > atol {atol} on {scorer.provider}); not serving it"
        )
    return diff


__all__ = ["MANIFEST_FORMAT", "POINTER", "ModelRegistry", "default_model_dir", "parity_tolerance", "verify_parity"]
