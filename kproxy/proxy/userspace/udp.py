"""UDP proxy sockets: one reader per service socket, one connected backend socket per client.

Owns :class:`ClientTable` (pure: bounded, idle timeout, injectable clock) and
:class:`UdpProxySocket`, upstream's ``udpProxySocket`` without its flaws:

- everything runs as reader callbacks of the data-plane loop (no thread or task
  per client): the service socket's reader forwards client datagrams, each
  client's backend socket has a reader that sends the replies back to the client
  *from the service socket* (so the REDIRECT/DNAT conntrack entry un-NATs them),
  with the reply's source set to the address the client's datagram arrived at
  (IP_PKTINFO), so multi-homed nodes answer from the right address;
- datagrams up to 64 KiB (upstream truncated at 4 KiB);
- a client association lives until no datagram went either way for
  ``--udp-timeout`` (default 250 ms); the table is bounded, a full table closes
  its least recently active association (counted), and a missing descriptor
  (EMFILE) drops the datagram (counted) instead of hanging the socket;
- a service port without endpoints drops the datagram.

Invariants: the table holds exactly the open backend sockets, each registered
with the loop once; a sweep timer is pending whenever the table is non-empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import LoadBalancer, MissingEndpoints, MissingService
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.proxysocket import FD_ERRNOS, split_endpoint

__all__ = ["DEFAULT_MAX_CLIENTS", "DEFAULT_UDP_TIMEOUT", "ClientTable", "UdpProxySocket"]

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

DEFAULT_UDP_TIMEOUT: Final = 0.25
DEFAULT_MAX_CLIENTS: Final = 4096
MAX_DATAGRAM: Final = 65536
# Datagrams handled per readiness callback, so one busy socket cannot starve the loop.
BATCH: Final = 64
# <linux/in.h>; Python 3.11's socket module does not export it.
IP_PKTINFO: Final = 8
_PKTINFO: Final = struct.Struct("=i4s4s")  # ifindex, spec_dst, addr
_CMSG_SPACE: Final = socket.CMSG_SPACE(_PKTINFO.size)


class ClientTable(Generic[K, V]):
    """Associations ordered by last activity; bounded; idle ones expire."""

    def __init__(self, max_clients: int, timeout: float, clock: Callable[[], float]) -> None:
        if max_clients < 1:
            raise ValueError("max_clients must be at least 1")
        self.max_clients = max_clients
        self.timeout = timeout
        self._clock = clock
        self._entries: OrderedDict[K, tuple[V, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        return entry[0] if entry is not None else None

    def touch(self, key: K) -> None:
        """Record activity: the association's idle time starts again."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], self._clock())
            self._entries.move_to_end(key)

    def add(self, key: K, value: V) -> list[tuple[K, V]]:
        """Insert ``key`` (must be absent); returns the associations evicted to make room."""
        if key in self._entries:
            raise KeyError(f"{key!r} is already in the table")
        evicted: list[tuple[K, V]] = []
        while len(self._entries) >= self.max_clients:
            k, (v, _) = self._entries.popitem(last=False)
            evicted.append((k, v))
        self._entries[key] = (value, self._clock())
        return evicted

    def pop(self, key: K) -> V | None:
        entry = self._entries.pop(key, None)
        return entry[0] if entry is not None else None

    def expire(self) -> list[tuple[K, V]]:
        """Remove and return the associations idle for ``timeout`` or longer."""
        now = self._clock()
        out: list[tuple[K, V]] = []
        while self._entries:
            k, (v, last) = next(iter(self._entries.items()))
            if now - last < self.timeout:
                break
            del self._entries[k]
            out.append((k, v))
        return out

    def next_expiry(self) -> float | None:
        """When the least recently active association expires (None if empty)."""
        for _, last in self._entries.values():
            return last + self.timeout
        return None

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, v) for k, (v, _) in self._entries.items())

    def clear(self) -> list[tuple[K, V]]:
        out = list(self.items())
        self._entries.clear()
        return out


Address = tuple[str, int]


@dataclass(slots=True)
class _Client:
    addr: Address
    backend: socket.socket
    # The address the client's datagrams arrive at: the source of our replies.
    local: bytes | None


def _local_address(ancdata: list[tuple[int, int, bytes]]) -> bytes | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _PKTINFO.size:
            addr: bytes = _PKTINFO.unpack_from(data)[2]
            return addr
    return None


class UdpProxySocket:
    """The UDP socket of one service port and its client associations."""

    protocol = "UDP"

    def __init__(
        self,
        name: ServicePortName,
        sock: socket.socket,
        lb: LoadBalancer,
        metrics: UserspaceMetrics,
        *,
        timeout: float = DEFAULT_UDP_TIMEOUT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
    ) -> None:
        self.name = name
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.lb = lb
        self.metrics = metrics
        self.timeout = timeout
        self.max_clients = max_clients
        self._loop: asyncio.AbstractEventLoop | None = None
        self.clients: ClientTable[Address, _Client] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pktinfo = sock.family == socket.AF_INET
        self._fd_episode = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.clients = ClientTable(self.max_clients, self.timeout, loop.time)
        if self._pktinfo:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        loop.add_reader(self.sock.fileno(), self._on_service_readable)

    async def close(self, *, abort: bool = False) -> None:
        """Stop serving: the associations go with the socket (UDP has no connections)."""
        del abort
        loop, table = self._loop, self.clients
        if loop is not None and table is not None:
            loop.remove_reader(self.sock.fileno())
            for _, client in table.clear():
                self._close_client(client)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.sock.close()

    # -- client → backend ------------------------------------------------------
    def _on_service_readable(self) -> None:
        table = self.clients
        assert table is not None
        for _ in range(BATCH):
            try:
                data, ancdata, _flags, addr = self.sock.recvmsg(MAX_DATAGRAM, _CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # An ICMP error queued on the socket; it concerns one earlier datagram.
                log.debug("%s: recvmsg: %s", self.name, e)
                continue
            client = table.get(addr)
            if client is None:
                client = self._new_client(addr, _local_address(ancdata))
                if client is None:
                    continue
            else:
                table.touch(addr)
            try:
                client.backend.send(data)
            except OSError as e:
                # Full buffer or an ICMP error from the backend: UDP may drop.
                log.debug("%s: send to backend: %s", self.name, e)

    def _new_client(self, addr: Address, local: bytes | None) -> _Client | None:
        loop, table = self._loop, self.clients
        assert loop is not None and table is not None
        try:
            endpoint = self.lb.next_endpoint(self.name, addr[0], False)
        except (MissingService, MissingEndpoints):
            log.debug("%s: no endpoint for a datagram from %s; dropped", self.name, addr)
            return None
        host, port = split_endpoint(endpoint)
        try:
            backend = socket.socket(
                socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM
            )
        except OSError as e:
            if e.errno in FD_ERRNOS:
                self.metrics.fd_exhausted.labels(protocol="UDP").inc()
                if not self._fd_episode:
                    log.error("%s: %s; dropping datagrams of new clients", self.name, e)
                    self._fd_episode = True
                return None
            raise
        self._fd_episode = False
        try:
            backend.setblocking(False)
            backend.connect((host, port))
        except OSError as e:
            backend.close()
            log.warning("%s: cannot reach %s for %s: %s", self.name, endpoint, addr, e)
            return None
        client = _Client(addr, backend, local if self._pktinfo else None)
        for _, old in table.add(addr, client):
            self.metrics.udp_evictions.inc()
            self._close_client(old)
        loop.add_reader(backend.fileno(), self._on_backend_readable, client)
        self.metrics.udp_clients.inc()
        if self._timer is None:
            self._arm()
        return client

    # -- backend → client ------------------------------------------------------
    def _on_backend_readable(self, client: _Client) -> None:
        table = self.clients
        assert table is not None
        for _ in range(BATCH):
            try:
                data = client.backend.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                # ECONNREFUSED: the backend port is closed (ICMP); later datagrams may work.
                log.debug("%s: recv from backend for %s: %s", self.name, client.addr, e)
                return
            table.touch(client.addr)
            ancillary = []
            if client.local is not None:
                ancillary = [
                    (socket.IPPROTO_IP, IP_PKTINFO, _PKTINFO.pack(0, client.local, bytes(4)))
                ]
            try:
                self.sock.sendmsg([data], ancillary, 0, client.addr)
            except OSError as e:
                log.debug("%s: reply to %s: %s", self.name, client.addr, e)

    # -- expiry ----------------------------------------------------------------
    def _arm(self) -> None:
        loop, table = self._loop, self.clients
        assert loop is not None and table is not None
        when = table.next_expiry()
        self._timer = None if when is None else loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        table = self.clients
        assert table is not None
        for _, client in table.expire():
            self._close_client(client)
        self._arm()

    def _close_client(self, client: _Client) -> None:
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(client.backend.fileno())
        client.backend.close()
        self.metrics.udp_clients.dec()

    @property
    def client_count(self) -> int:
        return len(self.clients) if self.clients is not None else 0
