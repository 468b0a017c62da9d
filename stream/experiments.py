"""Experiments: arms (variants) that serve users different blends of the same learned models,
and the attribution of clicks and purchases to the lists that caused them.

An experiment is a file (``STREAMREC_VARIANTS``, TOML or JSON) naming arms, each with a
traffic share (the shares add up to 1)::

    experiment = "blend-2026-12"       # changing it reshuffles who gets which arm
    control = "control"                # the arm lifts are measured against (default: the first)

    [[arms]]
    name = "control"
    share = 0.5
    baseline = "popularity"            # trending items only: the sanity floor

    [[arms]]
    name = "blend"
    share = 0.5
    weights = {covisit = 1.0, mf = 0.2} # over the worker's blend (STREAMREC_BLEND_WEIGHTS)
    learners_off = ["session_hybrid"]  # their weight 0 in this arm
    model = "none"                     # "latest" (default): the worker's Transformer; "none": without it
    candidates = 100                   # candidates scored per list (default STREAMREC_CANDIDATES; 1 to 100,000)

``baseline = "shuffle"`` serves the arm's candidates in a random order (Metarank's shuffle:
what ranking adds over the candidate set). A user's arm is a stable hash of
``(experiment, user_id)`` (:meth:`Experiment.arm_of`), the id the site sends; so every worker,
a restart and ``streamrec evaluate --variants`` put a user in the same arm. All arms share the
models, which learn every event whatever arm its user is in: an arm changes what is served,
never what is learned.

Attribution (:func:`attribute`) is pure: given a user's state before an event, it says which
list (``rec_id``) the event is credited to, if any: the list whose ``rec_id`` the event echoes,
else the user's last list when it holds the event's item and was published at most
``window_ms`` before the event. A list counts once as clicked (and once as purchased), however
many of its items are clicked; further clicks on it are counted as repeats.

**The arm that served a list is named by its ``rec_id``**: every ``rec_id`` ends with ``-`` and
the :func:`rec_tag` of the arm that ranked the list (4 characters of a hash of its name), so an
event credited to a list counts under that arm (:meth:`Experiment.arm_named`), not the arm its
user is in when it comes: a click on a list served before the experiment file changed (shares,
arms) counts where the list was served. The id is what the user's state remembers of a list
(``[rec_id, ts, flags]``: 5 characters more per list, no arm name) and the one thing a click
echoes of a list ``streamrec serve`` answered, which no state remembers. A tag names only an arm
of the experiment (a made-up one names none: per-arm counters stay the configured arms).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import random
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from online_models import Recommender, RecommenderConfig
from online_models.recommender import MAX_WEIGHT, weight_ok
from stream.errors import ConfigError, read_named_file
from stream.records import CONTROL_CHARS
from stream.settings import MAX_LIST

#: the baselines an arm may be instead of a blend
BASELINES = ("popularity", "shuffle")
#: the learner a popularity arm ranks with, alone
POPULARITY_SOURCE = "trending"
#: buckets of the hash a user's arm is drawn from (shares are resolved to 1/10,000)
BUCKETS = 10_000
#: the lists whose attribution a user's state remembers (rec id, time, what they got)
RECS_KEPT = 16
#: flags of a remembered list
CLICKED, PURCHASED, SHOWN = 1, 2, 4
#: the flag of a remembered list that answered a search (the others are home-page lists, the
#: latest of which is the one live hits are judged against: :func:`home_list`)
SEARCHED = 8
#: characters of an arm's tag at the end of a ``rec_id`` (:func:`rec_tag`), after :data:`TAG_SEP`
TAG_CHARS = 4
TAG_SEP = "-"
#: the variant the workers count under without an experiment (no arm may take it)
DEFAULT_VARIANT = "default"
#: the groups a user's counts are summed in, by :func:`variance_group` (``streamrec_experiment_groups_total``):
#: every list, click and judged event of one user lands in one group, so the spread of the groups'
#: rates is the spread of whole users', and ``streamrec report`` works out intervals that take a
#: user's lists together (a user who clicks often clicks on many lists), not each list as independent
VARIANCE_GROUPS = 32
#: what each group counts, in this order (each is also an arm's total counter; ``hits20``: hits within the top 20)
GROUP_FIELDS = ("lists", "impressions", "clicked_lists", "purchased_lists", "revenue", "judged", "hits20")


@functools.lru_cache(maxsize=256)
def rec_tag(variant: str) -> str:
    """The tag that ends the ``rec_id`` of a list ``variant`` served: 4 characters (20 bits) of
    BLAKE2b of its name, the same in every process, never a ``-``.

    >>> rec_tag("blend"), rec_tag("blend") == rec_tag("control")
    ('fv6m', False)
    """
    digest = hashlib.blake2b(variant.encode("utf-8", "surrogatepass"), digest_size=5).digest()
    return base64.b32encode(digest).decode("ascii")[:TAG_CHARS].lower()


@functools.lru_cache(maxsize=65_536)
def variance_group(site_user_id: str) -> int:
    """The group (of :data:`VARIANCE_GROUPS`) a user's counts go to: a hash of the id the site
    sends, the same in every process and for every arm, drawn apart from the arm's hash (which
    also hashes the experiment's name), so each arm's users spread over all the groups.

    >>> variance_group("u1") == variance_group("u1"), 0 <= variance_group("u2") < VARIANCE_GROUPS
    (True, True)
    """
    digest = hashlib.blake2b(site_user_id.encode("utf-8", "surrogatepass"), digest_size=4, person=b"streamrec-var").digest()
    return int.from_bytes(digest, "big") % VARIANCE_GROUPS


def tag_of(rec_id: str) -> str | None:
    """The arm's tag a ``rec_id`` ends with; None for one that has none (written before arms were
    named in rec ids, or made by the site).

    >>> tag_of("3f9a1c22d07b1a-fv6m"), tag_of("3f9a1c22d07b1a"), tag_of("order-12")
    ('fv6m', None, None)
    """
    at = len(rec_id) - TAG_CHARS - 1
    return rec_id[at + 1:] if at > 0 and rec_id[at] == TAG_SEP else None


@dataclass(frozen=True)
class Arm:
    """One variant: a name, a traffic share, and how it serves (see the module docstring)."""

    name: str
    share: float
    weights: dict[str, float] = field(default_factory=dict)
    learners_off: tuple[str, ...] = ()
    model: str = "latest"  # "latest", "none", or a registered version
    candidates: int | None = None
    baseline: str | None = None  # None, "popularity" or "shuffle"

    @property
    def uses_model(self) -> bool:
        """Whether the arm scores with a Transformer (never a baseline's)."""
        return self.model != "none" and self.baseline is None

    def config(self, base: RecommenderConfig) -> RecommenderConfig:
        """The blend this arm serves, over the worker's ``base``."""
        if self.baseline == "popularity":
            weights = dict.fromkeys(base.weights, 0.0)
            weights[POPULARITY_SOURCE] = 1.0
            return replace(base, weights=weights, reranker_weight=0.0,
                           n_candidates=self.candidates or base.n_candidates)
        weights = {**base.weights, **self.weights}
        for name in self.learners_off:
            weights[name] = 0.0
        if self.model == "none":
            weights["transformer"] = 0.0
        return replace(base, weights=weights, n_candidates=self.candidates or base.n_candidates)


@dataclass(frozen=True)
class Experiment:
    """Arms and how users are split between them."""

    name: str
    arms: tuple[Arm, ...]
    control: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "_bounds", _bucket_bounds(self.arms))
        object.__setattr__(self, "_by_tag", {rec_tag(a.name): a.name for a in self.arms})

    def arm_of(self, user_id: str) -> Arm:
        """The user's arm: a stable hash of ``(experiment, user_id)`` into :data:`BUCKETS`
        buckets, split by the arms' shares in their order.

        >>> e = Experiment("x", (Arm("a", 0.5), Arm("b", 0.5)), "a")
        >>> e.arm_of("u1").name == e.arm_of("u1").name
        True
        """
        digest = hashlib.blake2b(f"{self.name}\x00{user_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        bucket = int.from_bytes(digest, "big") % BUCKETS
        for arm, upper in zip(self.arms, self._bounds, strict=True):  # type: ignore[attr-defined]
            if bucket < upper:
                return arm
        return self.arms[-1]

    def arm_named(self, rec_id: str) -> str | None:
        """The name of the arm whose :func:`rec_tag` ``rec_id`` ends with; None when it names no
        arm of this experiment (no tag, or one of an arm removed or renamed since, or made up).

        >>> e = Experiment("x", (Arm("a", 0.5), Arm("b", 0.5)), "a")
        >>> e.arm_named("3f9a1c22d07b1a-" + rec_tag("b")), e.arm_named("3f9a1c22d07b1a"), e.arm_named("r-zzzz")
        ('b', None, None)
        """
        tag = tag_of(rec_id)
        return None if tag is None else self._by_tag.get(tag)  # type: ignore[attr-defined]

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.arms]

    @property
    def digest(self) -> str:
        """8 hex characters naming how this experiment splits and serves users: its name, its
        control, and each arm's name, bucket range and settings, in order. Workers exporting
        different digests (``streamrec_experiment_info``) put a user in different arms, or serve
        an arm differently: ``streamrec report`` says so.

        >>> a = Experiment("x", (Arm("a", 0.5), Arm("b", 0.5)), "a")
        >>> a.digest == Experiment("x", (Arm("a", 0.5), Arm("b", 0.5)), "a").digest
        True
        >>> a.digest == Experiment("x", (Arm("b", 0.5), Arm("a", 0.5)), "a").digest
        False
        """
        arms = [[a.name, upper, a.baseline, sorted(a.weights.items()), list(a.learners_off), a.model, a.candidates]
                for a, upper in zip(self.arms, self._bounds, strict=True)]  # type: ignore[attr-defined]
        text = json.dumps([self.name, self.control, arms], ensure_ascii=True)
        return hashlib.blake2b(text.encode("ascii"), digest_size=4).hexdigest()

    def describe(self) -> str:
        return f"experiment {self.name!r}: " + ", ".join(
            f"{a.name} {a.share:.0%}{f' ({a.baseline})' if a.baseline else ''}" for a in self.arms)


def _bucket_bounds(arms: Sequence[Arm]) -> list[int]:
    total = sum(a.share for a in arms)
    bounds, acc = [], 0.0
    for a in arms:
        acc += a.share / total
        bounds.append(round(acc * BUCKETS))
    bounds[-1] = BUCKETS
    return bounds


#: the largest experiment file read: a few arms take a few hundred bytes
MAX_EXPERIMENT_BYTES = 1 << 20


def load_experiment(path: str | Path, known_sources: Sequence[str] = ()) -> Experiment:
    """The experiment in ``path`` (``.toml`` or ``.json``); a :class:`ConfigError` that names
    the file and the field for anything wrong."""
    p = Path(path)
    where = f"STREAMREC_VARIANTS={str(path)!r}"
    try:
        text = read_named_file(p, MAX_EXPERIMENT_BYTES).decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the experiment file ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the experiment file is not UTF-8 text") from None
    except ValueError as exc:  # a device (/dev/zero was read for ever), or far too big for a few arms
        raise ConfigError(f"{where}: cannot be the experiment file: {exc}") from None
    try:
        data = json.loads(text, object_pairs_hook=_once) if p.suffix.lower() == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{where}: not valid {'JSON' if p.suffix.lower() == '.json' else 'TOML'}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: the experiment file is nested too deeply to read") from None
    return parse_experiment(data, where, known_sources)


def _encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (a JSON file's ``\\ud800`` escape gives a lone surrogate, which cannot).

    >>> _encodable("ünï 名前"), _encodable("\\ud800")
    (True, False)
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


#: a control character (a newline, ESC): a name holding one split the report's table rows and the
#: log's lines
_CONTROL = re.compile(f"[{CONTROL_CHARS}]")


def _once(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are each given once (the last of two was taken, without a word,
    where TOML refuses the file)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} is given twice in one object")
        out[key] = value
    return out


def parse_experiment(data: Mapping, where: str = "the experiment", known_sources: Sequence[str] = ()) -> Experiment:
    """An :class:`Experiment` from its file's contents (see the module docstring)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a table with `experiment` and `arms`")
    unknown = sorted(set(data) - {"experiment", "control", "arms"})
    if unknown:  # `contol = "blend"` left the first arm the control, and the report's lifts against it
        raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; the file's fields are "
                          "experiment, control and arms")
    name = data.get("experiment")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: `experiment` must name the experiment (a non-empty string)")
    if not _encodable(name):
        raise ConfigError(f"{where}: `experiment` {name!r} holds a lone surrogate (a JSON \\ud800 escape), "
                          "which no UTF-8 text can carry")
    if _CONTROL.search(name):
        raise ConfigError(f"{where}: `experiment` {name!r} holds a control character (a newline, a tab, ESC): "
                          "it names the experiment in logs, metrics and the report, one line each")
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or len(raw_arms) < 1:
        raise ConfigError(f"{where}: `arms` must list at least one arm ([[arms]] tables)")
    arms, seen = [], set()
    known = set(known_sources)
    for i, raw in enumerate(raw_arms):
        at = f"{where}: arms[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{at}: expected a table")
        unknown = set(raw) - {"name", "share", "weights", "learners_off", "model", "candidates", "baseline"}
        if unknown:
            raise ConfigError(f"{at}: unknown field(s) {', '.join(sorted(unknown))}")
        arm_name = raw.get("name")
        if not isinstance(arm_name, str) or not arm_name.strip() or len(arm_name) > 64:
            raise ConfigError(f"{at}: `name` must be a non-empty string of at most 64 characters")
        if not _encodable(arm_name):  # every list of the arm was a dead letter, its metrics and the report a traceback
            raise ConfigError(f"{at}: `name` {arm_name!r} holds a lone surrogate (a JSON \\ud800 escape), which "
                              "the arm's lists, its metrics' labels and the report cannot carry as UTF-8")
        if _CONTROL.search(arm_name):  # the report's table row split in two at a newline
            raise ConfigError(f"{at}: `name` {arm_name!r} holds a control character (a newline, a tab, ESC): the arm "
                              "names a row of the report's table and a label of the metrics, one line each")
        if arm_name == DEFAULT_VARIANT:
            raise ConfigError(f"{at}: an arm may not be named {DEFAULT_VARIANT!r}: workers without "
                              "STREAMREC_VARIANTS count under that variant, and the report would add their counts "
                              "to the arm's without a warning; rename it")
        if arm_name in seen:
            raise ConfigError(f"{at}: arm {arm_name!r} is named twice")
        same_tag = [other for other in seen if rec_tag(other) == rec_tag(arm_name)]
        if same_tag:  # about one pair in 2^20: the lists' rec ids would not tell the two apart
            raise ConfigError(f"{at}: arms {same_tag[0]!r} and {arm_name!r} have the same tag in rec ids "
                              f"({rec_tag(arm_name)}), so clicks on their lists could not be told apart: rename one")
        seen.add(arm_name)
        share = raw.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError(f"{at} ({arm_name}): `share` must be a number in (0, 1]")
        weights = raw.get("weights", {})
        if not isinstance(weights, Mapping) or not all(map(weight_ok, weights.values())):
            raise ConfigError(f"{at} ({arm_name}): `weights` must map source names to numbers from 0 to {MAX_WEIGHT:g}")
        off = raw.get("learners_off", [])
        if not isinstance(off, list) or not all(isinstance(x, str) for x in off):
            raise ConfigError(f"{at} ({arm_name}): `learners_off` must be a list of source names")
        if known:
            bad = sorted((set(weights) | set(off)) - known)
            if bad:
                raise ConfigError(f"{at} ({arm_name}): unknown source(s) {', '.join(bad)}; the sources are "
                                  f"{', '.join(sorted(known))}")
        model = raw.get("model", "latest")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{at} ({arm_name}): `model` must be \"latest\", \"none\" or a registered version")
        candidates = raw.get("candidates")
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int)
                                       or not 1 <= candidates <= MAX_LIST):
            raise ConfigError(f"{at} ({arm_name}): `candidates` must be a whole number from 1 to {MAX_LIST:,} "
                              f"(STREAMREC_CANDIDATES's bound), saw {candidates!r}")
        baseline = raw.get("baseline")
        if baseline is not None and baseline not in BASELINES:
            raise ConfigError(f"{at} ({arm_name}): `baseline` must be one of {', '.join(BASELINES)}")
        arms.append(Arm(arm_name, float(share), {k: float(v) for k, v in weights.items()}, tuple(off), model,
                        candidates, baseline))
    total = sum(a.share for a in arms)
    if abs(total - 1) > 1e-9:
        raise ConfigError(f"{where}: the arms' shares add up to {total:g}, not 1 (each is the fraction of users "
                          "the arm gets)")
    bounds = _bucket_bounds(arms)
    for arm, low, high in zip(arms, [0, *bounds], bounds, strict=False):
        if high == low:
            raise ConfigError(f"{where}: arm {arm.name!r} gets no user: its share {arm.share:g} is under the "
                              f"1/{BUCKETS:,} users are split by")
    control = data.get("control", arms[0].name)
    if not isinstance(control, str) or control not in seen:
        raise ConfigError(f"{where}: `control` must be the name of an arm ({', '.join(sorted(seen))}), saw {control!r}")
    return Experiment(name.strip(), tuple(arms), control)


def serving_view(recommender: Recommender, config: RecommenderConfig) -> Recommender:
    """``recommender`` serving with ``config``: a shallow copy that shares every learner, the
    re-ranker and the blend's tables (the lists pending for ``record_shown`` included, so the
    re-ranker labels an arm's lists as any other), and differs only in its config. Nothing it
    learns goes elsewhere: only ``candidates_many`` and ``rank_many`` are called on it."""
    view = object.__new__(type(recommender))
    view.__dict__.update(recommender.__dict__)
    view.config = config
    return view


def shuffled(items: list, seed: str) -> list:
    """``items`` in a random order fixed by ``seed`` (the list's id: a repeat is the same)."""
    out = list(items)
    random.Random(seed).shuffle(out)
    return out


@dataclass
class Attribution:
    """What one event was credited with (see :func:`attribute`)."""

    rec_id: str
    #: the first click (or purchase) on that list: it counts as a clicked (purchased) list
    first: bool


def attribute(recs: list[list], last_items: Sequence[str], event_rec_id: str | None, item_id: str, ts: int,
              kind: str, window_ms: int) -> Attribution | None:
    """The list an event is credited to, from the user's remembered lists ``recs`` (``[rec_id,
    published ts, flags]``, newest last; updated in place: the credited entry is replaced by one
    with the flag for ``kind`` set, never changed itself, so a copy of ``recs`` may share its
    entries: ``UserState.copy``) and the items of their last list: the list whose ``rec_id``
    the event echoes, else the last list when it holds ``item_id`` and came at most ``window_ms`` before ``ts``.
    An echoed ``rec_id`` the state does not remember (too old, or made up) is credited, but
    never as a first: it counts as a click (or purchase), not as a clicked (purchased) list.

    >>> recs = [["r1", 1000, 0]]
    >>> attribute(recs, ["a", "b"], None, "b", 2000, "click", 60_000)
    Attribution(rec_id='r1', first=True)
    >>> attribute(recs, ["a", "b"], None, "a", 2500, "click", 60_000).first
    False
    >>> attribute(recs, ["a", "b"], None, "z", 2500, "click", 60_000) is None
    True
    >>> attribute(recs, ["a"], "made-up", "a", 2600, "click", 60_000).first
    False
    """
    flag = PURCHASED if kind == "purchase" else CLICKED
    if event_rec_id is not None:
        for at in range(len(recs) - 1, -1, -1):
            entry = recs[at]
            if entry[0] == event_rec_id:
                first = not entry[2] & flag
                recs[at] = [entry[0], entry[1], entry[2] | flag]
                return Attribution(event_rec_id, first)
        return Attribution(event_rec_id, False)
    if not recs or item_id not in last_items:
        return None
    entry = recs[-1]
    if ts - entry[1] > window_ms or ts < entry[1]:
        return None
    first = not entry[2] & flag
    recs[-1] = [entry[0], entry[1], entry[2] | flag]
    return Attribution(entry[0], first)


def remembered(recs: list[list], rec_id: str, ts: int, flags: int = 0) -> list[list]:
    """``recs`` and a list just published to the user (``flags``: :data:`SEARCHED` for a
    search's answer), as a new list (``recs`` is not changed: ranking a user again after a
    failure remembers the list once); the oldest beyond :data:`RECS_KEPT` go."""
    entry = [rec_id, ts, flags]
    return [*recs[len(recs) + 1 - RECS_KEPT:], entry] if len(recs) >= RECS_KEPT else [*recs, entry]


def home_list(recs: list[list]) -> str | None:
    """The ``rec_id`` of the latest home-page list remembered in ``recs`` (not a search's
    answer), which the user's ``last_recommended`` holds; None when there is none. A state
    written before searches' answers were flagged may name a search's answer instead.

    >>> home_list([["h1", 1, 0], ["h2", 2, CLICKED], ["s1", 3, SEARCHED]]), home_list([["s1", 3, SEARCHED]])
    ('h2', None)
    """
    for at in range(len(recs) - 1, -1, -1):
        if not recs[at][2] & SEARCHED:
            return recs[at][0]
    return None


def new_to_arm(recs: list[list], variant: str) -> bool:
    """True when none of the home-page lists remembered in ``recs`` (search answers aside) was
    served by ``variant``: a list of that arm published now is the user's first in it, as far as
    their state remembers (``streamrec_experiment_users_total``: the users each arm has served).

    >>> recs = [["a1-" + rec_tag("A"), 1, 0], ["s1-" + rec_tag("B"), 2, SEARCHED]]
    >>> new_to_arm(recs, "A"), new_to_arm(recs, "B"), new_to_arm([], "A")
    (False, True, True)
    """
    tag = rec_tag(variant)
    return not any(not r[2] & SEARCHED and tag_of(r[0]) == tag for r in recs)


def shown(recs: list[list], rec_id: str) -> bool:
    """Mark the remembered list ``rec_id`` as shown (an impression); False when it is not
    remembered or was marked before: an impression counts once, for a list the worker published."""
    for at in range(len(recs) - 1, -1, -1):
        entry = recs[at]
        if entry[0] == rec_id:
            if entry[2] & SHOWN:
                return False
            recs[at] = [entry[0], entry[1], entry[2] | SHOWN]  # replaced, not changed (see attribute)
            return True
    return False


__all__ = ["Arm", "Attribution", "BASELINES", "DEFAULT_VARIANT", "Experiment", "attribute", "home_list", "load_experiment",
           "parse_experiment", "rec_tag", "remembered", "serving_view", "shown", "shuffled", "tag_of", "GROUP_FIELDS",
           "VARIANCE_GROUPS", "new_to_arm", "variance_group"]
