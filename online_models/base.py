"""The one vocabulary every online learner speaks.

A learner learns from one :class:`~online_models.types.Interaction` at a time and scores
items for a :class:`~online_models.types.UserContext`. A subclass implements
``learn_one`` and ``predict_one`` (and counts what it learned in ``self.n_learned``);
it overrides ``score_many`` (one user) and ``score_batch`` (a batch of users) where scoring many items at once pays, and ``propose`` when it can put
forward items of its own (``propose_scores``; it is then a *candidate source*). Everything else (ranking,
cloning, snapshots, the version string) comes from here.

Constructor arguments are stored under their own names, as in River, so that
:meth:`OnlineLearner.clone` can rebuild a fresh copy and two learners can be compared.

>>> from online_models.popularity import GlobalPopularity
>>> from online_models.types import Interaction, UserContext
>>> model = GlobalPopularity()
>>> model.learn_one(Interaction("u1", "a", ts=1))
>>> model.learn_one(Interaction("u2", "a", ts=2))
>>> model.learn_one(Interaction("u2", "b", ts=3))
>>> [s.item_id for s in model.rank(UserContext("u3"))]
['a', 'b']
>>> restored = GlobalPopularity.restore(model.snapshot())
>>> restored.predict_one(UserContext("u3"), "a") == model.predict_one(UserContext("u3"), "a")
True
"""

from __future__ import annotations

import abc
import hashlib
import hmac
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, islice
from typing import Any, ClassVar, Self

import numpy as np

from online_models import codec
from online_models.types import Interaction, ScoredItem, UserContext

#: Version of the snapshot layout; bumped when the header or payload layout changes.
#: 1 was a pickle: refused, since loading it would run whatever code it names.
SNAPSHOT_FORMAT = 2
_MAGIC = b"streamrec-snapshot\n"


class SnapshotError(ValueError):
    """Bytes that are not a snapshot this code can restore; the message says what was seen."""


def _signature(key: bytes, header: bytes, payload: bytes) -> str:
    return hmac.new(key, header + b"\n" + payload, hashlib.sha256).hexdigest()


def _key(key: str | bytes | None) -> bytes | None:
    if not key:
        return None
    return key.encode() if isinstance(key, str) else bytes(key)


def dump_snapshot(obj: Any, params: dict[str, Any], payload: Any, key: str | bytes | None = None) -> bytes:
    """``magic + JSON header line + data``: the header, readable with ``head -2``, names the
    class and its parameters; the data is ``payload`` as msgpack (:mod:`online_models.codec`,
    no pickle). With ``key`` the header also carries an HMAC-SHA256 of itself and the data."""
    cls = type(obj)
    header = {
        "format": SNAPSHOT_FORMAT,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "params": params,
    }
    try:
        data = codec.encode(payload)
    except codec.CodecError as exc:
        raise SnapshotError(str(exc)) from None
    secret = _key(key)
    if secret is not None:
        unsigned = json.dumps(header, default=repr, sort_keys=True).encode()
        header["hmac_sha256"] = _signature(secret, unsigned, data)
    line = json.dumps(header, default=repr, sort_keys=True).encode() + b"\n"
    return _MAGIC + line + data


def load_snapshot(data: bytes, expected: type, key: str | bytes | None = None) -> tuple[dict[str, Any], Any]:
    """The header and payload of ``data``, after checking format, signature and class.

    The data decodes only to plain values, numeric arrays and objects of this project's and
    River's classes (:mod:`online_models.codec`), so bytes from outside can at worst hold
    wrong numbers, not run code; with ``key`` they must also carry its signature.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"a snapshot is bytes, saw {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(_MAGIC):
        raise SnapshotError(f"not a streamrec snapshot: starts with {data[:20]!r}")
    end = data.find(b"\n", len(_MAGIC))
    if end < 0:
        raise SnapshotError("snapshot header has no end")
    try:
        header = json.loads(data[len(_MAGIC) : end])
    except ValueError as exc:
        raise SnapshotError(f"snapshot header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SnapshotError("snapshot header is not a JSON object")
    if header.get("format") == 1:
        raise SnapshotError("snapshot format 1 is a pickle, which streamrec no longer loads (it could run any code)")
    if header.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError(
            f"snapshot format {header.get('format')!r} cannot be read by this code (format {SNAPSHOT_FORMAT})"
        )
    body = data[end + 1 :]
    secret = _key(key)
    if secret is not None:
        signed = header.pop("hmac_sha256", None)
        if not isinstance(signed, str):
            raise SnapshotError("the snapshot is not signed, and this worker only restores signed ones (STREAMREC_SNAPSHOT_KEY)")
        unsigned = json.dumps(header, default=repr, sort_keys=True).encode()
        if not hmac.compare_digest(signed, _signature(secret, unsigned, body)):
            raise SnapshotError("the snapshot's signature does not match (another key, or the bytes were changed)")
    if not _names(header.get("class"), expected):
        raise SnapshotError(f"snapshot holds a {header.get('class')}, which is not a {expected.__name__}")
    try:
        payload = codec.decode(body)
    except codec.CodecError as exc:
        raise SnapshotError(str(exc)) from None
    if not isinstance(payload, expected):
        raise SnapshotError(
            f"snapshot holds a {type(payload).__name__}, which is not a {expected.__name__}"
        )
    return header, payload


def _names(name: Any, cls: type) -> bool:
    """Whether a snapshot header's ``module.Class`` is ``cls``: its own module, or a module
    that it moved out of and that still imports it (only modules already imported are looked
    at; nothing is imported)."""
    if name == f"{cls.__module__}.{cls.__qualname__}":
        return True
    if not isinstance(name, str):
        return False
    module, _, attr = name.rpartition(".")
    same_package = module.split(".", 1)[0] == cls.__module__.split(".", 1)[0]
    return same_package and getattr(sys.modules.get(module), attr, None) is cls


class ParamsMixin:
    """River-style plumbing shared by the learners and the re-ranker: constructor arguments
    are kept under their own names, so an object can be cloned, snapshotted and compared."""

    name: ClassVar[str]
    n_learned: int

    def _get_params(self) -> dict[str, Any]:
        """Constructor arguments, read back from the attributes of the same names."""
        sig = inspect.signature(type(self).__init__)
        return {
            p: getattr(self, p)
            for p, v in sig.parameters.items()
            if p != "self" and v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)
        }

    def clone(self) -> Self:
        """A fresh, unfitted learner with the same constructor arguments."""
        return type(self)(**self._get_params())

    def snapshot(self, key: str | bytes | None = None) -> bytes:
        """The learner's whole state as versioned bytes (see :func:`dump_snapshot`)."""
        return dump_snapshot(self, self._get_params(), self, key)

    @classmethod
    def restore(cls, data: bytes, key: str | bytes | None = None) -> Self:
        """A learner equal to the one that wrote ``data``; it predicts the same."""
        return load_snapshot(data, cls, key)[1]

    @property
    def version(self) -> str:
        return f"{self.name}-{self.n_learned}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._get_params().items())
        return f"{type(self).__name__}({args})"


class OnlineLearner(ParamsMixin, abc.ABC):
    """Base class of every online model (see the module docstring for what to implement)."""

    #: Short source name: ``ScoredItem.reason`` and a metric label.
    name: ClassVar[str] = "learner"

    #: Whether ``learn_one`` reads its ``user`` argument. None of this package's learners
    #: does, so the worker does not build a context per event for them; a learner that
    #: does says True (online_models.checks verifies the others learn the same without one).
    learns_with_context: ClassVar[bool] = False

    #: Whether an item this source put in a list is explained by its category ("popular now
    #: in c12"): the popularity learners say True.
    explains_by_category: ClassVar[bool] = False

    n_learned: int = 0

    # -- learning -------------------------------------------------------------------
    @abc.abstractmethod
    def learn_one(self, x: Interaction, user: UserContext | None = None) -> None:
        """Learn from ``x``; ``user`` is the user's context *before* ``x`` (may be None)."""

    def learn_many(self, xs: Iterable[tuple[Interaction, UserContext | None]]) -> None:
        for x, user in xs:
            self.learn_one(x, user)

    def forget_user(self, user_id: str, sessions: Iterable[str] = ()) -> None:
        """Drop everything the learner keeps keyed by ``user_id``, by one of ``sessions`` (the
        user's session ids) or by a session key derived from them (:func:`owned_by`): an
        erasure request. What stays are anonymous aggregates over items (pair counts, item
        factors, popularity), to which the user's events contributed without being kept.

        Nothing by default: a learner that keeps only item-keyed state (the popularity
        learners) holds nothing of a user. A learner with user- or session-keyed tables
        overrides this; forgets are rare, so one pass over such a table is fine."""

    # -- scoring --------------------------------------------------------------------
    @abc.abstractmethod
    def predict_one(self, user: UserContext, item_id: str) -> float:
        """Score of ``item_id`` for ``user``; higher is better. Never raises; an unseen
        user or item gets the learner's default (usually 0.0)."""

    def score_many(self, user: UserContext, items: Sequence[str]) -> list[float]:
        """Scores of ``items`` in order; override where a batch is cheaper than a loop."""
        return [self.predict_one(user, item) for item in items]

    def score_batch(self, users: Sequence[UserContext], items: Sequence[Sequence[str]]) -> np.ndarray:
        """:meth:`score_many` of ``items[i]`` for ``users[i]``, all users' scores one after
        another in one float array; the ranker calls this once per batch. Override where one
        pass over all users' items is cheaper than a call per user."""
        score = self.score_many
        return np.fromiter(chain.from_iterable(map(score, users, items)), dtype=float,
                           count=sum(map(len, items)))

    def because(self, user: UserContext, items: Sequence[str]) -> list[str | None] | None:
        """For each of ``items`` (the few of a published list this source contributed most
        to), the item of ``user``'s own that led the source to it, or None; None for all when
        the source cannot say (the default). Called for a list's top ``k`` only, never for
        every candidate, so it may cost a few dict lookups per item."""
        return None

    def propose_scores(self, user: UserContext, k: int) -> list[tuple[str, float]]:
        """At most ``k`` ``(item, score)`` pairs of the learner's own choosing, best first,
        without duplicates; none by default. Override to make the learner a candidate source."""
        return []

    def propose_items(self, user: UserContext, k: int) -> list[str]:
        """The items of :meth:`propose_scores`, in its order (the candidate generator needs no
        scores); from :meth:`rank` for a learner that only overrides that."""
        if type(self).propose_scores is not OnlineLearner.propose_scores:
            return [item for item, _ in self.propose_scores(user, k)]
        return [s.item_id for s in self.rank(user, None, k)]

    def propose(self, user: UserContext, k: int) -> list[ScoredItem]:
        """:meth:`propose_scores` as :class:`ScoredItem` values."""
        name = self.name
        return [ScoredItem(item, float(score), name) for item, score in self.propose_scores(user, k)]

    def rank(
        self, user: UserContext, candidates: Sequence[str] | None = None, k: int = 20
    ) -> list[ScoredItem]:
        """Best ``k`` items first, without duplicates.

        With ``candidates`` the result is a subset of them (ties keep the given order);
        with ``None`` the learner proposes items itself (see :meth:`propose_scores`).
        """
        if k <= 0:
            return []
        if candidates is None:
            return self.propose(user, k)[:k]
        items = list(dict.fromkeys(candidates))
        scores = self.score_many(user, items)
        order = sorted(range(len(items)), key=lambda i: -scores[i])
        return [ScoredItem(items[i], float(scores[i]), self.name) for i in order[:k]]


def trim_oldest(table: dict, limit: int, keep: int | None = None) -> list:
    """Hold ``table``, a dict kept in the order its keys were last put (a bounded FIFO or LRU:
    the oldest first), to at most ``limit`` keys: once it has more, the oldest go, down to
    ``keep`` (default ``limit - limit // 64``), and are returned.

    ``del table[next(iter(table))]`` for each key over the limit looks free but is not: CPython
    leaves a deleted key's slot in place until the dict is rebuilt, and every ``iter`` walks the
    slots from the first, so once the table is full each such delete walks past all the keys
    deleted before it (13 µs a put at 20,000 keys, 47 µs at 100,000, on this project's machines,
    against under 1 µs while the table fills: a cost per event that jumps once a long run's
    users fill the tables). Dropping ``limit // 64`` more than needed pays that walk once for
    as many puts. A table that must keep its ``n`` newest keys (a guarantee, not only a bound)
    passes ``limit=n + n // 64, keep=n``. Below 64 keys the limit is held exactly.

    >>> t = dict.fromkeys(range(201))
    >>> gone = trim_oldest(t, 200)
    >>> gone, len(t), next(iter(t))
    ([0, 1, 2, 3], 197, 4)
    >>> trim_oldest(t, 200)
    []
    >>> small = dict.fromkeys("abcd")
    >>> trim_oldest(small, 3), list(small)
    (['a'], ['b', 'c', 'd'])
    """
    if len(table) <= limit:
        return []
    keep = limit - limit // 64 if keep is None else keep
    gone = list(islice(table, max(0, len(table) - keep)))
    for key in gone:
        del table[key]
    return gone


class Recency:
    """Keys (items, users) from the least to the most recently seen, held to ``capacity``.

    ``touch(key)`` marks a key as just seen and returns the keys that fell out: once there are
    more than ``capacity``, the least recently seen go at once, down to three quarters of it (so
    a learner drops their rows in one pass now and then, not one key per event). The owner removes those keys from its own
    tables, which are then bounded by ``capacity`` too.

    >>> r = Recency(4)
    >>> [r.touch(k) for k in "abcab"], r.touch("d"), r.touch("e")
    ([[], [], [], [], []], [], ['c', 'a'])
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, saw {capacity!r}")
        self.capacity = capacity
        self._order: dict = {}

    def touch(self, key) -> list:
        order = self._order
        order.pop(key, None)
        order[key] = None
        return trim_oldest(order, self.capacity, keep=max(1, (self.capacity * 3) // 4))

    def __len__(self) -> int:
        return len(self._order)


def heaviest_rows(weights: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows a table keeps when it reached ``capacity``: the three quarters of it with the
    highest ``weights``, in their old order, and each old row's new number (-1: gone).

    >>> keep, new_row = heaviest_rows(np.array([5.0, 1.0, 3.0, 2.0]), 4)
    >>> keep.tolist(), new_row.tolist()
    ([0, 2, 3], [0, -1, 1, 2])
    """
    n = len(weights)
    keep_n = max(1, (capacity * 3) // 4)
    keep = np.sort(np.argpartition(-weights, keep_n - 1)[:keep_n]) if keep_n < n else np.arange(n)
    new_row = np.full(n, -1, dtype=np.int64)
    new_row[keep] = np.arange(len(keep))
    return keep, new_row


def session_key(
    x: Interaction | UserContext,
    gap_ms: int | None = None,
    open_session: tuple[str, int, int | None] | None = None,
) -> str:
    """The session an interaction (or a user's context) belongs to: its ``session_id``, else
    its user's. Every learner and tool that groups events by session asks here.

    Without ``gap_ms`` the key is the session id or the user id itself: all of a user's events
    without a session id are one session. With ``gap_ms`` the keys say which they are
    (``s:<session id>``, ``u:<user id>#<n>``) and a user's events more than ``gap_ms`` apart
    start a new session: ``open_session`` is the user's current one as ``(key, n, ts of its
    last event)`` (None: none yet), which ``x`` continues unless it comes more than
    ``gap_ms`` after that event (or either time is unknown: then it continues).

    >>> session_key(Interaction("u1", "a", ts=0, session_id="s1")), session_key(Interaction("u1", "a", ts=0))
    ('s1', 'u1')
    >>> gap = 30 * 60 * 1000
    >>> session_key(Interaction("u1", "a", ts=0, session_id="s1"), gap)
    's:s1'
    >>> session_key(Interaction("u1", "a", ts=0), gap)
    'u:u1#1'
    >>> session_key(Interaction("u1", "a", ts=gap), gap, ("u:u1#1", 1, 0))
    'u:u1#1'
    >>> session_key(Interaction("u1", "a", ts=gap + 1), gap, ("u:u1#1", 1, 0))
    'u:u1#2'
    """
    if gap_ms is None:
        return x.session_id if x.session_id is not None else x.user_id
    if x.session_id is not None:
        return "s:" + x.session_id
    key, number, last = open_session if open_session is not None else (None, 0, None)
    if key is not None and (x.ts is None or last is None or x.ts - last <= gap_ms):
        return key
    return f"u:{x.user_id}#{number + 1}"


def owned_by(user_id: str, sessions: Iterable[str] = (), *, gapped: bool) -> Callable[[object], bool]:
    """Whether a session key (:func:`session_key`) is one of ``user_id``'s, among the keys of a
    learner that makes them with a ``gap_ms`` (``gapped``: ``"s:" +`` one of ``sessions``, or of
    the user id for events whose session id is the user id, or ``u:<user id>#<n>``) or without
    one (the user id itself, or one of ``sessions``). Only keys of the learner's own form match:
    a user whose id is another's key (``u:u1#3``, ``s:s9``) owns no key of that other.

    >>> owns = owned_by("u1", ["s9"], gapped=True)
    >>> [k for k in ["u1", "s9", "s:s9", "s:u1", "u:u1#3", "u:u1#x", "u:u12#1", "u2", "s:s99"] if owns(k)]
    ['s:s9', 's:u1', 'u:u1#3']
    >>> [k for k in ["u1", "s9", "s:s9", "u:u1#3"] if owned_by("u1", ["s9"], gapped=False)(k)]
    ['u1', 's9']
    >>> owned_by("u:u1#3", gapped=True)("u:u1#3"), owned_by("s:s9", gapped=True)("s:s9")
    (False, False)
    """
    if not gapped:
        exact = {user_id, *sessions}
        return exact.__contains__
    exact = {"s:" + user_id, *("s:" + sid for sid in sessions)}
    prefix = f"u:{user_id}#"
    skip = len(prefix)

    def owns(key: object) -> bool:
        if key in exact:
            return True
        return type(key) is str and key.startswith(prefix) and key[skip:].isdigit()

    return owns


def learner_classes() -> list[type[OnlineLearner]]:
    """Every concrete learner class imported so far, in a stable order."""
    seen: dict[str, type[OnlineLearner]] = {}
    stack = list(OnlineLearner.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not inspect.isabstract(cls) and not cls.__name__.startswith("_"):
            seen[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [seen[k] for k in sorted(seen)]


__all__ = [
    "SNAPSHOT_FORMAT",
    "OnlineLearner",
    "Recency",
    "SnapshotError",
    "dump_snapshot",
    "heaviest_rows",
    "learner_classes",
    "load_snapshot",
    "owned_by",
    "session_key",
    "trim_oldest",
]
