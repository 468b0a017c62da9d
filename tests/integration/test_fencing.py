"""Fencing: a worker that lost its partitions never overwrites what their next owner wrote.

Worker A reaches Redis through a small TCP proxy that can hold back A's writes. Mid-stream the
proxy holds them (A's batch in hand is stuck saving its state, as behind a network split),
A is paused (SIGSTOP, a long pause: its session times out), and worker B joins and takes every
partition. Then the proxy lets A's held commands through, A resumes, and its late writes
arrive after B's: they must be refused. Every user's count is exact afterwards.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import threading
import time

from workerkit import FlowingFeed, exactly_once, wait_for

#: the commands a worker writes user state and claims with (its save and claim scripts; SET, INCR, MULTI/EXEC before)
WRITES = {b"EVALSHA", b"EVAL", b"SET", b"INCR", b"MULTI", b"EXEC", b"DEL"}


def split_commands(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The complete RESP commands (arrays of bulk strings, as redis-py sends them) at the start
    of ``buffer``, and what is left of it.

    >>> split_commands(b"*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n*1\\r\\n$4\\r\\nPI")
    ([b'*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nk\\r\\n'], b'*1\\r\\n$4\\r\\nPI')
    """
    out = []
    while buffer.startswith(b"*"):
        at = buffer.find(b"\r\n")
        if at < 0:
            break
        n, pos, complete = int(buffer[1:at]), at + 2, True
        for _ in range(n):
            end = buffer.find(b"\r\n", pos)
            if end < 0:
                complete = False
                break
            size = int(buffer[pos + 1:end])
            pos = end + 2 + size + 2
            if pos > len(buffer):
                complete = False
                break
        if not complete:
            break
        out.append(buffer[:pos])
        buffer = buffer[pos:]
    return out, buffer


def command_name(command: bytes) -> bytes:
    _, _, rest = command.partition(b"\r\n")
    _, _, rest = rest.partition(b"\r\n")
    return rest.partition(b"\r\n")[0].upper()


class HoldingProxy:
    """A TCP proxy to ``upstream``. While :meth:`hold` is on, it keeps back each connection's
    writes (:data:`WRITES`, and whatever follows one on its connection, so that replies stay in
    order) and lets reads through; :meth:`release` sends what it kept, also for a client that
    gave up and closed its side meanwhile (the bytes had left it: they arrive late)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.held_writes = 0
        self.threads: list[threading.Thread] = []

    def start(self) -> HoldingProxy:
        self._spawn(self._accept)
        return self

    def hold(self) -> None:
        self.holding.set()

    def release(self) -> None:
        self.holding.clear()

    def close(self) -> None:
        self.closed.set()
        self.holding.clear()
        self.listener.close()
        for t in self.threads:
            t.join(5)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self.threads.append(t)

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                ready, _, _ = select.select([self.listener], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._spawn(self._client_to_server, client, server)
            self._spawn(self._server_to_client, server, client)

    def _client_to_server(self, client: socket.socket, server: socket.socket) -> None:
        partial, held = b"", []
        client_open = True
        try:
            while not self.closed.is_set():
                if client_open:
                    ready, _, _ = select.select([client], [], [], 0.05)
                    if ready:
                        try:
                            data = client.recv(65536)
                        except OSError:
                            data = b""
                        if data:
                            commands, partial = split_commands(partial + data)
                            for command in commands:
                                if held or (self.holding.is_set() and command_name(command) in WRITES):
                                    held.append(command)
                                    self.held_writes += command_name(command) in WRITES
                                else:
                                    server.sendall(command)
                        else:
                            client_open = False
                else:
                    time.sleep(0.05)
                if held and not self.holding.is_set():
                    server.sendall(b"".join(held))
                    held = []
                if not client_open and not held:
                    server.shutdown(socket.SHUT_WR)  # late commands sent; the server answers into the void
                    return
        except OSError:
            return

    def _server_to_client(self, server: socket.socket, client: socket.socket) -> None:
        try:
            while not self.closed.is_set():
                ready, _, _ = select.select([server], [], [], 0.1)
                if not ready:
                    continue
                data = server.recv(65536)
                if not data:
                    break
                try:
                    client.sendall(data)
                except OSError:
                    pass  # the client gave up; keep reading so the server is not blocked
        except OSError:
            pass
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass


def assigned(worker) -> int:
    """How many partitions the worker's /readyz says it holds (-1: no answer)."""
    status, body = worker.http("/readyz")
    m = re.search(r"(\d+) input partitions? assigned", body)
    return int(m.group(1)) if m and status == 200 else -1


def test_a_paused_worker_whose_writes_arrive_late_is_fenced_and_counts_stay_exact(worker_env, workers, topic_prefix,
                                                                                    redis_client):
    host, port = re.match(r"redis://([^:/]+):(\d+)", worker_env["STREAMREC_REDIS_URL"]).groups()
    proxy = HoldingProxy(host, int(port)).start()
    try:
        with FlowingFeed(worker_env["STREAMREC_KAFKA_BOOTSTRAP"], topic_prefix, seed=51, n_events=5000) as feed:
            a = workers(metrics=True, STREAMREC_REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
            feed.start(a)
            wait_for(lambda: sum(feed.applied(redis_client).values()) > 500, 60, "A to apply events", a)
            proxy.hold()  # A's next state write (its batch in hand) is held back
            wait_for(lambda: proxy.held_writes > 0, 30, "A to be stuck writing to Redis", a)
            a.proc.send_signal(signal.SIGSTOP)  # and paused long enough to lose its partitions
            try:
                b = workers(metrics=True)
                wait_for(lambda: assigned(b) == 4, 90, "B to own every partition", b)
                applied_by_b = sum(feed.applied(redis_client).values())
                wait_for(lambda: sum(feed.applied(redis_client).values()) > applied_by_b + 200, 60,
                         "B to apply events", b)
                proxy.release()  # A's held writes reach Redis now, after B's
            finally:
                a.proc.send_signal(signal.SIGCONT)
            feed.wait_until_all_applied(redis_client, b, timeout=240)
            wait_for(lambda: a.metric("streamrec_fenced_batches_total") >= 1, 60, "A's late write to be refused", a)
            assert exactly_once(redis_client, topic_prefix, feed.expected)  # still: the refused write changed nothing
            assert "fenced:" in a.log_text()
            a.assert_alive()
            assert a.agent_restarts() == [] and b.agent_restarts() == []
    finally:
        proxy.close()
