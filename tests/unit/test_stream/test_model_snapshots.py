"""The snapshot service (stream/snapshots.py ModelSnapshots) over any store, and the shell on the in-memory store."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest

from online_models import Recommender
from online_models.datasets import synthetic_interactions
from stream import snapshots
from stream.app import create_app
from stream.handler import RawMessage
from stream.prometheus import Metrics
from stream.records import ClickEvent, encode
from stream.settings import Settings
from stream.shell import FIRST_SNAPSHOT_DELAY_S
from stream.snapshots import SNAPSHOT_KEY, ModelSnapshots
from stream.state import InMemoryUserStateStore


def trained(n: int = 400) -> Recommender:
    rec = Recommender.default()
    for x in synthetic_interactions(n_events=n, seed=3):
        rec.learn_one(x)
    return rec


async def no_retry(what, call):
    return await call()


def count(metrics: Metrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


class FileStore(InMemoryUserStateStore):
    """A store a forked child can write to: its blobs are files."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    async def get_blob(self, name: str) -> bytes | None:
        path = self.root / name.replace(":", "_")
        return path.read_bytes() if path.exists() else None

    def blob_writer(self, name: str):
        path = self.root / name.replace(":", "_")
        return path.write_bytes


class NiceFileStore(FileStore):
    """A FileStore whose writer also notes the niceness of the process that writes."""

    def blob_writer(self, name: str):
        write = super().blob_writer(name)

        def written(data: bytes) -> None:
            (self.root / "niceness").write_text(str(os.nice(0)))
            write(data)
        return written


class DownStore(InMemoryUserStateStore):
    async def set_blob(self, name: str, data: bytes) -> None:
        raise ConnectionError("store down")


@pytest.mark.skipif(not snapshots.can_fork(), reason="os.fork is POSIX only")
async def test_the_forked_child_runs_niced_and_its_time_is_measured(tmp_path):
    """The child encodes on a core the worker's neighbours (the broker, another worker) may
    need: it yields to them (SNAPSHOT_NICE), and how long it took is a gauge."""
    store, metrics = NiceFileStore(tmp_path), Metrics()
    service = ModelSnapshots(store, metrics, asyncio.Lock(), fork=True)
    assert await service.take(trained)
    assert int((tmp_path / "niceness").read_text()) == min(19, os.nice(0) + snapshots.SNAPSHOT_NICE)
    assert snapshots.SNAPSHOT_NICE > 0
    took = count(metrics, "streamrec_model_snapshot_seconds")
    assert 0 < took < 30 and took >= count(metrics, "streamrec_model_snapshot_pause_seconds")


async def test_a_snapshot_taken_in_memory_restores_the_same_models():
    store, metrics = InMemoryUserStateStore(), Metrics()
    service = ModelSnapshots(store, metrics, asyncio.Lock(), fork=True)  # in memory: no child can write
    rec = trained()
    assert store.blob_writer(SNAPSHOT_KEY) is None
    assert await service.take(lambda: rec)
    restored = await service.restore(no_retry)
    assert restored is not None and restored.n_learned == rec.n_learned == 400
    assert count(metrics, "streamrec_model_snapshots_total", result="ok") == 1


@pytest.mark.skipif(not snapshots.can_fork(), reason="os.fork is POSIX only")
async def test_a_store_a_child_can_write_to_gets_the_snapshot_from_a_forked_child(tmp_path):
    store, metrics = FileStore(tmp_path), Metrics()
    service = ModelSnapshots(store, metrics, asyncio.Lock(), signing_key="k", fork=True)
    rec = trained()
    assert await service.take(lambda: rec)
    assert (tmp_path / SNAPSHOT_KEY.replace(":", "_")).exists()  # written by the child, not by set_blob
    assert await store.get_blob(SNAPSHOT_KEY) is not None and store._blobs == {}
    restored = await service.restore(no_retry)
    assert restored is not None and restored.n_learned == 400


async def test_a_forged_or_foreign_snapshot_is_refused_counted_and_the_worker_starts_empty():
    store, metrics = InMemoryUserStateStore(), Metrics()
    await store.set_blob(SNAPSHOT_KEY, trained().snapshot("someone else's key"))
    service = ModelSnapshots(store, metrics, asyncio.Lock(), signing_key="ours")
    assert await service.restore(no_retry) is None
    await store.set_blob(SNAPSHOT_KEY, b"not a snapshot")
    assert await service.restore(no_retry) is None
    assert count(metrics, "streamrec_model_snapshot_refused_total") == 2


async def test_no_snapshot_yet_is_no_models():
    service = ModelSnapshots(InMemoryUserStateStore(), Metrics(), asyncio.Lock())
    assert await service.restore(no_retry) is None


async def test_a_store_that_is_down_fails_the_snapshot_and_says_so(caplog):
    metrics = Metrics()
    service = ModelSnapshots(DownStore(), metrics, asyncio.Lock(), fork=False)
    assert not await service.take(lambda: trained(50))
    assert count(metrics, "streamrec_model_snapshots_total", result="failed") == 1
    assert "could not store the online models' snapshot" in caplog.text


async def test_models_that_cannot_be_encoded_in_process_fail_the_snapshot_not_the_worker(caplog):
    """STREAMREC_SNAPSHOT_FORK=false and a model the codec cannot write (a bug): the error escaped
    the snapshot timer, which mode turns into a crash of the worker; in a forked child it is an
    exit code, counted."""
    models = trained(50)
    models.learners["trending"].unwritable = object()  # no class the codec knows
    metrics = Metrics()
    service = ModelSnapshots(InMemoryUserStateStore(), metrics, asyncio.Lock(), fork=False)
    assert not await service.take(lambda: models)
    assert count(metrics, "streamrec_model_snapshots_total", result="failed") == 1
    assert "the online models' snapshot failed; the worker goes on" in caplog.text


async def test_the_snapshot_waits_for_the_batch_in_hand():
    busy = asyncio.Lock()
    service = ModelSnapshots(InMemoryUserStateStore(), Metrics(), busy, fork=False)
    await busy.acquire()  # a batch is being handled
    taking = asyncio.ensure_future(service.take(lambda: trained(50)))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(taking), 0.2)
    busy.release()
    assert await asyncio.wait_for(taking, 10)


async def test_the_shell_restores_and_snapshots_over_the_in_memory_store():
    store = InMemoryUserStateStore()
    await store.set_blob(SNAPSHOT_KEY, trained().snapshot())
    app = create_app(Settings.from_env({}), load_model=False, store=store)
    shell = app.streamrec
    assert shell.store.inner is store  # behind the cache of what the worker saved last (stream/state.py)
    await shell.restore_models()
    assert shell.restored.is_set() and shell.step.recommender.n_learned == 400
    shell.step.recommender.learn_many((x, None) for x in synthetic_interactions(n_events=10, seed=9))
    await shell.snapshot_models()  # models not ready yet (nothing replayed): no snapshot over a good one
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 400
    shell.models_ready.set()
    await shell.snapshot_models()
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 410


async def test_a_restored_snapshot_serves_with_the_settings_of_this_start_not_of_the_snapshots_worker(caplog):
    """The blend's tunables are settings: a worker restarted with STREAMREC_TOP_K=5 and new blend
    weights must serve with them, not with those the snapshot's worker ran under."""
    store = InMemoryUserStateStore()
    await store.set_blob(SNAPSHOT_KEY, trained().snapshot())  # k 20, the default weights
    settings = Settings.from_env({"STREAMREC_TOP_K": "5", "STREAMREC_CANDIDATES": "30",
                                  "STREAMREC_BLEND_WEIGHTS": "covisit=2.5,mf=0.2"})
    shell = create_app(settings, load_model=False, store=store).streamrec
    with caplog.at_level(logging.INFO, "streamrec.snapshots"):
        await shell.restore_models()
    config = shell.step.recommender.config
    assert shell.step.recommender.n_learned == 400  # the snapshot's models
    assert (config.k, config.n_candidates, config.weights["covisit"]) == (5, 30, 2.5)
    assert "STREAMREC_* settings of this start" in caplog.text
    assert "weighs mf, which the models' snapshot has no learner for" in caplog.text


async def test_a_snapshot_forgets_erasures_older_than_kafka_keeps_their_events():
    """The forgotten set is bounded: at each snapshot the shell drops the users whose bound is
    older than the raw topics' retention plus a segment roll and an hour (Kafka holds none of
    their older events), keeps the recent ones, and reports how many it still refuses."""
    store = InMemoryUserStateStore()
    settings = Settings.from_env({"STREAMREC_RAW_RETENTION_H": "2"})  # kept 2 + 2 + 1 hours
    assert settings.forgotten_kept_ms == 5 * 3_600_000
    app = create_app(settings, load_model=False, store=store)
    shell = app.streamrec
    shell.models_ready.set()
    models = shell.step.recommender
    now = time.time_ns() // 1_000_000
    models.forget_user("old", now - 6 * 3_600_000)
    models.forget_user("recent", now - 4 * 3_600_000)
    await shell.snapshot_models()
    assert not models.refuses("old", now - 7 * 3_600_000)  # Kafka no longer holds such an event
    assert models.refuses("recent", now - 5 * 3_600_000)
    assert count(shell.metrics, "streamrec_forgotten_users_remembered") == 1
    restored = Recommender.restore(await store.get_blob(SNAPSHOT_KEY))
    assert restored.forgotten_users == 1 and restored.refuses("recent", now - 5 * 3_600_000)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _published(*args, **kwargs) -> None:
    return None


def first_batch(n: int = 20) -> list[RawMessage]:
    return [RawMessage("clicks", 0, o, f"u{o % 3}".encode(),
                       encode(ClickEvent(event_id=f"e{o}", user_id=f"u{o % 3}", item_id=f"i{o % 7}",
                                         ts=1_700_000_000_000 + o)), None, 0) for o in range(n)]


async def snapshots_by(shell, clock: Clock, until_s: float) -> float | None:
    """Run the one-second snapshot timer up to ``until_s`` on the fake clock: when a snapshot was
    in the store first (None: not by then)."""
    start = clock.now
    while clock.now - start <= until_s:
        await shell.snapshot_soon()
        if await shell.store.get_blob(SNAPSHOT_KEY) is not None:
            return clock.now - start
        clock.now += 1.0
    return None


async def test_a_fresh_worker_snapshots_its_models_seconds_after_its_first_batch_not_at_the_interval():
    """serve ranks with the workers' snapshot: a worker that started with none, and learned its
    first batch, must write one within seconds (FIRST_SNAPSHOT_DELAY_S), not at the first
    STREAMREC_SNAPSHOT_INTERVAL_S (300 s), when serve would answer empty lists until then."""
    store, clock = InMemoryUserStateStore(), Clock()
    shell = create_app(Settings.from_env({"STREAMREC_SNAPSHOT_FORK": "false"}), load_model=False,
                       store=store).streamrec
    shell.handler.publish = _published
    shell.clock = clock
    await shell.restore_models()  # none in the store
    shell.models_ready.set()
    assert await snapshots_by(shell, clock, 30) is None  # nothing learned: nothing to snapshot early
    await shell.handler.handle_isolated(first_batch())
    assert shell.step.recommender.n_learned == 20
    taken = await snapshots_by(shell, clock, 300)
    assert taken is not None and taken <= FIRST_SNAPSHOT_DELAY_S + 1
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 20
    # only the first: more learning waits for the interval timer
    await shell.handler.handle_isolated(first_batch(40)[20:])
    await store.set_blob(SNAPSHOT_KEY, b"")
    clock.now += 600
    await shell.snapshot_soon()
    assert await store.get_blob(SNAPSHOT_KEY) == b""


async def test_a_restored_worker_snapshots_early_only_once_its_models_learned_past_the_snapshot():
    store, clock = InMemoryUserStateStore(), Clock()
    await store.set_blob(SNAPSHOT_KEY, trained().snapshot())
    shell = create_app(Settings.from_env({"STREAMREC_SNAPSHOT_FORK": "false"}), load_model=False,
                       store=store).streamrec
    shell.clock = clock
    await shell.restore_models()
    for _ in range(30):  # not ready yet, then ready with nothing learned past the snapshot
        await shell.snapshot_soon()
        clock.now += 1.0
        shell.models_ready.set()
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 400
    shell.step.recommender.learn_many((x, None) for x in synthetic_interactions(n_events=10, seed=9))
    for _ in range(int(FIRST_SNAPSHOT_DELAY_S) + 1):
        await shell.snapshot_soon()
        clock.now += 1.0
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 410


@pytest.mark.skipif(not snapshots.can_fork(), reason="os.fork is POSIX only")
async def test_a_fork_that_fails_fails_the_snapshot_and_an_erasure_still_asks_for_one(tmp_path, monkeypatch, caplog):
    """``os.fork`` raises where the kernel refuses a child (ENOMEM under strict overcommit, EAGAIN
    at a container's pids limit). It escaped ``take`` and the snapshot timer, and Faust crashes
    the worker on a timer that raises (mode's ``_execute_task``); and the erasure's request for
    a snapshot was cleared first, so the store's snapshot went on holding the user until the
    next interval. A failed fork is a failed snapshot: counted, said, tried again."""
    store = FileStore(tmp_path)
    shell = create_app(Settings.from_env({}), load_model=False, store=store).streamrec
    await shell.restore_models()
    shell.models_ready.set()
    shell.step.recommender.learn_many((x, None) for x in synthetic_interactions(n_events=10, seed=9))
    shell.forgets_pending.set()  # a user was erased: the one-second timer asks for a snapshot

    def no_child():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(snapshots.os, "fork", no_child)
    with caplog.at_level(logging.ERROR, "streamrec.snapshots"):
        await shell.snapshot_soon()
    assert count(shell.metrics, "streamrec_model_snapshots_total", result="failed") == 1
    assert "could not start the process that writes the online models' snapshot" in caplog.text
    assert "Cannot allocate memory" in caplog.text and "Traceback" not in caplog.text
    assert shell.forgets_pending.is_set() and await store.get_blob(SNAPSHOT_KEY) is None
    monkeypatch.undo()  # the kernel gives a child again: the next tick takes the snapshot
    await shell.snapshot_soon()
    assert Recommender.restore(await store.get_blob(SNAPSHOT_KEY)).n_learned == 10
    assert not shell.forgets_pending.is_set()
