"""The session-rec protocol (Ludewig, Mauro, Latifi & Jannach) on a train/test split.

1. Every contender learns the training log, in time order, through ``learn`` (the same
   calls as the stream).
2. For each test session and each position ``p`` but the last, the contender recommends
   for the session's first ``p + 1`` clicks, proposing from all items it knows (an item
   it cannot rank is a miss), and the list is judged against click ``p + 1``.
   *Frozen*: the contender never learns from the test sessions (as session-rec does).
   *Learning*: the test log is replayed in time order, test-then-learn, so each session
   also teaches the contender before its next click is predicted.
3. The session-rec framework's saved lists (``recommendations/recoms_*.csv``:
   ``SessionId;Position;Recommendations;Scores``, the list after the event at
   ``Position``, judged against the next event) are scored the same way, and the
   contenders are also scored on exactly those (session, position) pairs.

>>> from online_models.types import Interaction
>>> train = [Interaction(s, i, t, session_id=s) for t, (s, i) in enumerate(
...     [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "y"), ("c", "z")])]
>>> test = [Interaction("t", "x", 10, session_id="t"), Interaction("t", "y", 11, session_id="t")]
>>> report = session_rec(train, test, models=["session_knn"], ks=(2,))
>>> report["models"]["session_knn"]["frozen"]["HR@2"]
1.0
"""

from __future__ import annotations

import csv
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from online_models.evaluation import (
    Contender,
    ContenderStats,
    ExternalScorer,
    _config_dict,
    build_contenders,
    default_config,
)
from online_models.metrics import RankingMetrics
from online_models.recommender import RecommenderConfig
from online_models.types import Interaction, UserContext

#: Contenders the session-rec protocol runs when none are named.
SESSION_MODELS = ("session_hybrid", "session_hybrid+transformer", "session_knn", "sequential_rules", "covisit",
                  "reminder", "popularity", "blend", "blend+session")

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
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter=";"):
                lists[(row["SessionId"], int(row["Position"]))] = row["Recommendations"].split(",")
        out[algo] = lists
    return out


def sessions_of(test: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Test events by session (file order of first appearance), each in time order."""
    out: dict[str, list[Interaction]] = {}
    for x in test:
        out.setdefault(x.session_id if x.session_id is not None else x.user_id, []).append(x)
    for seq in out.values():
        seq.sort(key=lambda x: x.ts)
    return out


def score_references(
    references: Mapping[str, Mapping[tuple[str, int], list[str]]],
    sessions: Mapping[str, list[Interaction]],
    ks: Sequence[int],
) -> dict[str, dict[str, Any]]:
    """HR/MRR/NDCG of the saved lists against each session's next click."""
    out: dict[str, dict[str, Any]] = {}
    for algo, lists in references.items():
        m = RankingMetrics(ks)
        for (sid, pos), ranked in lists.items():
            seq = sessions.get(sid)
            if seq is None:  # a test log cut short (--limit)
                continue
            if pos + 1 >= len(seq):
                raise ValueError(f"reference {algo}: session {sid} position {pos} has no next click in the test log")
            m.update(ranked, seq[pos + 1].item_id)
        out[algo] = {"predictions": m.n, **m.summary()}
        if algo in REFERENCE_EXPECTED:
            out[algo]["published"] = dict(zip(("HR@20", "MRR@20"), REFERENCE_EXPECTED[algo], strict=True))
    return out


_CURVE_EVERY = [100]  # predictions between two points of the curves (set per run)


def _context(sid: str, seq: list[Interaction], pos: int, max_recent: int) -> UserContext:
    x = seq[pos]
    items = tuple(e.item_id for e in seq[max(0, pos + 1 - max_recent): pos + 1])
    return UserContext(x.user_id, items, frozenset(), x.session_id, x.ts)


def _judge(c: Contender, st: ContenderStats, subset: RankingMetrics, pairs: set, sid: str,
           seq: list[Interaction], pos: int, kmax: int, max_recent: int) -> None:
    ctx = _context(sid, seq, pos, max_recent)
    t0 = time.perf_counter()
    ranked = c.recommend(ctx, kmax)
    st.recommend_s.append(time.perf_counter() - t0)
    target = seq[pos + 1].item_id
    st.metrics.update(ranked, target)
    if (sid, pos) in pairs:
        subset.update(ranked, target)
    if st.metrics.n % _CURVE_EVERY[0] == 0:
        st.curve.append((st.metrics.n, st.metrics.value("HR", kmax), st.metrics.value("MRR", kmax)))


def session_rec(
    train: Iterable[Interaction],
    test: Iterable[Interaction],
    models: Sequence[str] | None = None,
    ks: Sequence[int] = (10, 20),
    references: Mapping[str, Mapping[tuple[str, int], list[str]]] | None = None,
    config: RecommenderConfig | None = None,
    scorer: ExternalScorer | None = None,
    seed: int = 0,
    max_recent: int = 50,
    modes: Sequence[str] = ("frozen", "learning"),
    progress: Callable[[int], None] | None = None,
    session_params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the protocol for each contender and mode; returns the summary.

    ``progress`` is called with the number of work units done (training events plus test
    predictions, per contender and mode).
    """
    ks = tuple(sorted(set(ks)))
    kmax = ks[-1]
    train = sorted(train, key=lambda x: x.ts)
    sessions = sessions_of(test)
    test_events = sorted((x for seq in sessions.values() for x in seq), key=lambda x: x.ts)
    position = {id(x): p for seq in sessions.values() for p, x in enumerate(seq)}
    ref_scores = score_references(references, sessions, ks) if references else {}
    pairs = {p for lists in (references or {}).values() for p in lists if p[0] in sessions}
    names = list(models) if models else list(SESSION_MODELS)
    _CURVE_EVERY[0] = max(1, sum(len(s) - 1 for s in sessions.values()) // 100)
    catalogue = len({x.item_id for x in train})
    done = 0
    out_models: dict[str, dict[str, Any]] = {}
    curves: dict[str, list[list[float]]] = {}
    for name in names:
        out_models[name] = {}
        for mode in modes:
            (c,) = build_contenders([name], config, scorer, seed, session_params)
            t0 = time.perf_counter()
            for x in train:
                c.learn(x, None)
                done += 1
                if progress is not None and done % 1000 == 0:
                    progress(done)
            end_training = getattr(c, "end_training", None)
            if end_training is not None:  # a contender that fits a batch model on the training log
                end_training()
            train_s = time.perf_counter() - t0
            done += len(train) % 1000
            st = ContenderStats(RankingMetrics(ks))
            subset = RankingMetrics(ks)
            if mode == "frozen":
                for sid, seq in sessions.items():
                    for pos in range(len(seq) - 1):
                        _judge(c, st, subset, pairs, sid, seq, pos, kmax, max_recent)
                        done += 1
            elif mode == "learning":
                for x in test_events:
                    sid = x.session_id if x.session_id is not None else x.user_id
                    seq, pos = sessions[sid], position[id(x)]
                    if pos > 0:
                        _judge(c, st, subset, pairs, sid, seq, pos - 1, kmax, max_recent)
                        done += 1
                    ctx = _context(sid, seq, pos - 1, max_recent) if pos > 0 else UserContext(x.user_id)
                    t1 = time.perf_counter()
                    c.learn(x, ctx)
                    st.learn_s.append(time.perf_counter() - t1)
            else:
                raise ValueError(f"unknown mode {mode!r} (frozen, learning)")
            if progress is not None:
                progress(done)
            result = st.summary(catalogue)
            result["train_s"] = round(train_s, 2)
            if pairs:
                result["saved_pairs"] = {"predictions": subset.n, **subset.summary()}
            out_models[name][mode] = result
            curves[f"{name} ({mode})"] = [list(p) for p in st.curve]
    return {
        "protocol": "session-rec",
        "train_events": len(train),
        "test_sessions": len(sessions),
        "test_predictions": sum(len(s) - 1 for s in sessions.values()),
        "catalogue": catalogue,
        "ks": list(ks),
        "modes": list(modes),
        "references": ref_scores,
        "saved_pairs": len(pairs),
        "models": out_models,
        "curves": curves,
        "x_label": "test predictions (frozen: session by session; learning: in time order)",
        "config": _config_dict(config if config is not None else default_config()),
    }


def work_units(train_events: int, test: Iterable[Interaction], n_models: int, n_modes: int) -> int:
    """The ``progress`` total of :func:`session_rec` (for a progress bar)."""
    predictions = sum(max(0, len(s) - 1) for s in sessions_of(test).values())
    return n_models * n_modes * (train_events + predictions)


def load_folder(folder: str | Path, limit: int | None = None, split: str = "test"):
    """``(train, test, references)`` from a session-rec YooChoose folder; ``limit`` keeps
    the first ``limit`` test sessions (99 covers the saved lists). ``split="valid"``:
    train on ``train_tr`` and predict ``train_valid`` (no saved lists: they are for the test)."""
    from online_models.datasets import read_yoochoose

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    folder = Path(folder)
    train_file, test_file = SPLITS[split]
    train = list(read_yoochoose(folder / train_file))
    test = list(read_yoochoose(folder / test_file))
    if limit is not None:
        keep = set(list(dict.fromkeys(x.session_id for x in test))[:limit])
        test = [x for x in test if x.session_id in keep]
    refs = {}
    if split == "test" and (folder / "recommendations").is_dir():
        refs = read_reference_lists(folder / "recommendations")
    return train, test, refs


__all__ = ["SESSION_MODELS", "SPLITS", "load_folder", "read_reference_lists", "score_references", "session_rec",
           "sessions_of", "work_units"]
