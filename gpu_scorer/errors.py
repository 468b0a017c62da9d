"""Exceptions of the scorer package (``stream`` may wrap them under its own root)."""

from __future__ import annotations


class ScorerError(RuntimeError):
    """Root of every error the scorer raises on purpose."""


class ScorerDeviceError(ScorerError):
    """The requested execution device cannot be used (e.g. ``device="cuda"`` without a GPU)."""


class ModelLoadError(ScorerError):
    """A model version could not be loaded, or failed its parity check; it is not served."""


__all__ = ["ModelLoadError", "ScorerDeviceError", "ScorerError"]
