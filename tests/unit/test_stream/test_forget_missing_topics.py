"""``streamrec forget`` when some of the topics the workers read together do not exist: they are
said as missing, with what to do (start a worker, which creates them). They were said as
having 0 partitions, with the advice to grow them ("Grow t.purchases to 4 partitions"), which
kafka-topics.sh --alter cannot do to a topic that is not there."""

import pytest
from typer.testing import CliRunner

from stream import forget as forget_module
from stream import topics as topics_module
from stream.cli import app as cli_app
from stream.errors import StreamrecError

UNKNOWN_TOPIC, NOT_AUTHORISED = 3, 29


def described(name: str, partitions: int, error_code: int = 0) -> dict:
    """A topic as kafka-python's describe_topics gives it (a missing one: error 3, no partitions)."""
    return {"error_code": error_code, "name": name, "topic_id": None, "is_internal": False,
            "partitions": [{"error_code": 0, "partition_index": p} for p in range(partitions)]}


class Admin:
    def __init__(self, topics: list[dict]) -> None:
        self.topics = {t["name"]: t for t in topics}

    def describe_topics(self, names):
        return [self.topics.get(n) or described(n, 0, UNKNOWN_TOPIC) for n in names]

    def close(self) -> None:
        pass


@pytest.fixture
def broker(monkeypatch):
    """A broker with the given topics; forget's own check of the forget topic passes."""
    def with_topics(*topics: dict) -> None:
        monkeypatch.setattr(topics_module, "_connected_admin", lambda kafka, timeout_s: Admin(list(topics)))

    monkeypatch.setattr(forget_module, "require_topic", lambda settings, topic: 4)
    return with_topics


def run_forget():
    return CliRunner().invoke(cli_app, ["forget", "--bootstrap", "127.0.0.1:9", "--topic-prefix", "t.", "u1"])


def test_forget_says_missing_input_topics_are_missing_not_to_be_grown(broker):
    broker(described("t.clicks", 4), described("t.forget", 4))
    result = run_forget()
    assert isinstance(result.exception, StreamrecError), result.output
    said = str(result.exception)
    assert said == ("there are no topics t.purchases, t.impressions, t.searches on 127.0.0.1:9, which the workers "
                    "read together with t.clicks and t.forget: a worker creates them when it starts, with as many "
                    "partitions as the clicks topic: start one (streamrec worker) first"), said
    assert "Grow" not in said and "has 0" not in said


def test_forget_says_one_missing_topic_in_the_singular(broker):
    broker(*(described(f"t.{n}", 4) for n in ("clicks", "purchases", "forget", "impressions")))
    said = str(run_forget().exception)
    assert said.startswith("there is no topic t.searches on 127.0.0.1:9, which the workers read together with "
                           "t.clicks, t.purchases, t.forget and t.impressions: a worker creates it when"), said


def test_a_topic_it_may_not_describe_is_said_as_such_not_as_empty(broker):
    broker(*(described(f"t.{n}", 4) for n in ("clicks", "purchases", "forget", "impressions")),
           described("t.searches", 0, NOT_AUTHORISED))
    said = str(run_forget().exception)
    assert said == "cannot read the partitions of topic t.searches on 127.0.0.1:9: TopicAuthorizationFailedError"


def test_uneven_topics_that_all_exist_are_still_said_to_be_grown(broker):
    broker(*(described(f"t.{n}", 4) for n in ("clicks", "purchases", "forget", "impressions")),
           described("t.searches", 2))
    said = str(run_forget().exception)
    assert "t.searches has 2" in said and "Grow t.searches to 4 partitions" in said
