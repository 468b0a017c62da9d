"""Model snapshots in a forked child (stream/snapshots.py): the worker waits only for the fork."""

from __future__ import annotations

import asyncio
import os
import pickle
import time

import pytest
import redis

from online_models import Recommender
from online_models.datasets import synthetic_interactions
from stream import snapshots

pytestmark = pytest.mark.skipif(not snapshots.can_fork(), reason="os.fork is POSIX only")


async def test_the_child_sees_the_models_as_they_were_at_the_fork(tmp_path):
    rec = Recommender.default()
    for x in synthetic_interactions(n_events=500, seed=1):
        rec.learn_one(x)
    out = tmp_path / "snapshot"

    def slow_snapshot() -> None:
        time.sleep(0.3)  # the parent goes on learning meanwhile
        out.write_bytes(rec.snapshot())

    pid = snapshots.fork_call(slow_snapshot)
    # back before the child is done (not reaped here: os.waitpid answers (0, 0) while it runs);
    # a bound on fork_call's time failed on a loaded machine, where the fork alone took 0.29 s
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)
    for x in synthetic_interactions(n_events=200, seed=2):
        rec.learn_one(x)
    assert await snapshots.wait_child(pid, timeout_s=30) == 0
    restored = Recommender.restore(out.read_bytes())
    assert restored.n_learned == 500 and rec.n_learned == 700


async def test_a_failing_snapshot_is_an_exit_code_and_the_parent_goes_on(capfd):
    def broken() -> None:
        pickle.dumps(lambda: None)  # not picklable

    pid = snapshots.fork_call(broken)
    assert await snapshots.wait_child(pid, timeout_s=30) == 1
    assert "model snapshot failed in the child process" in capfd.readouterr().err


async def test_a_full_redis_is_said_with_what_to_do(capfd):
    """A Redis at its maxmemory refusing the snapshot: the child said only
    `server:OutOfMemoryError` (redis-py's repr of a server error is its class alone)."""
    def refused() -> None:
        raise redis.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")

    pid = snapshots.fork_call(refused)
    assert await snapshots.wait_child(pid, timeout_s=30) == 1
    err = capfd.readouterr().err
    assert "OutOfMemoryError: command not allowed when used memory > 'maxmemory'.: Redis is full" in err, err
    assert "STREAMREC_STATE_TTL_S" in err


async def test_a_child_that_hangs_is_killed_at_the_timeout():
    pid = snapshots.fork_call(lambda: time.sleep(60))
    start = time.monotonic()
    assert await snapshots.wait_child(pid, timeout_s=0.3) == -9
    assert time.monotonic() - start < 5


async def test_waiting_does_not_block_the_event_loop():
    pid = snapshots.fork_call(lambda: time.sleep(0.5))
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    assert await snapshots.wait_child(pid, timeout_s=30) == 0
    ticker.cancel()
    assert ticks >= 20


def test_the_setting_turns_the_fork_off():
    from stream.settings import Settings

    assert Settings.from_env({}).snapshot_fork is True
    assert Settings.from_env({"STREAMREC_SNAPSHOT_FORK": "false"}).snapshot_fork is False


async def test_a_child_refused_a_lower_priority_still_writes_the_snapshot(tmp_path, monkeypatch):
    """``os.nice`` refused (a sandbox's seccomp policy): the snapshot is written all the same."""
    def refused(increment: int) -> int:
        raise PermissionError("nice refused")

    monkeypatch.setattr(snapshots.os, "nice", refused)  # the child is a copy of this process
    out = tmp_path / "written"
    pid = snapshots.fork_call(lambda: out.write_text("written"), nice=10)
    assert await snapshots.wait_child(pid, timeout_s=30) == 0
    assert out.read_text() == "written"
