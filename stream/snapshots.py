"""The online models' snapshots: restored at start, taken every interval without stopping the worker.

:class:`ModelSnapshots` is the worker's snapshot service. It works over any
:class:`~stream.state.UserStateStore` (the snapshot is one of the store's blobs), and
:meth:`~ModelSnapshots.take` encodes the models in a forked child where it can:

Encoding the models (online_models/codec.py) on the event loop stops the worker for as long as
it takes, and that grows with the models: 300 ms for a model that learned the 110,300-event
Taobao log, once every ``STREAMREC_SNAPSHOT_INTERVAL_S``. ``os.fork()`` instead copies the
process's page tables (5 ms for the same model), and the child, which sees the models exactly as
they were at the fork (copy-on-write), encodes them and writes them to Redis over its own connection
while the worker goes on. The parent polls for the child's exit without blocking.

The child runs only ``work`` and leaves with ``os._exit``: no atexit handlers, no logging
(another thread may have held the logging lock at the fork), no event loop. It ignores
SIGINT, so a Ctrl-C to the terminal's process group stops the worker (which drains as
usual) while an unfinished snapshot still completes. Where there is no ``os.fork`` (not
POSIX), ``STREAMREC_SNAPSHOT_FORK=false``, or a store a child cannot write to (in memory), the
models are encoded on the loop.

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "out"
>>> pid = fork_call(lambda: path.write_text("written by the child"))
>>> import asyncio
>>> asyncio.run(wait_child(pid, timeout_s=10))
0
>>> path.read_text()
'written by the child'
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from online_models import Recommender, RecommenderConfig
from stream.errors import described, redis_advice
from stream.prometheus import Metrics
from stream.state import UserStateStore

log = logging.getLogger("streamrec.snapshots")

#: the store's blob that holds the models
SNAPSHOT_KEY = "models:snapshot"
T = TypeVar("T")

#: how often the parent checks whether the child has exited
POLL_S = 0.05
#: the niceness the snapshot's child adds to the worker's: on two busy cores a child at the worker's
#: priority took CPU from the workers and the broker for as long as it encoded (two workers at
#: 2,000 events/s: p99 34.5-37.5 ms and max 77-137 against 29.7-35.4 and 53-90 niced, alternating
#: runs as noisy as that: docs/operations.md, Model snapshots); at 10 it still gets about a tenth
#: of a core that others want, so it finishes well within its timeout
SNAPSHOT_NICE = 10


def serving_with(restored: Recommender, config: RecommenderConfig, say: bool = True) -> Recommender:
    """``restored`` (a snapshot's models) serving with ``config``, from this start's settings:
    the blend's tunables (list length, candidates, weights, rules) are settings, not learned
    state, so a worker restarted with new ones serves with them, not with those the snapshot's
    worker ran under. A weighted learner the snapshot lacks is said: it serves nothing until
    a start without that snapshot builds it. ``say=False``: neither is logged (serve, which
    loads every new snapshot, says them at its first)."""
    if say and restored.config != config:
        log.info("the models' snapshot was taken under other blend settings: serving with the STREAMREC_* "
                 "settings of this start")
    missing = say and sorted(name for name, weight in config.weights.items()
                             if weight > 0 and name in Recommender.DEFAULT_LEARNERS and name not in restored.learners)
    if missing:
        log.warning("STREAMREC_BLEND_WEIGHTS weighs %s, which the models' snapshot has no learner for: %s nothing "
                    "until the worker starts without that snapshot", ", ".join(missing),
                    "it serves" if len(missing) == 1 else "they serve")
    restored.config = config
    return restored


def can_fork() -> bool:
    return hasattr(os, "fork")


def fork_call(work: Callable[[], object], nice: int = 0) -> int:
    """Run ``work()`` in a forked child and return the child's pid at once (in the parent).

    The child first adds ``nice`` to its niceness (the parent's stays), so that on busy cores
    the kernel gives it what the parent and its neighbours leave. It exits 0 when ``work``
    returned, 1 when it raised (the error goes to stderr).
    """
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child, from here on
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the parent's event loop reads that fd: never write to it
        if nice:
            try:
                os.nice(nice)
            except OSError:  # a sandbox that refuses it: the snapshot matters more than its priority
                pass
        work()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported on stderr, then the exit code says it
        try:
            # described(): redis-py's repr of a server error is its class alone ("server:OutOfMemoryError")
            os.write(2, f"streamrec: model snapshot failed in the child process: {described(exc)}{redis_advice(exc)}\n"
                     .encode())
        except OSError:
            pass
    finally:
        os._exit(code)


async def wait_child(pid: int, timeout_s: float) -> int:
    """The child's exit code (negative: killed by that signal), polling without blocking the loop.

    A child still running after ``timeout_s`` is killed (SIGKILL) and reported as ``-9``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(POLL_S)


__all__ = ["can_fork", "fork_call", "wait_child"]


class ModelSnapshots:
    """Restore the online models from the store's snapshot, and snapshot them again.

    ``busy``: the lock a batch holds while it runs; a snapshot is taken between batches, when
    the models are consistent. ``signing_key``: the snapshot's HMAC key (None: unsigned).
    """

    def __init__(self, store: UserStateStore, metrics: Metrics, busy: asyncio.Lock, signing_key: str | None = None,
                 fork: bool = True, timeout_s: float = 60.0, name: str = SNAPSHOT_KEY) -> None:
        self.store = store
        self.metrics = metrics
        self.busy = busy
        self.signing_key = signing_key
        self.fork = fork
        self.timeout_s = timeout_s
        self.name = name
        # one snapshot at a time: an older one written after a newer (an erasure's) would undo it
        self._taking = asyncio.Lock()

    async def restore(self, retry: Callable[[str, Callable[[], Awaitable[T]]], Awaitable[T]]) -> Recommender | None:
        """The models in the store's snapshot; None when there is none or it is refused (an
        old, foreign or forged snapshot never stops the worker: counted and logged).
        ``retry(what, call)`` retries reading until the store answers: starting with empty
        models would later overwrite a good snapshot."""
        data = await retry("load the models' snapshot", lambda: self.store.get_blob(self.name))
        if not data:
            return None
        try:
            recommender = Recommender.restore(data, self.signing_key)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self.metrics.model_snapshot_refused.inc()
            log.error("refused the online models' snapshot in the store (%s); starting with empty models", exc)
            return None
        log.info("online models restored from the snapshot (%d bytes, %d events learned)", len(data),
                 recommender.n_learned)
        return recommender

    async def take(self, models: Callable[[], Recommender]) -> bool:
        """Snapshot ``models()`` (called between batches) into the store; False when it failed
        (counted and logged; the next one comes at the next interval). One at a time, in order."""
        async with self._taking:
            return await self._take(models)

    async def _take(self, models: Callable[[], Recommender]) -> bool:
        clock = time.perf_counter
        write = self.store.blob_writer(self.name) if self.fork and can_fork() else None
        if write is not None:
            async with self.busy:  # no batch in hand: the models are consistent
                start = clock()
                recommender, key = models(), self.signing_key
                try:
                    # in the child: the models as forked
                    pid = fork_call(lambda: write(recommender.snapshot(key)), nice=SNAPSHOT_NICE)
                except OSError as exc:  # the kernel refused a child (ENOMEM, EAGAIN at a pids limit)
                    pid = None
                    problem = exc
                self.metrics.model_snapshot_pause.set(clock() - start)
            if pid is None:  # raised from the timer, it crashed the worker (mode crashes an app whose task raises)
                self.metrics.model_snapshots.labels("failed").inc()
                log.error("could not start the process that writes the online models' snapshot (%s); trying again at "
                          "the next snapshot", described(problem))
                return False
            code = await wait_child(pid, timeout_s=self.timeout_s)
            self.metrics.model_snapshot_seconds.set(clock() - start)
            if code != 0:
                self.metrics.model_snapshots.labels("failed").inc()
                log.error("the online models' snapshot failed (child process %d exited with %d; its error is in the "
                          "worker's stderr)", pid, code)
                return False
        else:
            async with self.busy:
                start = clock()
                try:
                    data = models().snapshot(self.signing_key)
                except Exception:  # noqa: BLE001 - a codec's bug: from the timer, it crashed the worker
                    self.metrics.model_snapshots.labels("failed").inc()  # (the forked child's is an exit code)
                    log.exception("the online models' snapshot failed; the worker goes on, and tries again at the "
                                  "next snapshot")
                    return False
                finally:
                    self.metrics.model_snapshot_pause.set(clock() - start)
            try:
                await self.store.set_blob(self.name, data)
            except Exception as exc:  # noqa: BLE001 - the store is down: the next interval tries again
                self.metrics.model_snapshots.labels("failed").inc()
                log.error("could not store the online models' snapshot (%s)", described(exc))
                return False
        self.metrics.model_snapshots.labels("ok").inc()
        return True
