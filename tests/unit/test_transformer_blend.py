"""SessionHybrid + Transformer contender (online_models/transformer_blend.py) and the
validation split of the session-rec protocol. Tiny Transformers, trained in a second."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")

from online_models import transformer_blend  # noqa: E402
from online_models.evaluation import TRANSFORMER_HYBRID, build_contenders  # noqa: E402
from online_models.session_protocol import load_folder, session_rec  # noqa: E402
from online_models.transformer_blend import SequenceModel, TransformerHybrid, blend_scores  # noqa: E402
from online_models.types import Interaction, UserContext  # noqa: E402

TINY_MODEL = {"dim": 8, "n_blocks": 1, "n_heads": 1, "max_len": 5, "dropout": 0.0}
TINY_TRAIN = {"epochs": 40, "patience": 40, "lr": 3e-2, "batch_size": 16, "eval_users": 2}


def log(sessions: list[str], start: int = 0) -> list[Interaction]:
    """One session per string, one item per character, events one second apart."""
    out, t = [], start
    for n, items in enumerate(sessions):
        for item in items:
            out.append(Interaction(f"s{start}-{n}", item, ts=1000 * t, session_id=f"s{start}-{n}"))
            t += 1
    return out


def tiny(weight: float, top_n: int = 10, exponent: float = 0.25) -> TransformerHybrid:
    return TransformerHybrid(weight=weight, exponent=exponent, top_n=top_n, model_config=TINY_MODEL,
                             train_config=TINY_TRAIN)


@pytest.fixture(autouse=True)
def _fresh_cache():
    transformer_blend._FITTED.clear()
    yield
    transformer_blend._FITTED.clear()


def test_blend_scores_normalise_the_transformer_to_its_best_item():
    assert blend_scores({"a": 2.0}, [("a", 0.5), ("b", 0.25)], weight=2.0) == {"a": 4.0, "b": 1.0}
    assert blend_scores({"a": 2.0}, [("b", 0.25)], weight=0.0) == {"a": 2.0}
    assert blend_scores({}, [], weight=1.0) == {}


def test_weight_zero_ranks_as_session_hybrid():
    from online_models.session_knn import SessionHybrid

    train = log(["abc", "abd", "abc", "xbc"] * 3)
    c, ref = tiny(0.0), SessionHybrid()
    for x in train:
        c.learn(x)
        ref.learn_one(x)
    c.end_training()
    user = UserContext("new", recent_items=("a", "b"))
    assert c.recommend(user, 4) == [s.item_id for s in ref.rank(user, None, 4)]


def test_the_transformer_learns_the_order_and_its_items_enter_the_list():
    # p always follows x, q; s always follows y, r
    train = log(["xqp", "yrs"] * 16)
    c = tiny(weight=50.0, exponent=1.0)
    for x in train:
        c.learn(x)
    c.end_training()
    model = c.sequence_model
    assert model is not None and model.probabilities(("x", "q"), 1)[0][0] == "p"
    assert model.probabilities(("y", "r"), 1)[0][0] == "s"
    # weighted heavily, the Transformer's best item wins over the reminder of q
    assert c.recommend(UserContext("new", recent_items=("x", "q")), 1) == ["p"]
    assert c.hybrid.rank(UserContext("new", recent_items=("x", "q")), None, 1)[0].item_id == "q"
    # items only the Transformer proposes (y, r, s here) are scored too
    probs = dict(model.probabilities(("x", "q"), 10))
    scores = c.scores(UserContext("new", recent_items=("x", "q")))
    assert set(probs) <= set(scores)


def test_transformer_is_trained_once_on_the_training_log_only():
    c = tiny(weight=1.0)
    for x in log(["ab", "ab", "cd", "cd"] * 3):
        c.learn(x)
    assert c.sequence_model is None and sum(map(len, c._pending.values())) == 24
    model = c.end_training()
    assert c.recommend(UserContext("u", recent_items=("a",)), 3)
    for x in log(["ef", "ef"], start=100):  # test events teach the kNN part, not the Transformer
        c.learn(x)
    assert c.sequence_model is model and c._pending == {}
    assert "f" in c.hybrid._scores(UserContext("v", recent_items=("e",)))
    # a second contender on the same log reuses the trained model (frozen + learning runs)
    d = tiny(weight=1.0)
    for x in log(["ab", "ab", "cd", "cd"] * 3):
        d.learn(x)
    assert d.end_training() is model


def test_recommending_before_end_training_trains_on_what_was_learned():
    c = tiny(weight=1.0)
    for x in log(["ab", "ab", "cd", "cd"] * 3):
        c.learn(x)
    assert c.recommend(UserContext("u", recent_items=("a",)), 2) == ["a", "b"]  # reminder, then b
    assert c.sequence_model is not None


def test_empty_history_gives_no_transformer_items():
    model = tiny(1.0)
    for x in log(["ab", "ab", "cd", "cd"] * 3):
        model.learn(x)
    seq: SequenceModel = model.end_training()
    assert seq.probabilities((), 5) == []
    assert model.recommend(UserContext("nobody"), 5) == []


def write_folder(folder: Path) -> None:
    rows = "SessionId\tItemId\tTime\n"

    def fmt(sessions, t0):
        return rows + "".join(f"{x.session_id}\t{x.item_id}\t{x.ts / 1000 + t0}\n" for x in log(sessions))

    (folder / "yoochoose-clicks-100k_train_full.txt").write_text(fmt(["abc", "abc", "xyz", "xyz"] * 3, 0))
    (folder / "yoochoose-clicks-100k_test.txt").write_text(fmt(["abc", "xyz"], 1000))
    (folder / "yoochoose-clicks-100k_train_tr.txt").write_text(fmt(["abc", "abc", "xyz"], 0))
    (folder / "yoochoose-clicks-100k_train_valid.txt").write_text(fmt(["xyz"], 1000))
    (folder / "recommendations").mkdir()
    (folder / "recommendations" / "recoms_toy_algo.csv").write_text(
        "SessionId;Position;Recommendations;Scores\ns0-0;0;b;1\n")


def test_contender_runs_in_the_session_rec_protocol(tmp_path, monkeypatch):
    write_folder(tmp_path)
    monkeypatch.setattr(transformer_blend, "MODEL_CONFIG", TINY_MODEL)
    monkeypatch.setattr(transformer_blend, "TRAIN_CONFIG", TINY_TRAIN)
    (c,) = build_contenders([TRANSFORMER_HYBRID])
    assert isinstance(c, TransformerHybrid) and c.name == TRANSFORMER_HYBRID
    train, test, refs = load_folder(tmp_path)
    report = session_rec(train, test, models=[TRANSFORMER_HYBRID], ks=(2,), references=refs)
    frozen = report["models"][TRANSFORMER_HYBRID]["frozen"]
    assert frozen["predictions"] == 4 and frozen["HR@2"] == 1.0
    assert report["models"][TRANSFORMER_HYBRID]["learning"]["predictions"] == 4


def test_several_seeds_average_their_probabilities():
    sessions = {f"s{n}": list(s) for n, s in enumerate(["qp", "qp", "qr", "rs", "rs", "rq"] * 3)}
    one = SequenceModel.fit(sessions, (0,), TINY_MODEL, TINY_TRAIN)
    two = SequenceModel.fit(sessions, (1,), TINY_MODEL, TINY_TRAIN)
    both = SequenceModel.fit(sessions, (0, 1), TINY_MODEL, TINY_TRAIN)
    assert len(both.models) == 2 and [m["seed"] for m in both.metrics] == [0, 1]
    p1, p2, pb = (dict(m.probabilities(("q",), 10)) for m in (one, two, both))
    assert set(pb) == set(p1) == {"p", "q", "r", "s"}
    for item in pb:
        assert pb[item] == pytest.approx((p1[item] + p2[item]) / 2, abs=1e-6)
    assert sum(pb.values()) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError):
        SequenceModel([], [])


def test_prequential_refuses_the_contender_it_cannot_train_first():
    from online_models.datasets import synthetic_interactions
    from online_models.evaluation import prequential

    with pytest.raises(ValueError, match="session-rec"):
        prequential(synthetic_interactions(n_events=50, seed=1), models=[TRANSFORMER_HYBRID])
