"""Snapshot the online models without stopping the worker: encode them in a forked child.

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
POSIX) or ``STREAMREC_SNAPSHOT_FORK=false``, the caller encodes on the loop as before.

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
import os
import signal
import time
from collections.abc import Callable

#: how often the parent checks whether the child has exited
POLL_S = 0.05


def can_fork() -> bool:
    return hasattr(os, "fork")


def fork_call(work: Callable[[], object]) -> int:
    """Run ``work()`` in a forked child and return the child's pid at once (in the parent).

    The child exits 0 when ``work`` returned, 1 when it raised (the error goes to stderr).
    """
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child, from here on
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)  # the parent's event loop reads that fd: never write to it
        work()
        code = 0
    except BaseException as exc:  # noqa: BLE001 - reported on stderr, then the exit code says it
        try:
            os.write(2, f"streamrec: model snapshot failed in the child process: {exc!r}\n".encode())
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
