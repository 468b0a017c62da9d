"""Unit tests run without a broker: the shell's read of the topics' ids (at every assignment)
answers none here, unless a test says otherwise, instead of asking whatever listens on the
default bootstrap address."""

from __future__ import annotations

import pytest

from stream import shell as shell_module


@pytest.fixture(autouse=True)
def no_topic_ids(monkeypatch):
    monkeypatch.setattr(shell_module, "topic_ids", lambda *args, **kw: {})
