"""Readers for the real e-commerce logs streamrec replays, and a synthetic generator.

Every reader yields :class:`~online_models.types.Interaction` values in file order.
``streamrec produce`` turns them into events, ``streamrec train`` into sequences and
``streamrec evaluate`` into a test-then-learn replay, so all three read a log the same way.

Formats (see ``docs/datasets.md``):

- ``taobao``: ``user_id,item_id,category_id,behavior,timestamp`` without a header;
  behavior in pv/cart/fav/buy; unix seconds. ``buy`` becomes a purchase, the rest clicks.
- ``yoochoose``: tab-separated ``SessionId ItemId Time`` with a header; unix seconds
  (fractional). The session id plays the part of the user id.
- ``otto``: one JSON object per line, ``{"session", "events": [{"aid", "ts", "type"}]}``;
  ts in milliseconds; ``orders`` become purchases, clicks and carts clicks.
- ``synthetic``: :func:`synthetic_interactions`, no file.

>>> events = list(synthetic_interactions(n_events=50, seed=1))
>>> len(events), events[0].ts <= events[-1].ts
(50, True)
"""

from __future__ import annotations

import csv
import errno
import functools
import itertools
import json
import math
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from online_models.base import session_key
from online_models.metrics import RankingMetrics
from online_models.types import Interaction

FORMATS = ("taobao", "yoochoose", "otto", "synthetic")

_TAOBAO_KIND = {"pv": "click", "cart": "click", "fav": "click", "buy": "purchase"}
_OTTO_KIND = {"clicks": "click", "carts": "click", "orders": "purchase"}


#: the largest seed a command accepts: numpy's generators (River's MF, the samplers) take at
#: most 2**32 - 1, and a larger one failed deep inside a fit, as a traceback
SEED_MAX = 2**32 - 1


class DatasetError(ValueError):
    """A log line that does not follow its format; the message names the file and line."""


#: the longest line a reader takes, in characters (an OTTO session of some 20,000 events fits):
#: a file with no line break (``-d /dev/zero``, a binary file) was read whole, into a MemoryError
MAX_LINE_CHARS = 1 << 20


def bounded_lines(fh: TextIO, path: str | Path, start: int = 1, what: str = "a log of this format") -> Iterator[str]:
    """The lines of the text file ``fh`` (opened from ``path``), each read with at most
    :data:`MAX_LINE_CHARS` (and its line break) in memory; a :class:`DatasetError` naming the file
    and line (numbered from ``start``) for a longer one, before the rest of it is read: not ``what``.

    >>> import io
    >>> list(bounded_lines(io.StringIO("a,b\\nc"), "x.csv"))
    ['a,b\\n', 'c']
    >>> next(bounded_lines(io.StringIO("\\0" * (MAX_LINE_CHARS + 1)), "zeros"))
    Traceback (most recent call last):
    ...
    online_models.datasets.DatasetError: zeros:1: a line longer than 1 MiB (1,048,576 characters): not a log of this format
    """
    readline = fh.readline
    for lineno in itertools.count(start):
        line = readline(MAX_LINE_CHARS + 2)  # room for the line's own CR LF
        if not line:
            return
        if len(line.rstrip("\r\n")) > MAX_LINE_CHARS:
            raise DatasetError(f"{path}:{lineno}: a line longer than 1 MiB ({MAX_LINE_CHARS:,} characters): not {what}")
        yield line


def _ts_ms(seconds: float, where: str, field: str) -> int:
    """``seconds`` (a log's unix time) in ms; a :class:`DatasetError` naming ``where`` for NaN
    or an infinity (a time out of the events' range is read, and refused where events are)."""
    if not math.isfinite(seconds):
        raise DatasetError(f"{where}: {field} {seconds!r} is not a time in unix seconds")
    return int(round(seconds * 1000))


def _guarded(read: Callable[[Path], Iterator[Interaction]]) -> Callable[[str | Path], Iterator[Interaction]]:
    """``read`` raising a :class:`DatasetError` for a file that is not UTF-8 text or nests
    JSON too deeply, as for any other line it cannot read."""
    @functools.wraps(read)
    def reader(path: str | Path) -> Iterator[Interaction]:
        path = Path(path)
        try:
            yield from read(path)
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{path}: not UTF-8 text (byte {exc.object[exc.start:exc.start + 1]!r} "
                               f"cannot be decoded)") from None
        except RecursionError:
            raise DatasetError(f"{path}: a line nests its JSON too deeply to read") from None
        except csv.Error as exc:  # a field over the csv module's 131,072 characters
            raise DatasetError(f"{path}: not a CSV log this reader can take ({exc})") from None
    return reader


@_guarded
def read_taobao(path: Path) -> Iterator[Interaction]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        for lineno, row in enumerate(csv.reader(bounded_lines(fh, path)), start=1):
            if not row:
                continue
            if len(row) != 5:
                raise DatasetError(f"{path}:{lineno}: expected 5 comma-separated fields, saw {len(row)}")
            user, item, category, behavior, ts = row
            kind = _TAOBAO_KIND.get(behavior)
            if kind is None and lineno == 1 and not ts.strip().isdigit():  # was "unknown behavior 'behavior'"
                raise DatasetError(f"{path}:1: {','.join(row)!r} is a header, which a Taobao log has none of "
                                   "(user_id,item_id,category_id,behavior,timestamp): remove that line")
            if kind is None:
                raise DatasetError(f"{path}:{lineno}: unknown behavior {behavior!r} (pv, cart, fav, buy)")
            try:
                ts_ms = int(ts) * 1000
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: timestamp {ts!r} is not an integer") from None
            yield Interaction(user, item, ts_ms, kind, None, category, behavior)


@_guarded
def read_yoochoose(path: Path) -> Iterator[Interaction]:
    with path.open(encoding="utf-8-sig") as fh:
        lines = bounded_lines(fh, path)
        header = next(lines, "").rstrip("\n").split("\t")
        if header[:3] != ["SessionId", "ItemId", "Time"]:
            raise DatasetError(f"{path}:1: expected the header SessionId<TAB>ItemId<TAB>Time, saw {header!r:.120}")
        for lineno, line in enumerate(lines, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                if line.strip():
                    raise DatasetError(f"{path}:{lineno}: expected 3 tab-separated fields, saw {len(parts)}")
                continue
            session, item, ts = parts[0], parts[1], parts[2]
            try:
                seconds = float(ts)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: Time {ts!r} is not a number") from None
            yield Interaction(session, item, _ts_ms(seconds, f"{path}:{lineno}", "Time"), "click", session, None,
                              "click")


def _otto_id(value: Any, where: str, field: str) -> str:
    """An OTTO ``session`` or ``aid`` (a whole number; a string is taken too) as an id; a
    :class:`DatasetError` naming ``where`` for anything else: ``null``, ``true`` or ``1.5`` became
    the ids "None", "True" and "1.5", and every session without an id one user "None".

    >>> _otto_id(12, "x.jsonl:1", "aid"), _otto_id("s7", "x.jsonl:1", "session")
    ('12', 's7')
    >>> _otto_id(None, "x.jsonl:3", "session")
    Traceback (most recent call last):
    ...
    online_models.datasets.DatasetError: x.jsonl:3: `session` must be a whole number or a string, saw None
    """
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return str(value)
    raise DatasetError(f"{where}: `{field}` must be a whole number or a string, saw {value!r:.80}")


@_guarded
def read_otto(path: Path) -> Iterator[Interaction]:
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(bounded_lines(fh, path), start=1):
            if not line.strip():
                continue
            try:
                session = json.loads(line)
                sid, events = session["session"], session["events"]
            except (ValueError, KeyError, TypeError) as exc:
                raise DatasetError(f"{path}:{lineno}: not an OTTO session object ({exc})") from None
            sid = _otto_id(sid, f"{path}:{lineno}", "session")
            if not isinstance(events, list):
                raise DatasetError(f"{path}:{lineno}: `events` is not a list")
            for ev in events:
                if not isinstance(ev, dict):
                    raise DatasetError(f"{path}:{lineno}: an event is not an object: {ev!r:.80}")
                kind = _OTTO_KIND.get(ev.get("type"))
                if kind is None:
                    raise DatasetError(f"{path}:{lineno}: unknown OTTO event type {ev.get('type')!r}")
                try:
                    aid, ts = ev["aid"], int(ev["ts"])
                except (KeyError, TypeError, ValueError, OverflowError):
                    raise DatasetError(f"{path}:{lineno}: an OTTO event needs `aid` and `ts` (milliseconds), "
                                       f"saw {ev!r:.80}") from None
                aid = _otto_id(aid, f"{path}:{lineno}", "aid")
                yield Interaction(sid, aid, ts, kind, sid, None, ev["type"])


def synthetic_interactions(
    n_events: int = 10_000,
    n_users: int = 500,
    n_items: int = 2_000,
    n_categories: int = 40,
    seed: int = 42,
    start_ts: int = 1_700_000_000_000,
    zipf_s: float = 1.1,
    purchase_rate: float = 0.04,
) -> Iterator[Interaction]:
    """A stream with the shape of a real shop, for the demo and the tests.

    Item popularity follows a Zipf law; users browse in sessions that stay mostly in a
    few categories and revisit what they saw (so co-visitation has something to find);
    a small share of clicks on an item already viewed turn into purchases (the funnel).
    The same seed gives the same stream.
    """
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** zipf_s for rank in range(n_items)]
    item_category = [rng.randrange(n_categories) for _ in range(n_items)]
    by_category: list[list[int]] = [[] for _ in range(n_categories)]
    cat_weights: list[list[float]] = [[] for _ in range(n_categories)]
    for item, cat in enumerate(item_category):
        by_category[cat].append(item)
        cat_weights[cat].append(weights[item])
    cat_cum = [list(itertools.accumulate(w)) for w in cat_weights]
    user_taste = [rng.sample(range(n_categories), k=min(3, n_categories)) for _ in range(n_users)]
    # user activity is skewed too, but no single user dominates (Zipf, exponent 0.7)
    user_cum = list(itertools.accumulate(1.0 / (rank + 1) ** 0.7 for rank in range(n_users)))
    sessions: dict[int, tuple[int, list[int]]] = {}  # user -> (session number, items seen)
    ts = start_ts
    for _ in range(n_events):
        ts += int(rng.expovariate(1 / 50)) + 1  # ~20 events per second of event time
        user = rng.choices(range(n_users), cum_weights=user_cum)[0]
        number, seen = sessions.get(user, (0, []))
        if not seen or rng.random() < 0.08:  # a new session
            number, seen = number + 1, []
        if seen and rng.random() < purchase_rate * 3:
            item = rng.choice(seen)
            kind = "purchase" if rng.random() < 0.35 else "click"
        elif seen and rng.random() < 0.25:
            item = rng.choice(seen[-3:])
            kind = "click"
        else:
            cat = rng.choice(user_taste[user]) if rng.random() < 0.8 else rng.randrange(n_categories)
            if not by_category[cat]:
                cat = item_category[0]
            item = rng.choices(by_category[cat], cum_weights=cat_cum[cat])[0]
            kind = "click"
        seen.append(item)
        sessions[user] = (number, seen[-20:])
        yield Interaction(
            user_id=f"u{user}",
            item_id=f"i{item}",
            ts=ts,
            kind=kind,
            session_id=f"u{user}-s{number}",
            category_id=f"c{item_category[item]}",
            behavior=kind,
        )


def read_interactions(path: str | Path | None, fmt: str, limit: int | None = None, **synthetic_kw) -> Iterator[Interaction]:
    """Interactions from ``path`` in format ``fmt`` (one of :data:`FORMATS`), at most ``limit``."""
    if fmt == "synthetic" or path is None:
        if fmt not in ("synthetic", None):
            raise DatasetError(f"format {fmt!r} needs a dataset path")
        n = limit if limit is not None else synthetic_kw.pop("n_events", 10_000)
        return synthetic_interactions(n_events=n, **synthetic_kw)
    readers = {"taobao": read_taobao, "yoochoose": read_yoochoose, "otto": read_otto}
    if fmt not in readers:
        raise DatasetError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if problem := _missing(Path(path)):
        raise DatasetError(f"dataset {path} {problem}")
    it = readers[fmt](path)
    return _take(it, limit) if limit is not None else it


def _missing(path: Path) -> str | None:
    """Why ``path`` cannot be opened at all, else None: ``Path.exists`` answers False alike for a
    missing file, a link to one, a loop of links and a folder that may not be searched, and all of
    them were said as "does not exist".

    >>> _missing(Path("/nonexistent/log.csv")), _missing(Path("/"))
    ('does not exist', None)
    """
    try:
        os.stat(path)
    except FileNotFoundError:
        return "is a symbolic link to a file that does not exist" if path.is_symlink() else "does not exist"
    except OSError as exc:
        what = (exc.strerror or type(exc).__name__).lower()
        if exc.errno == errno.ELOOP:
            what += " (the links lead round in a loop)"
        return f"cannot be reached: {what}"
    return None


def _take(it: Iterable[Interaction], n: int) -> Iterator[Interaction]:
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def sequences_by_user(interactions: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Each user's interactions in time order (stable for equal timestamps)."""
    out: dict[str, list[Interaction]] = {}
    for x in interactions:
        out.setdefault(x.user_id, []).append(x)
    for seq in out.values():
        seq.sort(key=lambda x: x.ts)
    return out


def time_ordered(interactions: Iterable[Interaction]) -> list[Interaction]:
    """All interactions sorted by timestamp, file order kept among equal timestamps."""
    return sorted(interactions, key=lambda x: x.ts)


# -- the session-rec YooChoose folder -------------------------------------------------------
TRAIN_FILE = "yoochoose-clicks-100k_train_full.txt"
TEST_FILE = "yoochoose-clicks-100k_test.txt"
#: The validation split of the same folder: train_tr is train_full without its last day,
#: train_valid that day. Everything is tuned on it; the test is run once.
VALID_TRAIN_FILE = "yoochoose-clicks-100k_train_tr.txt"
VALID_FILE = "yoochoose-clicks-100k_train_valid.txt"
SPLITS = {"test": (TRAIN_FILE, TEST_FILE), "valid": (VALID_TRAIN_FILE, VALID_FILE)}
#: The published figures the reference files must reproduce (data README).
REFERENCE_EXPECTED = {"vsknn": (0.6098, 0.3342), "ar": (0.5917, 0.3160), "gru4rec": (0.5711, 0.3289),
                      "sr": (0.5607, 0.3275)}


def read_reference_lists(folder: str | Path) -> dict[str, dict[tuple[str, int], list[str]]]:
    """``{algorithm: {(session, position): ranked items}}`` from ``recoms_*_<algo>.csv``."""
    out: dict[str, dict[tuple[str, int], list[str]]] = {}
    for path in sorted(Path(folder).glob("recoms_*.csv")):
        algo = path.stem.rsplit("_", 1)[-1]
        lists: dict[tuple[str, int], list[str]] = {}
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                for lineno, row in enumerate(csv.DictReader(bounded_lines(fh, path), delimiter=";"), start=2):
                    try:
                        lists[(row["SessionId"], int(row["Position"]))] = row["Recommendations"].split(",")
                    except (KeyError, ValueError, TypeError, AttributeError):
                        raise DatasetError(f"{path}:{lineno}: expected the columns SessionId;Position;Recommendations "
                                           "(session-rec's saved lists), with a whole-number Position") from None
        except UnicodeDecodeError:
            raise DatasetError(f"{path}: not UTF-8 text") from None
        except csv.Error as exc:
            raise DatasetError(f"{path}: not a CSV file this reader can take ({exc})") from None
        out[algo] = lists
    return out


def sessions_of(test: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Test events by session (file order of first appearance), each in time order."""
    out: dict[str, list[Interaction]] = {}
    for x in test:
        out.setdefault(session_key(x), []).append(x)
    for seq in out.values():
        seq.sort(key=lambda x: x.ts)
    return out


def score_references(
    references: Mapping[str, Mapping[tuple[str, int], list[str]]],
    sessions: Mapping[str, list[Interaction]],
    ks: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """HR/MRR/NDCG of the saved lists against each session's next click; a :class:`DatasetError`
    for a list saved at a position with no next click in ``sessions``."""
    out: dict[str, dict[str, Any]] = {}
    for algo, lists in references.items():
        m = RankingMetrics(ks)
        for (sid, pos), ranked in lists.items():
            seq = sessions.get(sid)
            if seq is None:  # a test log cut short (--limit)
                continue
            if not 0 <= pos < len(seq) - 1:  # was a ValueError, or an IndexError for a negative one: a traceback
                raise DatasetError(f"saved lists {algo!r}: session {sid} at position {pos} has no next click in the "
                                   f"test log ({len(seq)} clicks): the lists were saved for another test file")
            m.update(ranked, seq[pos + 1].item_id)
        out[algo] = {"predictions": m.n, **m.summary()}
        if algo in REFERENCE_EXPECTED:
            out[algo]["published"] = dict(zip(("HR@20", "MRR@20"), REFERENCE_EXPECTED[algo], strict=True))
    return out


def load_folder(folder: str | Path, limit: int | None = None, split: str = "test"):
    """``(train, test, references)`` from a session-rec YooChoose folder; ``limit`` keeps
    the first ``limit`` test sessions (99 covers the saved lists). ``split="valid"``:
    train on ``train_tr`` and predict ``train_valid`` (no saved lists: they are for the test)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    folder = Path(folder)
    train_file, test_file = SPLITS[split]
    for name in (train_file, test_file):
        if not (folder / name).is_file():
            raise DatasetError(f"{folder} has no {name}: expected the session-rec YooChoose folder "
                               f"({TRAIN_FILE}, {TEST_FILE}, {VALID_TRAIN_FILE}, {VALID_FILE})")
    train = list(read_yoochoose(folder / train_file))
    test = list(read_yoochoose(folder / test_file))
    if limit is not None:
        keep = set(list(dict.fromkeys(map(session_key, test)))[:limit])
        test = [x for x in test if session_key(x) in keep]
    refs = {}
    if split == "test" and (folder / "recommendations").is_dir():
        refs = read_reference_lists(folder / "recommendations")
    return train, test, refs


__all__ = [
    "FORMATS",
    "MAX_LINE_CHARS",
    "SPLITS",
    "DatasetError",
    "bounded_lines",
    "load_folder",
    "read_reference_lists",
    "score_references",
    "sessions_of",
    "read_interactions",
    "read_otto",
    "read_taobao",
    "read_yoochoose",
    "sequences_by_user",
    "synthetic_interactions",
    "time_ordered",
]
