"""Servers with security on, for the security tests: a Kafka broker with a SASL_SSL listener
and a Redis server with TLS and an ACL file, on free loopback ports, with certificates made
at test time by ``openssl`` (a CA, the servers' certificate for 127.0.0.1, a client
certificate, and a second CA that signed nothing the servers use).

The broker is deploy/kafka/kafka.sh's (``--extra-config`` adds the SASL_SSL listener,
``--add-scram`` creates the SCRAM users when it formats its storage); it keeps its plaintext
listener for its own probe and inter-broker traffic, and the tests' clients use only the
SASL_SSL one. Redis is Debian's redis-server, in the foreground, with TLS only (no plaintext
port) and clients' certificates not required (``tls-auth-clients no``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from conftest import KAFKA_SH, RUN_DIR, LocalService, in_ci, running, tail
from ports import free_ports

OPENSSL = shutil.which("openssl")


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA that signed the servers' and the client's certificates
    server_cert: Path
    server_key: Path
    server_pem: Path  # key and certificate in one file (Kafka's PEM keystore)
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: a client trusting only it must fail


def _openssl(*args: str, cwd: Path) -> None:
    if OPENSSL is None:
        pytest.fail("openssl not found on PATH: the security tests make their certificates with it "
                    "(Debian: apt-get install openssl; .ci/run installs it)", pytrace=False)
    done = subprocess.run([OPENSSL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.fail(f"openssl {' '.join(args[:2])} failed: {done.stderr}", pytrace=False)


def make_certs(where: Path) -> Certs:
    """A CA, a server certificate for 127.0.0.1 and localhost, a client certificate, another CA."""
    where.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out", f"{ca}.pem",
                 "-days", "2", "-subj", f"/CN=streamrec test {ca}", cwd=where)
    (where / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (where / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=streamrec test {name}", cwd=where)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=where)
    # Kafka's PEM keystore: an unencrypted PKCS#8 key, then the certificate
    _openssl("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server-pk8.key", cwd=where)
    keystore = where / "server-keystore.pem"
    keystore.write_text((where / "server-pk8.key").read_text() + (where / "server.pem").read_text())
    for path in where.iterdir():
        path.chmod(0o600)
    return Certs(ca=where / "ca.pem", server_cert=where / "server.pem", server_key=where / "server.key",
                 server_pem=keystore, client_cert=where / "client.pem", client_key=where / "client.key",
                 other_ca=where / "other-ca.pem")


# ---------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class SecureKafka:
    bootstrap: str  # the SASL_SSL listener
    users: dict[str, tuple[str, str]]  # mechanism -> (user, password)
    certs: Certs
    plaintext: str = ""  # the broker's own PLAINTEXT listener (its principal is ANONYMOUS)

    def env(self, mechanism: str = "SCRAM-SHA-512", password: str | None = None) -> dict[str, str]:
        """The STREAMREC_KAFKA_* settings of a client that logs in with ``mechanism``'s user,
        trusts the test CA and presents the client certificate (the listener requires one)."""
        user, right = self.users[mechanism]
        return {
            "STREAMREC_KAFKA_BOOTSTRAP": self.bootstrap,
            "STREAMREC_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "STREAMREC_KAFKA_SASL_MECHANISM": mechanism,
            "STREAMREC_KAFKA_SASL_USERNAME": user,
            "STREAMREC_KAFKA_SASL_PASSWORD": right if password is None else password,
            "STREAMREC_KAFKA_SSL_CAFILE": str(self.certs.ca),
            "STREAMREC_KAFKA_SSL_CERTFILE": str(self.certs.client_cert),
            "STREAMREC_KAFKA_SSL_KEYFILE": str(self.certs.client_key),
        }


def secure_kafka(certs: Certs, tag: str, more_config: tuple[str, ...] = ()) -> Iterator[SecureKafka]:
    """A broker with a SASL_SSL listener (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; mutual TLS);
    ``more_config``: more lines of its server.properties (an authorizer, say)."""
    port, controller_port, sasl_port = free_ports(3)
    data_dir = RUN_DIR / f"test-kafka-secure-{tag}"
    users = {mech: (f"{mech.lower().replace('-', '')}-user", secrets.token_urlsafe(12))
             for mech in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")}
    plain_user, plain_password = users["PLAIN"]
    extra = certs.ca.parent / "kafka-sasl-ssl.properties"
    extra.write_text("\n".join([
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port},SASL_SSL://127.0.0.1:{sasl_port}",
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port},SASL_SSL://127.0.0.1:{sasl_port}",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL",
        "sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule "
        f'required user_{plain_user}="{plain_password}";',
        "listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={certs.server_pem}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={certs.ca}",
        "listener.name.sasl_ssl.ssl.client.auth=required",
        *more_config,
        "",
    ]))
    scram = [f"--add-scram={mech}=[name={user},password={password}]"
             for mech, (user, password) in users.items() if mech.startswith("SCRAM")]
    service = LocalService(
        name=f"a Kafka broker with a SASL_SSL listener on 127.0.0.1:{sasl_port}",
        script=KAFKA_SH,
        args=[f"--port={port}", f"--controller-port={controller_port}", f"--data-dir={data_dir}",
              f"--watch-pid={os.getpid()}", f"--extra-config={extra}", *scram],
        data_dir=data_dir,
        log=data_dir / "kafka.log",
        address=f"127.0.0.1:{sasl_port}",
    )
    for broker in running(service):
        yield SecureKafka(bootstrap=broker.address, users=users, certs=certs, plaintext=f"127.0.0.1:{port}")


# ---------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class SecureRedis:
    port: int
    user: str
    password: str
    certs: Certs

    def url(self, password: str | None = None, scheme: str = "rediss") -> str:
        """The user's URL, with its password (another one; "": none in the URL)."""
        password = self.password if password is None else password
        login = f"{self.user}:{password}" if password else self.user
        return f"{scheme}://{login}@127.0.0.1:{self.port}/0"


def secure_redis(certs: Certs, where: Path, key_pattern: str = "*", more_users: tuple[str, ...] = ()) -> Iterator[SecureRedis]:
    """redis-server with TLS only on a free port, an ACL file with one user (and the default
    user off) allowed the worker's commands on keys matching ``key_pattern``, and the ACL lines
    ``more_users`` (``user NAME on >PASSWORD ...``), in the foreground; stopped after."""
    server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(server):
        pytest.fail("redis-server not found: `make redis-server` (deploy/redis/redis.sh install) installs it"
                    + (" (CI=true: a missing service fails the run)" if in_ci() else ""), pytrace=False)
    (port,) = free_ports(1)
    user, password = "streamrec-app", secrets.token_urlsafe(12)
    acl = where / "users.acl"
    # the worker's commands on its own keys only (docs/operations.md, Security)
    acl.write_text(f"user default off\nuser {user} on >{password} ~{key_pattern} -@all +@read +@write "
                   "+@scripting +@transaction +@connection -@dangerous\n" + "".join(f"{line}\n" for line in more_users))
    acl.chmod(0o600)
    log = where / "redis.log"
    proc = subprocess.Popen(
        [server, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", "--dir", str(where),
         "--save", "", "--appendonly", "no", "--aclfile", str(acl), "--tls-cert-file", str(certs.server_cert),
         "--tls-key-file", str(certs.server_key), "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
         "--logfile", str(log)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    secure = SecureRedis(port=port, user=user, password=password, certs=certs)
    try:
        deadline = time.monotonic() + 30
        while True:  # until it answers PING over TLS with the user's password
            client = redis.Redis.from_url(secure.url(), ssl_ca_certs=str(certs.ca), socket_connect_timeout=1)
            try:
                if client.ping():
                    break
            except redis.RedisError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server with TLS on 127.0.0.1:{port} did not answer ({exc}); exit code "
                                f"{proc.poll()}\n--- {log} ---\n{tail(log)}", pytrace=False)
            finally:
                client.close()
            time.sleep(0.05)
        yield secure
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
