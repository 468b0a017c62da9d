"""``streamrec serve`` against clients that would hold more than their share.

- **A client that does not read its answers** (:func:`write_timeout`). aiohttp has no write
  timeout: a client that pipelines requests on a keep-alive connection and never reads left
  serve's handler for that connection waiting, for ever, for its answers to be sent (the
  keep-alive timeout only counts while no request is in hand), its unsent bytes held, and once
  aiohttp gave up on it, the transport still held them until they were sent. Now serve keeps no
  unsent bytes past the kernel's socket buffer but the answer in hand (the transport pauses the
  writer as soon as the kernel takes no more), and a connection whose answer has not left within
  :data:`WRITE_TIMEOUT_S` is aborted, said in at most one log line a minute.
- **A client with many requests at once** (:func:`shedding`). More than ``max_in_flight`` API
  requests in progress is a 503; one peer address may take a slot only while ``reserved`` slots
  are left that it does not hold (it holds at most ``max_in_flight - reserved``, at least one), so
  that a client that opens many at once gets its own 503s and others are still answered, and a
  client alone on an idle server has all but ``reserved`` of them (with half, a single backend
  calling from one address got its 9th request shed while 8 slots stood empty). The
  peer is the connection's address (an IPv6 address by its /64, which one host is given), never
  ``X-Forwarded-For``, which any client can write; but behind a reverse proxy every request
  comes from the proxy's address, so ``STREAMREC_SERVE_TRUSTED_PROXIES`` names the proxies whose
  ``X-Forwarded-For`` is believed (:func:`client_of`).

**A client that half-closes** (``shutdown(SHUT_WR)`` after its request, as ``nc -N`` does) gets
no answer: aiohttp closes the connection on the client's end of input
(aio-libs/aiohttp#3659). Keeping it open is easy (``eof_received`` returning True), but closing
it once the requests in hand are answered needs aiohttp's queue of requests, which is not public;
without that, every client that closes its connection would hold it on serve's side until the
keep-alive timeout. So it stays a known limit (docs/operations.md, "serve's clients").
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time

import msgspec
from aiohttp import web

from stream.settings import RESERVED_SLOTS, IPNetwork

log = logging.getLogger("streamrec.serve")

#: seconds an answer may wait for its client to read it before the connection is aborted: as
#: nginx's ``send_timeout`` (the wait is reset each time the client reads all that was sent)
WRITE_TIMEOUT_S = 60.0
#: at most one log line this often about the connections aborted so
SAY_EVERY_S = 60.0

_encode = msgspec.json.Encoder().encode


class _Said:
    """One warning per :data:`SAY_EVERY_S` about aborted connections; the next says how many
    there were meanwhile."""

    def __init__(self) -> None:
        self.last = float("-inf")
        self.held = 0

    def aborted(self, peer: str, unsent: int) -> None:
        now = time.monotonic()
        if now - self.last < SAY_EVERY_S:
            self.held += 1
            return
        more = f"; {self.held} more since the last line" if self.held else ""
        log.warning("aborted a connection from %s whose answers were not read for %g s (%d bytes unsent): a client "
                    "that sends requests and does not read the answers%s", peer, WRITE_TIMEOUT_S, unsent, more)
        self.last, self.held = now, 0


_said = _Said()


class _WriteGuard(asyncio.Protocol):
    """Stands between a connection's transport and aiohttp's protocol, passing everything on;
    while the transport holds unsent bytes (it pauses writing), a timer runs, and at
    :data:`WRITE_TIMEOUT_S` it aborts the connection."""

    __slots__ = ("inner", "peer", "timer", "transport")

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.Transport, peer: str) -> None:
        self.inner = inner
        self.transport = transport
        self.peer = peer
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover - installed once connected
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(WRITE_TIMEOUT_S, self._abort)
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self._stop()
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop()
        self.inner.connection_lost(exc)

    def _stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _abort(self) -> None:
        self.timer = None
        _said.aborted(self.peer, self.transport.get_write_buffer_size())
        self.transport.abort()


def write_timeout():
    """A middleware that puts each connection's transport, at its first request, behind a
    :class:`_WriteGuard`, and has it pause the writer as soon as a byte is left unsent."""

    @web.middleware
    async def guard(request: web.Request, handler):
        transport = request.transport
        if transport is not None:
            inner = transport.get_protocol()
            if not isinstance(inner, _WriteGuard) and not isinstance(inner, asyncio.BufferedProtocol):
                transport.set_protocol(_WriteGuard(inner, transport, str(request.remote)))
                transport.set_write_buffer_limits(high=0)  # an answer waits (is drained) until all of it is sent
        return await handler(request)

    return guard


def peer_of(remote: str | None) -> str:
    """The peer a request is counted under: its connection's address, an IPv6 one by its /64.

    >>> peer_of("10.0.0.7"), peer_of("2001:db8:1:2:aaaa::1"), peer_of("::ffff:10.0.0.7"), peer_of(None)
    ('10.0.0.7', '2001:db8:1:2::/64', '10.0.0.7', '')
    """
    if not remote or ":" not in remote:
        return remote or ""
    try:
        address = ipaddress.IPv6Address(remote.split("%", 1)[0])
    except ValueError:
        return remote
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((address, 64), strict=False))


def client_of(remote: str | None, forwarded: list[str], trusted: tuple[IPNetwork, ...]) -> str | None:
    """The client's address: ``remote``, the connection's, unless it is one of the ``trusted``
    proxies; then the nearest address in ``X-Forwarded-For`` (``forwarded``: its headers, in
    order) that is not a trusted proxy, read from the right (what is left of it the client may
    have written), stopping at one that is not an address.

    >>> trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    >>> client_of("10.0.0.2", ["203.0.113.9, 198.51.100.4", "10.0.0.3"], trusted)
    '198.51.100.4'
    >>> client_of("10.0.0.2", ["10.1.1.1, garbage, 10.0.0.3"], trusted), client_of("10.0.0.2", [], trusted)
    ('10.0.0.3', '10.0.0.2')
    >>> client_of("198.51.100.4", ["203.0.113.9"], trusted)  # not through a trusted proxy: not believed
    '198.51.100.4'
    """
    if not trusted or not _among(remote, trusted):
        return remote
    client = remote
    for hop in reversed([hop.strip() for header in forwarded for hop in header.split(",")]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            break
        client = hop
        if not any(address in network for network in trusted):
            break
    return client


def _among(remote: str | None, trusted: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(address in network for network in trusted)


def shedding(max_in_flight: int, trusted: tuple[IPNetwork, ...] = (), reserved: int = RESERVED_SLOTS):
    """More than ``max_in_flight`` API requests in progress, or more than ``max_in_flight -
    reserved`` of them (at least one) from one peer (:func:`client_of` through ``trusted``
    proxies, :func:`peer_of`): a new one is a 503 with Retry-After. So whatever one peer does,
    ``reserved`` slots stay beyond its reach, for the others."""
    per_peer = max(1, max_in_flight - reserved)
    in_flight = 0
    peers: dict[str, int] = {}  # requests in progress by peer (none: not there)

    @web.middleware
    async def shed(request: web.Request, handler):
        nonlocal in_flight
        if not request.path.startswith("/v1/"):
            return await handler(request)
        if in_flight >= max_in_flight:
            return _overloaded(f"overloaded: {in_flight} requests in progress; retry shortly")
        remote = request.remote
        peer = peer_of(client_of(remote, request.headers.getall("X-Forwarded-For", []), trusted) if trusted else remote)
        held = peers.get(peer, 0)
        if held >= per_peer:
            return _overloaded(f"overloaded: this client already has {held} requests in progress, the most one client "
                               f"may (of {max_in_flight} in all); retry shortly")
        in_flight += 1
        peers[peer] = held + 1
        try:
            return await handler(request)
        finally:
            in_flight -= 1
            left = peers[peer] - 1
            if left:
                peers[peer] = left
            else:
                del peers[peer]

    return shed


def _overloaded(error: str) -> web.Response:
    return web.Response(body=_encode({"error": error}), status=503, content_type="application/json",
                        headers={"Retry-After": "1"})


__all__ = ["SAY_EVERY_S", "WRITE_TIMEOUT_S", "client_of", "peer_of", "shedding", "write_timeout"]
