"""A Redis user the ACL lets log in but refuses a command the worker needs is refused at start.

Before, the worker and serve only PINGed Redis at start: a user without EVALSHA (the worker's
claim and save scripts), or without SET (refused inside those scripts, as an error reply
rather than NOPERM), passed, and the worker then retried every claim and save for ever,
unready, logging a warning every two seconds. Now `streamrec worker` exits 2 with one line
that names the user and STREAMREC_REDIS_URL, before it reaches Kafka; the documented ACL
passes, and the check leaves the keys it touches as they were.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from secure import Certs, SecureRedis, make_certs, secure_redis

from stream.connections import AccessDenied
from stream.settings import Settings
from stream.state import access_check

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "acl."
PASSWORDS = {name: f"{name}-{secrets.token_urlsafe(9)}" for name in ("noscript", "noset", "reader")}
WORKER_ACL = "-@all +@read +@write +@scripting +@transaction +@connection -@dangerous"


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory) -> Iterator[tuple[SecureRedis, Certs]]:
    certs = make_certs(tmp_path_factory.mktemp("acl-certs"))
    users = (f"user noscript on >{PASSWORDS['noscript']} ~{PREFIX}* -@all +@read +@write +@connection",
             f"user noset on >{PASSWORDS['noset']} ~{PREFIX}* {WORKER_ACL} -set",
             f"user reader on >{PASSWORDS['reader']} ~{PREFIX}* -@all +@read +@connection")
    for server in secure_redis(certs, tmp_path_factory.mktemp("acl-redis"), key_pattern=f"{PREFIX}*", more_users=users):
        yield server, certs


def url_of(server: SecureRedis, user: str) -> str:
    return f"rediss://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}/0"


def settings_of(server: SecureRedis, certs: Certs, url: str) -> Settings:
    return Settings.from_env({"STREAMREC_REDIS_URL": url, "STREAMREC_REDIS_SSL_CA_FILE": str(certs.ca),
                              "STREAMREC_TOPIC_PREFIX": PREFIX})


@pytest.mark.parametrize("user", ["noscript", "noset"])
def test_a_user_without_the_workers_commands_is_refused_at_start(acl_redis, user: str, tmp_path: Path) -> None:
    server, certs = acl_redis
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    # Kafka is not needed: Redis is checked before the worker looks for a broker
    env.update({"STREAMREC_REDIS_URL": url_of(server, user), "STREAMREC_REDIS_SSL_CA_FILE": str(certs.ca),
                "STREAMREC_TOPIC_PREFIX": PREFIX, "STREAMREC_KAFKA_BOOTSTRAP": "127.0.0.1:1",
                "STREAMREC_METRICS_PORT": "0", "STREAMREC_MODEL_DIR": str(tmp_path / "models")})
    done = subprocess.run([sys.executable, "-m", "stream.cli", "worker"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 2, f"exit {done.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert f"does not allow user {user!r} a command or key" in output, output[-3000:]
    assert "STREAMREC_REDIS_URL" in output
    assert PASSWORDS[user] not in output


def test_serve_needs_reads_only_and_the_check_leaves_keys_as_they_were(acl_redis) -> None:
    server, certs = acl_redis
    reader = settings_of(server, certs, url_of(server, "reader"))
    reader.redis.check_login(probe=access_check(PREFIX, writes=False))  # serve's check: a read-only user will do
    with pytest.raises(AccessDenied, match="does not allow user 'reader'"):
        reader.redis.check_login(probe=access_check(PREFIX, writes=True))

    worker = settings_of(server, certs, server.url())
    with worker.redis.client() as client:
        client.set(f"{PREFIX}user:streamrec-access-check", b"a user's document", ex=1000)
        worker.redis.check_login(probe=access_check(PREFIX, writes=True))
        assert client.get(f"{PREFIX}user:streamrec-access-check") == b"a user's document"
        assert 0 < client.ttl(f"{PREFIX}user:streamrec-access-check") <= 1000
        assert not client.exists(f"{PREFIX}claim:access-check")  # made and deleted in one script
        with pytest.raises(redis.exceptions.NoPermissionError):  # the fixture's users are what they claim
            client.set("elsewhere", b"x")


def test_the_other_scheme_than_the_servers_is_refused_at_start(acl_redis, redis_url: str) -> None:
    """redis:// at a TLS-only port (reset) and rediss:// at a plain one (the handshake times
    out): as a Redis that is down, waited for by the worker for ever, unready; now the server is
    asked which it speaks, and the URL's scheme is named."""
    server, _ = acl_redis
    plain_at_tls = Settings.from_env({"STREAMREC_REDIS_URL": server.url(scheme="redis")})
    with pytest.raises(AccessDenied, match="speaks TLS, and STREAMREC_REDIS_URL's redis:// does not") as caught:
        plain_at_tls.redis.check_login()
    assert server.password not in str(caught.value)

    tls_at_plain = Settings.from_env({"STREAMREC_REDIS_URL": redis_url.replace("redis://", "rediss://", 1)})
    with pytest.raises(AccessDenied, match="speaks no TLS, and STREAMREC_REDIS_URL's rediss:// does"):
        tls_at_plain.redis.check_login()
