"""kafka-python 3.0's failed connection attempts, closed as they fail.

``KafkaNetSocket.sock_connect`` raises when a broker refuses a connection (or does not answer
in time) without closing the socket it made for it: the socket stays open until the garbage
collector gets to it (it is held by the failed attempt's traceback). A client
that outlives a broker's outage tries again every second or so: ``streamrec retrain``, which
reads for days, held a socket per attempt and printed a ResourceWarning for each once they were
collected (``PYTHONWARNINGS=always::ResourceWarning``: a dozen for a few seconds' restart).
:func:`close_failed_connects` wraps that method so that each socket is closed as its attempt
fails; kafka-python 2, which connects elsewhere, is left as it is.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

try:  # kafka-python 3.0's connection code (2.x connects elsewhere: nothing to wrap there)
    from kafka.net.inet import KafkaNetSocket
except ImportError:  # pragma: no cover - kafka-python 2.x
    KafkaNetSocket = None

SockConnect = Callable[..., Awaitable[object]]


def closing_on_failure(connect: SockConnect) -> SockConnect:
    """``KafkaNetSocket.sock_connect`` that closes the socket when the attempt fails."""
    if getattr(connect, "closes_on_failure", False):
        return connect

    async def sock_connect(self, net, sock, *args, **kwargs):  # the rest passed as given: a later signature too
        try:
            return await connect(self, net, sock, *args, **kwargs)
        except BaseException:
            sock.close()
            raise

    sock_connect.closes_on_failure = True  # type: ignore[attr-defined]
    sock_connect.__wrapped__ = connect  # type: ignore[attr-defined]
    return sock_connect


def close_failed_connects() -> None:
    """Close each of kafka-python's failed connection attempts as it fails, in this process
    (once is enough; again changes nothing)."""
    if KafkaNetSocket is not None:
        KafkaNetSocket.sock_connect = closing_on_failure(KafkaNetSocket.sock_connect)


__all__ = ["close_failed_connects", "closing_on_failure"]
