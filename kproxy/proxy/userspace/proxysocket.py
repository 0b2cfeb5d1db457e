"""TCP proxy sockets: one listener per service port, accept → dial → relay.

Owns the proxy-port allocation (``--proxy-port-range``, or a port the kernel
picks), the listening sockets, upstream's dial retry and the process's fd limit.

Upstream's ``tcpProxySocket`` with its flaws fixed:

- accepting never waits for a dial: each accepted connection gets its own task;
- the dial follows ``endpointDialTimeout`` (250 ms, 500 ms, 1 s, 2 s), asking the
  balancer for an endpoint before each attempt and for an affinity reset after
  the first failure, so a dead endpoint is skipped;
- ``EMFILE``/``ENFILE`` pause accepting (the connection waits in the backlog)
  with a back-off, are logged once per episode and counted, and accepting
  resumes by itself (upstream panicked);
- a service port without endpoints, or whose endpoints all failed to answer,
  resets the client at once (SO_LINGER 0) instead of closing it cleanly;
- TCP_NODELAY on both legs; the pair goes to a :class:`~.relay.Relay`.

The connection-rate path: when the relay is a :class:`~.splice.SpliceRelay`
and the service port is plain round robin (:class:`~.loadbalancer.RoundRobinLoadBalancer`
without ClientIP affinity), the listener is handed to the relay loop, which
accepts, dials (same schedule, next endpoint per attempt, reset when none
answers) and relays without Python; :meth:`TcpProxySocket.refresh` pushes the
balancer's rotation to it on every sync (new connections only) and moves the
port back to the Python path when affinity is turned on. Failures still reach
the metrics and the log, as events from the relay thread.

Invariants: every socket this module creates is owned by exactly one object that
closes it (listener → :class:`TcpProxySocket`, client/backend → the handler
until handed to the relay); all methods except :func:`open_listener`,
:class:`PortAllocator` and :func:`raise_nofile_limit` run on the data-plane loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import random
import resource
import socket
from collections.abc import Iterator, Sequence
from typing import Final

from kproxy.errors import KProxyError
from kproxy.fastpath import RelayLoop
from kproxy.proxy.types import IPAddress, ServicePortName
from kproxy.proxy.userspace.loadbalancer import (
    LoadBalancer,
    MissingEndpoints,
    MissingService,
    RoundRobinLoadBalancer,
)
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.relay import Relay, reset_close
from kproxy.proxy.userspace.splice import SpliceRelay

__all__ = [
    "DIAL_TIMEOUTS",
    "PortAllocator",
    "PortRangeError",
    "TcpProxySocket",
    "dial",
    "open_listener",
    "parse_port_range",
    "raise_nofile_limit",
    "split_endpoint",
]

log = logging.getLogger(__name__)

# Upstream's endpointDialTimeout.
DIAL_TIMEOUTS: Final = (0.25, 0.5, 1.0, 2.0)
FD_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE})
# Accept errors that concern one connection only.
_TRANSIENT_ACCEPT: Final = frozenset(
    {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENOBUFS, errno.ENOMEM, errno.EINTR}
)
BACKLOG: Final = 1024
NOFILE_TARGET: Final = 64 * 1000  # upstream's setRLimit(64 * 1000)


class PortRangeError(KProxyError):
    """A bad ``--proxy-port-range`` or no free port in it."""


def parse_port_range(text: str) -> tuple[int, int] | None:
    """``"a-b"``, ``"a+n"`` (a..a+n) or ``"a"``; None for ``""``/``"0-0"`` (kernel's choice)."""
    text = text.strip()
    if text in ("", "0-0", "0"):
        return None
    try:
        if "-" in text:
            lo_s, hi_s = text.split("-", 1)
            lo, hi = int(lo_s), int(hi_s)
        elif "+" in text:
            lo_s, n_s = text.split("+", 1)
            lo = int(lo_s)
            hi = lo + int(n_s)
        else:
            lo = hi = int(text)
    except ValueError:
        raise PortRangeError(
            f"--proxy-port-range {text!r} is not PORT, PORT-PORT or PORT+N"
        ) from None
    if not 1 <= lo <= hi <= 65535:
        raise PortRangeError(f"--proxy-port-range {text!r} is outside 1-65535 or reversed")
    return lo, hi


class PortAllocator:
    """Hands out proxy ports: the kernel's choice, or free ports of a range in random order.

    Tracks the ports it handed out per protocol (a TCP and a UDP service may share
    a number); a port whose bind fails is simply skipped.
    """

    def __init__(self, port_range: str = "", rng: random.Random | None = None) -> None:
        self.range = parse_port_range(port_range)
        self._rng = rng or random.Random()
        self._used: dict[str, set[int]] = {}

    def candidates(self, protocol: str) -> Iterator[int]:
        if self.range is None:
            yield 0
            return
        used = self._used.get(protocol, set())
        ports = [p for p in range(self.range[0], self.range[1] + 1) if p not in used]
        self._rng.shuffle(ports)
        yield from ports

    def claim(self, protocol: str, port: int) -> None:
        if self.range is not None:
            self._used.setdefault(protocol, set()).add(port)

    def release(self, protocol: str, port: int) -> None:
        self._used.get(protocol, set()).discard(port)


def open_listener(protocol: str, listen_ip: IPAddress, allocator: PortAllocator) -> socket.socket:
    """A bound (and for TCP listening) non-blocking socket on a port of the allocator."""
    family = socket.AF_INET6 if listen_ip.version == 6 else socket.AF_INET
    kind = socket.SOCK_STREAM if protocol == "TCP" else socket.SOCK_DGRAM
    last: OSError | None = None
    for port in allocator.candidates(protocol):
        sock = socket.socket(family, kind)
        try:
            if kind == socket.SOCK_STREAM:
                # A restarted proxy must be able to reuse ports in TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((str(listen_ip), port))
            if kind == socket.SOCK_STREAM:
                sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if e.errno in FD_ERRNOS or port == 0:
                raise
            last = e
            continue
        allocator.claim(protocol, sock.getsockname()[1])
        return sock
    raise PortRangeError(f"no free {protocol} port in --proxy-port-range ({last})")


def raise_nofile_limit(target: int = NOFILE_TARGET) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``target`` (within the hard limit); the new soft."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            return want
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE to %d: %s", want, e)
    return soft


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """``"IP:port"`` / ``"[v6]:port"`` → (ip, port)."""
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


async def dial(endpoint: str, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to ``endpoint`` (TCP_NODELAY set)."""
    host, port = split_endpoint(endpoint)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class TcpProxySocket:
    """The listener of one TCP service port and its in-flight dials."""

    protocol = "TCP"

    def __init__(
        self,
        name: ServicePortName,
        sock: socket.socket,
        lb: LoadBalancer,
        relay: Relay,
        metrics: UserspaceMetrics,
        *,
        dial_timeouts: Sequence[float] = DIAL_TIMEOUTS,
        pause: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self.name = name
        self.sock = sock
        self.port: int = sock.getsockname()[1]
        self.lb = lb
        self.relay = relay
        self.metrics = metrics
        self.dial_timeouts = tuple(dial_timeouts)
        self.pause = pause
        self._accepter: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.accepted = 0  # by the Python path (the relay loop counts its own)
        self._lid: int | None = None  # listener id in the relay loop while it accepts
        self._rotation: tuple[str, ...] = ()
        self._exhausted = False  # relay-thread side of the EMFILE episode logging

    def start(self) -> None:
        if not self._offload():
            self._start_accepting()

    @property
    def in_loop(self) -> bool:
        """True while the relay loop accepts and dials for this port."""
        return self._lid is not None

    def _start_accepting(self) -> None:
        if self._accepter is None or self._accepter.done():
            self._accepter = asyncio.get_running_loop().create_task(
                self._accept_loop(), name=f"accept {self.name}"
            )

    def _plain_rotation(self) -> tuple[str, ...] | None:
        if not isinstance(self.relay, SpliceRelay) or self.relay.closed:
            return None
        if not isinstance(self.lb, RoundRobinLoadBalancer):
            return None  # maglev hashes the client: stays in Python
        if self.relay.dial_timeouts != self.dial_timeouts:
            return None  # the loop has one schedule; a port with another keeps Python's
        return self.lb.plain_rotation(self.name)

    def _push(self, lid: int, rotation: tuple[str, ...]) -> bool:
        assert isinstance(self.relay, SpliceRelay)
        try:
            self.relay.set_backends(lid, [split_endpoint(ep) for ep in rotation])
        except ValueError as e:  # not an IP literal: the Python path can still dial it
            log.warning("%s: endpoints not usable by the relay loop (%s)", self.name, e)
            return False
        self._rotation = rotation
        return True

    def _offload(self) -> bool:
        """Hand the listener to the relay loop when the port is plain round robin."""
        rotation = self._plain_rotation()
        if rotation is None or self.sock.fileno() < 0:
            return False
        assert isinstance(self.relay, SpliceRelay)
        lid = self.relay.listen(self.sock, self._on_loop_event)
        if not self._push(lid, rotation):
            self.relay.unlisten(lid)
            return False
        self._lid = lid
        log.info("%s: accepting and dialling in the relay loop", self.name)
        if self._accepter is not None:
            # Both paths may accept for a moment; either serves the connection fully.
            self._accepter.cancel()
            self._accepter = None
        return True

    def _reclaim(self) -> None:
        """Take the listener back from the relay loop (Python accepts again)."""
        if self._lid is not None and isinstance(self.relay, SpliceRelay):
            self.relay.unlisten(self._lid)
        self._lid = None
        log.info("%s: accepting in Python (affinity or endpoints the loop cannot dial)", self.name)
        self._start_accepting()

    def refresh(self) -> None:
        """After a sync of the balancer: push a changed rotation, or switch accept paths."""
        if self.sock.fileno() < 0:
            return
        rotation = self._plain_rotation()
        if rotation is None:
            if self._lid is not None:
                self._reclaim()
            return
        if self._lid is None:
            self._offload()
        elif rotation != self._rotation and not self._push(self._lid, rotation):
            self._reclaim()

    def _on_loop_event(self, kind: int, err: int) -> None:
        # Runs on the relay thread: counters and logging only (both thread-safe).
        if kind == RelayLoop.EV_REFUSED:
            self.metrics.refused.inc()
        elif kind == RelayLoop.EV_DIAL_FAILED:
            self.metrics.dial_failures.inc()
            log.warning(
                "%s: dial failed (%s), trying another endpoint", self.name, os.strerror(err)
            )
        elif kind == RelayLoop.EV_FD_EXHAUSTED:
            self.metrics.fd_exhausted.labels(protocol="TCP").inc()
            if not self._exhausted:
                log.error("%s: %s; pausing until descriptors free up", self.name, os.strerror(err))
                self._exhausted = True
        elif kind == RelayLoop.EV_ACCEPTING:
            if self._exhausted:
                log.warning("%s: accepting again", self.name)
            self._exhausted = False
        elif kind == RelayLoop.EV_ACCEPT_FAILED:
            log.error("%s: accept failed in the relay loop: %s", self.name, os.strerror(err))

    @property
    def in_flight(self) -> int:
        """Accepted connections still dialling (on the Python path)."""
        return len(self._handlers)

    async def close(self, *, abort: bool = False) -> None:
        """Stop accepting; in-flight dials finish unless ``abort`` (relayed pairs survive)."""
        if self._lid is not None:
            if isinstance(self.relay, SpliceRelay):
                self.relay.unlisten(self._lid)
            self._lid = None
            # The loop closes its copy of the fd a moment later; stop listening now.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        if self._accepter is not None:
            self._accepter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepter
            self._accepter = None
        self.sock.close()
        if abort:
            for t in list(self._handlers):
                t.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        delay = self.pause[0]
        exhausted = False
        while True:
            try:
                conn, addr = await loop.sock_accept(self.sock)
            except OSError as e:
                if e.errno in FD_ERRNOS:
                    # Back-pressure, not a crash: the client waits in the backlog.
                    self.metrics.fd_exhausted.labels(protocol="TCP").inc()
                    if not exhausted:
                        log.error("%s: accept: %s; pausing until descriptors free up", self.name, e)
                        exhausted = True
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self.pause[1])
                    continue
                if e.errno in _TRANSIENT_ACCEPT:
                    continue
                log.error("%s: accept failed, closing the proxy socket: %s", self.name, e)
                return
            if exhausted:
                log.warning("%s: accepting again", self.name)
                exhausted, delay = False, self.pause[0]
            self.accepted += 1
            task = loop.create_task(self._serve(conn, addr))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _serve(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        handed_over = False
        try:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            backend = await self._connect(addr[0]) if self.lb.has_endpoints(self.name) else None
            if backend is None:
                self.metrics.refused.inc()
                return
            self.relay.start(conn, backend)
            handed_over = True
        finally:
            if not handed_over:
                reset_close(conn)

    async def _connect(self, client_ip: str) -> socket.socket | None:
        """Upstream's ``tryConnect``: one attempt per dial timeout, new endpoint each time."""
        reset = False
        for timeout in self.dial_timeouts:
            try:
                endpoint = self.lb.next_endpoint(self.name, client_ip, reset)
            except (MissingService, MissingEndpoints):
                return None
            try:
                return await dial(endpoint, timeout)
            except (OSError, TimeoutError) as e:
                self.metrics.dial_failures.inc()
                if isinstance(e, OSError) and e.errno in FD_ERRNOS:
                    self.metrics.fd_exhausted.labels(protocol="TCP").inc()
                    log.error("%s: out of descriptors dialling %s: %s", self.name, endpoint, e)
                    return None
                log.warning(
                    "%s: dial %s failed (%s), trying another endpoint", self.name, endpoint, e
                )
                reset = True
        log.error("%s: no endpoint answered after %d attempts", self.name, len(self.dial_timeouts))
        return None
