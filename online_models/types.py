"""Plain data types shared by every learner, the evaluator and the stream.

They carry no I/O and no framework objects, so the offline evaluator, the
benchmarks and the Faust worker all hand the models exactly the same values.
"""

from __future__ import annotations

from typing import Literal

import msgspec

InteractionKind = Literal["click", "purchase"]


class Interaction(msgspec.Struct, frozen=True):
    """One user-item event, as the models see it.

    ``ts`` is epoch milliseconds. ``kind`` is ``"click"`` or ``"purchase"``; logs with
    richer behaviour types (Taobao's cart and fav) map them onto these two and keep the
    original in ``behavior``. A msgspec Struct, not a dataclass: the worker builds one per
    event, and a Struct is built several times faster.
    """

    user_id: str
    item_id: str
    ts: int
    kind: InteractionKind = "click"
    session_id: str | None = None
    category_id: str | None = None
    behavior: str | None = None
    quantity: int = 1


class UserContext(msgspec.Struct, frozen=True):
    """What the caller knows of a user when it asks for recommendations.

    ``recent_items`` is oldest first, newest last (the stream keeps it in Redis).
    """

    user_id: str
    recent_items: tuple[str, ...] = ()
    purchased: frozenset[str] = frozenset()
    session_id: str | None = None
    ts: int | None = None


class ScoredItem(msgspec.Struct, frozen=True, omit_defaults=True):
    """An item in a ranked list, best first; ``reason`` names the source that proposed it.

    A msgspec Struct rather than a dataclass: ranking builds ``k`` of them per user on every
    event, and a Struct is built about 5x faster (20 items: 1.5 µs against 7 µs). The stream
    publishes the ranked lists as they are (``stream.records.RecommendedItem`` is this type).
    """

    item_id: str
    score: float
    reason: str | None = None
