"""Model snapshots are data: restoring one runs no code, a forged or foreign one is refused with
a clear error, and with a key only a snapshot signed with it is restored."""

from __future__ import annotations

import json
import os
import pickle

import msgspec
import numpy as np
import pytest

from online_models import Recommender, RecommenderConfig, SnapshotError, codec
from online_models.base import _MAGIC
from online_models.datasets import synthetic_interactions


def trained(mf: bool = True) -> Recommender:
    config = RecommenderConfig(weights={**RecommenderConfig().weights, "mf": 0.2 if mf else 0.0})
    rec = Recommender.default(config)
    for x in synthetic_interactions(n_events=1500, seed=4):
        rec.learn_one(x)
    rec.learned_offsets = {"streamrec.clicks:0": 1499}
    return rec


def test_a_restored_recommender_ranks_the_same_and_keeps_its_offsets():
    rec = trained()
    back = Recommender.restore(rec.snapshot())
    from online_models import UserContext

    user = UserContext("u3", recent_items=("i3", "i9"))
    assert back.recommend(user) == rec.recommend(user)
    assert back.learned_offsets == {"streamrec.clicks:0": 1499} and back.n_learned == rec.n_learned


def test_the_session_learner_the_worker_can_run_snapshots_and_restores():
    config = RecommenderConfig(weights={**RecommenderConfig().weights, "session_hybrid": 1.0}, max_users=5000,
                               max_items=4000)
    rec = Recommender.default(config)
    assert rec.learners["session_hybrid"].max_sessions == 5000 and rec.learners["session_hybrid"].max_items == 4000
    for x in synthetic_interactions(n_events=1500, seed=4):
        rec.learn_one(x)
    back = Recommender.restore(rec.snapshot())
    from online_models import UserContext

    user = UserContext("u3", recent_items=("i3", "i9"), session_id="u3-s1")
    assert back.recommend(user) == rec.recommend(user)
    assert back.learners["session_hybrid"].n_learned == rec.learners["session_hybrid"].n_learned == 1500


def test_the_snapshot_holds_no_pickle():
    data = trained().snapshot()
    assert b"\x80\x05" not in data[:200] and pickle.PROTO not in data[len(_MAGIC):len(_MAGIC) + 2]
    header = json.loads(data[len(_MAGIC): data.index(b"\n", len(_MAGIC))])
    assert header["format"] == 2 and header["class"] == "online_models.recommender.Recommender"


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/streamrec-pwned",))


def _header(cls: str = "online_models.recommender.Recommender", **extra) -> bytes:
    return _MAGIC + json.dumps({"format": 2, "class": cls, "params": {}, **extra}, sort_keys=True).encode() + b"\n"


def test_an_old_pickle_snapshot_is_refused_and_never_unpickled():
    forged = _MAGIC + json.dumps({"format": 1, "class": "online_models.recommender.Recommender", "params": {}}).encode() + b"\n" + pickle.dumps(Boom())
    with pytest.raises(SnapshotError, match="format 1 is a pickle"):
        Recommender.restore(forged)
    assert not os.path.exists("/tmp/streamrec-pwned")


@pytest.mark.parametrize("payload", [
    msgspec.msgpack.Ext(9, msgspec.msgpack.encode([0, "posix.system", {}])),          # a class outside the allowlist
    msgspec.msgpack.Ext(9, msgspec.msgpack.encode([0, "subprocess.Popen", {}])),
    msgspec.msgpack.Ext(10, msgspec.msgpack.encode("builtins.eval")),                # a callable outside it
    msgspec.msgpack.Ext(1, msgspec.msgpack.encode(["|O", [1], b"\x00" * 8])),        # an object array
    msgspec.msgpack.Ext(99, b"\x90"),                                                # an unknown tag
    msgspec.msgpack.Ext(17, msgspec.msgpack.encode(5)),                              # a reference to nothing
])
def test_anything_but_known_data_is_refused(payload):
    with pytest.raises(SnapshotError):
        Recommender.restore(_header() + msgspec.msgpack.encode(payload))


def test_a_snapshot_of_something_else_is_refused():
    from online_models import CoVisitation

    with pytest.raises(SnapshotError, match="not a Recommender"):
        Recommender.restore(CoVisitation().snapshot())
    with pytest.raises(SnapshotError, match="not a streamrec snapshot"):
        Recommender.restore(b"garbage")
    with pytest.raises(SnapshotError):
        Recommender.restore(_header() + b"\xc1\xc1")


def test_with_a_key_only_a_snapshot_signed_with_it_is_restored():
    rec = trained(mf=False)
    signed = rec.snapshot(key="s3cret")
    assert Recommender.restore(signed, key="s3cret").n_learned == rec.n_learned
    assert Recommender.restore(signed).n_learned == rec.n_learned  # no key: not checked
    with pytest.raises(SnapshotError, match="not signed"):
        Recommender.restore(rec.snapshot(), key="s3cret")
    with pytest.raises(SnapshotError, match="does not match"):
        Recommender.restore(signed, key="another")
    tampered = bytearray(signed)
    tampered[-5] ^= 1
    with pytest.raises(SnapshotError, match="does not match"):
        Recommender.restore(bytes(tampered), key="s3cret")
    header_swapped = signed.replace(b'"max_per_category": null', b'"max_per_category": 1 ')
    with pytest.raises(SnapshotError, match="does not match"):
        Recommender.restore(header_swapped, key="s3cret")


def test_the_codec_round_trips_what_the_learners_hold():
    import collections
    import random

    rng = random.Random(3)
    rng.random()
    value = {"a": [1, 2.5, None, True, "x", b"\x00"], "t": (1, ("n",)), "s": {1, 2}, "f": frozenset({"z"}),
             "d": collections.deque([1], maxlen=3), "dd": collections.defaultdict(float, {"k": 1.0}),
             "od": collections.OrderedDict([(2, "b"), (1, "a")]), "keys": {(1, 2): "pair", 3: "int"},
             "arr": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.float64(2.5), "rng": rng,
             "rs": np.random.RandomState(1), "gen": np.random.default_rng(2)}
    back = codec.decode(codec.encode(value))
    assert back["a"] == value["a"] and back["t"] == value["t"] and back["s"] == {1, 2} and back["f"] == frozenset({"z"})
    assert back["d"] == value["d"] and back["d"].maxlen == 3 and back["dd"]["missing"] == 0.0
    assert list(back["od"].items()) == [(2, "b"), (1, "a")] and back["keys"] == value["keys"]
    assert back["arr"].dtype == np.float32 and back["arr"].tolist() == value["arr"].tolist() and back["scalar"] == 2.5
    assert back["rng"].random() == rng.random()
    assert back["rs"].random_sample() == value["rs"].random_sample()
    assert back["gen"].random() == value["gen"].random()


def test_an_object_the_codec_does_not_know_is_not_written():
    with pytest.raises(codec.CodecError, match="cannot be written"):
        codec.encode({"x": Boom()})
