"""UDP side of the userspace proxy: the client table (fake clock), a proxy socket on 127.0.0.1."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import cast

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import RoundRobinLoadBalancer
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.udp import ClientTable, UdpProxySocket

SVC = ServicePortName("ns", "dns", "", "UDP")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_table_expires_idle_clients_only() -> None:
    clock = Clock()
    t: ClientTable[str, int] = ClientTable(10, 2.0, clock)
    assert t.next_expiry() is None
    t.add("a", 1)
    clock.now = 1.0
    t.add("b", 2)
    assert t.next_expiry() == 2.0
    clock.now = 1.5
    t.touch("a")  # a is now the most recent
    assert t.next_expiry() == 3.0
    clock.now = 2.999
    assert t.expire() == []
    clock.now = 3.0
    assert t.expire() == [("b", 2)]
    assert "a" in t and len(t) == 1
    clock.now = 3.5
    assert t.expire() == [("a", 1)]
    assert len(t) == 0 and t.next_expiry() is None


def test_table_is_bounded_and_evicts_the_least_recently_active() -> None:
    clock = Clock()
    t: ClientTable[int, int] = ClientTable(3, 10.0, clock)
    for i in range(3):
        clock.now += 1
        assert t.add(i, i) == []
    t.touch(0)
    assert t.add(3, 3) == [(1, 1)]
    assert sorted(k for k, _ in t.items()) == [0, 2, 3]
    assert t.pop(2) == 2 and t.pop(2) is None
    assert t.clear() == [(0, 0), (3, 3)] and len(t) == 0


class Echo(asyncio.DatagramProtocol):
    """A backend that answers ``<name> <bytes received>``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector transport is a DatagramTransport by duck typing only.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(f"{self.name} {len(data)}".encode(), addr)


async def ask(port: int, payload: bytes = b"q", sock: socket.socket | None = None) -> str:
    own = sock is None
    s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendto(s, payload, ("127.0.0.1", port))
        async with asyncio.timeout(2):
            return (await loop.sock_recv(s, 65536)).decode()
    finally:
        if own:
            s.close()


Scenario = Callable[[UdpProxySocket, list[str], UserspaceMetrics], Awaitable[None]]


def run(
    scenario: Scenario, *, backends: int = 2, timeout: float = 0.25, max_clients: int = 64
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transports = []
        eps: list[str] = []
        for i in range(backends):
            tr, _ = await loop.create_datagram_endpoint(
                functools.partial(Echo, f"b{i}"), local_addr=("127.0.0.1", 0)
            )
            transports.append(tr)
            eps.append(f"127.0.0.1:{tr.get_extra_info('sockname')[1]}")
        lb = RoundRobinLoadBalancer(shuffle=lambda _: None)
        lb.new_service(SVC, False, 0)
        lb.set_endpoints(SVC, eps)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        metrics = UserspaceMetrics()
        proxy = UdpProxySocket(SVC, sock, lb, metrics, timeout=timeout, max_clients=max_clients)
        proxy.start()
        try:
            await scenario(proxy, eps, metrics)
        finally:
            await proxy.close()
            for tr in transports:
                tr.close()
        assert proxy.client_count == 0 and sock.fileno() == -1

    asyncio.run(main())


def value(metrics: UserspaceMetrics, name: str) -> float:
    v = metrics.registry.get_sample_value(name)
    return 0.0 if v is None else v


def test_round_trip_big_datagrams_and_association_reuse() -> None:
    async def scenario(proxy: UdpProxySocket, eps: list[str], m: UserspaceMetrics) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            answers = [await ask(proxy.port, b"x" * n, s) for n in (1, 60000, 65507)]
        # One association: the same backend each time; no 4 KiB truncation.
        assert answers == ["b0 1", "b0 60000", "b0 65507"]
        assert proxy.client_count == 1
        # A new client (another source port) gets the next endpoint.
        assert await ask(proxy.port) == "b1 1"
        assert value(m, "kubeproxy_userspace_udp_clients") == 2

    run(scenario)


def test_associations_expire_after_the_idle_timeout() -> None:
    async def scenario(proxy: UdpProxySocket, eps: list[str], m: UserspaceMetrics) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with s:
            assert await ask(proxy.port, b"a", s) == "b0 1"
            for _ in range(4):  # activity keeps it alive past one timeout
                await asyncio.sleep(0.1)
                assert await ask(proxy.port, b"a", s) == "b0 1"
            await asyncio.sleep(0.5)
            assert proxy.client_count == 0
            assert value(m, "kubeproxy_userspace_udp_clients") == 0
            # The same client address is a new association: the next endpoint.
            assert await ask(proxy.port, b"a", s) == "b1 1"

    run(scenario, timeout=0.2)


def test_a_full_table_evicts_the_oldest_association() -> None:
    async def scenario(proxy: UdpProxySocket, eps: list[str], m: UserspaceMetrics) -> None:
        for _ in range(5):
            await ask(proxy.port)
        assert proxy.client_count == 2
        assert value(m, "kubeproxy_userspace_udp_evictions_total") == 3

    run(scenario, max_clients=2, timeout=5.0)


def test_no_endpoints_drops_datagrams() -> None:
    async def scenario(proxy: UdpProxySocket, eps: list[str], m: UserspaceMetrics) -> None:
        proxy.lb.set_endpoints(SVC, [])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        with s:
            await asyncio.get_running_loop().sock_sendto(s, b"q", ("127.0.0.1", proxy.port))
            await asyncio.sleep(0.1)
            assert proxy.client_count == 0
            try:
                s.recv(100)
                raise AssertionError("an answer without endpoints")
            except BlockingIOError:
                pass

    run(scenario)
