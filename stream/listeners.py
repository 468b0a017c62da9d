"""What security protocol a Kafka listener speaks, asked when a client's own attempt failed.

A client whose ``STREAMREC_KAFKA_SECURITY_PROTOCOL`` is not its listener's sees only a closed
connection (plaintext at a TLS listener, TLS without SASL at a SASL one) or a TLS handshake cut
short (TLS at a plaintext listener): what a broker that is down or starting may do too, so it
was waited for, the worker unready for ever, and the commands said to start a broker. On such a
failure :func:`listener_speaks` asks the listener itself, with a TLS handshake that trusts
anything (it reads no data and sends no credentials) and the two requests a listener answers
before a login or not (Metadata: no SASL; ApiVersions: any). A listener that speaks another
protocol than the client's is a setting to change, said at once (``KafkaConnection.refusal``).
"""

from __future__ import annotations

import socket
import ssl
import struct

_CLIENT = b"streamrec-probe"
#: api_key 3 (Metadata), version 7, correlation id 42, client id, all topics (-1), no auto-create
METADATA = struct.pack(">hhih", 3, 7, 42, len(_CLIENT)) + _CLIENT + struct.pack(">ib", -1, 0)
#: api_key 18 (ApiVersions), version 0, correlation id 42, client id: answered before a SASL login
API_VERSIONS = struct.pack(">hhih", 18, 0, 42, len(_CLIENT)) + _CLIENT

#: what :func:`stream.topics.probe` adds to its problem when :func:`listener_speaks` found out
SPEAKS = "the listener there speaks "


def _any_tls(certfile: str = "", keyfile: str = "") -> ssl.SSLContext:
    """A TLS context that trusts any server (it only asks whether TLS is spoken), with the
    client's certificate where it has one (a listener that requires one, answers only then)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if certfile:
        try:
            context.load_cert_chain(certfile, keyfile or None, password=lambda: b"")
        except (ssl.SSLError, OSError):
            pass  # the settings' check says what is wrong with it
    return context


def handshakes(host: str, port: int, timeout_s: float, context: ssl.SSLContext | None = None) -> bool:
    """Whether the server at ``host:port`` completes a TLS handshake (``context``: one that
    trusts any certificate by default; nothing is sent after it)."""
    context = context or _any_tls()
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return True
    except (OSError, ValueError):
        return False


def exchange(conn: socket.socket, request: bytes) -> bytes | None:
    """Send one Kafka ``request`` (:data:`METADATA`, :data:`API_VERSIONS`) framed by its size;
    the answer's first 8 bytes (its size, then the correlation id 42 where it is an answer to
    it), None when the listener closed the connection first."""
    conn.sendall(struct.pack(">i", len(request)) + request)
    head = b""
    while len(head) < 8:
        chunk = conn.recv(8 - len(head))
        if not chunk:
            return None
        head += chunk
    return head


def answered(head: bytes) -> bool:
    """Whether :func:`exchange`'s ``head`` answers the request (its correlation id)."""
    return struct.unpack(">ii", head)[1] == 42


def _answers(host: str, port: int, timeout_s: float, request: bytes, context: ssl.SSLContext | None) -> bool:
    """Whether the listener answers ``request`` (its correlation id), over TLS with ``context``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            conn = context.wrap_socket(raw, server_hostname=host) if context is not None else raw
            try:
                head = exchange(conn, request)
            finally:
                if conn is not raw:
                    conn.close()
    except (OSError, ValueError):
        return False
    return head is not None and answered(head)


def listener_speaks(host: str, port: int, timeout_s: float = 3.0, certfile: str = "", keyfile: str = "") -> str | None:
    """``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL`` (``SSL or SASL_SSL`` for a TLS
    listener that answered neither request: one that requires a client certificate it was not
    given), as the Kafka listener at ``host:port`` answers; None when it answers as none of them.

    >>> listener_speaks("127.0.0.1", 1, 0.5) is None  # nothing listens there
    True
    """
    context = _any_tls(certfile, keyfile)
    tls = handshakes(host, port, timeout_s, context)
    over = context if tls else None
    if _answers(host, port, timeout_s, METADATA, over):
        return "SSL" if tls else "PLAINTEXT"
    if _answers(host, port, timeout_s, API_VERSIONS, over):
        return "SASL_SSL" if tls else "SASL_PLAINTEXT"
    return "SSL or SASL_SSL" if tls else None


__all__ = ["API_VERSIONS", "METADATA", "SPEAKS", "answered", "exchange", "handshakes", "listener_speaks"]
