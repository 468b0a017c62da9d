"""A probe that hangs up before its answer (Kubernetes' ``timeoutSeconds`` on a worker paused or
busy past it, a scraper's timeout): the health server writes to a closed connection. socketserver
printed that BrokenPipeError's traceback to stderr, which a running worker logs line by line at
WARNING (29 of them in a 13-minute chaos soak, every one a probe that gave up). Now it is said
nothing of; any other error in a request is still printed."""

from __future__ import annotations

import socket
import struct
import threading

from prometheus_client import CollectorRegistry

from stream.health import Health, HealthServer


class HeldHealth(Health):
    """A Health whose readiness answers only once ``release`` is set (a worker paused meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()
        self.release = threading.Event()

    def readiness(self):
        self.asked.set()
        self.release.wait(10)
        return super().readiness()


def test_a_probe_that_hung_up_before_its_answer_leaves_no_traceback(capfd):
    health = HeldHealth()
    with HealthServer(0, CollectorRegistry(), health, addr="127.0.0.1").start() as server:
        probe = socket.create_connection(("127.0.0.1", server.port))
        probe.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert health.asked.wait(10)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        probe.close()  # a reset: the answer's write fails at once
        done = threading.Event()
        original = server.httpd.shutdown_request

        def shut(request):  # the request's thread is over, error handling included
            original(request)
            done.set()

        server.httpd.shutdown_request = shut
        health.release.set()
        assert done.wait(10)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred during processing" not in err, err
