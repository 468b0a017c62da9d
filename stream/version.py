"""streamrec's version, and the versions a bug report needs beside it (``streamrec --version``,
the first line the worker and serve log, ``streamrec_build_info``)."""

from __future__ import annotations

import platform
from importlib import metadata

#: the libraries whose versions a bug report needs, beside streamrec's own (``--version``)
REPORTED_LIBRARIES = ("faust-streaming", "aiokafka", "redis", "river", "onnxruntime", "onnxruntime-gpu", "torch")


def version_text() -> str:
    """``streamrec X (Python Y; library Z, ...)``: the installed distributions, as a bug report wants them."""
    libraries = []
    for name in REPORTED_LIBRARIES:
        try:
            libraries.append(f"{'redis-py' if name == 'redis' else name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:  # an extra not installed (torch: [train]; one onnxruntime of two)
            continue
    return f"streamrec {own_version()} (Python {platform.python_version()}; {', '.join(libraries)})"


def own_version() -> str:
    """The installed streamrec's version; "(not installed)" in a checkout that never was."""
    try:
        return metadata.version("streamrec")
    except metadata.PackageNotFoundError:
        return "(not installed)"


__all__ = ["REPORTED_LIBRARIES", "own_version", "version_text"]
