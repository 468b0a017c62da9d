"""Pseudonymous user ids: the worker keeps and learns on a keyed hash of each user id.

With ``STREAMREC_PSEUDONYM_KEY`` set, every event's ``user_id`` is replaced, as soon as the
event is decoded, by ``HMAC-SHA256(key, user_id)`` (its first 128 bits, hex, after a ``p-``):
the Redis user documents, their keys, the online models and their snapshots, the worker's
logs and the re-ranker's pending lists only ever see that pseudonym. The batch handler keeps
the pseudonym -> id pairs of the batch in hand, so each recommendation still goes out keyed
by, and naming, the id the site sent. Without the key nobody can link a pseudonym back to a
user; with it, the same id always maps to the same pseudonym (a user's state carries over
between events and restarts), and erasing a user means erasing their pseudonym.

What stays raw: the input topics and dead letters (the events as sent, until retention
removes them), the recommendations topic (keyed by the site's id, as the site reads it),
session ids and event ids (the site's own, which should not embed user ids). Changing the
key starts every user afresh.

>>> p = Pseudonyms("secret")
>>> p.of("u1") == p.of("u1") != Pseudonyms("other").of("u1"), p.of("u1")[:2], len(p.of("u1"))
(True, 'p-', 34)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

import msgspec

from stream.records import Event

PREFIX = "p-"


class Pseudonyms:
    """The keyed hash of user ids (see the module docstring)."""

    def __init__(self, key: str | bytes) -> None:
        if not key:
            raise ValueError("a pseudonym key must not be empty")
        self._key = key.encode() if isinstance(key, str) else bytes(key)

    def of(self, user_id: str) -> str:
        return PREFIX + hmac.new(self._key, user_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]

    def events(self, events: Sequence[Event]) -> tuple[list[Event], dict[str, str]]:
        """``events`` with pseudonymous user ids, and pseudonym -> the id the site sent. Any
        record with a ``user_id`` goes (a ForgetRequest too)."""
        out: list[Event] = []
        original: dict[str, str] = {}
        of = self.of
        replace = msgspec.structs.replace
        for ev in events:
            pseudonym = of(ev.user_id)
            original[pseudonym] = ev.user_id
            out.append(replace(ev, user_id=pseudonym))
        return out, original

    def __repr__(self) -> str:
        return "Pseudonyms(<key>)"  # never the key


def pseudonyms_of(key: str) -> Pseudonyms | None:
    """The worker's :class:`Pseudonyms` for ``STREAMREC_PSEUDONYM_KEY`` (empty: None, raw ids)."""
    return Pseudonyms(key) if key else None


__all__ = ["PREFIX", "Pseudonyms", "pseudonyms_of"]
