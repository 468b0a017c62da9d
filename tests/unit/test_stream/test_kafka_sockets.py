"""stream/kafka_sockets.py: kafka-python 3.0's refused connection attempts leave their sockets
closed, not to the garbage collector (``streamrec retrain`` held one per attempt through a broker
outage)."""

from __future__ import annotations

import select
import socket
import time

import pytest
from kafka.errors import KafkaConnectionError

from stream import kafka_sockets
from stream.kafka_sockets import KafkaNetSocket, close_failed_connects, closing_on_failure

pytestmark = pytest.mark.skipif(KafkaNetSocket is None, reason="kafka-python 2 connects elsewhere")


class _Net:
    """What ``sock_connect`` asks of kafka-python's selector: to wait until the socket is writable."""

    async def wait_write(self, sock, timeout_at=None):
        select.select([], [sock], [], 1.0)


def _closed_address() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()


async def test_a_refused_attempt_closes_its_socket():
    sock = socket.socket()
    sock.setblocking(False)
    connect = closing_on_failure(KafkaNetSocket.sock_connect)
    with pytest.raises(KafkaConnectionError):
        await connect(KafkaNetSocket(), _Net(), sock, _closed_address(), timeout_at=time.monotonic() + 10)
    assert sock.fileno() == -1  # closed: kafka-python's own left it open


async def test_a_connection_that_is_made_stays_open():
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.socket()
        sock.setblocking(False)
        connect = closing_on_failure(KafkaNetSocket.sock_connect)
        try:
            assert await connect(KafkaNetSocket(), _Net(), sock, server.getsockname(),
                                 timeout_at=time.monotonic() + 10) is sock
            assert sock.fileno() != -1
        finally:
            sock.close()


def test_installed_once_however_often_it_is_asked(monkeypatch):
    # kafka-python's own (a test of tail or retrain before this one may have wrapped it in this process)
    original = getattr(KafkaNetSocket.sock_connect, "__wrapped__", KafkaNetSocket.sock_connect)
    monkeypatch.setattr(kafka_sockets.KafkaNetSocket, "sock_connect", original)  # undone after
    close_failed_connects()
    wrapped = KafkaNetSocket.sock_connect
    close_failed_connects()
    assert KafkaNetSocket.sock_connect is wrapped is not original
