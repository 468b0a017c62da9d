"""streamrec's exceptions: one root, a few children that callers act on differently."""

from __future__ import annotations

import errno
import os
import pwd
import select
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import typer

_T = TypeVar("_T")


def clipped(text: str, limit: int) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters, then an ellipsis.

    >>> clipped("abcdef", 4), clipped("abc", 4)
    ('abcd…', 'abc')
    """
    return text if len(text) <= limit else text[:limit] + "…"


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, the noun agreeing with the count (``plural``: where adding "s" is wrong).

    >>> counted(1, "event"), counted(2_000, "event"), counted(0, "purchase"), counted(1, "entry", "entries")
    ('1 event', '2,000 events', '0 purchases', '1 entry')
    """
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def some_of(items: Sequence[_T], shown: int, text: Callable[[_T], str] = str, sep: str = ", ") -> str:
    """The first ``shown`` of ``items``, each as ``text`` writes it, joined by ``sep``, then how
    many more in parentheses: the one wording of every message that names a list it cannot name
    whole (a fetch may bring thousands of ids). The parentheses keep the count apart from the
    items even where ``sep`` is a space; the items left out are never written.

    >>> some_of(["a", "b", "c"], 2), some_of(["a", "b"], 2), some_of(range(1_200), 1, repr, " ")
    ('a, b (and 1 more)', 'a, b', '0 (and 1,199 more)')
    """
    head = sep.join(map(text, items[:shown]))
    return f"{head} (and {len(items) - shown:,} more)" if len(items) > shown else head


def described(exc: BaseException) -> str:
    """``Type: message`` for a log line. ``%r`` of an exception usually shows its message, but
    not always: redis-py's ``ResponseError("DB index is out of range")`` is ``server:ResponseError``.

    >>> described(ValueError("no such user")), described(TimeoutError())
    ('ValueError: no such user', 'TimeoutError')
    """
    try:
        text = str(exc).replace("\n", " ").strip()
    except Exception:  # noqa: BLE001 - a bug's exception whose __str__ raises
        text = ""
    return f"{type(exc).__name__}: {clipped(text, 300)}" if text else type(exc).__name__


def redis_advice(exc: BaseException) -> str:
    """What an operator can do about a Redis error beyond what its text says ("" when nothing).

    >>> class OutOfMemoryError(Exception): __module__ = "redis.exceptions"
    >>> class ReadOnlyError(Exception): __module__ = "redis.exceptions"
    >>> redis_advice(OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")).startswith(": Redis is full")
    True
    >>> redis_advice(ReadOnlyError("You can't write against a read only replica."))
    ': this Redis is a read-only replica; point STREAMREC_REDIS_URL at the primary'
    >>> redis_advice(TimeoutError())
    ''
    >>> class ConnectionError(Exception): __module__ = "redis.exceptions"
    >>> redis_advice(ConnectionError("Connection closed by server.")).startswith(": the server closed the connection")
    True
    """
    if not type(exc).__module__.startswith("redis"):
        return ""
    if type(exc).__name__ == "ConnectionError" and "closed by server" in str(exc):
        # a Redis shutting down closes the connections in use once, then refuses new ones (or
        # answers LOADING as it starts); one that takes each connection and closes it unanswered
        # is no Redis speaking plain RESP: Kafka's port does so
        return (": the server closed the connection without an answer. A Redis shutting down does so once; if this "
                "lasts, check that STREAMREC_REDIS_URL names a Redis port (not Kafka's, say), and use rediss:// for "
                "a Redis that requires TLS")
    if type(exc).__name__ == "OutOfMemoryError":
        return (": Redis is full (its maxmemory) and refuses writes; give it more memory (INFO memory shows the use), "
                "or lower STREAMREC_STATE_TTL_S so that idle users' states expire sooner")
    if type(exc).__name__ == "ReadOnlyError":  # a replica, or the old primary after a failover
        return ": this Redis is a read-only replica; point STREAMREC_REDIS_URL at the primary"
    return ""


def path_problem(exc: OSError) -> str:
    """What a file-system error on a path says to the person who named it (``Path.exists`` and
    ``is_dir`` raise, rather than answer False, on a folder they may not search, or a name too
    long: a model folder owned by another user reached every command that looks for one).

    >>> path_problem(PermissionError(13, "Permission denied", "/srv/models/CURRENT")).split(";")[0]
    '/srv/models/CURRENT: permission denied'
    >>> path_problem(OSError(36, "File name too long", "/tmp/" + "a" * 300)).endswith("a: file name too long")
    True
    >>> path_problem(OSError(errno.ELOOP, "Too many levels of symbolic links", "out.json"))
    'out.json: too many levels of symbolic links (the links lead round in a loop)'
    """
    where = f"{exc.filename}" if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    what = (exc.strerror or type(exc).__name__).lower()
    if exc.errno == errno.ELOOP:
        what += " (the links lead round in a loop)"
    if isinstance(exc, PermissionError):
        return (f"{where}: {what}; the user running streamrec ({_user()}) needs access to it (to read it, or to write "
                "where a command writes), and to enter (x) every folder above it")
    return f"{where}: {what}"


def resolved(path: Path) -> Path:
    """``path.resolve()``, with a loop of symbolic links an ``OSError`` (ELOOP) naming ``path``,
    as Python 3.13's raises it, which :func:`run_command` and :func:`path_problem` put in words:
    3.11's ``RuntimeError("Symlink loop from ...")`` came out of ``--json-out loop`` as a traceback.
    """
    try:
        return path.resolve()
    except RuntimeError:  # Python < 3.13; "Symlink loop from '...'" names the link in the loop met first
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None


def existing_file(path: Path | None) -> Path | None:
    """A typer callback for an option naming a file to read: click's ``exists=True`` says "does
    not exist" of a loop of symbolic links and of a file in a folder that may not be searched too;
    this says what stands in the way (:func:`path_problem`)."""
    if path is not None:
        try:
            os.stat(path)
        except OSError as exc:
            raise typer.BadParameter(path_problem(exc)) from None
    return path


#: how long a named pipe a setting names may stay silent (no writer, or one that sends nothing)
PIPE_QUIET_S = 30.0


def read_named_file(path: str | os.PathLike, limit: int | None = None, quiet_s: float | None = None) -> bytes:
    """The bytes of a file a setting names: an OSError (path_problem says it) where it cannot be
    read, and a ValueError, saying what it is instead, for a device or a socket (``/dev/zero``,
    ``/dev/stdin`` at a terminal: reading one never ends, and held the process at start while
    its memory grew by hundreds of MB a second) or more than ``limit`` bytes. A pipe is read
    (``<(cat arms.toml)`` in a shell names one), but a ValueError ends a wait of ``quiet_s``
    (:data:`PIPE_QUIET_S` when None) with nothing from it: a named pipe that no program writes
    to held the worker at its start, silent, for ever (opening one blocks until a writer opens
    it too)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # not inherited by children (PEP 446), as open()'s
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            what = "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode) else "not a file"
            raise ValueError(f"{what}, not a file")
        if stat.S_ISFIFO(mode):
            data = _read_pipe(fd, limit, PIPE_QUIET_S if quiet_s is None else quiet_s)
        else:
            os.set_blocking(fd, True)
            with open(fd, "rb", closefd=False) as f:
                data = f.read() if limit is None else f.read(limit + 1)
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise ValueError(f"more than {limit:,} bytes: not the file meant")
    return data


def _read_pipe(fd: int, limit: int | None, quiet_s: float) -> bytes:
    """A pipe's bytes to its end (or past ``limit``), read without blocking: a ValueError when
    ``quiet_s`` pass without a byte or its end. (Linux reports a named pipe opened before any
    writer readable only once one has written or come and gone.)"""
    chunks: list[bytes] = []
    size = 0
    while limit is None or size <= limit:
        ready, _, _ = select.select([fd], [], [], quiet_s)
        if not ready:
            said = "nothing came from it" if not chunks else f"it sent {size:,} bytes, then nothing and no end"
            raise ValueError(f"a pipe: {said} in {quiet_s:g} s (is a program writing to it?)")
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except (KeyError, OSError):
        return f"uid {os.geteuid()}"


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` (the exit Typer makes of a Ctrl-C: status 130) came of a KeyboardInterrupt
    (a command that stops on SIGINT itself, such as ``produce``, says so in its own words)."""
    seen: BaseException | None = exc
    for _ in range(8):  # SystemExit <- typer's Exit(130) <- KeyboardInterrupt
        if seen is None:
            return False
        if isinstance(seen, KeyboardInterrupt):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def run_command(app: Callable[[], object], prefix: str, usage_errors: tuple[type[Exception], ...]) -> None:
    """Run a Typer ``app`` as a console script (``streamrec``, ``python -m stream.evaluate_cli``):
    one of ``usage_errors``, or a file-system error on a path the user named, is one red line
    after ``prefix`` and exit 2, not a traceback; a Ctrl-C, which Typer makes a silent exit 130,
    says why the command stopped."""
    try:
        app()
    except usage_errors as exc:
        typer.secho(f"{prefix}: {exc}", fg="red", err=True)
        sys.exit(2)
    except OSError as exc:
        if exc.filename is None:  # a socket's, a bug's: not about a path the user gave
            raise
        typer.secho(f"{prefix}: {path_problem(exc)}", fg="red", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if interrupted(exc):
            typer.secho(f"{prefix}: interrupted", fg="red", err=True)
        raise


class StreamrecError(Exception):
    """Root of every error streamrec raises on purpose."""


class ConfigError(StreamrecError):
    """A setting is missing or has a value that cannot work; the message names the variable."""


class InvalidEvent(StreamrecError):
    """An input value that breaks the event contract.

    It is data, not a crash: the worker sends it to the dead-letter topic with ``reason``
    (a sentence naming the field and what was seen) and ``code`` (a short label for
    metrics, one of :data:`DEAD_LETTER_CODES`).
    """

    def __init__(self, code: str, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.field = field


#: Every dead-letter code, in the order docs/events.md explains them: the decoder's rules in the
#: order it checks them, then ``processing_error`` (the value was valid, but handling it raised),
#: then ``embedding_failed`` (a valid item whose text the text model raised on, alone).
DEAD_LETTER_CODES = (
    "oversize", "too_deep", "not_utf8", "malformed_json", "not_finite", "not_object", "unknown_type",
    "missing_field", "wrong_type", "invalid_value", "too_long", "bad_id", "bad_text", "ts_out_of_window",
    "number_too_large", "processing_error", "embedding_failed",
)


class ServiceUnavailable(StreamrecError):
    """Kafka or Redis did not answer in time; the message says which and where."""
