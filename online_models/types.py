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


class Explanation(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Why a blended item is in the list: the source that contributed most to its score, and
    what that source can say of it, as ids only (small and bounded; no free text).

    ``because`` is one of the user's own items: for ``"covisit"`` the recent item whose
    co-visitation gave the candidate its largest share of the score, for ``"reminder"`` the
    item itself (viewed before). ``category`` is the item's category where the source is a
    popularity one (``"trending"``: popular now in that category) and the category is known.
    Fields that say nothing are left out of the JSON.

    >>> msgspec.json.encode(Explanation("covisit", because="i77"))
    b'{"source":"covisit","because":"i77"}'
    """

    source: str
    because: str | None = None
    category: str | None = None
    #: ``"search"`` only: what matched the query, ``"words"`` (BM25), ``"meaning"`` (the text
    #: model), ``"both"``, or ``"shop"`` (a result the shop's own engine sent)
    matched: str | None = None


class ScoredItem(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """An item in a ranked list, best first; ``reason`` names the source that proposed it,
    and ``explanation`` (from the blend only) says why in a structured form.

    A msgspec Struct rather than a dataclass: ranking builds ``k`` of them per user on every
    event, and a Struct is built about 5x faster (20 items: 1.5 µs against 7 µs). The stream
    publishes the ranked lists as they are (``stream.records.RecommendedItem`` is this type).
    ``gc=False``, as :class:`Explanation`: neither can hold a container, so neither can be in
    a reference cycle, and untracked they do not drive the collector (a tracked ScoredItem,
    which one holding an Explanation would be, doubled the step's young collections).
    """

    item_id: str
    score: float
    reason: str | None = None
    explanation: Explanation | None = None
