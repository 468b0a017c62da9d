"""The Faust app's rebalance hook, without a broker: ``create_app`` connects to nothing."""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from types import SimpleNamespace

import pytest
import redis
from mode.utils.logging import ExtensionFormatter
from prometheus_client import CollectorRegistry

from stream import app as app_module
from stream import logs
from stream.app import Worker, create_app
from stream.consumer import FetchPacer
from stream.errors import ConfigError
from stream.prometheus import Metrics
from stream.settings import Settings
from stream.state import InMemoryUserStateStore


def make_app(**env):
    return create_app(Settings.from_env(env), load_model=False)


async def test_a_revocation_waits_for_the_batch_in_hand():
    app = make_app()
    shell = app.streamrec
    await shell.busy.acquire()  # a batch is being handled
    revoking = asyncio.ensure_future(app.on_partitions_revoked.send({("streamrec.clicks", 0)}))
    await asyncio.sleep(0.1)
    assert not revoking.done()  # its partitions are not handed over before its state is saved
    shell.busy.release()
    await asyncio.wait_for(revoking, 1.0)


async def test_a_revocation_does_not_wait_forever_for_a_stuck_batch(caplog):
    app = make_app(STREAMREC_KAFKA_SESSION_TIMEOUT_S="1")  # waits at most half of it
    await app.streamrec.busy.acquire()
    try:
        with caplog.at_level(logging.WARNING, logger="streamrec.app"):
            await asyncio.wait_for(app.on_partitions_revoked.send({("streamrec.clicks", 0)}), 2.0)
    finally:
        app.streamrec.busy.release()  # receivers of every app made in this process stay connected
    assert "did not finish within 0.5 s" in caplog.text


async def test_nothing_revoked_waits_for_nothing():
    app = make_app()
    await app.streamrec.busy.acquire()
    try:
        await asyncio.wait_for(app.on_partitions_revoked.send(set()), 0.5)
    finally:
        app.streamrec.busy.release()


class FakeApp:
    """What drop_stale reads of a Faust app."""

    def __init__(self) -> None:
        self.active = True
        self.flow_control = SimpleNamespace(is_active=lambda: self.active)
        self.consumer_generation_id = 1
        self.consumer = SimpleNamespace(held=set())


class RecordingHandler:
    def __init__(self) -> None:
        self.handled: list[list[int]] = []

    async def handle_isolated(self, messages) -> None:
        self.handled.append([m.offset for m in messages])


def taken(*offsets: int, generation: int = 1) -> list:
    return [SimpleNamespace(message=SimpleNamespace(topic="streamrec.clicks", partition=0, offset=o, key=b"u",
                                                    value=b"{}", timestamp=None, generation_id=generation))
            for o in offsets]


async def test_a_batch_waiting_for_the_lock_when_a_rebalance_begins_is_not_handled():
    app, handler = FakeApp(), RecordingHandler()
    shell = make_app().streamrec
    shell.handler = handler
    await shell.handle_taken(app, taken(0, 1))
    assert handler.handled == [[0, 1]]
    await shell.busy.acquire()  # the batch before is still in hand
    events = taken(2, 3)
    waiting = asyncio.ensure_future(shell.handle_taken(app, events))
    await asyncio.sleep(0.05)
    app.active = False  # Faust suspends the flow as the rebalance begins
    shell.busy.release()
    await asyncio.wait_for(waiting, 1.0)
    assert handler.handled == [[0, 1]] and events == []  # left for take_batches not to acknowledge
    app.active, app.consumer_generation_id = True, 2  # assigned again: a new generation
    mixed = taken(2, 3) + taken(2, 3, generation=2)  # the old copies and the ones fetched after the seek
    await shell.handle_taken(app, mixed)
    assert handler.handled == [[0, 1], [2, 3]] and len(mixed) == 2


async def test_the_shell_tells_the_fetch_pacer_how_long_each_batch_took():
    """A batch that takes longer than STREAMREC_FETCH_MAX_WAIT_MS to handle lengthens the next
    fetches' wait to about as long (stream/consumer.py, FetchPacer)."""

    class SlowHandler(RecordingHandler):
        async def handle_isolated(self, messages) -> None:
            await asyncio.sleep(0.03)
            await super().handle_isolated(messages)

    shell = make_app().streamrec
    shell.handler = SlowHandler()
    shell.fetch_pacer = FetchPacer(10, smoothing=1.0)  # the last batch alone, for the test
    assert shell.fetch_pacer.wait_ms() == 10
    await shell.handle_taken(FakeApp(), taken(0, 1))
    assert shell.handler.handled == [[0, 1]]
    assert 30 <= shell.fetch_pacer.wait_ms() <= 50


async def test_a_batch_left_unacknowledged_holds_its_partitions_commits_until_they_are_revoked():
    """Faust commits past one unacknowledged event at a partition's head, and past any number
    when the partition has no commit yet (faust-streaming issue 606): the worker's consumer
    commits nothing more for a partition whose batch raised past every safeguard, so that the
    events are read again from the commit after the rebalance or restart."""
    from faust.types import TP

    class FailingHandler(RecordingHandler):
        async def handle_isolated(self, messages) -> None:
            raise RuntimeError("past every safeguard")

    app = make_app()
    shell, consumer = app.streamrec, app.consumer
    shell.handler = FailingHandler()
    clicks0, clicks1 = TP("streamrec.clicks", 0), TP("streamrec.clicks", 1)
    events = taken(10)  # streamrec.clicks[0] offset 10
    await shell.handle_taken(SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True),
                                             consumer_generation_id=1, consumer=consumer), events)
    assert events == []  # not acknowledged
    for tp, committed in ((clicks0, 10), (clicks1, None)):
        consumer._committed_offset[tp] = committed
        consumer._acked[tp] = [11, 12]  # later events of the partition, handled and acknowledged
    assert consumer._new_offset(clicks0) is None  # Faust alone: 13, past offset 10
    assert consumer._new_offset(clicks1) == 13  # another partition commits as before
    await consumer.on_partitions_revoked({clicks0})
    assert clicks0 not in consumer.held
    consumer.hold({clicks0})  # a batch fenced after the revocation: assigned again, it is read again from the commit

    async def assigned(partitions, generation_id) -> None:  # the app's own callbacks: not this test's
        pass

    consumer._on_partitions_assigned = assigned
    await consumer.on_partitions_assigned({clicks0}, 2)
    assert consumer.held == set()
    # a batch that fails after a rebalance began (its partitions revoked and read again from the
    # commit by then) holds nothing of the new generation's
    app2 = SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True), consumer_generation_id=1,
                           consumer=consumer)

    class FailingAfterARebalance(RecordingHandler):
        async def handle_isolated(self, messages) -> None:
            app2.consumer_generation_id = 2
            raise RuntimeError("past every safeguard")

    shell.handler = FailingAfterARebalance()
    await shell.handle_taken(app2, taken(12))
    assert consumer.held == set()


async def test_a_batch_that_raises_past_every_safeguard_logs_its_exception_cut_short(caplog):
    """The traceback quoted the exception's text whole: a 1 MB value carried in it went to the log."""

    class FailingHandler(RecordingHandler):
        async def handle_isolated(self, messages) -> None:
            raise RuntimeError("v" * 1_000_000)

    app = make_app()
    shell = app.streamrec
    shell.handler = FailingHandler()
    with caplog.at_level(logging.ERROR, logger="streamrec.app"):
        await shell.handle_taken(SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True),
                                                 consumer_generation_id=1, consumer=app.consumer), taken(10))
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    (line,) = [formatter.format(r) for r in caplog.records if "past every safeguard" in r.getMessage()]
    assert "Traceback (most recent call last)" in line and "RuntimeError: " + "v" * 300 + "…" in line, line[-500:]
    assert len(line) < 20_000


async def test_a_held_partition_stops_fetching_and_its_later_events_wait_for_the_redelivery():
    """Handled, a later event of a held partition would move its user's offset past the
    unacknowledged batch, whose events would then be skipped as duplicates when Kafka delivers
    them again from the commit; and each acknowledgement would grow Faust's acked list there."""
    from faust.types import TP

    class FailingOnce(RecordingHandler):
        async def handle_isolated(self, messages) -> None:
            if not self.handled:
                self.handled.append([])
                raise RuntimeError("past every safeguard")
            await super().handle_isolated(messages)

    app = make_app()
    shell, consumer = app.streamrec, app.consumer
    shell.handler = FailingOnce()
    clicks0 = TP("streamrec.clicks", 0)
    consumer._set_active_tps({clicks0, TP("streamrec.clicks", 1)})
    faust_app = SimpleNamespace(flow_control=SimpleNamespace(is_active=lambda: True), consumer_generation_id=1,
                                consumer=consumer)
    await shell.handle_taken(faust_app, taken(10))
    assert consumer.held == {clicks0} and clicks0 not in consumer._get_active_partitions()
    later = taken(11, 12) + [SimpleNamespace(message=SimpleNamespace(
        topic="streamrec.clicks", partition=1, offset=5, key=b"v", value=b"{}", timestamp=None, generation_id=1))]
    await shell.handle_taken(faust_app, later)
    assert shell.handler.handled == [[], [5]]  # partition 0's events wait for the redelivery
    assert [ev.message.offset for ev in later] == [5]  # only the handled one is acknowledged


def test_a_working_directory_the_worker_cannot_write_is_a_sentence(tmp_path, monkeypatch):
    """Faust's data folder lives under the working directory: a service started in a read-only
    one got a raw OSError traceback."""
    (tmp_path / ".run").write_text("a file where the folder goes")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="WorkingDirectory="):
        create_app(Settings.from_env({}), load_model=False, store=InMemoryUserStateStore())


async def test_no_model_registered_is_said_at_start_not_every_five_seconds(tmp_path, caplog):
    settings = Settings.from_env({"STREAMREC_MODEL_DIR": str(tmp_path / "models")})
    with caplog.at_level(logging.WARNING, "streamrec"):
        shell = create_app(settings, store=InMemoryUserStateStore()).streamrec  # looks for a model at start
        for _ in range(3):
            await shell.reload_scorer()  # the timer's look, every 5 s
    assert shell.step.scorer is None
    assert caplog.text.count("no Transformer model registered") == 1


def test_the_kafka_clients_repeated_errors_are_thinned(caplog):
    """With the broker away aiokafka logged ~200 lines in 10 s per message (its fetcher, its
    client's reconnects): one of each goes through per 10 s, saying how many it stands for."""
    logs.configure(logging.INFO)
    with caplog.at_level(logging.ERROR):
        for name, template in (("aiokafka", "Unable connect to node with id %s: %s"),
                               ("aiokafka.consumer.fetcher", "Failed fetch messages from %s: %s")):
            for _ in range(50):
                logging.getLogger(name).error(template, 1, "Connect call failed")
    assert caplog.text.count("Unable connect to node") == 1 and caplog.text.count("Failed fetch messages") == 1


async def test_a_redis_refusal_is_logged_with_its_reason(caplog):
    """redis-py's ResponseError shows no message in its repr ("server:ResponseError"): with
    STREAMREC_REDIS_URL naming database 99 the log never said "DB index is out of range"."""
    shell = make_app().streamrec
    failures = [redis.exceptions.ResponseError("DB index is out of range")]

    async def call():
        if failures:
            raise failures.pop()
        return "loaded"

    with caplog.at_level(logging.WARNING, "streamrec"):
        assert await shell.retry_redis("load the models' snapshot", call) == "loaded"
    assert "ResponseError: DB index is out of range" in caplog.text


def test_a_thinned_line_that_counts_what_it_held_back_formats_in_the_workers_log():
    """mode's formatter (the worker's log) turns a record's args of None into (None,): the line
    saying how many were held back failed to format, and the log had a "--- Logging error ---"
    traceback instead, once every 10 s for each message, while the broker was away."""
    clock = iter([0.0, 1.0, 12.0]).__next__
    thinned = logs.Thinned(10.0, clock)
    records = [logging.LogRecord("aiokafka", logging.ERROR, "f", 1, "Unable connect to node with id %s: %s",
                                 (1, "Connect call failed"), None) for _ in range(3)]
    assert [thinned.filter(r) for r in records] == [True, False, True]
    formatter = ExtensionFormatter(stream=io.StringIO(), fmt="%(message)s")
    assert formatter.format(records[2]) == "Unable connect to node with id 1: Connect call failed (1 more like it in the last 12 s)"


def test_thinning_keeps_the_kafka_clients_information_and_tells_partitions_apart(caplog):
    """Only repeated warnings and errors are thinned: each rebalance's 'Joined group' goes
    through, and an error about another partition is another line."""
    logs.configure(logging.INFO)
    with caplog.at_level(logging.INFO, "aiokafka.consumer.group_coordinator"), \
            caplog.at_level(logging.INFO, "aiokafka.consumer.fetcher"):  # whatever an earlier test set them to
        for generation in range(3):
            logging.getLogger("aiokafka.consumer.group_coordinator").info("Joined group %r (generation %s)", "g",
                                                                          generation)
        for partition in range(3):
            logging.getLogger("aiokafka.consumer.fetcher").error("Unexpected error for %s", f"clicks-{partition}")
    assert [caplog.text.count(f"generation {g})") for g in range(3)] == [1, 1, 1]
    assert [caplog.text.count(f"for clicks-{p}") for p in range(3)] == [1, 1, 1]


@pytest.mark.parametrize(("first", "second", "said"), [
    (signal.SIGINT, signal.SIGTERM, "SIGTERM after Ctrl-C"),
    (signal.SIGTERM, signal.SIGINT, "Ctrl-C after SIGTERM"),
    (signal.SIGTERM, signal.SIGTERM, "SIGTERM again"),
    (signal.SIGINT, signal.SIGINT, "Ctrl-C again"),
])
def test_the_second_stop_signal_is_logged_as_what_happened(first, second, said, monkeypatch, caplog):
    worker = Worker(make_app(), loglevel="info", quiet=True)
    exits: list[int] = []
    monkeypatch.setattr(app_module, "exit_now", exits.append)
    # the first signal's shutdown is mode's to schedule; here it only marks the worker as stopping
    monkeypatch.setattr(worker, "_schedule_shutdown", lambda sig: setattr(worker, "_signal_stop_time", 1.0))
    handlers = {signal.SIGINT: worker._on_sigint, signal.SIGTERM: worker._on_sigterm}
    with caplog.at_level(logging.WARNING):
        handlers[first]()
        assert exits == []
        handlers[second]()
    assert exits == [128 + second]
    assert f"{said}: exiting now; the batch in hand is not committed" in caplog.text


async def test_a_periodic_duty_that_raises_is_counted_and_logged_and_the_worker_goes_on(caplog):
    """mode crashes a Faust app whose timer raises: a bug in a snapshot, a readiness check or a
    lag reading stopped the whole worker."""
    metrics = Metrics(CollectorRegistry())
    calls = []

    async def buggy() -> None:
        calls.append(1)
        raise KeyError("a bug")

    run = app_module.surviving("watch_lag_and_readiness", buggy, metrics)
    await run()
    await run()  # again at its next interval
    assert len(calls) == 2
    assert metrics.registry.get_sample_value("streamrec_timer_failures_total",
                                             {"timer": "watch_lag_and_readiness"}) == 2
    assert "periodic watch_lag_and_readiness raised; the worker goes on" in caplog.text and "KeyError" in caplog.text

    async def stopped() -> None:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):  # a stop still stops it
        await app_module.surviving("heartbeat", stopped, metrics)()


async def test_each_ended_run_of_a_periodic_duty_is_counted_whether_it_raised_or_not():
    """What a test (or an operator) waits on to know that a timer has run again since."""
    metrics = Metrics(CollectorRegistry())
    outcomes = iter([None, KeyError("a bug"), None, asyncio.CancelledError()])

    async def duty() -> None:
        outcome = next(outcomes)
        if outcome is not None:
            raise outcome

    run = app_module.surviving("reload_scorer", duty, metrics)
    for _ in range(3):
        await run()
    with pytest.raises(asyncio.CancelledError):  # a stop: not a run that ended
        await run()
    sample = metrics.registry.get_sample_value
    assert sample("streamrec_timer_runs_total", {"timer": "reload_scorer"}) == 3
    assert sample("streamrec_timer_failures_total", {"timer": "reload_scorer"}) == 1


def test_every_timer_of_the_worker_survives_what_its_duty_raises(monkeypatch):
    wrapped: list[str] = []
    real = app_module.surviving

    def recording(name, duty, metrics):
        wrapped.append(name)
        return real(name, duty, metrics)

    monkeypatch.setattr(app_module, "surviving", recording)
    app = create_app(Settings.from_env({}), load_model=False, store=InMemoryUserStateStore())
    timers = [task for task in app._app_tasks if getattr(task, "__name__", "") not in ("on_start",)]
    assert sorted(wrapped) == sorted(["snapshot_models", "snapshot_soon", "reload_scorer", "heartbeat",
                                      "count_frozen_objects", "watch_lag_and_readiness", "read_topic_ids_until_known"])
    assert len(timers) == len(wrapped)  # no timer left unwrapped
