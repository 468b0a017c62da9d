"""How every streamrec client reaches Kafka and Redis: addresses plus security (SASL, TLS, ACLs).

One :class:`KafkaConnection` and one :class:`RedisConnection` per process, built from the
settings (``Settings.kafka``, ``Settings.redis``); every client the project creates takes its
options from them, so a security setting reaches the Faust worker, the publisher, topic
creation, ``produce``, ``tail``, the replay after a restart and the benchmarks alike.
Neither object prints a secret: the SASL password stays out of its ``repr``, and a Redis URL
is shown through :func:`mask_url`.

>>> conn = KafkaConnection("b1:9093", "SASL_SSL", "SCRAM-SHA-512", "alice", "s3cret")
>>> "s3cret" in repr(conn), conn.describe()
(False, 'b1:9093 (SASL_SSL, SCRAM-SHA-512 as alice)')
>>> mask_url("rediss://app:s3cret@db:6380/0?password=s3cret&ssl_ca_certs=/ca.pem")
'rediss://app:***@db:6380/0?password=***&ssl_ca_certs=/ca.pem'
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
from aiokafka import AIOKafkaConsumer
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from stream.errors import ConfigError, ServiceUnavailable, StreamrecError, clipped
from stream.listeners import SPEAKS, handshakes

#: STREAMREC_KAFKA_SECURITY_PROTOCOL's values (Kafka's own names)
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: STREAMREC_KAFKA_SASL_MECHANISM's values
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

#: the highest database number STREAMREC_REDIS_URL takes (Redis's ``databases`` is an int)
MAX_REDIS_DB = 2**31 - 1
#: the longest socket_timeout or socket_connect_timeout STREAMREC_REDIS_URL takes: a day
MAX_TIMEOUT_S = 86_400

#: query parameters of a URL whose values are masked (redis-py passes any of them on)
_SECRET_QUERY = re.compile(r"pass|secret|token|credential", re.IGNORECASE)


class AccessDenied(StreamrecError):
    """A server answered but refused this client: wrong credentials, an untrusted certificate,
    a missing ACL. A user's mistake to fix in the settings, not a service to wait for."""


#: a URL's user part up to its password (group 1) and the password (group 2): greedy to the last
#: '@', as a password may itself hold '@', '/' or '?' (more masked is safe)
_PASSWORD = re.compile(r"(//[^:/@?#]*:)(.*)@")


def mask_url(url: str) -> str:
    """``url`` with its password hidden, in the user part and in the query.

    >>> mask_url("redis://:hunter2@h:1/0")
    'redis://:***@h:1/0'
    >>> mask_url("redis://h:1/0?ssl_password=x&db=2&PASSWORD=y")
    'redis://h:1/0?ssl_password=***&db=2&PASSWORD=***'
    >>> mask_url("redis://user@h/0"), mask_url("not a url: p@ss")
    ('redis://user@h/0', 'not a url: p@ss')
    """
    masked = _PASSWORD.sub(r"\1***@", url)
    head, sep, query = masked.partition("?")
    if not sep:
        return masked
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        parts.append(f"{name}=***" if eq and value and _SECRET_QUERY.search(name) else pair)
    return head + sep + "&".join(parts)


def _host_ok(host: str) -> bool:
    """A bootstrap host: an IPv6 address in brackets, or a name or IPv4 address of letters,
    digits, ``-`` and ``_`` in dot-separated labels (none empty; a final dot allowed)."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        return ":" in inner and all(c in "0123456789abcdefABCDEF:." for c in inner)
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    return bool(host) and all(label and all(c.isalnum() or c in "-_" for c in label) for label in labels)


def _encrypted_key(path: str) -> bool:
    """Whether the PEM file at ``path`` holds a passphrase-protected private key."""
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    return b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in text or b"Proc-Type: 4,ENCRYPTED" in text


def _check_file(env: str, path: str) -> None:
    if os.path.isdir(path):
        raise ConfigError(f"{env}={path}: a folder, not a file; name the PEM file itself")
    if not os.path.isfile(path):
        raise ConfigError(f"{env}={path}: no such file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{env}={path}: not readable by this process")


def _check_ca_pem(env: str, path: str) -> None:
    """A :class:`ConfigError` unless ``path`` holds CA certificates in PEM (as a TLS client reads them)."""
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{env}={path}: not a PEM file of CA certificates ({exc}); give the CA's certificate in "
                          "PEM (-----BEGIN CERTIFICATE-----)") from None


# --------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class KafkaConnection:
    """Where Kafka is and how to log in to it (the ``STREAMREC_KAFKA_*`` settings)."""

    bootstrap: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = ""
    sasl_username: str = ""
    sasl_password: str = field(default="", repr=False)
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    #: what named the bootstrap servers, for messages: a command's option (``--bootstrap``) or the environment variable
    given_by: str = field(default="STREAMREC_KAFKA_BOOTSTRAP", compare=False, repr=False)

    @classmethod
    def of(cls, target: KafkaConnection | str) -> KafkaConnection:
        """``target`` itself, or a plaintext connection to the bootstrap servers it names."""
        return target if isinstance(target, KafkaConnection) else cls(target)

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def servers(self) -> list[tuple[str, int]]:
        """The bootstrap servers as (host, port), brackets off an IPv6 host; ConfigError naming
        the setting for an entry that is not host:port.

        >>> KafkaConnection("127.0.0.1:9092, [::1]:9093,").servers()
        [('127.0.0.1', 9092), ('::1', 9093)]
        >>> KafkaConnection(":9092").servers()
        Traceback (most recent call last):
        stream.errors.ConfigError: STREAMREC_KAFKA_BOOTSTRAP=':9092': ':9092' is not host:port (e.g. 127.0.0.1:9092; several are separated by commas)
        """
        servers = []
        for server in filter(None, (s.strip() for s in self.bootstrap.split(","))):
            host, _, port = server.rpartition(":")
            # a scheme (PLAINTEXT://b1:9092), a space or a ';' for a comma, a user@ or a '#' made a host
            # no name resolves, waited for as a broker that does not answer, for ever; a ':' in it
            # (an IPv6 address without brackets, two servers run together) crashed Faust's URL parser
            if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535 and _host_ok(host)):
                if "://" in server:
                    hint = ": drop the scheme (PLAINTEXT:// and the like)"
                elif ";" in server or any(c.isspace() for c in server):
                    hint = ": separate servers with commas, not ';' or spaces"
                elif "@" in server:
                    hint = ": no user name here, a login goes in the STREAMREC_KAFKA_SASL_* settings"
                elif ":" in host and not host.startswith("["):
                    hint = ": put an IPv6 address in brackets, as [::1]:9092"
                else:
                    hint = ""
                raise ConfigError(f"STREAMREC_KAFKA_BOOTSTRAP={self.bootstrap!r}: {server!r} is not host:port{hint} "
                                  "(e.g. 127.0.0.1:9092; several are separated by commas)")
            servers.append((host.strip("[]"), int(port)))
        return servers

    def check(self) -> None:
        """ConfigError naming the setting when these values cannot work together."""
        if not self.servers():  # "," alone: Faust refused it with a traceback, aiokafka tried localhost:9092
            raise ConfigError(f"STREAMREC_KAFKA_BOOTSTRAP={self.bootstrap!r} names no server: expected "
                              "host:port[,host:port]")
        if self.security_protocol not in PROTOCOLS:
            raise ConfigError(f"STREAMREC_KAFKA_SECURITY_PROTOCOL={self.security_protocol!r}: expected one of "
                              f"{', '.join(PROTOCOLS)}")
        sasl = {"STREAMREC_KAFKA_SASL_MECHANISM": self.sasl_mechanism, "STREAMREC_KAFKA_SASL_USERNAME": self.sasl_username,
                "STREAMREC_KAFKA_SASL_PASSWORD": self.sasl_password}
        if self.uses_sasl:
            if self.sasl_mechanism not in MECHANISMS:
                raise ConfigError(f"STREAMREC_KAFKA_SASL_MECHANISM={self.sasl_mechanism!r}: expected one of "
                                  f"{', '.join(MECHANISMS)} with STREAMREC_KAFKA_SECURITY_PROTOCOL={self.security_protocol}")
            for env, value in sasl.items():
                if not value:
                    raise ConfigError(f"{env} is empty: STREAMREC_KAFKA_SECURITY_PROTOCOL={self.security_protocol} "
                                      "needs a SASL mechanism, user name and password")
        else:
            given = [env for env, value in sasl.items() if value]
            if given:
                raise ConfigError(f"{', '.join(given)} set, but STREAMREC_KAFKA_SECURITY_PROTOCOL="
                                  f"{self.security_protocol} sends no credentials: use SASL_SSL (or SASL_PLAINTEXT)")
        files = {"STREAMREC_KAFKA_SSL_CAFILE": self.ssl_cafile, "STREAMREC_KAFKA_SSL_CERTFILE": self.ssl_certfile,
                 "STREAMREC_KAFKA_SSL_KEYFILE": self.ssl_keyfile}
        if not self.uses_ssl:
            given = [env for env, value in files.items() if value]
            if given:
                raise ConfigError(f"{', '.join(given)} set, but STREAMREC_KAFKA_SECURITY_PROTOCOL="
                                  f"{self.security_protocol} does not use TLS: use SSL or SASL_SSL")
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ConfigError("STREAMREC_KAFKA_SSL_KEYFILE is set without STREAMREC_KAFKA_SSL_CERTFILE: a client "
                              "certificate needs both")
        for env, path in files.items():
            if path:
                _check_file(env, path)

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of every client (None without TLS): the CA file's authorities (else the
        system's), the broker's host name checked, and the client certificate when one is set."""
        if not self.uses_ssl:
            return None
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"STREAMREC_KAFKA_SSL_CAFILE={self.ssl_cafile}: not a PEM file of CA certificates ({exc})") from None
        if self.ssl_certfile:
            try:  # never a passphrase prompt on the terminal: a worker under `docker run -it` hung there
                context.load_cert_chain(self.ssl_certfile, self.ssl_keyfile or None, password=lambda: b"")
            except (ssl.SSLError, OSError) as exc:
                given = (f"STREAMREC_KAFKA_SSL_CERTFILE={self.ssl_certfile}, STREAMREC_KAFKA_SSL_KEYFILE="
                         f"{self.ssl_keyfile or '(none)'}")
                if _encrypted_key(self.ssl_keyfile or self.ssl_certfile):
                    raise ConfigError(f"{given}: the private key is encrypted with a passphrase, which streamrec "
                                      "does not take: give it the key unencrypted (openssl pkey -in KEY -out "
                                      "PLAIN), kept readable by the worker alone") from None
                raise ConfigError(f"{given}: not a certificate and its private key in PEM ({exc})") from None
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for an aiokafka or kafka-python client (both take these names):
        ``bootstrap_servers`` and the security options."""
        options: dict[str, Any] = {"bootstrap_servers": self.bootstrap, "security_protocol": self.security_protocol}
        if self.uses_ssl:
            options["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                           sasl_plain_password=self.sasl_password)
        return options

    def describe(self) -> str:
        """The bootstrap servers and how this client logs in, for messages; never the password."""
        how = self.security_protocol
        if self.uses_sasl:
            how += f", {self.sasl_mechanism} as {self.sasl_username}"
        return f"{self.bootstrap} ({how})" if how != "PLAINTEXT" else self.bootstrap

    def refusal(self, exc: BaseException | str) -> AccessDenied | None:
        """An :class:`AccessDenied` saying what to fix when ``exc`` is a broker refusing this
        client (authentication, TLS verification, authorization); None for anything else. A
        string (what :func:`stream.topics.probe` saw) is a refusal only when TLS failed over a
        certificate (the broker's, or the one it asked of this client)."""
        if isinstance(exc, str):
            speaks = exc.partition(SPEAKS)[2]
            if speaks:  # the listener answered as another protocol than this client's (stream/listeners.py)
                return self._wrong_protocol(exc, speaks)
            if "tls failed" not in exc.lower() or "certificate" not in exc.lower():
                return None
            text = exc
        else:
            name = type(exc).__name__
            text = f"{name}: {exc}" if str(exc) else name
        lowered = text.lower()
        if "illegalsaslstate" in lowered and self.uses_sasl:  # the listener answered the handshake as no SASL one does
            return AccessDenied(f"Kafka at {self.bootstrap} did not take a SASL login ({text}): the listener there "
                                "seems to speak no SASL. Set STREAMREC_KAFKA_SECURITY_PROTOCOL to what it speaks "
                                "(PLAINTEXT or SSL), or point at the broker's SASL listener")
        if "authentication" in lowered or "sasl" in lowered:
            if self.uses_sasl:
                return AccessDenied(f"Kafka at {self.bootstrap} refused the {self.sasl_mechanism} login of user "
                                    f"{self.sasl_username!r} ({text}): check STREAMREC_KAFKA_SASL_USERNAME, "
                                    "STREAMREC_KAFKA_SASL_PASSWORD and STREAMREC_KAFKA_SASL_MECHANISM")
            return AccessDenied(f"Kafka at {self.bootstrap} asks for a login ({text}): set "
                                "STREAMREC_KAFKA_SECURITY_PROTOCOL=SASL_SSL and the STREAMREC_KAFKA_SASL_* settings")
        if isinstance(exc, ssl.SSLError) or "certificate" in lowered or "ssl" in lowered:
            return AccessDenied(f"TLS with Kafka at {self.bootstrap} failed ({text}): check STREAMREC_KAFKA_SSL_CAFILE "
                                "(the authority that signed the broker's certificate) and, where the broker asks for "
                                "one, STREAMREC_KAFKA_SSL_CERTFILE and STREAMREC_KAFKA_SSL_KEYFILE")
        if "authoriz" in lowered:
            return AccessDenied(f"Kafka at {self.bootstrap} does not allow user {self.sasl_username or '(anonymous)'!r} "
                                f"this ({text}): grant it the ACLs in docs/operations.md (Security)")
        return None

    def _wrong_protocol(self, text: str, speaks: str) -> AccessDenied:
        """The refusal for a listener that speaks ``speaks``, not this client's protocol."""
        needs = []
        if speaks.startswith("SASL") and not self.uses_sasl:  # not 'SSL or SASL_SSL': either may be it
            needs.append("the STREAMREC_KAFKA_SASL_* settings")
        if "SSL" in speaks and not self.uses_ssl:
            needs.append("STREAMREC_KAFKA_SSL_CAFILE (empty: the system's authorities)")
        if self.uses_sasl and "SASL" not in speaks:
            needs.append("no STREAMREC_KAFKA_SASL_* settings")
        if self.uses_ssl and "SSL" not in speaks:
            needs.append("no STREAMREC_KAFKA_SSL_* files")
        also = f", with {' and '.join(needs)}" if needs else ""
        return AccessDenied(f"Kafka at {self.bootstrap} speaks {speaks}, not STREAMREC_KAFKA_SECURITY_PROTOCOL="
                            f"{self.security_protocol} ({text}): set STREAMREC_KAFKA_SECURITY_PROTOCOL={speaks}{also}, "
                            f"or point {self.given_by} at the brokers' {self.security_protocol} listener")

    def reader(self, client_id: str) -> KafkaConsumer:
        """A blocking (kafka-python) consumer of no group for the command-line readers (``tail``,
        ``redrive``): it commits nothing, reads committed data only (:data:`ISOLATION_LEVEL`: what a
        transactional producer aborted stays in the log, marked aborted; the worker's producer is not
        one, a tool that copies or writes these topics may be), and waits up to 30 s for the broker;
        one it cannot reach raises :meth:`unavailable`'s error."""
        try:
            return KafkaConsumer(**self.client_options(), client_id=client_id, group_id=None, enable_auto_commit=False,
                                 bootstrap_timeout_ms=30_000, isolation_level=ISOLATION_LEVEL)
        except KafkaError as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: BaseException | str, timeout_s: float | None = None,
                    waited: bool = False) -> StreamrecError:
        """The error for a client that failed to reach Kafka: :meth:`refusal` when the broker
        refused it, else :class:`ServiceUnavailable` saying where Kafka was looked for.
        ``waited``: the caller tried again for ``timeout_s`` (a refused connection says so)."""
        denied = self.refusal(exc)
        if denied is not None:
            return denied
        if isinstance(exc, ConnectionRefusedError) or "connection refused" in str(exc).lower():
            # nothing listens there: said so, not as a slow broker's wait running out
            how_long = f" for {timeout_s:g} s" if waited and timeout_s is not None else ""
            return ServiceUnavailable(f"Kafka at {self.describe()} refused the connection{how_long} ({exc}): no broker "
                                      f"listens there. Start the local broker with `make up`, or point "
                                      f"{self.given_by} at a running one")
        within = f" within {timeout_s:g} s" if timeout_s is not None else ""
        hint = ""
        if self.uses_ssl and "tls failed" in str(exc).lower():  # a listener without TLS closes the handshake
            hint = (". If a broker runs there, its listener may speak no TLS: set STREAMREC_KAFKA_SECURITY_PROTOCOL to "
                    "what it speaks (PLAINTEXT or SASL_PLAINTEXT), or point at its TLS listener")
        return ServiceUnavailable(f"Kafka at {self.describe()} did not answer{within} ({exc}); start the local broker "
                                  f"with `make up`, or point {self.given_by} at a running one{hint}")


# --------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class RedisConnection:
    """Where Redis is and how to log in to it: the URL (``redis://`` or ``rediss://`` for TLS,
    ``user:password@`` for an ACL user) and the CA file that signed the server's certificate."""

    url: str = field(repr=False)
    ssl_ca_file: str = ""

    def __repr__(self) -> str:
        return f"RedisConnection(url={mask_url(self.url)!r}, ssl_ca_file={self.ssl_ca_file!r})"

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    def _scrubbed(self, exc: BaseException) -> str:
        """A parser's complaint about the URL, never with its password. A '#', '/' or '?' in the
        password ends the URL's address part early, and the complaint then quoted a piece of the
        password as a port ("Port could not be cast to integer value as 'hunter2'" for
        ``redis://:hunter2#x@h:1``): that is said instead."""
        secret = _PASSWORD.search(self.url)
        if secret is None:
            return str(exc)
        if any(c in secret.group(2) for c in "/?#"):
            return ("the password holds '#', '/' or '?', which end a URL's address part: percent-encode them "
                    "(%23, %2F, %3F)")
        text = str(exc)
        for form in {secret.group(2), unquote(secret.group(2))}:
            if form:
                text = text.replace(form, "***")
        return text

    def check(self) -> None:
        if not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: expected redis://host:port/db "
                              "(rediss:// for TLS)")
        try:
            parsed = urlsplit(self.url)
            parsed.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: {self._scrubbed(exc)}") from None
        if "@" not in parsed.netloc and ("@" in parsed.path or "@" in parsed.fragment):
            # a '/' or '#' in the password cut the address short: it parsed as a host no one runs
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: {self._scrubbed(ValueError())}")
        self._check_address(parsed)
        self._check_database(parsed)
        if self.ssl_ca_file:
            if parsed.scheme != "rediss":
                raise ConfigError(f"STREAMREC_REDIS_SSL_CA_FILE is set, but STREAMREC_REDIS_URL={self.masked_url} does "
                                  "not use TLS: start it with rediss://")
            _check_file("STREAMREC_REDIS_SSL_CA_FILE", self.ssl_ca_file)
            _check_ca_pem("STREAMREC_REDIS_SSL_CA_FILE", self.ssl_ca_file)
        self._check_max_connections(parsed)
        try:  # what redis-py makes of the URL, connecting to nothing: unknown names, bad values
            pool = redis.ConnectionPool.from_url(self.url, **self.client_options())
            pool.make_connection()
        except TypeError as exc:  # an unknown keyword argument: a query parameter redis-py has no use for
            name = re.search(r"argument '([^']*)'", str(exc))
            name = name.group(1) if name else str(exc)
            hint = " (the ssl_* ones need rediss://)" if name.startswith("ssl_") and parsed.scheme != "rediss" else ""
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: unknown query parameter {name!r}{hint}; remove "
                              "it or correct its name (redis-py's connection options)") from None
        except (ValueError, redis.RedisError) as exc:
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: {self._scrubbed(exc)}") from None
        if pool.connection_kwargs.get("decode_responses"):
            # the user documents and the models' snapshot are bytes: a restarted worker retried
            # loading its snapshot for ever (UnicodeDecodeError) and made no list meanwhile
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: decode_responses is not supported, streamrec "
                              "stores binary values; remove it from the URL")
        for name in ("socket_timeout", "socket_connect_timeout"):
            # redis-py reads them as floats: nan or -1 reached socket.settimeout as a traceback at
            # the first connection, 0 made the socket non-blocking
            value = pool.connection_kwargs.get(name)
            if value is not None and not 0 < value <= MAX_TIMEOUT_S:
                raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: {name}={value:g}: expected seconds, more "
                                  f"than 0 and at most {MAX_TIMEOUT_S:,} (leave it out for no timeout)")
        query = dict(parse_qsl(parsed.query))
        for name, value in query.items():
            if name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile") and value:
                _check_file(f"STREAMREC_REDIS_URL's {name}", value)
        if query.get("ssl_ca_certs"):
            _check_ca_pem("STREAMREC_REDIS_URL's ssl_ca_certs", query["ssl_ca_certs"])
        if query.get("ssl_certfile"):  # read as redis-py will, the key's password included
            password = query.get("ssl_password", "")
            try:
                ssl.create_default_context().load_cert_chain(query["ssl_certfile"], query.get("ssl_keyfile") or None,
                                                             password=lambda: password)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"STREAMREC_REDIS_URL's ssl_certfile={query['ssl_certfile']}, ssl_keyfile="
                                  f"{query.get('ssl_keyfile') or '(none)'}: not a certificate and its private key in PEM "
                                  f"(or the key's ssl_password is wrong) ({exc}); give PEM files, the key unencrypted or "
                                  "its password as ssl_password") from None
        elif query.get("ssl_keyfile"):
            raise ConfigError("STREAMREC_REDIS_URL's ssl_keyfile is given without ssl_certfile: give the client "
                              "certificate too (ssl_certfile=/path), or leave both out")

    def _check_address(self, parsed) -> None:
        """A host for redis:// and rediss:// (without one redis-py connected to localhost: a
        ``redis://${HOST}:6379/0`` whose variable was unset reached some other Redis), a port
        that can be connected to, and a socket's path for unix://."""
        if parsed.scheme == "unix":
            if not parsed.path:
                raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: no socket path; expected "
                                  "unix:///path/to/redis.sock")
            return
        host = parsed.hostname or ""  # an IPv6 address without its brackets
        if not host or not _host_ok(f"[{host}]" if ":" in host else host):  # 'a..b' or 'h%zz': waited for, for ever
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: {'no host' if not host else f'host {host!r}'}; "
                              "expected redis://host:port/db, e.g. redis://127.0.0.1:6379/0")
        if parsed.port == 0:
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: port 0; expected a port 1-65535 (6379 when "
                              "left out)")

    def _check_max_connections(self, parsed) -> None:
        """``max_connections``, when given, at least 1: redis-py took 0 without a word (as no
        limit in some versions, as its default of 100 in others), and a negative one was its
        own ValueError's words."""
        for name, value in parse_qsl(parsed.query):  # a blank value is left out, as redis-py leaves it
            if name != "max_connections":
                continue
            try:
                number = int(value)
            except ValueError:
                number = None
            if number is None or number < 1:
                raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: max_connections={clipped(value, 40)!r}: "
                                  "expected a whole number of connections, at least 1 (leave it out for redis-py's "
                                  "default)")

    def _check_database(self, parsed) -> None:
        """The database number, in the path (``/0``) or in the query (``?db=0``, a unix socket's
        only place for it), not both: a whole number (redis-py read ``/abc`` as 0 and ``/-1``
        as -1, which Redis refuses at the first command)."""
        queried = [value for name, value in parse_qsl(parsed.query, keep_blank_values=True) if name == "db"]
        in_path = parsed.path.lstrip("/") if parsed.scheme != "unix" else ""
        given = ([in_path] if in_path else []) + queried
        if len(given) > 1:
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: the database number is given "
                              f"{'in the path and in the query' if in_path else 'twice in the query'}; give it once, "
                              "e.g. redis://host:6379/0")
        if given and not (re.fullmatch(r"[0-9]{1,10}", given[0]) and int(given[0]) <= MAX_REDIS_DB):
            raise ConfigError(f"STREAMREC_REDIS_URL={self.masked_url}: database {given[0]!r} is not a number 0 to "
                              f"{MAX_REDIS_DB:,}; expected redis://host:port/db, e.g. redis://host:6379/0")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url(self.url, ...)`` (sync or asyncio)
        beyond those in the URL: the CA file, and the server's certificate required."""
        if not self.ssl_ca_file:
            return {}
        return {"ssl_ca_certs": self.ssl_ca_file, "ssl_cert_reqs": "required"}

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous redis-py client (scripts, benchmarks, tests); ``options`` beside the settings'."""
        return redis.Redis.from_url(self.url, **self.client_options(), **options)

    def check_login(self, timeout_s: float = 3.0, probe: Callable[[redis.Redis], Any] | None = None) -> None:
        """One PING at start: an :class:`AccessDenied` when Redis answers and refuses this client
        (:meth:`refusal`: a wrong password, an ACL, TLS), or what answers is not Redis at all,
        which the worker's retries would meet forever; a Redis that does not answer (down, starting) is left to them, and said by them.
        ``probe`` then runs on the same client: the commands the process needs (an ACL that
        refuses one of them is refused here too; ``stream.state.access_check``)."""
        try:
            with self.client(socket_connect_timeout=timeout_s, socket_timeout=timeout_s) as client:
                client.ping()
                if probe is not None:
                    probe(client)
        except (redis.RedisError, OSError) as exc:
            denied = self.refusal(exc) or self._other_scheme(exc, timeout_s)
            if denied is not None:
                raise denied from None

    def _other_scheme(self, exc: BaseException, timeout_s: float) -> AccessDenied | None:
        """An :class:`AccessDenied` when a connection that failed without a refusal (closed
        unanswered, a TLS handshake cut short) reaches a server that speaks the other scheme:
        TLS for ``redis://``, plain RESP for ``rediss://`` (asked with a handshake that trusts any
        certificate, or an unauthenticated PING). The worker waited for such a server for ever."""
        parsed = urlsplit(self.url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname or "certificate" in str(exc).lower():
            return None
        address = (parsed.hostname, parsed.port or 6379)
        if parsed.scheme == "redis":  # does it speak TLS?
            if handshakes(*address, timeout_s):
                return AccessDenied(f"Redis at {self.masked_url} speaks TLS, and STREAMREC_REDIS_URL's redis:// "
                                    f"does not ({type(exc).__name__}: {exc}): start it with rediss://, and set "
                                    "STREAMREC_REDIS_SSL_CA_FILE to the authority that signed its certificate")
            return None
        try:
            with socket.create_connection(address, timeout=timeout_s) as raw:
                raw.sendall(b"PING\r\n")  # does it answer plain RESP? (+PONG, or -NOAUTH before a login)
                if raw.recv(1)[:1] in (b"+", b"-"):
                    return AccessDenied(f"Redis at {self.masked_url} speaks no TLS, and STREAMREC_REDIS_URL's rediss:// "
                                        f"does ({type(exc).__name__}: {exc}): start it with redis://, without "
                                        "STREAMREC_REDIS_SSL_CA_FILE, or point it at the server's TLS port")
        except (OSError, ValueError):
            pass
        return None

    def refusal(self, exc: BaseException) -> AccessDenied | None:
        """An :class:`AccessDenied` saying what to fix when ``exc`` is Redis refusing this client,
        or a server that is not Redis answering it."""
        name = type(exc).__name__
        text = f"{name}: {exc}" if str(exc) else name
        lowered = text.lower()
        if "authentication" in lowered or "noauth" in lowered or "wrongpass" in lowered or "username-password" in lowered:
            parsed = urlsplit(self.url)
            # redis://PASSWORD@host names a user and no password, and redis-py then logs in as no one
            alone = (" (it names a user and no password: a password alone goes after a colon, "
                     "redis://:password@host:port/db)") if parsed.username and parsed.password is None else ""
            return AccessDenied(f"Redis at {self.masked_url} refused the login ({text}): check the user and password "
                                f"in STREAMREC_REDIS_URL (redis://user:password@host:port/db){alone}")
        # a command or key refused inside a script is a plain error reply, not NOPERM
        if "noperm" in lowered or "no permissions" in lowered or "user executing the script can't" in lowered:
            user = urlsplit(self.url).username or "default"
            return AccessDenied(f"Redis at {self.masked_url} does not allow user {unquote(user)!r} a command or key "
                                f"streamrec needs ({text}): grant it the ACL in docs/operations.md (Security), or name "
                                "a user that has it in STREAMREC_REDIS_URL")
        if "db index is out of range" in lowered:  # redis://host:port/16 on a server of 16 databases (0-15)
            return AccessDenied(f"Redis at {self.masked_url} has no such database ({text}): use a database number "
                                "below the server's `databases` setting (16 by default: 0 to 15) in STREAMREC_REDIS_URL")
        if "certificate" in lowered or "ssl" in lowered:
            return AccessDenied(f"TLS with Redis at {self.masked_url} failed ({text}): check STREAMREC_REDIS_SSL_CA_FILE "
                                "(the authority that signed the server's certificate) and the rediss:// scheme")
        if isinstance(exc, redis.InvalidResponse):  # an HTTP server, say, answering the PING: retrying will not help
            return AccessDenied(f"the server at {self.masked_url} answered, but not as Redis does ({text}): is the host "
                                "and port in STREAMREC_REDIS_URL a Redis server's (6379 by default)?")
        return None


#: how every streamrec reader reads Kafka: without what aborted transactions wrote (a
#: transactional producer, a site's say, leaves its aborted records in the log, marked);
#: tests/integration/test_aborted_transactions.py checks each reader
ISOLATION_LEVEL = "read_committed"


def fetches_end_empty_at_close(fetcher: Any) -> None:
    """Make a fetch that aiokafka's ``Fetcher.close()`` cancels end empty rather than cancelled.
    ``close()`` (``AIOKafkaConsumer.stop()``) cancels each fetch in flight and then awaits it
    unguarded (aiokafka issue 647), so a consumer stopped while a fetch waited to retry an
    absent broker raised the fetch's CancelledError out of ``stop()``: the worker's consumer
    thread died on it (its traceback logged line by line, the stop waiting 10 s for the dead
    thread), and a reader's ``finally: await consumer.stop()`` turned the error it was
    raising into a cancellation. A fetch cancelled by anything else stays cancelled.

    >>> import asyncio, types
    >>> async def away(assignment, node_id, request):
    ...     await asyncio.Event().wait()  # retrying an absent broker
    >>> f = types.SimpleNamespace(_closed=False, _proc_fetch_request=away)
    >>> fetches_end_empty_at_close(f)
    >>> async def closed_while_in_flight():
    ...     fetch = asyncio.ensure_future(f._proc_fetch_request(None, 0, None))
    ...     await asyncio.sleep(0)
    ...     f._closed = True
    ...     fetch.cancel()
    ...     return await fetch
    >>> asyncio.run(closed_while_in_flight())
    False
    """
    fetch = fetcher._proc_fetch_request

    async def fetch_or_closed(assignment, node_id, request):
        try:
            return await fetch(assignment, node_id, request)
        except asyncio.CancelledError:
            if fetcher._closed:
                return False
            raise

    fetcher._proc_fetch_request = fetch_or_closed


async def started_reader(client_options: Mapping[str, Any], max_poll_records: int) -> AIOKafkaConsumer:
    """An aiokafka consumer of no group (it commits nothing, and reads a partition it is given
    from its oldest record, committed transactions' only), started; one whose start fails (the
    broker down) is closed before the error goes on, not left for the collector to complain of.
    Its stop while the broker is away does not raise a cancelled fetch's CancelledError
    (:func:`fetches_end_empty_at_close`)."""
    consumer = AIOKafkaConsumer(**client_options, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", max_poll_records=max_poll_records,
                                isolation_level=ISOLATION_LEVEL)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()
        raise
    fetches_end_empty_at_close(consumer._fetcher)  # noqa: SLF001 - built by start()
    return consumer


__all__ = ["ISOLATION_LEVEL", "MECHANISMS", "PROTOCOLS", "AccessDenied", "KafkaConnection", "RedisConnection",
           "fetches_end_empty_at_close", "mask_url", "started_reader"]
