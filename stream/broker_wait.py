"""The worker's wait for Kafka at start: a broker that does not answer yet is waited for.

``streamrec worker`` needs Kafka before Faust starts (it creates or checks its topics). It used
to exit with status 2 when no broker answered then, and its supervisor started it again: a crash
loop for every broker restart or a stack started in the wrong order. Now
:meth:`BrokerWait.run` probes the bootstrap servers (:func:`stream.topics.probe`, the raw
Metadata request ``/readyz`` also sends) with back-off until one answers, then runs those
start-up steps; one that finds the broker gone again (:class:`~stream.errors.ServiceUnavailable`)
sends it back to waiting. Meanwhile ``/readyz`` says ``kafka: FAIL (cannot reach ... since ...)``
and its other conditions, which nothing checks before the worker starts, ``waiting`` (e.g.
``redis: waiting (not checked yet: the worker starts once Kafka answers)``: not a ``FAIL`` that
sends an operator after Redis or the models), ``/healthz`` stays alive, and the log says so once,
then once a minute.

What waiting cannot mend stops the worker at once, as before (status 2, one line): a broker that
refuses the login or the certificate (:class:`~stream.connections.AccessDenied`), and a server
that answers the probe but not as Kafka (:func:`misconfigured`). A bootstrap that is not
host:port never gets here (the settings refuse it).

SIGTERM or Ctrl-C while it waits stops it at once (:class:`StopRequested`, exit status 0 as for
a worker's first signal): the probe and the pause between tries are cut short; a start-up step
under way (each bounded by its timeout) finishes first.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TypeVar

from stream.connections import KafkaConnection
from stream.errors import ConfigError, ServiceUnavailable, StreamrecError
from stream.health import Health
from stream.retry import Backoff
from stream.topics import probe

log = logging.getLogger("streamrec.broker_wait")

T = TypeVar("T")

#: the waits between tries: short at first (a broker restarting), then every 10 s
BACKOFF = Backoff(base_s=0.5, factor=2.0, cap_s=10.0, jitter=0.1)
#: how often the log says again that the worker still waits
REMIND_EVERY_S = 60.0
#: how long one probe waits for each bootstrap server to answer
PROBE_TIMEOUT_S = 3.0

#: what ``/readyz`` says, while the worker waits, of its conditions other than ``kafka``
#: (:meth:`~stream.health.Health.pending`): the worker checks them once it has started
WAITING_ON_KAFKA = {
    "models": "restored from their snapshot once Kafka answers and the worker starts",
    "redis": "not checked yet: the worker starts once Kafka answers",
}
#: what it says of another condition
CHECKED_ONCE_STARTED = "checked once Kafka answers and the worker starts"

#: what the probe says of a server that answered, but not as a Kafka broker (stream/topics.py)
_NOT_KAFKA = "answered, but not as a Kafka broker"


class StopRequested(BaseException):
    """SIGTERM or SIGINT came while the worker waited for Kafka. A BaseException, as
    KeyboardInterrupt: nothing on its way out that catches Exception holds it."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.name = {signal.SIGINT: "Ctrl-C"}.get(signal.Signals(signum), signal.Signals(signum).name)
        super().__init__(self.name)


def misconfigured(kafka: KafkaConnection, problem: str) -> StreamrecError | None:
    """The error to stop on when what :func:`~stream.topics.probe` saw cannot get better by
    waiting; None for a broker that may yet answer (refused, timed out, a name not resolved yet).

    >>> kafka = KafkaConnection("127.0.0.1:6379")
    >>> misconfigured(kafka, "127.0.0.1:6379: [Errno 111] Connection refused") is None
    True
    >>> print(misconfigured(kafka, "127.0.0.1:6379: answered, but not as a Kafka broker"))
    STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:6379: 127.0.0.1:6379: answered, but not as a Kafka broker; point it at a Kafka listener
    """
    try:
        kafka.servers()  # not host:port (the settings refuse it first)
    except ConfigError as exc:
        return exc
    denied = kafka.refusal(problem)  # TLS refused over a certificate: it stays refused
    if denied is not None:
        return denied
    if _NOT_KAFKA in problem:
        return ConfigError(f"STREAMREC_KAFKA_BOOTSTRAP={kafka.bootstrap}: {problem}; point it at a Kafka listener")
    return None


def _duration(seconds: float) -> str:
    """
    >>> _duration(42.4), _duration(125), _duration(7300)
    ('42 s', '2 min 5 s', '2 h 1 min')
    """
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


class BrokerWait:
    """Waits, before the worker starts, until a Kafka broker answers; see the module's text.

    ``probe``, ``sleep``, ``clock`` (monotonic) and ``wall_clock`` (epoch seconds, for the
    time ``/readyz`` names) are the I/O it does, for tests to give.
    """

    def __init__(self, kafka: KafkaConnection, health: Health, *, backoff: Backoff = BACKOFF,
                 remind_every_s: float = REMIND_EVERY_S, probe_timeout_s: float = PROBE_TIMEOUT_S,
                 probe: Callable[[KafkaConnection, float], str | None] = probe,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.kafka = kafka
        self.health = health
        self.backoff = backoff
        self.remind_every_s = remind_every_s
        self.probe_timeout_s = probe_timeout_s
        self._probe = probe
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._delays = backoff.delays()
        self._since: float | None = None  # monotonic, when the wait began (None: not waiting)
        self._since_wall = ""
        self._said: float | None = None  # when the log last said it waits
        self._tries = 0
        #: the signal that asked to stop, once one did (see :meth:`stopped_by_signals`)
        self.stop_signal: int | None = None
        self._interruptible = False

    def run(self, steps: Callable[[], T]) -> T:
        """``steps()`` (the worker's start-up calls to Kafka) once a broker answers, and again
        after a wait whenever they raise :class:`ServiceUnavailable` (the broker gone meanwhile);
        their other errors, and :func:`misconfigured`'s, go on to the caller."""
        while True:
            self._until_reachable()
            try:
                result = steps()
            except ServiceUnavailable as exc:
                self._raise_if_stopped()
                self._unreachable(str(exc))
                self._pause()
                continue
            self._raise_if_stopped()
            self._started()
            return result

    def _until_reachable(self) -> None:
        """Return once a broker in the bootstrap answers a Metadata request; meanwhile ``kafka``
        fails in ``/readyz`` with the reason, the log says so once a ``remind_every_s``, and the
        tries follow ``backoff``. Raises :func:`misconfigured`'s error."""
        while True:
            self._raise_if_stopped()
            problem = self._interruptibly(self._probe, self.kafka, self.probe_timeout_s)
            if problem is None:
                return
            error = misconfigured(self.kafka, problem)
            if error is not None:
                raise error
            self._unreachable(problem)
            self._pause()

    @contextmanager
    def stopped_by_signals(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[BrokerWait]:
        """While inside, SIGTERM and SIGINT stop the wait: :class:`StopRequested` out of
        :meth:`run` (at once from a probe or a pause, after a start-up step that is under way).
        The handlers before are put back on the way out (the main thread only, as any handler)."""
        def stop(signum: int, frame) -> None:
            self.stop_signal = signum
            if self._interruptible:
                raise StopRequested(signum)

        previous = {sig: signal.signal(sig, stop) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------------ steps

    def _interruptibly(self, call: Callable[..., T], *args) -> T:
        self._interruptible = True
        try:
            self._raise_if_stopped()
            return call(*args)
        finally:
            self._interruptible = False

    def _raise_if_stopped(self) -> None:
        if self.stop_signal is not None:
            raise StopRequested(self.stop_signal)

    def _pause(self) -> None:
        self._interruptibly(self._sleep, next(self._delays))

    def _unreachable(self, problem: str) -> None:
        now = self._clock()
        self._tries += 1
        where = self.kafka.describe()
        if self._since is None:
            self._since = now
            for name in self.health.failing():
                if name != "kafka":
                    self.health.pending(name, WAITING_ON_KAFKA.get(name, CHECKED_ONCE_STARTED))
            self._since_wall = datetime.fromtimestamp(self._wall_clock(), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        waited = now - self._since
        self.health.set("kafka", False, f"cannot reach {where} since {self._since_wall} ({problem}); the worker "
                                        "starts once a broker answers: check that Kafka runs there, or "
                                        "STREAMREC_KAFKA_BOOTSTRAP")
        self.health.still_starting(f"waiting for Kafka at {where} since {self._since_wall}")
        if self._said is None:
            self._said = now
            log.warning("Kafka at %s does not answer (%s): waiting for a broker before starting, trying again every "
                        "%.0f s at most; /readyz says kafka FAIL meanwhile. Check that Kafka runs there, or point "
                        "STREAMREC_KAFKA_BOOTSTRAP at it (a listener that does not answer may want TLS or SASL: "
                        "STREAMREC_KAFKA_SECURITY_PROTOCOL)", where, problem, self.backoff.cap_s)
        elif now - self._said >= self.remind_every_s:
            self._said = now
            log.warning("still waiting for Kafka at %s: no broker has answered for %s (%d tries; the last: %s)",
                        where, _duration(waited), self._tries, problem)

    def _started(self) -> None:
        if self._since is not None:
            where = self.kafka.describe()
            log.info("Kafka at %s answers after %s of waiting; starting", where, _duration(self._clock() - self._since))
            self.health.set("kafka", False, "consumer has not joined its group yet")
            self.health.resume()  # the others say again what they said before the wait
            self.health.still_starting(f"Kafka at {where} answered; starting")


__all__ = ["BACKOFF", "WAITING_ON_KAFKA", "BrokerWait", "StopRequested", "misconfigured"]
