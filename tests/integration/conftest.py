"""Fixtures for the integration tier: a real Kafka broker and a real Redis server.

Nothing here mocks a service. When ``STREAMREC_KAFKA_BOOTSTRAP`` / ``STREAMREC_REDIS_URL``
point at servers that answer (say, a stack started with ``make up``), the tests use them;
otherwise the session starts its own through ``deploy/kafka/kafka.sh`` and
``deploy/redis/redis.sh`` on free loopback ports, with data under ``.run/test-*-<pid>``, and
stops them at the end. A service that cannot be started fails the tests that need it, with
the script's output and log tail; it is never a skip (in CI, ``CI=true``, nor anywhere else).

Fixtures:

- ``kafka_bootstrap`` (session): ``"127.0.0.1:PORT"`` of a broker that answers.
- ``redis_url`` (session): ``"redis://127.0.0.1:PORT/0"`` of a server that answers PING.
- ``service_env`` (session): ``{"STREAMREC_KAFKA_BOOTSTRAP": ..., "STREAMREC_REDIS_URL": ...}``
  to merge into the environment of a subprocess (a worker, the CLI).
- ``topic_prefix`` (function): ``"t<12 hex>."``, unique per test; put it before every topic
  and consumer group name so tests never see each other's messages.
- ``kafka_admin`` (function): a kafka-python ``KafkaAdminClient`` on the broker, closed after.
- ``redis_prefix`` (function): ``"t<12 hex>:"``, unique per test; keys under it are deleted
  after the test (the server may be a developer's, so nothing is flushed).
- ``redis_client`` (function): ``redis.Redis`` on ``redis_url`` with ``decode_responses=True``.
- ``private_kafka`` / ``private_redis`` (function): a server of the test alone, to ``halt`` and
  ``start`` again, or ``pause`` (SIGSTOP) and ``resume``; ``unstarted_kafka``: a broker of the test alone that it starts itself.

Every test under ``tests/integration`` is marked ``integration`` automatically.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient
from ports import free_ports
from workerkit import WorkerProcess

from stream.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
KAFKA_SH = ROOT / "deploy" / "kafka" / "kafka.sh"
REDIS_SH = ROOT / "deploy" / "redis" / "redis.sh"
RUN_DIR = ROOT / ".run"
HERE = Path(__file__).resolve().parent

# A cold start may resolve the Kafka jars with Maven or apt-get install Redis first.
START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 90


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


# ---------------------------------------------------------------------------- helpers


def kafka_answers(bootstrap: str, timeout: float = 3.0) -> bool:
    """True when the first broker in ``bootstrap`` answers a Kafka Metadata request.

    A raw Metadata v7 request (what kafka.sh's probe sends), not a client library: a client
    that fails to bootstrap leaves sockets behind, which ResourceWarning-as-error reports.
    """
    first = bootstrap.split(",")[0].strip().removeprefix("kafka://")
    host, _, port = first.rpartition(":")
    # api_key=3 (Metadata), version=7, correlation_id=42, client_id, all topics, no auto-create
    request = struct.pack(">hhih", 3, 7, 42, 5) + b"probe" + struct.pack(">ib", -1, 0)
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout) as conn:
            conn.sendall(struct.pack(">i", len(request)) + request)
            head = b""
            while len(head) < 16:
                chunk = conn.recv(16 - len(head))
                if not chunk:
                    return False
                head += chunk
    except (OSError, ValueError):
        return False
    _size, correlation_id, _throttle_ms, brokers = struct.unpack(">iiii", head)
    return correlation_id == 42 and brokers >= 1


def redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    except ValueError:
        return False
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


@dataclass
class LocalService:
    """One server started by a deploy script for this test session."""

    name: str
    script: Path
    args: list[str]
    data_dir: Path
    log: Path
    address: str = ""  # its bootstrap (Kafka) or URL (Redis)
    paused: bool = False  # SIGSTOPped by ``pause``

    def _run(self, command: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(self.script), *self.args, command],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def start(self) -> None:
        try:
            done = self._run("start", START_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            self._fail(f"{self.script.name} start took more than {exc.timeout:.0f} s", "")
        if done.returncode != 0:
            self._fail(
                f"{self.script.name} start exited {done.returncode}", done.stdout + done.stderr
            )

    def stop(self) -> None:
        if self.paused:  # a test that failed before its ``resume``: a stopped process does not take SIGTERM
            self.resume()
        if self.halt():
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def halt(self) -> bool:
        """Stop the server and keep its data (a later ``start`` brings it back as it was)."""
        try:
            done = self._run("stop", STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"\nwarning: {self.name} in {self.data_dir} did not stop in {STOP_TIMEOUT_S} s")
            return False
        if done.returncode != 0:
            print(f"\nwarning: stopping {self.name} failed:\n{done.stdout}{done.stderr}")
            return False
        return True

    def pause(self) -> None:
        """SIGSTOP the server: a host that stops answering (its connections stay open, nothing is
        refused, nothing answered) until ``resume``."""
        os.kill(self._pid(), signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)
        self.paused = False

    def _pid(self) -> int:
        """The pid its script wrote beside its log (``kafka.pid``, ``redis.pid``)."""
        return int(self.log.with_suffix(".pid").read_text().strip())

    def _fail(self, what: str, output: str) -> None:
        where = (
            "CI=true: a service that cannot start fails the run"
            if in_ci()
            else (
                "the integration tests need it; see deploy/README files, or point "
                "STREAMREC_KAFKA_BOOTSTRAP / STREAMREC_REDIS_URL at running servers"
            )
        )
        pytest.fail(
            f"could not start {self.name} for the integration tests: {what}.\n"
            f"{output.strip()}\n--- {self.log} (last lines) ---\n{tail(self.log)}\n({where})",
            pytrace=False,
        )


# ---------------------------------------------------------------------------- services


def kafka_service(what: str, tag: str) -> LocalService:
    """A broker on free loopback ports with its data under ``.run/test-kafka-<tag>``, not started;
    should this session die without tearing down, it stops by itself."""
    port, controller_port = free_ports(2)
    data_dir = RUN_DIR / f"test-kafka-{tag}"
    return LocalService(
        name=f"{what} on 127.0.0.1:{port}",
        script=KAFKA_SH,
        args=[f"--port={port}", f"--controller-port={controller_port}", f"--data-dir={data_dir}",
              f"--watch-pid={os.getpid()}"],
        data_dir=data_dir,
        log=data_dir / "kafka.log",
        address=f"127.0.0.1:{port}",
    )


def redis_service(what: str, tag: str) -> LocalService:
    """A Redis server on a free loopback port with its data under ``.run/test-redis-<tag>``, not started."""
    (port,) = free_ports(1)
    data_dir = RUN_DIR / f"test-redis-{tag}"
    return LocalService(
        name=f"{what} on 127.0.0.1:{port}",
        script=REDIS_SH,
        args=[f"--port={port}", f"--data-dir={data_dir}"],
        data_dir=data_dir,
        log=data_dir / "redis.log",
        address=f"redis://127.0.0.1:{port}/0",
    )


def running(service: LocalService) -> Iterator[LocalService]:
    service.start()
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    given = os.environ.get("STREAMREC_KAFKA_BOOTSTRAP", "").strip()
    if given and kafka_answers(given):
        yield given
        return
    for broker in running(kafka_service("a Kafka broker", str(os.getpid()))):
        yield broker.address


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    given = os.environ.get("STREAMREC_REDIS_URL", "").strip()
    if given and redis_answers(given):
        yield given
        return
    for server in running(redis_service("a Redis server", str(os.getpid()))):
        yield server.address


@pytest.fixture
def private_kafka() -> Iterator[LocalService]:
    """A broker of this test alone (``.address`` is its bootstrap), which it may stop (``halt``)
    and start again without disturbing the other tests."""
    yield from running(kafka_service("a private Kafka broker", f"own-{os.getpid()}-{uuid.uuid4().hex[:6]}"))


@pytest.fixture
def unstarted_kafka() -> Iterator[LocalService]:
    """A broker of this test alone, not started: its ``.address`` answers nothing until the test
    calls ``.start()`` (stopped after the test)."""
    broker = kafka_service("a private Kafka broker", f"own-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def private_redis() -> Iterator[LocalService]:
    """A Redis server of this test alone (``.address`` is its URL), to stop and start again."""
    yield from running(redis_service("a private Redis server", f"own-{os.getpid()}-{uuid.uuid4().hex[:6]}"))


@pytest.fixture(scope="session")
def service_env(kafka_bootstrap: str, redis_url: str) -> dict[str, str]:
    return {"STREAMREC_KAFKA_BOOTSTRAP": kafka_bootstrap, "STREAMREC_REDIS_URL": redis_url}


# ---------------------------------------------------------------------------- per test


@pytest.fixture
def topic_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}."


@pytest.fixture
def kafka_admin(kafka_bootstrap: str) -> Iterator[KafkaAdminClient]:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="streamrec-tests")
    try:
        yield admin
    finally:
        admin.close()


@pytest.fixture
def redis_prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        try:
            keys = list(client.scan_iter(match=f"{redis_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


@pytest.fixture
def worker_env(service_env, topic_prefix, tmp_path) -> dict[str, str]:
    """The environment of a `streamrec worker` subprocess on this test's topics (2 partitions,
    created here), with quick batches and a short session timeout; metrics off."""
    env = dict(os.environ)
    env.update(service_env)
    env.update({
        "STREAMREC_TOPIC_PREFIX": topic_prefix,
        "STREAMREC_APP_ID": f"{topic_prefix}worker",
        "STREAMREC_PARTITIONS": "2",
        "STREAMREC_MODEL_DIR": str(tmp_path / "models"),
        "STREAMREC_METRICS_PORT": "0",
        "STREAMREC_BATCH_TIMEOUT_MS": "5",
        "STREAMREC_SNAPSHOT_INTERVAL_S": "2",
        "STREAMREC_KAFKA_SESSION_TIMEOUT_S": "6",
        "STREAMREC_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    })
    ensure_topics(service_env["STREAMREC_KAFKA_BOOTSTRAP"], [f"{topic_prefix}{t}" for t in ("clicks", "purchases", "recommendations", "dlq")], 2)
    return env


@pytest.fixture
def workers(worker_env, tmp_path):
    """``start(**env) -> WorkerProcess``: a `streamrec worker` on this test's topics (with
    ``metrics=True`` its /metrics and /readyz on a free port; other keywords set environment
    variables); every one still running is killed after the test."""
    started: list[WorkerProcess] = []

    def start(metrics: bool = False, **env: str) -> WorkerProcess:
        w = WorkerProcess({**worker_env, **env}, tmp_path / f"worker-{len(started)}.log",
                          metrics_port=free_ports(1)[0] if metrics else None).start()
        started.append(w)
        return w

    yield start
    for w in started:
        if w.proc is not None and w.proc.poll() is None:
            w.stop(signal.SIGKILL)
