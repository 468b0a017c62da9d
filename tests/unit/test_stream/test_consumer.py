"""The per-message hand-over of stream/consumer.py: run a coroutine inline until it waits,
then finish it as a task would (the Faust consumer loop itself runs in the integration tests)."""

from __future__ import annotations

import asyncio
import logging
import time
import types

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.consumer.fetcher import Fetcher
from mode.utils.logging import CompositeLogger

from stream import connections
from stream import consumer as consumer_module
from stream.app import create_app
from stream.connections import fetches_end_empty_at_close
from stream.consumer import Consumer, Transport, adapt_fetches, cancel_within, resume, start
from stream.settings import Settings
from stream.state import InMemoryUserStateStore


async def test_a_coroutine_that_never_waits_finishes_inline():
    async def handover(x):
        return x * 2

    assert start(handover(21)) == (True, 42)


async def test_a_coroutine_that_waits_is_finished_by_resume():
    fut = asyncio.get_running_loop().create_future()
    seen = []

    async def handover():
        seen.append("before")
        await asyncio.sleep(0)  # a bare yield
        value = await fut
        seen.append(value)
        return "done"

    coro = handover()
    done, yielded = start(coro)
    assert not done and seen == ["before"]
    task = asyncio.ensure_future(resume(coro, yielded))
    await asyncio.sleep(0.01)
    assert not task.done()
    fut.set_result("value")
    assert await asyncio.wait_for(task, 1) == "done"
    assert seen == ["before", "value"]


async def test_an_exception_of_the_awaited_future_reaches_the_coroutine():
    fut = asyncio.get_running_loop().create_future()

    async def handover():
        try:
            await fut
        except KeyError:
            return "handled"

    coro = handover()
    _, yielded = start(coro)
    task = asyncio.ensure_future(resume(coro, yielded))
    fut.set_exception(KeyError("x"))
    assert await asyncio.wait_for(task, 1) == "handled"


async def test_cancelling_resume_cancels_the_coroutine_where_it_waits():
    fut = asyncio.get_running_loop().create_future()
    cleaned = []

    async def handover():
        try:
            await fut
        finally:
            cleaned.append(True)

    coro = handover()
    _, yielded = start(coro)
    task = asyncio.ensure_future(resume(coro, yielded))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == [True] and fut.cancelled()


def test_the_transport_uses_this_consumer():
    from stream.consumer import Consumer

    assert Transport.Consumer is Consumer



@pytest.mark.parametrize(("setting", "min_bytes", "wait_ms"), [("7", "FETCH_MIN_BYTES", 7), ("0", 1, 1500)])
async def test_the_worker_fetches_by_size_or_time(setting, min_bytes, wait_ms):
    """STREAMREC_FETCH_MAX_WAIT_MS reaches the aiokafka consumer Faust's thread builds (0:
    Faust's own fetch, 1 byte or 1,500 ms), through attributes aiokafka reads on start."""
    import inspect

    from aiokafka import AIOKafkaConsumer

    from stream import consumer
    from stream.app import create_app
    from stream.settings import Settings
    from stream.state import InMemoryUserStateStore

    app = create_app(Settings.from_env({"STREAMREC_FETCH_MAX_WAIT_MS": setting, "STREAMREC_MODEL_DIR": "/nonexistent"}),
                     store=InMemoryUserStateStore())
    thread = app.consumer._new_consumer_thread()
    assert isinstance(thread, consumer.ConsumerThread)
    kafka_consumer = thread._create_worker_consumer(app.transport)
    try:
        expected = consumer.FETCH_MIN_BYTES if min_bytes == "FETCH_MIN_BYTES" else min_bytes
        assert (kafka_consumer._fetch_min_bytes, kafka_consumer._fetch_max_wait_ms) == (expected, wait_ms)
    finally:
        await kafka_consumer.stop()
    start_source = inspect.getsource(AIOKafkaConsumer.start)  # the installed aiokafka still reads them there
    assert "fetch_min_bytes=self._fetch_min_bytes" in start_source
    assert "fetch_max_wait_ms=self._fetch_max_wait_ms" in start_source


def starts_a_fake_fetcher(fetched):
    """An ``AIOKafkaConsumer.start`` that makes a stand-in fetcher from the attributes aiokafka's
    own start() reads, whose fetches ``fetched(assignment, node_id, request)`` answers."""
    import types

    async def closed():
        pass

    async def fake_start(self):
        self._fetcher = types.SimpleNamespace(_fetch_min_bytes=self._fetch_min_bytes,
                                              _fetch_max_wait_ms=self._fetch_max_wait_ms,
                                              _proc_fetch_request=fetched, close=closed, _records={})

    return fake_start


async def test_an_idle_worker_long_polls_and_a_busy_one_fetches_by_size_or_time(monkeypatch):
    """Once started, the consumer's fetcher asks for 1 byte or IDLE_FETCH_WAIT_MS after a fetch
    that brought nothing, and for FETCH_MIN_BYTES or STREAMREC_FETCH_MAX_WAIT_MS after one that
    brought records, or while records are held back or a partition is paused; the installed
    aiokafka builds each request from those attributes, leaves out the partitions whose records
    are held back, and holds back a broker's next fetch while one is in flight."""
    import inspect
    import types

    from aiokafka import AIOKafkaConsumer
    from aiokafka.consumer.fetcher import Fetcher

    from stream import consumer
    from stream.app import create_app
    from stream.settings import Settings
    from stream.state import InMemoryUserStateStore

    answers = iter([False, False, True, False, False, False, False])

    async def fetched(assignment, node_id, request):
        return next(answers)

    def assignment(paused: bool):  # aiokafka's: its partitions and each one's state
        state = types.SimpleNamespace(paused=paused)
        return types.SimpleNamespace(tps=["clicks-0", "searches-0"], state_value=lambda tp: state)

    monkeypatch.setattr(AIOKafkaConsumer, "start", starts_a_fake_fetcher(fetched))
    app = create_app(Settings.from_env({"STREAMREC_FETCH_MAX_WAIT_MS": "7", "STREAMREC_MODEL_DIR": "/nonexistent"}),
                     store=InMemoryUserStateStore())
    kafka_consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
    try:
        await kafka_consumer.start()
        fetcher = kafka_consumer._fetcher
        modes = []
        # nothing came in the last three: but a partition is paused, then records are held back
        # (Faust did not take them: its buffer is full), then neither
        for paused, held in ((False, False),) * 4 + ((True, False), (False, True), (False, False)):
            fetcher._records = {"clicks-0": "records not taken yet"} if held else {}
            await fetcher._proc_fetch_request(assignment(paused), 0, None)
            modes.append((fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms))
        idle, busy = (1, consumer.IDLE_FETCH_WAIT_MS), (consumer.FETCH_MIN_BYTES, 7)
        assert modes == [idle, idle, busy, idle, busy, busy, idle]
    finally:
        await kafka_consumer.stop()
    request_source = inspect.getsource(Fetcher._get_actions_per_node)
    assert "self._fetch_max_wait_ms" in request_source and "self._fetch_min_bytes" in request_source
    assert "return needs_wakeup" in inspect.getsource(Fetcher._proc_fetch_request)
    assert "node_id in self._in_flight" in request_source and "tp_state.paused" in request_source
    assert "if tp in self._records" in request_source


async def test_a_saturated_worker_fetches_about_once_a_batch(monkeypatch):
    """The worker's fetch pacer (app.transport.fetch_pacer, told each batch's handling time by
    the shell) lengthens the wait of a fetch that follows records to about a batch's handling
    time when that is longer than STREAMREC_FETCH_MAX_WAIT_MS, at most PACED_FETCH_CAP times
    it; an idle worker's long poll is unchanged, and so is the wait of a worker that keeps up."""

    from aiokafka import AIOKafkaConsumer

    from stream import consumer
    from stream.app import create_app
    from stream.settings import Settings
    from stream.state import InMemoryUserStateStore

    async def fetched(assignment, node_id, request):
        return request == "records"

    monkeypatch.setattr(AIOKafkaConsumer, "start", starts_a_fake_fetcher(fetched))
    app = create_app(Settings.from_env({"STREAMREC_FETCH_MAX_WAIT_MS": "10", "STREAMREC_MODEL_DIR": "/nonexistent"}),
                     store=InMemoryUserStateStore())
    pacer = app.transport.fetch_pacer
    assert pacer is app.streamrec.fetch_pacer is not None
    kafka_consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
    try:
        await kafka_consumer.start()
        fetcher = kafka_consumer._fetcher
        waits = []
        for batch_s in (0.004, 0.025, 2.0):  # keeping up; saturated; a backlog's big batches
            for _ in range(40):
                pacer.observe(batch_s)
            await fetcher._proc_fetch_request(None, 0, "records")
            waits.append(fetcher._fetch_max_wait_ms)
            await fetcher._proc_fetch_request(None, 0, "empty")
            assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (1, consumer.IDLE_FETCH_WAIT_MS)
        assert waits == [10, 25, 10 * consumer.PACED_FETCH_CAP]
    finally:
        await kafka_consumer.stop()
    unpaced = create_app(Settings.from_env({"STREAMREC_FETCH_MAX_WAIT_MS": "0", "STREAMREC_MODEL_DIR": "/nonexistent"}),
                         store=InMemoryUserStateStore())
    assert unpaced.transport.fetch_pacer is None and unpaced.streamrec.fetch_pacer is None


def test_the_installed_faust_loop_is_the_one_the_worker_copied():
    """stream/consumer.py's Consumer._drain_messages is a modified copy of Faust's. When the
    installed Faust's loop is another one, the copy would silently drop its changes."""
    from importlib.metadata import version

    from faust.transport.drivers import aiokafka as faust_aiokafka

    from stream.consumer import FAUST_DRAIN_MESSAGES_FINGERPRINT, source_fingerprint

    installed = faust_aiokafka.Consumer._drain_messages  # the method stream's Consumer overrides
    assert source_fingerprint(installed) == FAUST_DRAIN_MESSAGES_FINGERPRINT, (
        f"faust-streaming {version('faust-streaming')} has another Consumer._drain_messages than the "
        "0.11.0-0.15.3 one that stream/consumer.py copies. Diff the installed function "
        f"({installed.__module__}) with the copy, carry its changes into stream.consumer.Consumer."
        "_drain_messages, then set FAUST_DRAIN_MESSAGES_FINGERPRINT to "
        f"{source_fingerprint(installed)!r} and widen the faust-streaming pin in pyproject.toml "
        "(or install a release in the pinned range)."
    )


def test_the_fingerprint_ignores_layout_and_sees_code():
    from stream.consumer import source_fingerprint

    def f(x):
        return x + 1

    same = "def f(x):\n    # a comment\n\n    return x+1\n"
    indented = "    def f(x):\n        return (x\n                + 1)\n"
    assert source_fingerprint(f) == source_fingerprint(same)
    assert source_fingerprint(same) != source_fingerprint(indented)  # the parentheses are code
    assert source_fingerprint(f) != source_fingerprint("def f(x):\n    return x + 2\n")
    assert source_fingerprint("def f(x):\n    if x:\n        g()\n    h()\n") != \
        source_fingerprint("def f(x):\n    if x:\n        g()\n        h()\n")  # the blocks count


async def test_a_failed_fetch_is_logged_with_its_text_cut_short(caplog):
    """The loop's last resort logged ``%r`` of the exception and its whole traceback: an error
    that quotes a 1 MB record was two 1 MB log lines."""
    huge = "x" * 1_000_000

    def getmany(timeout):
        raise RuntimeError(f"fetch failed: {huge}")

    stopped = types.SimpleNamespace(is_set=lambda: False)
    consumer = types.SimpleNamespace(
        callback=None, getmany=getmany, _stopped=stopped, _read_offset={}, _commit_every=10_000,
        app=types.SimpleNamespace(topics=types.SimpleNamespace(acks_enabled_for=lambda topic: True)),
        _buffered_partitions=set(), consumer_stopped_errors=(), log=CompositeLogger(Consumer.logger))
    with caplog.at_level(logging.ERROR, logger=Consumer.logger.name), pytest.raises(RuntimeError):
        await Consumer._drain_messages(consumer, types.SimpleNamespace(_stopped=stopped))
    [record] = caplog.records
    assert record.getMessage().startswith("Drain messages raised: RuntimeError: fetch failed: xxx")
    assert len(record.getMessage()) < 400
    assert "RuntimeError: fetch failed: xxx" in caplog.text and len(caplog.text) < 3_000  # the traceback too


async def never_answers(*args, **kwargs) -> bool:
    """A commit whose broker never answers (aiokafka waits for a group coordinator for ever)."""
    await asyncio.Event().wait()
    return True


async def answers(*args, **kwargs) -> bool:
    return True


@pytest.mark.parametrize(("commit", "in_flight", "skipped"), [
    (never_answers, False, True), (never_answers, True, True), (answers, False, False), (answers, True, False),
], ids=["no-answer", "no-answer-with-a-periodic-commit-waiting", "answered", "answered-with-a-periodic-commit"])
async def test_the_final_commit_is_given_up_when_the_broker_does_not_answer(monkeypatch, caplog, commit, in_flight,
                                                                            skipped):
    """Faust's stop waits for its final commit, which with the broker away waited for ever: a
    worker with events acknowledged since the last commit did not stop until the broker came
    back. Now it is given up after STOP_COMMIT_S, and said so; also when the periodic commit is in
    flight, waiting too (Faust's commit then swallows the first cancellation of its wait and
    starts its own: asyncio.wait_for would wait for ever)."""
    monkeypatch.setattr(consumer_module, "STOP_COMMIT_S", 0.3)
    app = create_app(Settings.from_env({"STREAMREC_MODEL_DIR": "/nonexistent"}), store=InMemoryUserStateStore())
    consumer = app.consumer
    assert isinstance(consumer, Consumer)
    consumer.force_commit = commit  # what Faust's commit() awaits: offsets to aiokafka's commit, in the thread
    # Faust's commit every broker_commit_interval, in flight as the stop begins
    periodic = asyncio.ensure_future(consumer.commit() if in_flight else asyncio.sleep(0))
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger=Consumer.logger.name):
        await asyncio.wait_for(consumer.commit_and_end_transactions(), 5)
    assert time.monotonic() - started < 0.3 + consumer_module.STOP_COMMIT_CANCEL_S + 0.5
    assert ("the final commit is skipped" in caplog.text) is skipped
    periodic.cancel()
    await asyncio.wait({periodic}, timeout=1)
    assert periodic.done()


async def test_a_task_that_goes_on_past_a_cancellation_is_cancelled_again():
    swallowed = []

    async def swallows_one():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(True)
        await asyncio.Event().wait()

    task = asyncio.ensure_future(swallows_one())
    await asyncio.sleep(0)
    assert await cancel_within(task, 1.0)
    assert swallowed == [True] and task.cancelled()


async def test_a_task_that_never_ends_is_left_after_the_time_given():
    ended = asyncio.Event()

    async def ends_only_when_told():
        while not ended.is_set():
            try:
                await ended.wait()
            except asyncio.CancelledError:
                pass

    task = asyncio.ensure_future(ends_only_when_told())
    await asyncio.sleep(0)
    started = time.monotonic()
    assert not await cancel_within(task, 0.2)
    assert 0.2 <= time.monotonic() - started < 1.0
    ended.set()
    await asyncio.wait_for(task, 1)


async def test_the_consumer_thread_is_not_waited_for_at_exit():
    """A stop waits THREAD_STOP_S for the consumer thread; past that, the interpreter waited for
    it at exit, up to Faust's 90 s broker_request_timeout with a broker that stopped answering."""
    app = create_app(Settings.from_env({"STREAMREC_MODEL_DIR": "/nonexistent"}), store=InMemoryUserStateStore())
    thread = app.consumer._new_consumer_thread()
    assert thread.shutdown_timeout == consumer_module.THREAD_STOP_S
    assert thread.Worker(thread).daemon  # the threading.Thread that runs it (not started here)


async def test_a_fetch_in_flight_when_the_consumer_stops_ends_quietly():
    """aiokafka's own ``Fetcher.close`` cancels each fetch in flight and awaits it unguarded: a
    worker stopped while its broker was away (the fetch retrying in its back-off) logged the
    CancelledError's traceback from the consumer thread, 60 lines of it, and a reader's stop
    raised it. Cancelled by close, a fetch ends empty, under the worker's fetch pacing (here)
    as under a plain reader; cancelled by anything else, it stays cancelled."""
    retrying = asyncio.Event()

    async def broker_away(assignment, node_id, request):
        retrying.set()
        await asyncio.Event().wait()  # aiokafka's back-off before it tries the broker again

    fetcher = object.__new__(Fetcher)  # the real close(), on the attributes it reads
    fetcher._proc_fetch_request, fetcher._records = broker_away, {}
    fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = 1, 500
    fetches_end_empty_at_close(fetcher)
    adapt_fetches(fetcher, 1 << 20, 10)
    fetcher._closed, fetcher._fetch_waiters = False, set()
    fetcher._fetch_task = asyncio.ensure_future(asyncio.Event().wait())
    in_flight = asyncio.ensure_future(fetcher._proc_fetch_request(None, 0, None))
    fetcher._pending_tasks = {in_flight}
    await retrying.wait()
    await Fetcher.close(fetcher)
    assert in_flight.result() is False

    retrying.clear()
    other = asyncio.ensure_future(fetcher._proc_fetch_request(None, 0, None))
    await retrying.wait()
    fetcher._closed = False  # a cancellation that is not the consumer's close
    other.cancel()
    with pytest.raises(asyncio.CancelledError):
        await other


async def test_the_workers_consumer_and_every_reader_guard_their_fetches_at_close(monkeypatch):
    """The guard is on the worker's consumer, paced or not, and on started_reader's consumers
    (the replay, the catalogue, the peer reader): aiokafka's start() builds the fetcher."""
    guarded = []
    monkeypatch.setattr(consumer_module, "fetches_end_empty_at_close", guarded.append)
    monkeypatch.setattr(connections, "fetches_end_empty_at_close", guarded.append)

    async def fetched(assignment, node_id, request):
        return False

    monkeypatch.setattr(AIOKafkaConsumer, "start", starts_a_fake_fetcher(fetched))
    for env in ({"STREAMREC_FETCH_MAX_WAIT_MS": "7"}, {}):
        app = create_app(Settings.from_env({**env, "STREAMREC_MODEL_DIR": "/nonexistent"}), store=InMemoryUserStateStore())
        kafka_consumer = app.consumer._new_consumer_thread()._create_worker_consumer(app.transport)
        await kafka_consumer.start()
        assert guarded[-1] is kafka_consumer._fetcher
        await kafka_consumer.stop()
    reader = await connections.started_reader({"bootstrap_servers": "127.0.0.1:1"}, 10)
    assert guarded[-1] is reader._fetcher and len(guarded) == 3
    await reader.stop()
