"""Kafka and Redis security settings: every combination that cannot work is refused naming the
setting, the options every client gets, and secrets masked wherever settings are shown.
(tests/integration/test_security.py runs them against a real SASL_SSL broker and TLS Redis.)"""

from __future__ import annotations

import socketserver
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from typer.testing import CliRunner

import stream.cli
from stream.app import faust_credentials
from stream.connections import AccessDenied, KafkaConnection, RedisConnection, mask_url
from stream.errors import ConfigError, ServiceUnavailable
from stream.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
EXISTING = __file__  # a file that exists, for the settings that must name one
#: a self-signed certificate and its key (openssl req -x509 -newkey ec, valid to 2126), for the
#: settings read as PEM at start
CERT_PEM = """-----BEGIN CERTIFICATE-----
MIIBiDCCAS+gAwIBAgIUAXiC58y2/CvZYyJS5o0To3vUYNowCgYIKoZIzj0EAwIw
GTEXMBUGA1UEAwwOc3RyZWFtcmVjLXRlc3QwIBcNMjYxMjA0MDQ0MjM0WhgPMjEy
NjExMTAwNDQyMzRaMBkxFzAVBgNVBAMMDnN0cmVhbXJlYy10ZXN0MFkwEwYHKoZI
zj0CAQYIKoZIzj0DAQcDQgAE+e6Yo9/S8Xuw0YtvkbYDnUkUAT8ZcY4s+YbXZKP3
/eTRggRUPnPjetoruYj8wGMEwwhxF7PCowiDx8xPM/RQcKNTMFEwHQYDVR0OBBYE
FOL/YJ4QYOCamQ+PhfdfPa4fMBrmMB8GA1UdIwQYMBaAFOL/YJ4QYOCamQ+Phfdf
Pa4fMBrmMA8GA1UdEwEB/wQFMAMBAf8wCgYIKoZIzj0EAwIDRwAwRAIgMM+UH3FS
yOYT7jEdzRnWlrUUpTnGmKxzXTxmxPR4iM0CIGlXRp/vykOClWXjSydLFMPH57Pi
NGB2m+Oyz3OLA1tl
-----END CERTIFICATE-----
"""
KEY_PEM = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgT9u1fFS193jCuJa7
VhV/hrq9hKtmapUWd915XSD2Nr+hRANCAAT57pij39Lxe7DRi2+RtgOdSRQBPxlx
jiz5htdko/f95NGCBFQ+c+N62iu5iPzAYwTDCHEXs8KjCIPHzE8z9FBw
-----END PRIVATE KEY-----
"""
SASL = {"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "STREAMREC_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "STREAMREC_KAFKA_SASL_USERNAME": "app", "STREAMREC_KAFKA_SASL_PASSWORD": "kafka-sentinel-pw"}


def test_plaintext_by_default_with_nothing_but_the_bootstrap_servers():
    kafka = Settings.from_env({}).kafka
    assert kafka.client_options() == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(kafka) is None
    assert KafkaConnection.of("h:1") == KafkaConnection("h:1")


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "scram-sha-512"])
def test_sasl_ssl_gives_every_client_the_login_and_a_verifying_tls_context(mechanism):
    kafka = Settings.from_env({**SASL, "STREAMREC_KAFKA_SASL_MECHANISM": mechanism}).kafka
    options = kafka.client_options()
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == mechanism.upper()
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("app", "kafka-sentinel-pw")
    context = options["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    credentials = faust_credentials(kafka)
    assert credentials.protocol.value == "SASL_SSL" and credentials.mechanism.value == mechanism.upper()
    assert "kafka-sentinel-pw" not in repr(credentials) + repr(kafka)


def test_sasl_plaintext_sends_no_tls_context():
    kafka = Settings.from_env({**SASL, "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}).kafka
    assert "ssl_context" not in kafka.client_options()
    assert faust_credentials(kafka).protocol.value == "SASL_PLAINTEXT"


def test_ssl_alone_sends_no_credentials():
    kafka = Settings.from_env({"STREAMREC_KAFKA_SECURITY_PROTOCOL": "SSL"}).kafka
    assert set(kafka.client_options()) == {"bootstrap_servers", "security_protocol", "ssl_context"}
    assert faust_credentials(kafka).protocol.value == "SSL"


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"STREAMREC_KAFKA_SECURITY_PROTOCOL": "TLS"}, "STREAMREC_KAFKA_SECURITY_PROTOCOL='TLS': expected one of"),
        ({**SASL, "STREAMREC_KAFKA_SASL_MECHANISM": "GSSAPI"}, "STREAMREC_KAFKA_SASL_MECHANISM='GSSAPI'"),
        ({**SASL, "STREAMREC_KAFKA_SASL_MECHANISM": ""}, "STREAMREC_KAFKA_SASL_MECHANISM=''"),
        ({**SASL, "STREAMREC_KAFKA_SASL_PASSWORD": ""}, "STREAMREC_KAFKA_SASL_PASSWORD is empty"),
        ({**SASL, "STREAMREC_KAFKA_SASL_USERNAME": ""}, "STREAMREC_KAFKA_SASL_USERNAME is empty"),
        ({**SASL, "STREAMREC_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, "sends no credentials"),
        ({**SASL, "STREAMREC_KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "STREAMREC_KAFKA_SSL_CAFILE=/nonexistent/ca.pem: no such file"),
        ({"STREAMREC_KAFKA_SSL_CAFILE": EXISTING}, "does not use TLS"),
        ({**SASL, "STREAMREC_KAFKA_SSL_KEYFILE": EXISTING}, "without STREAMREC_KAFKA_SSL_CERTFILE"),
        ({"STREAMREC_REDIS_SSL_CA_FILE": EXISTING}, "does not use TLS: start it with rediss://"),
        ({"STREAMREC_REDIS_URL": "rediss://h:6380/0", "STREAMREC_REDIS_SSL_CA_FILE": "/nope.pem"}, "no such file"),
        ({"STREAMREC_REDIS_URL": "rediss://h:port/0"}, "STREAMREC_REDIS_URL=rediss://h:port/0"),
    ],
)
def test_settings_that_cannot_work_are_refused_naming_them(env, says):
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert says in str(info.value)
    assert "kafka-sentinel-pw" not in str(info.value)


def test_a_ca_file_that_is_not_pem_is_a_config_error_naming_it(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    kafka = Settings.from_env({**SASL, "STREAMREC_KAFKA_SSL_CAFILE": str(bad)}).kafka
    with pytest.raises(ConfigError, match="STREAMREC_KAFKA_SSL_CAFILE=.*not a PEM file"):
        kafka.client_options()


def test_redis_ca_file_goes_to_every_redis_client_and_requires_the_server_certificate(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text(CERT_PEM)
    redis_conn = Settings.from_env({"STREAMREC_REDIS_URL": "rediss://app:pw@db:6380/0",
                                    "STREAMREC_REDIS_SSL_CA_FILE": str(ca)}).redis
    assert redis_conn.client_options() == {"ssl_ca_certs": str(ca), "ssl_cert_reqs": "required"}
    assert Settings.from_env({}).redis.client_options() == {}
    assert "pw@" not in repr(redis_conn)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://h:1/0?password=hunter2", "redis://h:1/0?password=***"),
        ("rediss://u@h:1/0?db=1&Password=hunter2&ssl_ca_certs=/ca.pem", "rediss://u@h:1/0?db=1&Password=***&ssl_ca_certs=/ca.pem"),
        ("rediss://u:hunter2@h:1/0?ssl_password=hunter2", "rediss://u:***@h:1/0?ssl_password=***"),
        ("redis://h:1/0?password=", "redis://h:1/0?password="),
    ],
)
def test_mask_url_hides_passwords_in_the_query_too(url, masked):
    assert mask_url(url) == masked


def test_no_secret_in_repr_describe_or_the_settings_command():
    env = {**SASL, "STREAMREC_REDIS_URL": "rediss://app@db:6380/0?password=redis-sentinel-pw",
           "STREAMREC_SNAPSHOT_KEY": "snapshot-sentinel-key"}
    s = Settings.from_env(env)
    shown = repr(s) + str(s) + " ".join(v for _, v, _ in s.describe()) + s.kafka.describe() + repr(s.kafka) + repr(s.redis)
    for secret in ("kafka-sentinel-pw", "redis-sentinel-pw", "snapshot-sentinel-key"):
        assert secret not in shown
    assert "STREAMREC_KAFKA_SASL_PASSWORD=***" in repr(s)
    done = subprocess.run([sys.executable, "-m", "stream.cli", "settings"], cwd=ROOT, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "STREAMREC_KAFKA_SASL_USERNAME" in done.stdout and "password=***" in done.stdout
    for secret in ("kafka-sentinel-pw", "redis-sentinel-pw", "snapshot-sentinel-key"):
        assert secret not in done.stdout + done.stderr


def test_refusals_say_what_to_fix_and_outages_stay_outages():
    kafka = Settings.from_env(SASL).kafka

    class SaslAuthenticationFailedError(Exception):
        pass

    denied = kafka.refusal(SaslAuthenticationFailedError("Authentication failed: invalid credentials"))
    assert isinstance(denied, AccessDenied) and "STREAMREC_KAFKA_SASL_PASSWORD" in str(denied)
    assert "kafka-sentinel-pw" not in str(denied)
    assert isinstance(kafka.unavailable("h:1: TLS failed: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
                      AccessDenied)
    assert isinstance(kafka.unavailable("h:1: [Errno 111] Connection refused", 3.0), ServiceUnavailable)
    assert isinstance(kafka.unavailable(ConnectionRefusedError(111, "refused")), ServiceUnavailable)
    redis_conn = RedisConnection("redis://app:redis-sentinel-pw@db:6379/0")
    denied = redis_conn.refusal(Exception("WRONGPASS invalid username-password pair or user is disabled."))
    assert isinstance(denied, AccessDenied) and "redis-sentinel-pw" not in str(denied)
    assert redis_conn.refusal(ConnectionError("Error 111 connecting")) is None


def test_a_listener_without_sasl_or_tls_is_said_so_not_blamed_on_the_password():
    """SASL_PLAINTEXT against a plain listener was "refused the PLAIN login of user 'u': check
    ...USERNAME, ...PASSWORD" (aiokafka's IllegalSaslStateError); SSL against one was only "did
    not answer": neither pointed at STREAMREC_KAFKA_SECURITY_PROTOCOL, the setting to fix."""
    class IllegalSaslStateError(Exception):
        pass

    kafka = Settings.from_env(SASL).kafka
    denied = kafka.refusal(IllegalSaslStateError("[Error 34] IllegalSaslStateError: <AIOKafkaConnection>"))
    assert isinstance(denied, AccessDenied) and "speak no SASL" in str(denied), denied
    assert "STREAMREC_KAFKA_SECURITY_PROTOCOL" in str(denied) and "PASSWORD" not in str(denied)
    tls = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": "h:1", "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SSL"}).kafka
    said = tls.unavailable("h:1: TLS failed: [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol", 5)
    assert isinstance(said, ServiceUnavailable) and "may speak no TLS" in str(said), said
    plain = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": "h:1"}).kafka.unavailable("h:1: Connection refused", 5)
    assert "TLS" not in str(plain)


class PingRaising:
    """A redis-py client whose PING raises ``exc`` (what a server that answered said)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def ping(self):
        raise self.exc


@pytest.mark.parametrize("exc, said", [
    (redis.AuthenticationError("invalid username-password pair or user is disabled."), "refused the login"),
    (redis.ResponseError("DB index is out of range"), "below the server's `databases` setting"),
    (redis.InvalidResponse('Protocol error, got "<" as reply type byte'), "answered, but not as Redis does"),
])
def test_a_redis_that_refuses_the_worker_or_serve_stops_them_at_start(monkeypatch, exc, said):
    """A wrong password, or a database the server has not: the worker retried loading its
    snapshot every 2 s forever, serve's /readyz never turned ready; said by neither at start."""
    monkeypatch.setattr(RedisConnection, "client", lambda self, **options: PingRaising(exc))

    def reached(*args, **kwargs):
        raise AssertionError("went on past a Redis that refused it")

    monkeypatch.setattr(stream.cli, "BrokerWait", reached)
    monkeypatch.setattr(stream.cli, "run_server", reached)
    monkeypatch.setattr(stream.cli.gcpolicy, "configure", lambda **_: None)
    monkeypatch.setattr(stream.cli, "one_blas_thread", lambda: None)
    monkeypatch.setattr(stream.cli, "REGISTRY", CollectorRegistry())  # the worker's metrics, once a test
    env = {"STREAMREC_REDIS_URL": "redis://:redis-sentinel-pw@db:6379/0", "STREAMREC_METRICS_PORT": "0",
           "STREAMREC_CATALOGUE": "false", "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    for command in ("worker", "serve"):
        result = CliRunner().invoke(stream.cli.app, [command], env=env)
        assert isinstance(result.exception, AccessDenied) and said in str(result.exception), (command, result.exception)
        assert "redis-sentinel-pw" not in str(result.exception)


@pytest.fixture
def http_server():
    """A local HTTP server (not Redis): answers whatever it is sent with a 400, as a web server does."""
    server = socketserver.TCPServer(("127.0.0.1", 0), _BadRequest)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class _BadRequest(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.rfile.readline()
        self.wfile.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


def test_a_url_naming_a_server_that_is_not_redis_is_refused_at_start(http_server):
    """STREAMREC_REDIS_URL at a web server's port: the worker retried loading its snapshot forever,
    each try logging redis-py's "Protocol error, got "H" as reply type byte"."""
    with pytest.raises(AccessDenied, match=r"not as Redis does .*STREAMREC_REDIS_URL"):
        RedisConnection(f"redis://127.0.0.1:{http_server}/0").check_login()


def test_a_redis_that_does_not_answer_is_left_to_the_retries(monkeypatch):
    monkeypatch.setattr(RedisConnection, "client",
                        lambda self, **options: PingRaising(redis.ConnectionError("Error 111 connecting to db:6379.")))
    RedisConnection("redis://db:6379/0").check_login()  # no error: the worker waits for it, as before


def test_a_password_written_as_the_user_is_pointed_out():
    denied = RedisConnection("redis://s3cret@db:6379/0").refusal(redis.AuthenticationError("WRONGPASS"))
    assert denied is not None and "a password alone goes after a colon" in str(denied)
    assert "after a colon" not in str(RedisConnection("redis://app:pw@db:6379/0").refusal(redis.AuthenticationError("x")))


@pytest.mark.parametrize("url, said", [
    ("redis://h:6379/0?bogus=1", "unknown query parameter 'bogus'"),
    ("redis://h:6379/0?ssl_certfile=/c.pem", "need rediss://"),
    ("redis://h:6379/0?socket_timeout=soon", "socket_timeout"),
    ("redis://h:6379/abc", "database 'abc' is not a number"),
    ("redis://h:6379/-1", "database '-1' is not a number"),
    ("redis://h:6379/2147483648", "database '2147483648' is not a number 0 to 2,147,483,647"),
    ("redis://h:6379/0/1", "is not a number"),
    ("redis://h:6379/?db=x", "database 'x' is not a number"),
    ("redis://h:6379/1?db=2", "in the path and in the query"),
    ("unix:///run/redis.sock?db=1&db=2", "twice in the query"),
    # no host: redis-py connected to localhost (redis://${HOST}:6379/0 with HOST unset reached another Redis)
    ("redis://:6379/0", "no host"),
    ("redis://", "no host"),
    ("rediss://:pw@/0", "no host"),
    ("redis://db host:6379/0", "host 'db host'"),
    ("redis://h:0/0", "port 0"),
    ("unix://", "no socket path"),
    # timeouts redis-py passes to socket.settimeout: nan and -1 were a traceback at the first
    # connection, 0 a non-blocking socket, 1e18 past what a socket takes
    ("redis://h:6379/0?socket_connect_timeout=nan", "socket_connect_timeout=nan: expected seconds"),
    ("redis://h:6379/0?socket_connect_timeout=-1", "socket_connect_timeout=-1: expected seconds"),
    ("redis://h:6379/0?socket_timeout=nan", "socket_timeout=nan"),
    ("redis://h:6379/0?socket_timeout=0", "socket_timeout=0"),
    ("redis://h:6379/0?socket_timeout=inf", "socket_timeout=inf"),
    ("redis://h:6379/0?socket_timeout=1e18", "at most 86,400"),
    # a pool of 0 connections: redis-py took it without a word (no limit, or its default)
    ("redis://h:6379/0?max_connections=0", "max_connections='0': expected a whole number of connections, at least 1"),
    ("redis://h:6379/0?max_connections=-3", "max_connections='-3': expected a whole number of connections, at least 1"),
    ("redis://h:6379/0?max_connections=ten", "max_connections='ten': expected a whole number"),
    # text for the binary user documents and snapshot: a restarted worker retried its snapshot for
    # ever (UnicodeDecodeError); redis-py keeps "False" from a URL as a string, which is true
    ("redis://h:6379/0?decode_responses=true", "decode_responses is not supported"),
    # a host no name resolves (as for the Kafka bootstrap): waited for, for ever
    ("redis://a..b:6379/0", "host 'a..b'"),
    ("redis://h%zz:6379/0", "host 'h%zz'"),
    ("redis://h:6379/0?decode_responses=False", "decode_responses is not supported"),
    # a '/', '#' or '?' in the password: urllib's complaint quoted the password as a port, or the
    # address parsed as a host named by the user name
    ("redis://:hunter2#x@h:6379/0", "the password holds '#', '/' or '?'"),
    ("redis://default:S3cr3t/Pw@h:6379/0", "percent-encode them (%23, %2F, %3F)"),
    ("redis://u:12/3@h:6379/0", "the password holds '#', '/' or '?'"),
    ("redis://u:12#3@h:6379/0", "the password holds '#', '/' or '?'"),
])
def test_a_redis_url_redis_py_would_misread_or_refuse_later_is_refused_at_start(url, said):
    with pytest.raises(ConfigError, match="STREAMREC_REDIS_URL") as info:
        Settings.from_env({"STREAMREC_REDIS_URL": url})
    assert said in str(info.value)
    assert "hunter2" not in str(info.value) and "S3cr3t" not in str(info.value), info.value


@pytest.mark.parametrize("url", ["redis://h:6379/3", "redis://h:6379/2147483647", "redis://h:6379", "redis://h:6379/", "unix:///run/redis.sock?db=2",
                                 "rediss://u:p@h:6380/0?ssl_cert_reqs=required&socket_timeout=5",
                                 "redis://[::1]:6379/0?socket_connect_timeout=0.5&socket_timeout=86400",
                                 "redis://h:6379/0?max_connections=1", "redis://h:6379/0?max_connections=50",
                                 "redis://h:6379/0?client_name=app@shop", "redis://u:p%2Fw%23x@h:6379/0"])
def test_the_redis_urls_that_work_are_taken(url):
    assert Settings.from_env({"STREAMREC_REDIS_URL": url}).redis_url == url


@pytest.fixture
def pem_files(tmp_path):
    (tmp_path / "cert.pem").write_text(CERT_PEM)
    (tmp_path / "key.pem").write_text(KEY_PEM)
    (tmp_path / "text.pem").write_text("not a certificate\n")
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("env, said", [
    ({"STREAMREC_REDIS_SSL_CA_FILE": "text.pem"}, "STREAMREC_REDIS_SSL_CA_FILE=.*text.pem: not a PEM file of CA certificates"),
    ({"STREAMREC_REDIS_SSL_CA_FILE": "folder"}, "STREAMREC_REDIS_SSL_CA_FILE=.*folder: a folder, not a file"),
    ({"STREAMREC_REDIS_URL": "rediss://h:6380/0?ssl_ca_certs=text.pem"}, "ssl_ca_certs=.*not a PEM file"),
    ({"STREAMREC_REDIS_URL": "rediss://h:6380/0?ssl_certfile=text.pem&ssl_keyfile=key.pem"}, "not a certificate and its private key in PEM"),
    ({"STREAMREC_REDIS_URL": "rediss://h:6380/0?ssl_certfile=cert.pem&ssl_keyfile=text.pem"}, "not a certificate and its private key in PEM"),
    ({"STREAMREC_REDIS_URL": "rediss://h:6380/0?ssl_certfile=cert.pem"}, "not a certificate and its private key"),
    ({"STREAMREC_REDIS_URL": "rediss://h:6380/0?ssl_keyfile=key.pem"}, "ssl_keyfile is given without ssl_certfile"),
])
def test_redis_tls_files_that_are_not_pem_are_refused_at_start(pem_files, monkeypatch, env, said):
    monkeypatch.chdir(pem_files)
    env = {"STREAMREC_REDIS_URL": "rediss://h:6380/0", **env}
    with pytest.raises(ConfigError, match=said):
        Settings.from_env(env)


def test_redis_tls_files_in_pem_are_taken(pem_files, monkeypatch):
    monkeypatch.chdir(pem_files)
    url = "rediss://h:6380/0?ssl_ca_certs=cert.pem&ssl_certfile=cert.pem&ssl_keyfile=key.pem"
    assert Settings.from_env({"STREAMREC_REDIS_URL": url, "STREAMREC_REDIS_SSL_CA_FILE": "cert.pem"}).redis_url == url


def test_a_refused_connection_is_called_refused_not_a_wait_that_ran_out():
    """A broker address where nothing listens was worded "did not answer within 5 s (...
    Connection refused)", as if the client had waited 5 s for a slow broker."""
    kafka = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:9"}).kafka
    for exc in ("127.0.0.1:9: [Errno 111] Connection refused", ConnectionRefusedError(111, "Connection refused")):
        said = str(kafka.unavailable(exc, 5))
        assert "refused the connection" in said and "no broker listens there" in said, said
        assert "within" not in said and "STREAMREC_KAFKA_BOOTSTRAP" in said, said
    slow = str(kafka.unavailable("127.0.0.1:9: timed out", 5))
    assert "did not answer within 5 s" in slow, slow


ENCRYPTED_KEY_PEM = """-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAh4mIWGfRiSQAICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEAPMdxJZpxFcBJjiRuKsMtMEgZCH
7Ajx0FXskkZNX+U/RDD4fnXZ5UiIvzF7Mv6/9NN/6bjfrtUudK7x4qUXc6b7HE4d
0MmikAd29DXQ/yYj7YnAJklelEIzqrPatdyc1brjP3JPr/J8PShhtw1NmrQk1ue8
PlGy3SotvpHdBBYrAJo8PcVdNPnXQDHkuD/mE3ib2o0eGWOnZjn9WjlGERfWJXQ=
-----END ENCRYPTED PRIVATE KEY-----
"""  # KEY_PEM under the passphrase "pw" (openssl pkey -aes256)


def test_a_kafka_client_key_under_a_passphrase_is_said_so_and_never_prompted_for(tmp_path):
    """OpenSSL asked for the passphrase on the terminal (a worker under `docker run -it` hung
    there); without one it said "not a certificate and its private key in PEM ([Errno 22]...)"."""
    (tmp_path / "cert.pem").write_text(CERT_PEM)
    (tmp_path / "key.pem").write_text(ENCRYPTED_KEY_PEM)
    kafka = Settings.from_env({"STREAMREC_KAFKA_BOOTSTRAP": "h:9093", "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SSL",
                               "STREAMREC_KAFKA_SSL_CERTFILE": str(tmp_path / "cert.pem"),
                               "STREAMREC_KAFKA_SSL_KEYFILE": str(tmp_path / "key.pem")}).kafka
    with pytest.raises(ConfigError, match="the private key is encrypted with a passphrase") as info:
        kafka.ssl_context()
    assert "STREAMREC_KAFKA_SSL_KEYFILE=" in str(info.value)
    (tmp_path / "key.pem").write_text(KEY_PEM)
    assert kafka.ssl_context() is not None
