"""Stand-ins that several test folders share: a publisher that keeps what it is given, a text
model of constant vectors, and a real server at a port that answers a Kafka request with
something else."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np


class Sink:
    """A ``publish`` that confirms every record and keeps them, in order."""

    def __init__(self) -> None:
        self.records: list = []

    async def __call__(self, records):
        self.records += list(records)
        return []


class ConstantEmbedder:
    """A text model whose every vector is the same: for tests of how items are read, not searched."""

    dim = 4
    name = "constant"

    def queries(self, texts):
        return np.ones((len(texts), 4), dtype=np.float32) / 2

    passages = queries


@contextmanager
def serving_not_kafka() -> Iterator[str]:
    """``host:port`` of a real server that accepts connections and answers every request with
    an HTTP 400 (not a Kafka response), until the block ends."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.recv(1024)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        done.set()
        thread.join()
        server.close()
