"""``produce --skip N`` says that it generates (or reads) the N events it drops, and how far it
got: ``--skip 100000000`` on the synthetic shop was minutes of silence before the first event
went (each synthetic event follows from the ones before it, so they cannot be jumped over)."""

import itertools

import pytest
import typer
from typer.testing import CliRunner

from online_models.datasets import synthetic_interactions
from stream import produce as produce_module
from stream.errors import StreamrecError


class KafkaNotReached(StreamrecError):
    pass


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("produce")(produce_module.produce)
    app.command("noop")(lambda: None)
    return app


@pytest.fixture
def stop_before_kafka(monkeypatch):
    """The skip runs before Kafka is asked anything: stop the command there."""
    def ensure(settings):
        raise KafkaNotReached("stopped before Kafka")

    monkeypatch.setattr(produce_module, "ensure_streamrec_topics", ensure)


def test_skipping_the_synthetic_shop_says_it_generates_them_with_the_count(stop_before_kafka):
    result = CliRunner().invoke(_app(), ["produce", "--skip", "1000", "--limit", "2", "--bootstrap", "127.0.0.1:9",
                                         "--no-progress"], env={"COLUMNS": "500"})
    assert isinstance(result.exception, KafkaNotReached), result.output
    said = [line for line in result.output.splitlines() if line.startswith("--skip")]
    assert said == ["--skip 1,000: generating the first 1,000 events of the synthetic shop to drop them, before any "
                    "is sent (each follows from the ones before it: none can be jumped over)"], result.output


def test_skipping_a_log_says_it_reads_them(stop_before_kafka, tmp_path):
    log = tmp_path / "shop.csv"
    log.write_text("".join(f"1,{100 + n},7,pv,{1511544070 + n}\n" for n in range(5)))
    result = CliRunner().invoke(_app(), ["produce", "-d", str(log), "-f", "taobao", "--skip", "3", "--bootstrap",
                                         "127.0.0.1:9", "--no-progress"], env={"COLUMNS": "500"})
    assert isinstance(result.exception, KafkaNotReached), result.output
    assert f"--skip 3: reading the first 3 events of {log} to drop them" in result.output


def test_a_long_skip_says_how_far_it_got_every_so_often():
    ticks = itertools.count(0.0, 1.0)  # a second a reading of the clock (one every 4,096 events)
    said: list[str] = []
    skipped = produce_module.skip_events(synthetic_interactions(60_000, seed=1), 50_000, "the synthetic shop",
                                         said.append, every_s=3.0, clock=lambda: next(ticks))
    assert skipped == 50_000
    assert said[0].startswith("--skip 50,000: generating the first 50,000 events of the synthetic shop")
    progress = said[1:]
    assert progress and all(line.startswith("--skip: ") and " of 50,000 events dropped (" in line for line in progress)
    done = [int(line.split()[1].replace(",", "")) for line in progress]
    assert done == sorted(done) and done[-1] < 50_000


def test_no_skip_says_nothing_and_a_short_log_stops_the_skip():
    said: list[str] = []
    assert produce_module.skip_events(iter(()), 0, "the synthetic shop", said.append) == 0 and said == []
    assert produce_module.skip_events(synthetic_interactions(7), 10, "x.csv", said.append) == 7
