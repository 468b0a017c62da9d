"""Each user's state, its pure transition, and the stores that keep it.

One user's state is one small JSON document: recent items (oldest first, capped),
purchased items, counters, last-seen time, and what de-duplication needs: for each input
partition the highest offset applied for this user (``offsets``, exact for any
redelivery by Kafka after a crash or rebalance, however many events it spans) and a
fingerprint of each of the user's latest event ids (``seen``, for a producer that sent one
event twice). Keeping both inside the document makes "apply the event" and "remember it was
applied" one atomic write, so an event is never applied twice.

The fingerprints are 64 bits of BLAKE2b, 11 characters each, all in one string (oldest
first): 2.8 kB for the default 256 ids instead of the ids themselves (about 10 kB of a heavy
user's 12 kB document when they were kept as sent), and one string to decode instead of 256.
Two different ids of one user share a fingerprint with a chance of about 2^-56 among 256,
too rare to lose an event to. A document written before (its ids in ``event_ids``) is read
as before and saved in the new form.

A micro-batch costs two round trips to Redis whatever its size: one ``MGET`` to load
every user it touches and one script call that checks the fence and ``SET`` s them
(:meth:`RedisUserStateStore.save_docs`). The worker leaves out the ``MGET`` for the users it
saved itself a moment ago, while its claims hold (:class:`CachedUserStateStore`).

>>> s = UserState("u1")
>>> s = apply_event(s, "e1", "i1", 1000, "click", max_recent=2, dedupe_window=8)
>>> s = apply_event(s, "e2", "i2", 2000, "purchase", max_recent=2, dedupe_window=8)
>>> s = apply_event(s, "e3", "i3", 3000, "click", max_recent=2, dedupe_window=8)
>>> s.recent_items, s.purchased, s.clicks, s.purchases, s.has_seen("e1"), s.has_seen("e4")
(['i2', 'i3'], ['i2'], 2, 1, True, False)
>>> len(s.seen) == 3 * FINGERPRINT_CHARS
True
"""

from __future__ import annotations

import binascii
import hashlib
import logging
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Annotated, Protocol

import msgspec
import redis
import redis.asyncio as aioredis

from online_models.base import trim_oldest

log = logging.getLogger("streamrec.state")
#: a stored document that does not decode, or is another user's: said at every read of it, so
#: ``streamrec serve`` (which reads and never saves) thins it (stream/serve.py, create_web_app)
document_log = logging.getLogger("streamrec.state.documents")


class UserState(msgspec.Struct, kw_only=False, omit_defaults=True):
    user_id: str
    recent_items: list[str] = msgspec.field(default_factory=list)
    purchased: list[str] = msgspec.field(default_factory=list)
    clicks: int = 0
    purchases: int = 0
    last_seen_ts: int = 0
    session_id: str | None = None
    #: the ids of the latest events as sent: read only from documents written before ``seen``
    #: (:func:`_load` turns them into fingerprints), never written
    event_ids: list[str] = msgspec.field(default_factory=list)
    offsets: dict[str, int] = msgspec.field(default_factory=dict)
    # the last list published to the user and when, for live hit-rate measurement
    last_recommended: list[str] = msgspec.field(default_factory=list)
    #: the latest lists published to the user, for attribution: ``[rec_id, ts of the event
    #: that triggered it, flags (1 clicked, 2 purchased, 4 shown, 8 a search's answer)]``, newest last (stream/experiments.py;
    #: the arm that served a list is named by the end of its rec_id, not stored apart)
    recs: list[tuple[str, int, int]] = msgspec.field(default_factory=list)
    #: the user's latest search queries, oldest first (stream/search_step.py)
    recent_queries: list[str] = msgspec.field(default_factory=list)
    #: when the latest of them was searched (the SearchEvent's ts; 0: unknown)
    query_ts: int = 0
    #: the :func:`fingerprint` of each of the latest ``dedupe_window`` event ids, oldest first
    seen: str = ""
    #: which topics ``offsets`` count in: the :func:`incarnation` of the input topics' ids when
    #: they were written ("": unknown, from before it was kept). A topic deleted and created
    #: again starts its offsets over; :func:`align_incarnation` drops offsets of another one.
    incarnation: str = msgspec.field(default="", name="inc")
    #: how many of the worker's batches (events, searches, impressions) saved this document (0: none, or
    #: written before it was kept). Always the last field, so that the save's script reads it
    #: from the document's last bytes (:func:`doc_version`). A batch saves one more than it loaded:
    #: written where that is above the stored version; at or below it, another writer saved the
    #: user meanwhile, and the save is refused for that user (:class:`StateConflict`)
    version: Annotated[int, msgspec.Meta(ge=0, lt=2**53)] = msgspec.field(default=0, name="v")

    def copy(self) -> UserState:
        """A copy that shares nothing that is changed in place with this state: the remembered
        lists' entries (``recs``) are shared, as they are replaced, never changed
        (stream/experiments.py), which saves copying up to 16 small lists per event."""
        return UserState(self.user_id, list(self.recent_items), list(self.purchased), self.clicks, self.purchases,
                         self.last_seen_ts, self.session_id, list(self.event_ids), dict(self.offsets),
                         list(self.last_recommended), list(self.recs), list(self.recent_queries),
                         self.query_ts, self.seen, self.incarnation, self.version)

    def has_seen(self, event_id: str, source: str | None = None, offset: int | None = None) -> bool:
        """True when this event was applied: its offset is at or below the watermark of its
        partition (``source`` = ``"topic:partition"``), or its id is among the latest ids."""
        if source is not None and offset is not None and offset <= self.offsets.get(source, -1):
            return True
        return self.saw(fingerprint(event_id))

    def saw(self, fp: str) -> bool:
        """True when ``fp`` (a :func:`fingerprint`) is one of the latest event ids'."""
        seen = self.seen
        at = seen.find(fp)
        while at > 0 and at % FINGERPRINT_CHARS:  # found across two fingerprints: look further
            at = seen.find(fp, at + 1)
        return at >= 0


#: characters of a :func:`fingerprint`
FINGERPRINT_CHARS = 11


def fingerprint(event_id: str) -> str:
    """64 bits of ``event_id``'s BLAKE2b, in :data:`FINGERPRINT_CHARS` base64 characters; the
    same in every process (Python's own ``hash`` of a string is not).

    >>> fingerprint("e1"), fingerprint("e1") == fingerprint("e1"), fingerprint("e1") == fingerprint("e2")
    ('G11eUfVPDwQ', True, False)
    """
    digest = hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return binascii.b2a_base64(digest, newline=False)[:FINGERPRINT_CHARS].decode()


def incarnation(ids: Mapping[str, str]) -> str:
    """A short tag of the broker's ids of the topics (topic -> id) whose offsets a user's state
    keeps: it changes when one of them is deleted and created again.

    >>> incarnation({"clicks": "a1", "purchases": "b2"}) == incarnation({"purchases": "b2", "clicks": "a1"})
    True
    >>> incarnation({"clicks": "a1", "purchases": "b2"}) == incarnation({"clicks": "c3", "purchases": "b2"})
    False
    """
    text = "\n".join(f"{topic}={ids[topic]}" for topic in sorted(ids))
    digest = hashlib.blake2b(text.encode(), digest_size=6).digest()
    return binascii.b2a_base64(digest, newline=False).decode()


def align_incarnation(states: Iterable[UserState], tag: str | None) -> int:
    """Make each loaded state's offsets count in the topics ``tag`` names (:func:`incarnation`;
    None: not known, nothing changes): a state whose offsets were written for another
    incarnation of the topics (one deleted and created again since) forgets them, so that the
    new topic's events, whose offsets start over, are not taken for redeliveries of the old
    one's. The event ids' fingerprints (``seen``) still catch a producer's duplicates. A state
    from before tags were kept is taken as the current incarnation's. Returns how many forgot.

    >>> old, new = UserState("u1", offsets={"c:0": 41}, incarnation="AAAA"), UserState("u2", offsets={"c:0": 3})
    >>> align_incarnation([old, new], "BBBB"), old.offsets, new.offsets, old.incarnation, new.incarnation
    (1, {}, {'c:0': 3}, 'BBBB', 'BBBB')
    """
    if tag is None:
        return 0
    reset = 0
    for state in states:
        if state.incarnation != tag:
            if state.incarnation and state.offsets:
                state.offsets = {}
                reset += 1
            state.incarnation = tag
    return reset


def apply_event(
    state: UserState,
    event_id: str,
    item_id: str,
    ts: int,
    kind: str,
    *,
    max_recent: int,
    dedupe_window: int,
    session_id: str | None = None,
    max_purchased: int = 500,
    source: str | None = None,
    offset: int | None = None,
    fp: str | None = None,
) -> UserState:
    """The state after one event (mutates and returns ``state``; the caller owns it).
    ``fp``: the event id's :func:`fingerprint`, when the caller has it already."""
    recent = state.recent_items
    recent.append(item_id)
    if len(recent) > max_recent:
        del recent[: len(recent) - max_recent]
    if kind == "purchase":
        state.purchases += 1
        if item_id not in state.purchased:
            state.purchased.append(item_id)
            if len(state.purchased) > max_purchased:
                del state.purchased[0]
    else:
        state.clicks += 1
    state.last_seen_ts = max(state.last_seen_ts, ts)
    if session_id is not None:
        state.session_id = session_id
    if source is not None and offset is not None:
        state.offsets[source] = offset
    return remember_seen(state, fingerprint(event_id) if fp is None else fp, dedupe_window)


def remember_seen(state: UserState, fp: str, dedupe_window: int) -> UserState:
    """``state`` with ``fp`` (an event id's :func:`fingerprint`) the newest of its latest
    ``dedupe_window`` ids (:meth:`UserState.saw`); mutates and returns ``state``.

    >>> s = remember_seen(remember_seen(UserState("u1"), fingerprint("s1"), 1), fingerprint("s2"), 1)
    >>> s.has_seen("s2"), s.has_seen("s1")
    (True, False)
    """
    seen = state.seen + fp
    keep = dedupe_window * FINGERPRINT_CHARS
    state.seen = seen[len(seen) - keep:] if len(seen) > keep else seen
    return state


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(UserState).decode


def encode_state(state: UserState) -> bytes:
    """The document a store keeps for ``state``."""
    return _encode(state)


#: a document's version: its last field, ``"v"`` (:attr:`UserState.version`), read from its last
#: bytes; the save's script reads it the same way (``_SAVE_LUA``)
_VERSION_TAIL = 24
_VERSION = re.compile(rb',"v":(\d+)}$')


def doc_version(doc: bytes) -> int:
    """The :attr:`UserState.version` a stored document holds (0 where it has none), read as
    the save's script reads it.

    >>> doc_version(encode_state(UserState("u1", clicks=2, version=7))), doc_version(encode_state(UserState("u1")))
    (7, 0)
    """
    found = _VERSION.search(doc[-_VERSION_TAIL:])
    return int(found.group(1)) if found else 0


class StateConflict(Exception):
    """A versioned save (:meth:`UserStateStore.save_docs`) that wrote every user but ``users``:
    another writer saved each of them after this one loaded them (their events reached two
    workers: partitions added while a backlog waits, a producer that does not key by user id).
    Load them again, apply the batch's events to what is there, and save once more
    (:meth:`stream.pipeline.RecommendationStep.merged_docs`)."""

    def __init__(self, users: list[str]) -> None:
        super().__init__(f"{len(users)} user(s) saved by another writer since they were loaded")
        self.users = users


class Fenced(Exception):
    """A save refused because another owner claimed one of the batch's partitions since ours
    (``partitions`` names them): the batch belongs to that owner now."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partition(s) {', '.join(map(str, partitions))} were claimed by a newer owner")
        self.partitions = partitions


class UserStateStore(Protocol):
    """Where user state lives between micro-batches.

    Fencing: an owner of input partitions ``claim`` s them when it gets them (each claim
    outnumbers every earlier one of that partition) and saves with ``fence`` = the claims it
    holds for the partitions of the batch; a save whose claim is no longer the latest is
    refused as a whole (:class:`Fenced`), so a worker that lost its partitions (a revocation
    wait that timed out, a long pause, a network split) never overwrites what the next owner
    wrote.
    """

    #: documents found corrupt by load_many (each loaded as a fresh state), and users' keys found
    #: holding another type than a document (a Redis store's save replaces them), since the start
    rebuilt: int

    async def load_many(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        """The state of every user asked for; a fresh ``UserState`` for users never seen, and
        for a document that does not decode (counted in ``rebuilt``, and logged)."""

    async def save_docs(self, docs: Mapping[str, bytes], fence: Mapping[int, int] | None = None,
                        delete: Collection[str] = (), versioned: bool = False) -> None:
        """Write all of ``docs`` (from :func:`encode_state`) and delete the state of the users
        in ``delete`` (erased: stream/handler.py), atomically; with ``fence`` (partition ->
        claim), only while no newer claim was taken on any of those partitions, else nothing
        is written and :class:`Fenced` is raised. A claim the store lost (missing, or older than
        the one given: Redis lost writes) is no newer owner's: it is put back, and the save goes on.

        ``versioned``: a user's document is written only where the stored one's
        :func:`doc_version` is below the new one's (or there is none): the others are left as
        they are, and :class:`StateConflict` names them once the rest is written."""

    async def save_many(self, states: Mapping[str, UserState], fence: Mapping[int, int] | None = None) -> None:
        """:meth:`save_docs` of the encoded ``states``."""

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        """A new claim on each partition, greater than any before it."""

    async def get_blob(self, name: str) -> bytes | None:
        """A named blob (the online models' snapshot), or None."""

    async def set_blob(self, name: str, data: bytes) -> None:
        """Store a named blob."""

    def blob_writer(self, name: str) -> Callable[[bytes], None] | None:
        """A blocking ``write(data)`` of the blob ``name`` over a connection of its own, for a
        forked child process (stream/snapshots.py); None where a child cannot write to this
        store (it lives in the parent's memory)."""

    async def ping(self) -> bool:
        """Whether the store answers (readiness)."""

    async def close(self) -> None:
        """Release connections."""


def _load(uid: str, doc: bytes | None) -> tuple[UserState, bool]:
    """The state a stored document holds, or a fresh one (and True) when it does not decode."""
    if doc is None:
        return UserState(uid), False
    try:
        state = _decode_state(uid, doc)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # Recursion: nested too deeply
        document_log.error("user %r: the stored state does not decode (%s); read as a new user's. A worker saves the "
                           "user afresh at their next event: their earlier events stay in the models, and an event "
                           "Kafka redelivers for them may apply twice", uid, exc)
        return UserState(uid), True
    if state.user_id != uid:
        document_log.error("user %r: the stored state belongs to user %r; read as a new user's (a worker saves the "
                           "user afresh at their next event)", uid, state.user_id)
        return UserState(uid), True
    if state.event_ids:  # written before fingerprints: saved as fingerprints from now on
        state.seen = "".join(map(fingerprint, state.event_ids)) + state.seen
        state.event_ids = []
    if len(state.seen) % FINGERPRINT_CHARS:  # cut by hand: the newest, at the end, are whole
        state.seen = state.seen[len(state.seen) % FINGERPRINT_CHARS:]
    return state, False


def _decode_state(uid: str, doc: bytes) -> UserState:
    """``doc`` decoded; remembered lists that are not ``[rec_id, ts, flags]`` (typed, so
    msgspec checks them in C) are dropped and the rest kept, rather than the user rebuilt."""
    try:
        return _decode(doc)
    except msgspec.ValidationError as exc:
        if "at `$.recs[" not in str(exc):
            raise
    raw = msgspec.json.decode(doc)  # an object: validation reached its recs
    if not isinstance(raw["recs"], list):  # given twice, the last one no list (the typed decoder stopped at the first)
        raise msgspec.ValidationError("`recs` is given more than once, the last time not as a list")
    kept = [entry for entry in raw["recs"] if isinstance(entry, list) and _is_remembered_list(entry)]
    document_log.error("user %r: %d of the stored remembered lists are not [rec_id, ts, flags]; dropped, so later "
                       "clicks on them are not attributed", uid, len(raw["recs"]) - len(kept))
    raw["recs"] = kept
    return msgspec.convert(raw, UserState)


def _is_remembered_list(entry: list) -> bool:
    """Whether ``entry`` is a remembered list as stream/experiments.py writes it.

    >>> _is_remembered_list(["r1", 1700000000000, 0]), _is_remembered_list(["r1", 1700000000000])
    (True, False)
    """
    return (len(entry) == 3 and type(entry[0]) is str and type(entry[1]) is int  # type(), not isinstance: True is no ts
            and type(entry[2]) is int)


def _claims_lost(partitions: list[int]) -> None:
    log.warning("the claim(s) on partition(s) %s were missing in the store or older than this worker's: Redis lost writes "
                "(a restart, a failover to a replica that was behind, a restored dump, a flush). No other worker can "
                "have claimed them since, so they are set back to this worker's and its writes go on; check Redis's "
                "persistence (appendonly) and its replication if this was not a restore or a flush",
                ", ".join(map(str, partitions)))


class InMemoryUserStateStore:
    """The store for the evaluator, benchmarks and unit tests; same semantics as Redis."""

    def __init__(self) -> None:
        self._docs: dict[str, bytes] = {}
        self._blobs: dict[str, bytes] = {}
        self._claims: dict[int, int] = {}
        self.rebuilt = 0

    async def load_many(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        out = {}
        for uid in user_ids:
            out[uid], bad = _load(uid, self._docs.get(uid))
            self.rebuilt += bad
        return out

    async def save_docs(self, docs: Mapping[str, bytes], fence: Mapping[int, int] | None = None,
                        delete: Collection[str] = (), versioned: bool = False) -> None:
        if fence:
            stale = sorted(p for p, claim in fence.items() if self._claims.get(p, 0) > claim)
            if stale:
                raise Fenced(stale)
            lost = sorted(p for p, claim in fence.items() if self._claims.get(p, 0) < claim)
            if lost:
                _claims_lost(lost)
                self._claims.update((p, fence[p]) for p in lost)
        for uid in delete:
            self._docs.pop(uid, None)
        if not versioned:
            self._docs.update(docs)
            return
        stored = self._docs
        conflicts = [uid for uid, doc in docs.items() if uid in stored and doc_version(stored[uid]) >= doc_version(doc)]
        stored.update((uid, doc) for uid, doc in docs.items() if uid not in conflicts)
        if conflicts:
            raise StateConflict(conflicts)

    async def save_many(self, states: Mapping[str, UserState], fence: Mapping[int, int] | None = None) -> None:
        await self.save_docs({uid: _encode(s) for uid, s in states.items()}, fence)

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        out = {}
        for p in partitions:
            out[p] = self._claims[p] = self._claims.get(p, 0) + 1
        return out

    async def get_blob(self, name: str) -> bytes | None:
        return self._blobs.get(name)

    async def set_blob(self, name: str, data: bytes) -> None:
        self._blobs[name] = data

    def blob_writer(self, name: str) -> None:
        return None  # a forked child's writes would land in its own copy of this memory

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


# KEYS: the fence's claim keys (ARGV[2] of them), then the keys to delete (ARGV[3] of
# them), then the users' keys to write, the first ARGV[4] of them to check
# ARGV: ttl, number of claims, number of deletions, number of users' keys to check, "1" for a
# versioned save (else "0"), the claims, then one document per key to write
# returns {-i} when a claim newer than the i-th was taken (or the stored one is no number);
# else {the number of users written, the i of each claim found missing or older (Redis lost
# writes: no newer owner can have claimed since), set back to the one given; for each checked
# key that held another type than a string (which MGET reads as nil, and SET replaces) its place
# among the users' keys (1: the first) and its type; the place of each user not written by a
# versioned save, as the stored document's version (its last field, read from its last
# _VERSION_TAIL bytes: doc_version) is not below the new one's}
_SAVE_LUA = """
local ttl = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local d = tonumber(ARGV[3])
local c = tonumber(ARGV[4])
local versioned = ARGV[5] == '1'
local lost = {}
for i = 1, n do
  local held = redis.pcall('GET', KEYS[i])
  if type(held) == 'table' then
    return redis.error_reply(KEYS[i] .. ' holds another Redis type than a claim (a number): delete the key, and ' ..
                             'the worker claims the partition afresh')
  end
  if held ~= ARGV[5 + i] then
    local claim = tonumber(held or 0)
    if claim == nil or claim > tonumber(ARGV[5 + i]) then
      return {-i}
    end
    lost[#lost + 1] = i
  end
end
for _, i in ipairs(lost) do
  redis.call('SET', KEYS[i], ARGV[5 + i])
end
for i = n + 1, n + d do
  redis.call('DEL', KEYS[i])
end
local foreign = {}
for i = n + d + 1, n + d + c do
  local kind = redis.call('TYPE', KEYS[i])['ok']
  if kind ~= 'none' and kind ~= 'string' then
    foreign[#foreign + 1] = i - n - d
    foreign[#foreign + 1] = kind
  end
end
local function version(doc)
  return tonumber(string.match(string.sub(doc, -VERSION_TAIL), ',"v":(%d+)}$') or 0)
end
local conflicts = {}
local written = 0
for i = n + d + 1, #KEYS do
  local doc = ARGV[5 + i - d]
  local stored = versioned and redis.pcall('GETRANGE', KEYS[i], -VERSION_TAIL, -1)
  if type(stored) == 'string' and stored ~= '' and version(stored) >= version(doc) then
    conflicts[#conflicts + 1] = i - n - d
  else
    if ttl > 0 then
      redis.call('SET', KEYS[i], doc, 'EX', ttl)
    else
      redis.call('SET', KEYS[i], doc)
    end
    written = written + 1
  end
end
return {written, lost, foreign, conflicts}
""".replace("VERSION_TAIL", str(_VERSION_TAIL))


# KEYS: the partitions' claim keys; ARGV[1]: the worker's clock in microseconds (NTP keeps the
# workers' within milliseconds; Redis's TIME would need an ACL category the documented user
# lacks). Returns each one's new claim: one more than the stored one, and at least that clock,
# so that it outnumbers every claim taken before it even where Redis lost those (a restart, a
# failover to a replica that was behind, a restored dump): a save can then take a claim it
# finds missing or older for one Redis lost (_SAVE_LUA)
_CLAIM_LUA = """
local now = tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  local held = redis.pcall('GET', key)
  if type(held) == 'table' then
    return redis.error_reply(key .. ' holds another Redis type than a claim (a number): delete the key, and the ' ..
                             'worker claims the partition afresh')
  end
  local claim = tonumber(held or 0)
  if claim == nil then
    return redis.error_reply(key .. ' holds ' .. held .. ', not a claim (a number): delete the key, and the ' ..
                             'worker claims the partition afresh')
  end
  claim = string.format('%.0f', math.max(claim + 1, now))
  redis.call('SET', key, claim)
  out[i] = claim
end
return out
"""


# KEYS: keys of the kinds the worker writes (a user's, a claim's), each left as it was (a script is
# atomic): what the worker's scripts call on them, so that a user the ACL refuses one of them
# (SET, DEL, TYPE, GETRANGE), or EVALSHA and SCRIPT LOAD themselves, is refused at start
_ACCESS_LUA = """
for _, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'none' then
    redis.call('SET', key, '', 'EX', 60)
    redis.call('GETRANGE', key, -1, -1)
    redis.call('DEL', key)
  elseif kind == 'string' then
    redis.call('GETRANGE', key, -1, -1)
    redis.call('SET', key, redis.call('GET', key), 'KEEPTTL')
  end
end
return 1
"""


def access_check(key_prefix: str, writes: bool = True) -> Callable[[redis.Redis], None]:
    """What a process checks it may do in Redis before it starts (``RedisConnection.check_login``'s
    ``probe``): read a user's document and a snapshot (MGET, GET), and with ``writes`` (the worker)
    run the scripts that write users and claims (EVALSHA, SCRIPT LOAD and, inside them, SET, DEL,
    TYPE, GETRANGE) on keys of those kinds, left as they were. A PING alone let a user without
    EVALSHA or SET through: the worker then retried every batch's claim or save for ever, unready.
    Raises redis-py's ``NoPermissionError`` for the first command or key refused."""
    user_key, claim_key = f"{key_prefix}user:streamrec-access-check", f"{key_prefix}claim:access-check"

    def probe(client: redis.Redis) -> None:
        client.mget([user_key])
        client.get(f"{key_prefix}models:access-check")  # GET on the snapshots' keys, without reading megabytes
        if writes:
            client.register_script(_ACCESS_LUA)(keys=[user_key, claim_key])

    return probe


#: most users loaded as absent that a store remembers until their save checks their key's type
#: (several of the largest batches, STREAMREC_BATCH_SIZE at most 16,384): only a store that loads
#: and never saves (serve's) reaches it
ABSENT_KEPT = 65_536
#: most keys of another type a store remembers having logged (each is logged once)
FOREIGN_LOGGED_KEPT = 10_000


class RedisUserStateStore:
    """User state in Redis: ``{prefix}user:{user_id}`` holds the JSON document, and
    ``{prefix}claim:{partition}`` the latest claim on an input partition.

    A user's key holding another type than a string (a hash, a list, a set: another application
    writing under the prefix, an operator's mistake) reads as nil in the ``MGET``, so the user
    starts afresh, and the save's ``SET`` replaces it. The save notices it: the store remembers
    the users it loaded as absent (at most :data:`ABSENT_KEPT`, the oldest forgotten first), and
    its script asks the ``TYPE`` of those users' keys only, before their ``SET``. Those are
    counted in ``rebuilt``, like a document that does not decode, and each key is logged once.
    A user whose document loaded costs no ``TYPE``: the check is one Redis call per new (or
    expired) user inside the save's one script call, never a round trip.
    """

    def __init__(self, client, key_prefix: str = "streamrec:", ttl_s: int = 0, url: str | None = None,
                 client_options: Mapping[str, object] | None = None) -> None:
        self.client = client  # a redis.asyncio.Redis
        self.url = url  # where a forked child connects to write a blob (None: it cannot)
        self.client_options = dict(client_options or {})  # and with what beyond the URL (TLS: the CA file)
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s
        self.rebuilt = 0
        #: users loaded as absent, not saved since: their save checks their key's type (oldest first)
        self._absent: dict[str, None] = {}
        #: keys of another type logged already (oldest first)
        self._foreign_logged: dict[str, None] = {}
        self._save_script = client.register_script(_SAVE_LUA)
        self._claim_script = client.register_script(_CLAIM_LUA)

    @classmethod
    def from_url(cls, url: str, key_prefix: str = "streamrec:", ttl_s: int = 0, **client_options) -> RedisUserStateStore:
        """A store on ``url``; ``client_options`` go to redis-py beside it (``Settings.redis.client_options()``)."""
        client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, **client_options)
        return cls(client, key_prefix, ttl_s, url, client_options)

    def key(self, user_id: str) -> str:
        return f"{self.key_prefix}user:{user_id}"

    def claim_key(self, partition: int) -> str:
        return f"{self.key_prefix}claim:{partition}"

    async def load_many(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        ids = list(user_ids)
        if not ids:
            return {}
        docs = await self.client.mget([self.key(u) for u in ids])
        out = {}
        absent = self._absent
        for uid, doc in zip(ids, docs, strict=True):
            if doc is None:  # no key, or one of another type (see the class): the save checks which
                absent.pop(uid, None)  # to the newest end
                absent[uid] = None
            out[uid], bad = _load(uid, doc)
            self.rebuilt += bad
        trim_oldest(absent, ABSENT_KEPT)
        return out

    async def save_docs(self, docs: Mapping[str, bytes], fence: Mapping[int, int] | None = None,
                        delete: Collection[str] = (), versioned: bool = False) -> None:
        """One atomic command for the whole batch: a Lua script checks the fence, DELetes the
        erased users' keys and SETs every other key (with the TTL).

        The keys of the users loaded as absent go first, and the script asks their ``TYPE``
        before it writes (the class says why). A versioned save reads the last bytes of each
        user's stored document (``GETRANGE``: its version, :func:`doc_version`) before its
        ``SET``, about 2 µs of Redis's time a user (40 µs a save of 22 users of 1.4 kB, measured).

        (A MULTI/EXEC pipeline of one SET per user costs ~40 µs of Python per user in
        redis-py's command packing; one script call with all keys costs a few.)
        """
        if not docs and not delete:
            return
        absent = self._absent
        checked = [uid for uid in docs if uid in absent] if absent else []
        if checked:
            users = checked + [uid for uid in docs if uid not in absent]
            values = [docs[uid] for uid in users]
        else:
            users, values = list(docs), docs.values()
        claims = sorted((fence or {}).items())
        keys = [self.claim_key(p) for p, _ in claims] + [self.key(uid) for uid in delete] + [self.key(uid) for uid in users]
        try:
            out = await self._save_script(keys=keys, args=[self.ttl_s, len(claims), len(delete), len(checked),
                                                           1 if versioned else 0, *(c for _, c in claims), *values])
        except redis.ReadOnlyError:
            await self._reconnect_after_failover()
            raise
        if out[0] < 0:
            raise Fenced([claims[-out[0] - 1][0]])
        _, lost, foreign, conflicts = out
        for uid in checked:
            del absent[uid]
        if lost:
            _claims_lost([claims[i - 1][0] for i in lost])
        if foreign:
            self._replaced_foreign([(users[i - 1], kind) for i, kind in zip(foreign[::2], foreign[1::2], strict=True)])
        if conflicts:
            raise StateConflict([users[i - 1] for i in conflicts])

    def _replaced_foreign(self, found: list[tuple[str, bytes | str]]) -> None:
        """Count in ``rebuilt`` the users whose key held another type (``found``: the user and
        the type), which their save replaced, and log each key the first time."""
        self.rebuilt += len(found)
        logged = self._foreign_logged
        for uid, kind in found:
            key = self.key(uid)
            if key in logged:
                continue
            logged[key] = None
            kind = kind.decode() if isinstance(kind, bytes) else kind
            log.error("user %r: the key %s held a Redis %s, not a user's state (a JSON string): the worker read no "
                      "state there, started the user afresh, and its save replaced the %s (its contents are gone; an "
                      "event Kafka redelivers for the user may apply twice). Find who wrote it: streamrec owns every "
                      "key under %r (STREAMREC_TOPIC_PREFIX), so another application writing there needs a prefix "
                      "of its own. Counted in streamrec_states_rebuilt_total; each key is logged once",
                      uid, key, kind, kind, self.key_prefix)
        trim_oldest(logged, FOREIGN_LOGGED_KEPT)

    async def save_many(self, states: Mapping[str, UserState], fence: Mapping[int, int] | None = None) -> None:
        await self.save_docs({uid: _encode(s) for uid, s in states.items()}, fence)

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        parts = sorted(set(partitions))
        if not parts:
            return {}
        try:
            values = await self._claim_script(keys=[self.claim_key(p) for p in parts], args=[time.time_ns() // 1000])
        except redis.ReadOnlyError:
            await self._reconnect_after_failover()
            raise
        return dict(zip(parts, map(int, values), strict=True))

    def blob_key(self, name: str) -> str:
        return f"{self.key_prefix}{name}"

    async def get_blob(self, name: str) -> bytes | None:
        key = self.blob_key(name)
        try:
            return await self.client.get(key)
        except redis.ResponseError as exc:  # a key of another type (WRONGTYPE): say which, and what to do
            if not str(exc).startswith("WRONGTYPE"):
                raise
            raise redis.ResponseError(f"{key} holds another Redis type than a blob (a string), so it cannot be read: "
                                      f"delete the key (streamrec owns every key under {self.key_prefix!r}; an "
                                      f"application writing there needs a prefix of its own)") from exc

    async def set_blob(self, name: str, data: bytes) -> None:
        try:
            await self.client.set(self.blob_key(name), data)
        except redis.ReadOnlyError:
            await self._reconnect_after_failover()
            raise

    async def _reconnect_after_failover(self) -> None:
        """Drop the idle connections after a write was refused as READONLY: they reach a primary
        that a failover made a replica, and redis-py keeps a connection unless it breaks, so every
        retry on it would be refused too; the next call connects afresh to the URL's address (a
        managed service's endpoint, or DNS, that the failover moved to the new primary)."""
        log.warning("Redis refused a write: the server this worker is connected to is a read-only replica (a failover "
                    "made it one). Connecting again for the next attempt; if this goes on, STREAMREC_REDIS_URL names "
                    "a replica, not the primary")
        try:
            await self.client.connection_pool.disconnect(inuse_connections=False)
        except Exception as exc:  # noqa: BLE001 - the refusal is what the caller must see
            log.warning("dropping the connections to the replica failed (%s); they are tried again as they are", exc)

    def blob_writer(self, name: str) -> Callable[[bytes], None] | None:
        if self.url is None:
            return None
        url, key, options = self.url, self.blob_key(name), self.client_options

        def write(data: bytes) -> None:  # in the child: a connection of its own, never the parent's
            with redis.Redis.from_url(url, socket_timeout=60, socket_connect_timeout=5, **options) as client:
                client.set(key, data)

        return write

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class CachedUserStateStore:
    """A worker's store: ``inner``, and the documents of the users it saved last, so that the
    next batch of an active user does not read them back (a micro-batch whose users are all
    here makes one round trip to Redis, the save, instead of two).

    A document is kept only as this worker last wrote it, and only while nothing else can have
    written it since:

    - every :meth:`claim` empties the cache: the worker got partitions (an assignment), or
      claims one before its first batch, and whatever it kept from an earlier ownership may have
      been overwritten by the owner in between;
    - a save that raises empties it: :class:`Fenced` (another worker owns a partition now), or a
      failure after which what Redis holds is not known;
    - an erased user's document goes with the erasure, and with one another worker carried out
      (a request not keyed by the user's id: the peer reader :meth:`discard` s them, stream/peers.py);
    - a document kept longer than ``max_age_s`` is read again (Redis expires idle users, and an
      operator may change a document by hand); at most ``max_users`` are kept, the least
      recently saved going first.

    Users are co-partitioned on every topic the worker writes their state for, so between two
    claims only this worker writes its users' documents (a user whose message was not keyed by
    their id may have reached another worker: the handler :meth:`discard` s them first; while
    partitions are added to the input topics, a user's events may be on two partitions owned by
    two workers, and each saves from its own copy: a kept document another worker saved over is
    then older than the stored one, so the versioned save refuses it (:class:`StateConflict`),
    which drops the user from here, and the handler merges: docs/operations.md, Adding partitions later). A
    worker that lost its partitions without knowing (a long pause) still reads its own last
    write, and its save is then refused by the fence as before. Each load decodes the kept bytes afresh: the step gets states of its
    own, as from Redis.

    >>> import asyncio
    >>> store = CachedUserStateStore(InMemoryUserStateStore())
    >>> asyncio.run(store.save_docs({"u1": encode_state(UserState("u1", clicks=3))}))
    >>> store.inner._docs.clear()  # gone from the store behind the worker's back: still kept here
    >>> asyncio.run(store.load_many(["u1"]))["u1"].clicks
    3
    >>> _ = asyncio.run(store.claim([0]))  # a claim: nothing kept is trusted any more
    >>> asyncio.run(store.load_many(["u1"]))["u1"].clicks
    0
    """

    def __init__(self, inner: UserStateStore, max_users: int = 10_000, max_age_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.inner = inner
        self.max_users = max_users
        self.max_age_s = max_age_s
        self.clock = clock
        self._kept: dict[str, tuple[bytes, float]] = {}  # user -> (document, when saved), oldest first
        self.hits = 0  # users' loads answered here, and those read from ``inner`` (the tests read them)
        self.misses = 0

    def __getattr__(self, name: str):  # blobs, ping, close, key, rebuilt: the inner store's
        if name == "inner":  # not set yet (a copy, an unpickling): no recursion through it
            raise AttributeError(name)
        return getattr(self.inner, name)

    def discard(self, user_ids: Iterable[str]) -> None:
        """Read these users from the inner store next time: their messages were not keyed by
        their id, so another worker may write their documents too (stream/handler.py)."""
        kept = self._kept
        for uid in user_ids:
            kept.pop(uid, None)

    async def load_many(self, user_ids: Iterable[str]) -> dict[str, UserState]:
        ids = list(user_ids)
        kept = self._kept
        oldest = self.clock() - self.max_age_s
        out: dict[str, UserState] = {}
        missing = []
        for uid in ids:
            hit = kept.get(uid)
            if hit is not None and hit[1] >= oldest:
                out[uid] = _load(uid, hit[0])[0]
            else:
                missing.append(uid)
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        if missing:
            out.update(await self.inner.load_many(missing))
        return out

    async def save_docs(self, docs: Mapping[str, bytes], fence: Mapping[int, int] | None = None,
                        delete: Collection[str] = (), versioned: bool = False) -> None:
        conflict = None
        try:
            await self.inner.save_docs(docs, fence, delete=delete, versioned=versioned)
        except StateConflict as exc:  # the rest was written; those users are read from the store again
            conflict = exc
        except BaseException:
            self._kept.clear()
            raise
        kept = self._kept
        now = self.clock()
        for uid in delete:
            kept.pop(uid, None)
        refused = frozenset(conflict.users) if conflict is not None else ()
        for uid, doc in docs.items():
            kept.pop(uid, None)  # to the newest end
            if uid not in refused:
                kept[uid] = (doc, now)
        trim_oldest(kept, self.max_users)
        if conflict is not None:
            raise conflict

    async def save_many(self, states: Mapping[str, UserState], fence: Mapping[int, int] | None = None) -> None:
        await self.save_docs({uid: _encode(s) for uid, s in states.items()}, fence)

    async def claim(self, partitions: Iterable[int]) -> dict[int, int]:
        self._kept.clear()  # before the claim: one that fails or is cancelled leaves nothing trusted
        return await self.inner.claim(partitions)
