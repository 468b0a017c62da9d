"""A run under its own app id (the demo, the benches) drops every topic it made, Faust's too."""

from __future__ import annotations

import faust

from stream.demo import faust_leader_topic


def test_the_leader_topic_dropped_is_the_one_faust_creates_for_the_group():
    app = faust.App("demo20261205121820", broker="kafka://127.0.0.1:1", autodiscover=False)
    assert faust_leader_topic("demo20261205121820") == app._leader_assignor._leader_topic_name
