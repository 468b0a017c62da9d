"""The layout of a model directory, read side: version names, the ``CURRENT`` pointer, manifests.

The layout is described in :mod:`gpu_scorer.registry`, which writes it. This module only
reads it and imports no other part of the scorer but the errors, so that both the
registry (which loads versions with :mod:`gpu_scorer.runtime`) and the runtime (which
resolves a version name to its directory) can use it.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> (root / "v0002").mkdir(); _ = (root / "v0002" / "manifest.json").write_text("{}")
>>> (root / "v0010").mkdir(); _ = (root / "v0010" / "manifest.json").write_text("{}")
>>> versions(root), latest(root)
(['v0002', 'v0010'], 'v0010')
>>> _ = (root / POINTER).write_text("v0002\\n"); latest(root)
'v0002'
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gpu_scorer.errors import ModelLoadError

POINTER = "CURRENT"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "streamrec-scorer/1"

log = logging.getLogger("streamrec.scorer")
#: the last pointer problem :func:`latest` logged
_last_warned = [""]


def model_dir_problem(text: str) -> str | None:
    """What is wrong with ``text`` as a model registry's path where no shell read it (an
    environment variable, a quoted option), else None: the worker, serve, train and retrain
    looked in, or wrote to, a folder of that very name.

    >>> model_dir_problem("~/models"), model_dir_problem("/srv/models")
    ("'~' is expanded by a shell only, not here; give the full path", None)
    """
    if text != text.strip():
        return "the path starts or ends with a space; remove it"
    if text.startswith("~"):
        return "'~' is expanded by a shell only, not here; give the full path"
    return None


def default_model_dir() -> Path:
    return Path(os.environ.get("STREAMREC_MODEL_DIR") or "models")


def version_path(root: Path, version: str) -> Path:
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"bad version name {version!r}")
    return root / version


def version_key(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else 0, name)


def versions(root: Path) -> list[str]:
    """Registered versions (directories with a manifest, not hidden: a writer stages a
    version as ``.staging-<hex>`` before it renames it), oldest first."""
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if not p.name.startswith(".") and p.is_dir() and (p / MANIFEST).exists()]
    return sorted(found, key=version_key)


def pointed(root: Path) -> str | None:
    """The version ``CURRENT`` names; None without one (no file, or an empty one); a
    :class:`ModelLoadError` that says why when it cannot be read or names no registered version
    (a typo in a hand-made rollback must not quietly serve another one)."""
    where = root / POINTER
    try:
        raw = where.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:  # a folder, no permission
        raise ModelLoadError(f"{where} cannot be read ({exc.strerror or exc})") from None
    try:
        name = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ModelLoadError(f"{where} is not UTF-8 text: it should hold one version name") from None
    if not name:
        return None
    try:
        registered = "/" not in name and not name.startswith(".") and (root / name / MANIFEST).exists()
    except OSError:  # a name too long for a file name
        registered = False
    if not registered:
        known = versions(root)
        raise ModelLoadError(f"{POINTER} names {name[:80]!r}, which is not a registered version in {root} "
                             f"({', '.join(known[-5:]) if known else 'none is registered'})")
    return name


def latest(root: Path) -> str | None:
    """The version ``CURRENT`` points at, else (saying why, where CURRENT is there but names
    none) the newest registered one, else None."""
    try:
        name = pointed(root)
    except ModelLoadError as exc:
        if str(exc) != _last_warned[0]:  # once, not at every retry of a worker with no model yet
            _last_warned[0] = str(exc)
            log.warning("%s; the newest registered version is used instead", exc)
        name = None
    if name is not None:
        return name
    found = versions(root)
    return found[-1] if found else None


#: the files a version is read from (the runtime's graph and vocabulary, the registry's parity sample)
VERSION_FILES = (MANIFEST, "model.onnx", "vocab.json", "parity.npz")


def version_stamp(root: Path, version: str) -> tuple:
    """What ``version``'s files are on disk now: (inode, size, mtime_ns) of each of
    :data:`VERSION_FILES`, None for one missing. A registered version never changes, so a
    different stamp is another model under the same name: a registry deleted and made again
    (its first version is ``v0001`` again), or a version copied in by hand that was still
    being written when it was read. A few ``stat`` calls; never raises.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> version_stamp(root, "v0001") == (None,) * len(VERSION_FILES)
    True
    """
    stamp = []
    for name in VERSION_FILES:
        try:
            st = os.stat(root / version / name)
        except (OSError, ValueError):  # missing, unreadable, a name no file can have
            stamp.append(None)
        else:
            stamp.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


def read_manifest(version_dir: Path) -> dict:
    """A version's manifest; :class:`ModelLoadError` when it cannot be read, or is not an
    object whose ``parity`` and ``config`` (where present) are objects."""
    try:
        manifest = json.loads((version_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        raise ModelLoadError(f"version {version_dir.name}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or not all(isinstance(manifest.get(key, {}), dict) for key in ("parity", "config")):
        raise ModelLoadError(f"version {version_dir.name}: the manifest is not an object whose `parity` and "
                             "`config` are objects; not serving it")
    return manifest


__all__ = [
    "MANIFEST",
    "MANIFEST_FORMAT",
    "POINTER",
    "VERSION_FILES",
    "default_model_dir",
    "latest",
    "pointed",
    "read_manifest",
    "version_key",
    "version_path",
    "version_stamp",
    "versions",
]
