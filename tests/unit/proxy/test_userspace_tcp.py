"""TCP side of the userspace proxy on 127.0.0.1: dial retry, half-close, resets, EMFILE, fds."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import RoundRobinLoadBalancer
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.proxysocket import (
    PortAllocator,
    PortRangeError,
    TcpProxySocket,
    parse_port_range,
)
from kproxy.proxy.userspace.relay import AsyncioRelay
from tests.support.backends import backend

SVC = ServicePortName("ns", "web", "http", "TCP")
FAST_DIALS = (0.2, 0.2, 0.2, 0.2)


def dead_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: connection refused
    return f"127.0.0.1:{port}"


async def request(port: int, payload: bytes = b"hello") -> str:
    """Send, half-close, read the reply to EOF."""
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    try:
        async with asyncio.timeout(5):
            await loop.sock_connect(s, ("127.0.0.1", port))
            await loop.sock_sendall(s, payload)
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := await loop.sock_recv(s, 65536):
                out += chunk
            return out.decode()
    finally:
        s.close()


Scenario = Callable[[TcpProxySocket, UserspaceMetrics], Awaitable[None]]


def run(
    scenario: Scenario,
    endpoints: Callable[[list[str]], list[str]] = lambda live: live,
    *,
    backends: int = 2,
    sock: socket.socket | None = None,
) -> None:
    async def main() -> None:
        servers = [await backend(f"b{i}") for i in range(backends)]
        lb = RoundRobinLoadBalancer(shuffle=lambda _: None)
        lb.new_service(SVC, False, 0)
        lb.set_endpoints(SVC, endpoints([ep for _, ep in servers]))
        listener = sock or socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        metrics = UserspaceMetrics()
        relay = AsyncioRelay()
        proxy = TcpProxySocket(
            SVC, listener, lb, relay, metrics, dial_timeouts=FAST_DIALS, pause=(0.01, 0.05)
        )
        proxy.start()
        try:
            await scenario(proxy, metrics)
        finally:
            await proxy.close(abort=True)
            relay.abort_all()
            for server, _ in servers:
                server.close()
                await server.wait_closed()

    asyncio.run(main())


def value(m: UserspaceMetrics, name: str, **labels: str) -> float:
    v = m.registry.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_round_robin_and_half_close_with_a_large_request() -> None:
    async def scenario(proxy: TcpProxySocket, m: UserspaceMetrics) -> None:
        big = b"z" * (4 << 20)
        assert await request(proxy.port, big) == f"b0 {len(big)}"
        assert await request(proxy.port) == "b1 5"
        assert await request(proxy.port) == "b0 5"

    run(scenario)


def test_a_dead_endpoint_is_skipped_by_the_retry() -> None:
    async def scenario(proxy: TcpProxySocket, m: UserspaceMetrics) -> None:
        answers = [await request(proxy.port) for _ in range(6)]
        assert sorted(set(answers)) == ["b0 5", "b1 5"]
        assert value(m, "kubeproxy_userspace_dial_failures_total") >= 2

    run(scenario, lambda live: [dead_endpoint(), *live])


async def expect_reset(port: int) -> float:
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
        await request(port)
    return loop.time() - start


def test_no_endpoints_resets_at_once() -> None:
    async def scenario(proxy: TcpProxySocket, m: UserspaceMetrics) -> None:
        assert await expect_reset(proxy.port) < 0.5
        assert value(m, "kubeproxy_userspace_connections_refused_total") == 1

    run(scenario, lambda live: [])


def test_all_endpoints_dead_resets_after_the_retries() -> None:
    async def scenario(proxy: TcpProxySocket, m: UserspaceMetrics) -> None:
        assert await expect_reset(proxy.port) < 2.0
        assert value(m, "kubeproxy_userspace_dial_failures_total") == 4

    run(scenario, lambda live: [dead_endpoint(), dead_endpoint()])


class ExhaustedSocket(socket.socket):
    """A listener whose first accepts fail with EMFILE, as at the fd limit."""

    failures = 3

    def accept(self) -> tuple[socket.socket, Any]:
        if ExhaustedSocket.failures > 0:
            ExhaustedSocket.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_emfile_pauses_accepting_then_resumes() -> None:
    async def scenario(proxy: TcpProxySocket, m: UserspaceMetrics) -> None:
        # The client waits in the backlog while accept fails, then is served.
        assert await request(proxy.port) == "b0 5"
        assert value(m, "kubeproxy_userspace_fd_exhausted_total", protocol="TCP") == 3

    run(scenario, sock=ExhaustedSocket())


def test_no_descriptor_leaks_over_many_connections() -> None:
    proxy: Any = None

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def settled() -> int:
        for _ in range(200):  # relays and the backends close their ends asynchronously
            await asyncio.sleep(0.01)
            if proxy.relay.active == 0 and proxy.in_flight == 0:
                break
        await asyncio.sleep(0.05)
        return fds()

    async def scenario(proxy_: TcpProxySocket, m: UserspaceMetrics) -> None:
        nonlocal proxy
        proxy = proxy_
        await request(proxy.port)
        before = await settled()
        for _ in range(20):
            await asyncio.gather(*(request(proxy.port) for _ in range(10)))
        assert await settled() == before
        assert proxy.accepted == 201

    run(scenario)


def test_port_ranges() -> None:
    assert parse_port_range("") is None and parse_port_range("0-0") is None
    assert parse_port_range("30000-30010") == (30000, 30010)
    assert parse_port_range("30000+10") == (30000, 30010)
    assert parse_port_range("30000") == (30000, 30000)
    for bad in ("x", "10-5", "0-70000"):
        with pytest.raises(PortRangeError):
            parse_port_range(bad)
    alloc = PortAllocator("40000-40002")
    assert sorted(alloc.candidates("TCP")) == [40000, 40001, 40002]
    alloc.claim("TCP", 40001)
    assert sorted(alloc.candidates("TCP")) == [40000, 40002]
    assert sorted(alloc.candidates("UDP")) == [40000, 40001, 40002]
    alloc.release("TCP", 40001)
    assert list(PortAllocator("").candidates("TCP")) == [0]
