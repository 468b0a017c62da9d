"""What the integration tests share to drive real `streamrec worker` processes: start and stop
one, read its /readyz and /metrics, produce to and consume from the real topics, read user
state and committed offsets back, and wait for a condition (never for a fixed time)."""

from __future__ import annotations

import asyncio
import json
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import msgspec
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from online_models.datasets import synthetic_interactions
from stream.connections import ISOLATION_LEVEL
from stream.records import ClickEvent, PurchaseEvent, encode
from stream.state import UserState
from stream.topics import committed_offsets, ensure_topics

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of GET ``url``; (0, why) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        body = err.read().decode()
        err.close()
        return err.code, body
    except OSError as exc:
        return 0, str(exc)


class WorkerProcess:
    """A `streamrec worker` subprocess with its own log file (and /metrics, /readyz on
    ``metrics_port`` when one is given)."""

    def __init__(self, env: dict[str, str], log_path: Path, metrics_port: int | None = None) -> None:
        self.env = dict(env)
        if metrics_port is not None:
            self.env["STREAMREC_METRICS_PORT"] = str(metrics_port)
        self.metrics_port = metrics_port
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "worker"], cwd=ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def assert_alive(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"worker exited:\n{self.log_tail()}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"worker did not stop within {timeout}s of {signal.Signals(sig).name}:\n{self.log_tail()}") from None

    def http(self, path: str) -> tuple[int, str]:
        """(status, body) of GET ``path`` on the worker's metrics port (0, why: no answer)."""
        return http_get(f"http://127.0.0.1:{self.metrics_port}{path}")

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of /metrics (0 when absent)."""
        _, body = self.http("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", re.M)
        for found_labels, value in pattern.findall(body):
            if ",".join(sorted(found_labels.split(","))) == want or (not want and not found_labels):
                return float(value)
        return 0.0

    def metric_total(self, name: str) -> float:
        """The sum of every sample of ``name`` in /metrics, whatever its labels (0 when absent)."""
        _, body = self.http("/metrics")
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(value) for value in pattern.findall(body))

    def agent_restarts(self) -> list[str]:
        """Log lines where Faust's supervisor restarted (or saw a crash of) the agent: mode's own
        words ("Restarting dead ...", "Crashed reason=...", "Giving up on ... crashed"), not any line
        holding "restarting" (the worker's hint that a Redis restarting closes no connection did)."""
        return [line for line in self.log_text().splitlines()
                if re.search(r"Restarting dead|Crashed reason=|Giving up on .*crashed|supervisor.*restart|"
                             r"[Aa]gent.*(died|crash)", line)]


async def until(condition: Callable[[], object], what: str, task: asyncio.Task | None = None,
                timeout: float = 60.0) -> None:
    """:func:`wait_for` inside an event loop: poll ``condition`` every 50 ms, yielding to the loop;
    fail after ``timeout`` seconds, or as soon as ``task`` (the reader under test) has stopped."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert task is None or not task.done(), f"the reader stopped before {what}: {task!r}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        await asyncio.sleep(0.05)


def wait_for(condition: Callable[[], object], timeout: float, what: str, worker: WorkerProcess | None = None,
              every: float = 0.25):
    """Poll ``condition`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        if worker is not None:
            worker.assert_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}"
                                 + (f"\nworker log:\n{worker.log_tail()}" if worker else ""))
        time.sleep(every)


def produce(bootstrap: str, prefix: str, items: list[tuple[str, bytes | None, bytes | None]]) -> list[tuple[str, int, int]]:
    """Write ``(topic, key, value)`` (topic without the prefix) as a site would; returns each
    record's ``(topic, partition, offset)``."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all", max_request_size=2 * 1024 * 1024)
    try:
        futures = [producer.send(f"{prefix}{topic}", key=key, value=value) for topic, key, value in items]
        producer.flush()
        return [(m.topic, m.partition, m.offset) for m in (f.get(30) for f in futures)]
    finally:
        producer.close()


def consume_until(bootstrap: str, topic: str, done, timeout: float, worker: WorkerProcess | None = None) -> list[bytes]:
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=500, group_id=None)
    values: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for msg in consumer:
                values.append(msg.value)
            if done(values):
                return values
            if worker is not None:
                worker.assert_alive()
    finally:
        consumer.close()
    raise AssertionError(f"timed out after {timeout}s on {topic} with {len(values)} messages"
                         + (f"\nworker log:\n{worker.log_tail()}" if worker else ""))


def read_all(bootstrap: str, topic: str) -> list:
    """Every record of ``topic`` as it is now (kafka-python ConsumerRecords)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        parts = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or [])]
        if not parts:
            return []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out = []
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=1000).values():
                out.extend(records)
        return out
    finally:
        consumer.close()


def user_doc(client: redis.Redis, prefix: str, user: str) -> dict | None:
    """The user's state document, every field (the stored JSON leaves out empty ones); None:
    none yet, or one that does not decode."""
    raw = client.get(f"{prefix}user:{user}")
    if not raw:
        return None
    try:
        json.loads(raw)
        return msgspec.structs.asdict(msgspec.json.decode(raw if isinstance(raw, bytes) else raw.encode(), type=UserState))
    except (ValueError, msgspec.DecodeError):
        return None


def applied_counts(client: redis.Redis, prefix: str, users) -> dict[str, int]:
    """Events applied to each user's state (clicks + purchases), 0 for a user with none."""
    out = {}
    for u in users:
        d = user_doc(client, prefix, u)
        out[u] = (d["clicks"] + d["purchases"]) if d else 0
    return out


def committed_and_end(bootstrap: str, group: str, topics: list[str]) -> tuple[dict, dict]:
    """The group's committed offsets and the end offsets of every partition of ``topics``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        committed = committed_offsets(bootstrap, group)
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or [])]
        ends = {(tp.topic, tp.partition): off for tp, off in consumer.end_offsets(parts).items()}
    finally:
        consumer.close()
    return committed, ends


#: longest :func:`unread` reads a partition from the group's committed offset towards its end
READ_PAST_S = 15.0


def unread(bootstrap: str, group: str, topics: list[str], timeout_s: float = READ_PAST_S) -> dict[tuple[str, int], tuple[int, int]]:
    """The partitions of ``topics`` that hold a record the group has not committed past, each
    with (committed offset, end offset); ``{}`` once it has committed past every one.

    A reader of committed data (the worker's isolation level) is never handed some offsets: a
    transaction's commit or abort marker, an aborted transaction's records. A partition whose last
    write was a transaction ends with its marker, so the group's committed offset stays short of
    the end for good, and comparing the two waited for ever. Where the committed offset is short
    of the end (the last stable offset: an open transaction's records are not there yet), the
    partition is read from it as the worker reads it: a record handed over is unread, a position
    that reaches the end without one was only offsets no reader gets. A read that does neither
    within ``timeout_s`` is an AssertionError naming the partitions, never a wait without end."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             isolation_level=ISOLATION_LEVEL)
    try:
        committed = committed_offsets(bootstrap, group)
        parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or [])]
        ends = consumer.end_offsets(parts)
        short = {tp: committed.get((tp.topic, tp.partition), 0) for tp in parts}
        short = {tp: at for tp, at in short.items() if at < ends[tp]}
        found: set[TopicPartition] = set()
        if short:
            consumer.assign(list(short))
            for tp, at in short.items():
                consumer.seek(tp, at)
            deadline = time.monotonic() + timeout_s
            while pending := [tp for tp in short if tp not in found and consumer.position(tp) < ends[tp]]:
                if time.monotonic() > deadline:
                    raise AssertionError(f"reading {', '.join(f'{tp.topic}[{tp.partition}]' for tp in pending)} from "
                                         f"group {group}'s committed offsets reached neither a record nor the end "
                                         f"within {timeout_s:g} s (at {[consumer.position(tp) for tp in pending]}, "
                                         f"ends {[ends[tp] for tp in pending]})")
                for tp, records in consumer.poll(timeout_ms=200).items():
                    if records:
                        found.add(tp)
                        consumer.pause(tp)
    finally:
        consumer.close()
    return {(tp.topic, tp.partition): (short[tp], ends[tp]) for tp in sorted(found)}


def all_committed(bootstrap: str, group: str, topics: list[str]) -> bool:
    """Whether group ``group`` has committed past every record of ``topics`` (:func:`unread`)."""
    return not unread(bootstrap, group, topics)


def wait_all_committed(bootstrap: str, group: str, topics: list[str], timeout: float, what: str,
                       worker: WorkerProcess | None = None) -> None:
    """Wait until :func:`all_committed`; fail after ``timeout`` seconds naming each partition
    still holding a record past the group's committed offset, with the offset and the end."""
    left: dict[tuple[str, int], tuple[int, int]] = {}

    def done() -> bool:
        left.clear()
        left.update(unread(bootstrap, group, topics))
        return not left

    try:
        wait_for(done, timeout, what, worker)
    except AssertionError as exc:
        short = ", ".join(f"{t}[{p}] committed {at}, end {end}" for (t, p), (at, end) in left.items())
        raise AssertionError(f"records past group {group}'s committed offsets ({short}); {exc}") from None


def group_assignment(bootstrap: str, group: str, topics: list[str]) -> dict[str, frozenset[tuple[str, int]]] | None:
    """The members of consumer group ``group`` and the partitions of ``topics`` each one holds,
    ``{member_id: {(topic, partition), ...}}``, as the broker (the group's coordinator) tells it;
    None while the group is not Stable (a rebalance under way, or no member yet)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="streamrec-tests")
    try:
        if hasattr(admin, "describe_groups"):  # kafka-python 3: dicts
            info = admin.describe_groups([group])[group]
            state = info["group_state"]
            members = {}
            for m in info["members"]:
                assignment = m["member_assignment"] if isinstance(m["member_assignment"], dict) else {}
                members[m["member_id"]] = [(a["topic"], a["partitions"]) for a in assignment.get("assigned_partitions", [])]
        else:  # kafka-python 2: GroupInformation / MemberInformation tuples
            (info,) = admin.describe_consumer_groups([group])
            state = info.state
            members = {m.member_id: list(getattr(m.member_assignment, "assignment", None) or []) for m in info.members}
    finally:
        admin.close()
    if state != "Stable" or not members:
        return None
    return {member: frozenset((t, p) for t, parts in assigned if t in topics for p in parts)
            for member, assigned in members.items()}


class Feeder(threading.Thread):
    """Writes ``records`` ``(topic, key, value)`` at about ``rate`` per second from a thread,
    as a site keeps sending while the test breaks things; a send the broker cannot take
    yet (it is stopped) waits and goes through once it is back."""

    def __init__(self, bootstrap: str, prefix: str, records: list[tuple[str, bytes | None, bytes | None]],
                 rate: float) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.prefix, self.records, self.rate = bootstrap, prefix, records, rate
        self.sent = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._enough = threading.Event()  # :meth:`end`: send no more, deliver what was sent

    def run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5, acks="all", retries=2**31 - 1,
                                 max_block_ms=180_000, delivery_timeout_ms=300_000, request_timeout_ms=10_000,
                                 reconnect_backoff_max_ms=1000)
        try:
            step = max(1, int(self.rate / 20))  # bursts every 50 ms
            for at in range(0, len(self.records), step):
                if self._halt.is_set():
                    return
                if self._enough.is_set():
                    break
                for topic, key, value in self.records[at:at + step]:
                    producer.send(f"{self.prefix}{topic}", key=key, value=value)
                self.sent = min(len(self.records), at + step)
                self._halt.wait(step / self.rate)
            producer.flush(300)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            producer.close(0 if self._halt.is_set() else 30)

    def stop(self) -> None:
        """Stop sending (a test that failed half-way)."""
        self._halt.set()
        self.join(60)

    def finish(self, timeout: float = 300) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the feeder did not finish"
        assert self.error is None, f"the feeder failed: {self.error!r}"

    def end(self, timeout: float = 300) -> None:
        """Send nothing after the records sent so far (``records[:sent]``), and wait until Kafka
        has those: a feed the test ends once what it needed to happen mid-stream has happened,
        rather than one whose length guessed how long that would take."""
        self._enough.set()
        self.finish(timeout)


def interaction_records(interactions, first: int = 0) -> list[tuple[str, bytes, bytes]]:
    """``interactions`` as (topic suffix, key, value) records for :func:`produce`, their event
    ids numbered from ``first``."""
    out = []
    for n, x in enumerate(interactions, first):
        cls, topic = (PurchaseEvent, "purchases") if x.kind == "purchase" else (ClickEvent, "clicks")
        out.append((topic, x.user_id.encode(), encode(cls(event_id=f"ev-{n}", user_id=x.user_id, item_id=x.item_id,
                                                          ts=x.ts, session_id=x.session_id))))
    return out


def synthetic_records(n: int, seed: int, n_users: int = 80) -> tuple[list[tuple[str, bytes, bytes]], dict[str, int]]:
    """``n`` synthetic events as records, and how many each user has."""
    records, expected = [], {}
    for i, x in enumerate(synthetic_interactions(n_events=n, n_users=n_users, n_items=400, seed=seed)):
        cls, topic = (PurchaseEvent, "purchases") if x.kind == "purchase" else (ClickEvent, "clicks")
        ev = cls(event_id=f"ev-{seed}-{i}", user_id=x.user_id, item_id=x.item_id, ts=x.ts,
                 category_id=x.category_id, session_id=x.session_id)
        records.append((topic, x.user_id.encode(), encode(ev)))
        expected[x.user_id] = expected.get(x.user_id, 0) + 1
    return records, expected


def exactly_once(client: redis.Redis, prefix: str, expected: dict[str, int]) -> bool:
    """True once every user's state holds their events exactly once; fails at once if any
    user holds more than were sent (applied twice)."""
    counts = applied_counts(client, prefix, expected)
    twice = {u: (counts[u], n) for u, n in expected.items() if counts[u] > n}
    assert not twice, f"events applied twice (applied, sent): {twice}"
    return counts == expected


class FlowingFeed:
    """``n_events`` synthetic events of 150 users: the first 250 at once, then the rest at about
    500 per second from a thread, so events keep flowing while workers come and go. A test that
    needs the flow to outlast steps of unknown length (workers starting on a slow machine) gives
    it room to spare and calls :meth:`end` once they are done: from then on only the events sent
    are expected."""

    def __init__(self, bootstrap: str, prefix: str, seed: int, n_events: int = 6000) -> None:
        self.bootstrap, self.prefix = bootstrap, prefix
        self.records, self.expected = synthetic_records(n_events, seed, n_users=150)
        self.events = self.records
        self.feeder = Feeder(bootstrap, prefix, self.records[250:], rate=500)

    def start(self, worker: WorkerProcess) -> None:
        """The first events, then the rest flowing, once ``worker`` is up and publishing."""
        produce(self.bootstrap, self.prefix, self.records[:250])
        consume_until(self.bootstrap, f"{self.prefix}recommendations", lambda v: len(v) >= 20, 120, worker)
        self.feeder.start()

    def applied(self, client: redis.Redis) -> dict[str, int]:
        return applied_counts(client, self.prefix, self.expected)

    def wait_until_all_applied(self, client: redis.Redis, worker: WorkerProcess, timeout: float = 180) -> None:
        """Every event applied exactly once: never more than sent, in the end exactly that."""
        wait_for(lambda: exactly_once(client, self.prefix, self.expected), timeout, "every event applied exactly once", worker)
        self.finish()

    def finish(self) -> None:
        self.feeder.finish()

    def end(self) -> None:
        """Stop the flow where it is: the events sent so far reach Kafka, no more follow, and
        :attr:`expected` (what :meth:`wait_until_all_applied` waits for) counts those alone."""
        self.feeder.end()
        expected: dict[str, int] = {}
        for _, key, _ in self.records[:250 + self.feeder.sent]:
            expected[key.decode()] = expected.get(key.decode(), 0) + 1
        self.expected = expected

    def flowing(self) -> bool:
        """True while the feeder still has events to send."""
        return self.feeder.is_alive() and self.feeder.sent < len(self.feeder.records)

    def __enter__(self) -> FlowingFeed:
        return self

    def __exit__(self, *exc) -> None:
        if self.feeder.is_alive():
            self.feeder.stop()


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
    gave up and closed its side meanwhile (the bytes had left it: they arrive late).
    ``latency_s``: how long each command waits before it goes on (a slow network to Redis)."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.held_writes = 0
        self.latency_s = 0.0
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
                                    if self.latency_s:
                                        self.closed.wait(self.latency_s)
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


#: the learners that learn every event (the click re-ranker learns from shown lists)
EVENT_LEARNERS = ("recommender", "covisit", "reminder", "trending")


def learned(worker: WorkerProcess) -> dict[str, float]:
    """Events each of :data:`EVENT_LEARNERS` of ``worker`` learned (its metrics)."""
    return {name: worker.metric("streamrec_model_events_learned", model=name) for name in EVENT_LEARNERS}


def learned_all(worker: WorkerProcess, sent: int) -> bool:
    """True once every learner of ``worker`` learned ``sent`` events; fails at once on more."""
    counts = learned(worker)
    over = {k: v for k, v in counts.items() if v > sent}
    assert not over, f"learned more events than were sent ({sent}): {over}\n{worker.log_tail()}"
    return counts == dict.fromkeys(EVENT_LEARNERS, float(sent))


def partitioned_env(bootstrap: str, prefix: str, partitions: int) -> dict[str, str]:
    """Worker settings on topics of ``prefix`` (created here) with ``partitions`` partitions,
    every worker learning all of them."""
    ensure_topics(bootstrap, [f"{prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], partitions)
    return {"STREAMREC_TOPIC_PREFIX": prefix, "STREAMREC_APP_ID": f"{prefix}worker",
            "STREAMREC_PARTITIONS": str(partitions), "STREAMREC_LEARN_ALL_PARTITIONS": "true"}

