"""TcpProxySocket on a SpliceRelay: the in-loop accept path and the switch back to Python.

For both builds of the relay loop (compiled and twin): a plain round-robin port
is accepted and dialled by the loop (``in_loop``), keeps round robin and
half-close, counts refusals and failed dials in the metrics, picks up endpoint
changes on ``refresh()``, moves back to the Python accept path when ClientIP
affinity is turned on (and affinity then holds), and maglev ports never leave
Python. Runs on 127.0.0.1 with bounded timeouts.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from types import ModuleType

import pytest

from kproxy.proxy.types import ServicePortName
from kproxy.proxy.userspace.loadbalancer import LoadBalancer, RoundRobinLoadBalancer
from kproxy.proxy.userspace.maglev import MaglevLoadBalancer
from kproxy.proxy.userspace.metrics import UserspaceMetrics
from kproxy.proxy.userspace.proxysocket import TcpProxySocket
from kproxy.proxy.userspace.splice import SpliceRelay
from tests.support.backends import backend
from tests.support.impls import IMPLS

SVC = ServicePortName("ns", "web", "http", "TCP")
FAST_DIALS = (0.2, 0.2, 0.2, 0.2)


async def request(port: int, payload: bytes = b"hello") -> str:
    """Send, half-close, read the reply to EOF ('reset' when reset)."""
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
            return out.decode() if out else "eof"
    except (ConnectionResetError, BrokenPipeError):
        return "reset"
    finally:
        s.close()


def value(m: UserspaceMetrics, name: str) -> float:
    v = m.registry.get_sample_value(name, {})
    return 0.0 if v is None else v


async def eventually(cond: Callable[[], bool], seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    assert cond()


Scenario = Callable[[TcpProxySocket, LoadBalancer, list[str], UserspaceMetrics], Awaitable[None]]


def run(impl: ModuleType, scenario: Scenario, lb: LoadBalancer | None = None) -> None:
    async def main() -> None:
        servers = [await backend(f"b{i}") for i in range(2)]
        eps = [ep for _, ep in servers]
        balancer = lb or RoundRobinLoadBalancer(shuffle=lambda _: None)
        balancer.new_service(SVC, False, 0)
        balancer.set_endpoints(SVC, eps)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.setblocking(False)
        metrics = UserspaceMetrics()
        relay = SpliceRelay(loop_factory=impl.RelayLoop, dial_timeouts=FAST_DIALS)
        proxy = TcpProxySocket(
            SVC, listener, balancer, relay, metrics, dial_timeouts=FAST_DIALS, pause=(0.01, 0.05)
        )
        proxy.start()
        try:
            await scenario(proxy, balancer, eps, metrics)
        finally:
            await proxy.close(abort=True)
            relay.close()
            for server, _ in servers:
                server.close()
                await server.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize("impl", IMPLS)
def test_plain_round_robin_runs_in_the_loop(impl: ModuleType) -> None:
    async def scenario(
        proxy: TcpProxySocket, lb: LoadBalancer, eps: list[str], m: UserspaceMetrics
    ) -> None:
        assert proxy.in_loop
        big = b"z" * (1 << 20)
        assert await request(proxy.port, big) == f"b0 {len(big)}"
        assert await request(proxy.port) == "b1 5"
        assert await request(proxy.port) == "b0 5"
        assert proxy.accepted == 0  # Python never saw them
        # Endpoint changes reach the loop on refresh() (new connections only).
        lb.set_endpoints(SVC, [eps[1]])
        proxy.refresh()
        assert [await request(proxy.port) for _ in range(3)] == ["b1 5"] * 3
        # No endpoints: reset at once and counted.
        lb.set_endpoints(SVC, [])
        proxy.refresh()
        assert await request(proxy.port) in ("reset", "eof")
        await eventually(lambda: value(m, "kubeproxy_userspace_connections_refused_total") == 1)
        await eventually(lambda: proxy.relay.active == 0)

    run(impl, scenario)


@pytest.mark.parametrize("impl", IMPLS)
def test_dead_endpoint_counted_and_skipped(impl: ModuleType) -> None:
    async def scenario(
        proxy: TcpProxySocket, lb: LoadBalancer, eps: list[str], m: UserspaceMetrics
    ) -> None:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        lb.set_endpoints(SVC, [dead, eps[0]])
        proxy.refresh()
        assert proxy.in_loop
        assert [await request(proxy.port) for _ in range(4)] == ["b0 5"] * 4
        await eventually(lambda: value(m, "kubeproxy_userspace_dial_failures_total") >= 2)
        assert value(m, "kubeproxy_userspace_connections_refused_total") == 0

    run(impl, scenario)


@pytest.mark.parametrize("impl", IMPLS)
def test_affinity_moves_the_port_back_to_python(impl: ModuleType) -> None:
    async def scenario(
        proxy: TcpProxySocket, lb: LoadBalancer, eps: list[str], m: UserspaceMetrics
    ) -> None:
        assert proxy.in_loop
        lb.new_service(SVC, True, 60)
        proxy.refresh()
        assert not proxy.in_loop
        got = {await request(proxy.port) for _ in range(4)}
        assert len(got) == 1  # sticky: one backend for 127.0.0.1
        assert proxy.accepted >= 4
        lb.new_service(SVC, False, 0)
        proxy.refresh()
        assert proxy.in_loop
        assert {await request(proxy.port) for _ in range(4)} == {"b0 5", "b1 5"}

    run(impl, scenario)


@pytest.mark.parametrize("impl", IMPLS)
def test_maglev_stays_in_python(impl: ModuleType) -> None:
    async def scenario(
        proxy: TcpProxySocket, lb: LoadBalancer, eps: list[str], m: UserspaceMetrics
    ) -> None:
        assert not proxy.in_loop
        assert (await request(proxy.port)).endswith(" 5")
        assert proxy.accepted == 1

    run(impl, scenario, MaglevLoadBalancer())
