"""Security against real servers (issue 16, parts 1-3): Kafka over SASL_SSL (SCRAM and PLAIN
logins, mutual TLS), Redis over TLS with an ACL user, and secrets that never show.

One broker with a SASL_SSL listener and one TLS-only Redis with an ACL file serve the whole
module (tests/integration/secure.py; certificates made here with openssl). A worker and
`streamrec produce` log in with credentials and an event becomes a recommendation; wrong
credentials and untrusted certificates are refused with a message that says what to fix and
no traceback; the passwords (random, so they serve as sentinels) appear in no output: not in
`streamrec settings`, the worker's log, its /metrics and /readyz, nor the error messages.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from ports import free_ports
from secure import Certs, SecureKafka, SecureRedis, make_certs, secure_kafka, secure_redis
from workerkit import WorkerProcess, wait_for

from stream.connections import AccessDenied
from stream.pseudonyms import Pseudonyms
from stream.records import decode_recommendation
from stream.settings import Settings
from stream.state import RedisUserStateStore, UserState
from stream.topics import ensure_topics

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "sec."  # the ACL user may touch keys under it only (secure.py)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def kafka_sasl(certs: Certs) -> Iterator[SecureKafka]:
    yield from secure_kafka(certs, f"{os.getpid()}-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def redis_tls(certs: Certs, tmp_path_factory) -> Iterator[SecureRedis]:
    yield from secure_redis(certs, tmp_path_factory.mktemp("redis-tls"), key_pattern=f"{PREFIX}*")


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def base_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env.update({"STREAMREC_MODEL_DIR": str(tmp_path / "models"), "STREAMREC_PARTITIONS": "2",
                "STREAMREC_METRICS_PORT": "0", "PYTHONUNBUFFERED": "1", **settings})
    return env


def assert_no_secret(text: str, secrets: list[str], where: str) -> None:
    for secret in secrets:
        assert secret not in text, f"a secret shows in {where}:\n{text[-3000:]}"


def assert_clear_refusal(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    for text in expected:
        assert text in output, output[-3000:]


# ------------------------------------------------------------------------------- Kafka


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_each_mechanism_logs_in_and_creates_topics(kafka_sasl: SecureKafka, mechanism: str) -> None:
    kafka = Settings.from_env(kafka_sasl.env(mechanism)).kafka
    name = f"sec{uuid.uuid4().hex[:8]}.{mechanism.lower()}"
    assert ensure_topics(kafka, [name], 1, timeout_s=30) == [name]
    assert ensure_topics(kafka, [name], 1, timeout_s=30) == []  # it is there: listed over the same login


def test_wrong_password_and_untrusted_certificates_are_refused_clearly(kafka_sasl: SecureKafka, certs: Certs,
                                                                      tmp_path: Path) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    bad_login = base_env(tmp_path, **kafka_sasl.env("SCRAM-SHA-512", password=wrong))
    done = cli("produce", "--limit", "5", "--no-progress", env=bad_login)
    assert_clear_refusal(done, "refused the SCRAM-SHA-512 login of user", "STREAMREC_KAFKA_SASL_PASSWORD")
    assert_no_secret(done.stdout + done.stderr, [wrong, kafka_sasl.users["SCRAM-SHA-512"][1]], "produce's error")

    done = cli("worker", env=bad_login, timeout=60)
    assert_clear_refusal(done, "refused the SCRAM-SHA-512 login of user")
    assert_no_secret(done.stdout + done.stderr, [wrong], "the worker's error")

    done = cli("tail", "--limit", "1", "--timeout", "5", env=bad_login)
    assert_clear_refusal(done, "refused the SCRAM-SHA-512 login of user")

    untrusted = base_env(tmp_path, **{**kafka_sasl.env(), "STREAMREC_KAFKA_SSL_CAFILE": str(certs.other_ca)})
    assert_clear_refusal(cli("produce", "--limit", "5", "--no-progress", env=untrusted),
                         "TLS with Kafka at", "STREAMREC_KAFKA_SSL_CAFILE")
    no_client_cert = base_env(tmp_path, **{**kafka_sasl.env(), "STREAMREC_KAFKA_SSL_CERTFILE": "",
                                           "STREAMREC_KAFKA_SSL_KEYFILE": ""})
    assert_clear_refusal(cli("produce", "--limit", "5", "--no-progress", env=no_client_cert),
                         "TLS with Kafka at", "STREAMREC_KAFKA_SSL_CERTFILE")
    plaintext = base_env(tmp_path, STREAMREC_KAFKA_BOOTSTRAP=kafka_sasl.bootstrap)
    assert_clear_refusal(cli("produce", "--limit", "5", "--no-progress", env=plaintext), "speaks SSL or SASL_SSL")

    # and in-process: the same refusal as an exception callers can tell from an outage
    with pytest.raises(AccessDenied, match="refused the SCRAM-SHA-512 login"):
        ensure_topics(Settings.from_env(bad_login).kafka, ["sec.never"], 1, timeout_s=30)


def test_a_protocol_the_listener_does_not_speak_is_said_and_not_waited_for(kafka_sasl: SecureKafka,
                                                                            tmp_path: Path) -> None:
    """TLS without SASL, or no TLS at all, at the SASL_SSL listener: the listener closes the
    connection unanswered, as a broker that is down may. The worker waited for it for ever
    (unready) and the commands said to start a broker; now the listener is asked what it speaks
    (stream/listeners.py) and each stops at start with the setting to change."""
    sasl = {"STREAMREC_KAFKA_SASL_MECHANISM": "", "STREAMREC_KAFKA_SASL_USERNAME": "", "STREAMREC_KAFKA_SASL_PASSWORD": ""}
    tls_only = base_env(tmp_path, **{**kafka_sasl.env(), **sasl, "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SSL"})
    done = cli("worker", env=tls_only, timeout=60)
    assert_clear_refusal(done, "speaks SASL_SSL, not STREAMREC_KAFKA_SECURITY_PROTOCOL=SSL",
                         "set STREAMREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL")
    assert_clear_refusal(cli("produce", "--limit", "5", "--no-progress", env=tls_only),
                         "set STREAMREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL")

    plaintext = base_env(tmp_path, STREAMREC_KAFKA_BOOTSTRAP=kafka_sasl.bootstrap)
    # the listener requires a client certificate, which a plaintext client has none of: TLS, but which one is not known
    done = cli("tail", "--limit", "1", "--timeout", "5", env=plaintext)
    assert_clear_refusal(done, "speaks SSL or SASL_SSL, not STREAMREC_KAFKA_SECURITY_PROTOCOL=PLAINTEXT")
    assert "make up" not in done.stdout + done.stderr
    with pytest.raises(AccessDenied, match="speaks SSL or SASL_SSL"):
        ensure_topics(Settings.from_env(plaintext).kafka, ["sec.never"], 1, timeout_s=30)


def test_worker_and_produce_over_sasl_ssl_and_redis_tls_and_no_secret_shows(
        kafka_sasl: SecureKafka, redis_tls: SecureRedis, certs: Certs, tmp_path: Path) -> None:
    sasl_password = kafka_sasl.users["SCRAM-SHA-512"][1]
    env = base_env(tmp_path, **kafka_sasl.env("SCRAM-SHA-512"), STREAMREC_REDIS_URL=redis_tls.url(),
                   STREAMREC_REDIS_SSL_CA_FILE=str(certs.ca), STREAMREC_TOPIC_PREFIX=PREFIX,
                   STREAMREC_APP_ID=f"sec{uuid.uuid4().hex[:8]}", STREAMREC_BATCH_TIMEOUT_MS="5",
                   STREAMREC_SNAPSHOT_INTERVAL_S="2", STREAMREC_KAFKA_SESSION_TIMEOUT_S="6",
                   STREAMREC_SNAPSHOT_KEY=f"snapkey-{uuid.uuid4().hex}", STREAMREC_PSEUDONYM_KEY=f"pseudokey-{uuid.uuid4().hex}")
    secrets = [sasl_password, redis_tls.password, env["STREAMREC_SNAPSHOT_KEY"], env["STREAMREC_PSEUDONYM_KEY"]]
    settings = Settings.from_env(env)
    ensure_topics(settings.kafka, settings.topics.all, 2, timeout_s=60)

    worker = WorkerProcess(env, tmp_path / "worker.log", metrics_port=free_ports(1)[0]).start()
    try:
        wait_for(lambda: worker.http("/readyz")[0] == 200, 120, "the worker's /readyz (Kafka over SASL_SSL, "
                 "Redis over TLS)", worker)
        done = cli("produce", "--limit", "40", "--no-progress", "--id-prefix", uuid.uuid4().hex, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "sent 40 events" in done.stdout

        consumer = KafkaConsumer(**settings.kafka.client_options(), group_id=None, enable_auto_commit=False)
        try:
            parts = [TopicPartition(settings.topics.recommendations, p) for p in (0, 1)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            got: list = []

            def recommendations() -> bool:
                got.extend(r for rs in consumer.poll(timeout_ms=500).values() for r in rs)
                return bool(got)

            wait_for(recommendations, 120, "a recommendation over SASL_SSL", worker)
        finally:
            consumer.close()
        rec = decode_recommendation(got[0].value)
        assert rec.items and rec.user_id == got[0].key.decode()

        with redis.Redis.from_url(redis_tls.url(), ssl_ca_certs=str(certs.ca)) as client:
            # state went to Redis over TLS, as the ACL user, under the user's pseudonym: the worker
            # saves a batch's states after Kafka took its lists, so the list can be read first
            pseudonym = Pseudonyms(env["STREAMREC_PSEUDONYM_KEY"]).of(rec.user_id)
            wait_for(lambda: client.exists(f"{PREFIX}user:{pseudonym}"), 30, "the user's state under their pseudonym",
                     worker)
            assert not client.exists(f"{PREFIX}user:{rec.user_id}")
            # the forked child writes the snapshot over a connection of its own, with the same CA
            wait_for(lambda: client.exists(f"{PREFIX}models:snapshot"), 60, "a model snapshot in Redis", worker)

        _, readyz = worker.http("/readyz")
        assert "kafka: ok" in readyz and "redis: ok" in readyz, readyz
        _, metrics = worker.http("/metrics")
        assert "streamrec_events_consumed_total" in metrics
        assert_no_secret(metrics, secrets, "/metrics")
        assert_no_secret(readyz, secrets, "/readyz")
    finally:
        worker.stop()
    log = worker.log_text()
    assert "STREAMREC_KAFKA_SASL_PASSWORD=***" in log  # the settings are logged at start, masked
    assert_no_secret(log, secrets, "the worker's log")
    assert_no_secret(done.stdout + done.stderr, secrets, "produce's output")

    shown = cli("settings", env={**env, "STREAMREC_REDIS_URL": redis_tls.url(password="") + f"?password={redis_tls.password}"})
    assert shown.returncode == 0, shown.stderr
    assert "password=***" in shown.stdout
    assert_no_secret(shown.stdout + shown.stderr, secrets, "`streamrec settings` (password in the query)")
    shown = cli("settings", env=env)
    assert f"{redis_tls.user}:***@" in shown.stdout
    assert_no_secret(shown.stdout + shown.stderr, secrets, "`streamrec settings`")


# ------------------------------------------------------------------------------- Redis


def test_store_over_tls_as_an_acl_user(redis_tls: SecureRedis, certs: Certs) -> None:
    settings = Settings.from_env({"STREAMREC_REDIS_URL": redis_tls.url(), "STREAMREC_REDIS_SSL_CA_FILE": str(certs.ca)})

    async def roundtrip() -> None:
        store = RedisUserStateStore.from_url(settings.redis_url, key_prefix=PREFIX, **settings.redis.client_options())
        try:
            assert await store.ping()
            await store.save_many({"u1": UserState("u1", recent_items=["i1"])})
            assert (await store.load_many(["u1"]))["u1"].recent_items == ["i1"]
            await store.load_many(["u2"])  # absent: its save asks the key's TYPE, which the ACL allows (+@read)
            await store.save_many({"u2": UserState("u2", clicks=1)})
            assert (await store.load_many(["u2"]))["u2"].clicks == 1 and store.rebuilt == 0
            store.blob_writer("blob")(b"data")  # what the snapshot child does, in a process of its own
            assert await store.get_blob("blob") == b"data"
        finally:
            await store.close()

    asyncio.run(roundtrip())
    with settings.redis.client() as client:
        with pytest.raises(redis.exceptions.NoPermissionError):  # the ACL: its own keys only
            client.set("elsewhere", b"x")
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.flushall()


def test_redis_refusals_are_clear_and_hold_no_password(redis_tls: SecureRedis, certs: Certs) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    cases = [
        (Settings.from_env({"STREAMREC_REDIS_URL": redis_tls.url(password="") + f"?password={wrong}",
                            "STREAMREC_REDIS_SSL_CA_FILE": str(certs.ca)}), "refused the login"),
        (Settings.from_env({"STREAMREC_REDIS_URL": redis_tls.url(), "STREAMREC_REDIS_SSL_CA_FILE": str(certs.other_ca)}),
         "TLS with Redis"),
    ]
    for settings, expected in cases:
        with settings.redis.client(socket_connect_timeout=5) as client:
            with pytest.raises(redis.RedisError) as caught:
                client.ping()
        denied = settings.redis.refusal(caught.value)
        assert denied is not None and expected in str(denied), (caught.value, denied)
        assert_no_secret(f"{caught.value!r} {denied}", [wrong, redis_tls.password], "a Redis error")
    # the plain scheme on a TLS port: no answer, and no password in what is said
    with redis.Redis.from_url(redis_tls.url(scheme="redis"), socket_connect_timeout=2, socket_timeout=2) as client:
        with pytest.raises(redis.RedisError) as caught:
            client.ping()
    assert_no_secret(repr(caught.value), [redis_tls.password], "a Redis error")
