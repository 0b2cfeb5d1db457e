"""Service health-check listeners (upstream service_health.go), served on 127.0.0.1.

Every test runs its async body under a deadline with ``asyncio.run`` and closes
its listeners in ``finally``; ports are chosen free by the OS just before use.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import pytest

from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.healthcheck import ServiceHealthServer, response_body
from kproxy.proxy.types import NamespacedName

LOOPBACK = "127.0.0.1"
A = NamespacedName("ns", "a")
B = NamespacedName("ns", "b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 30))


async def probe(
    port: int, path: str = "/", method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.request(method, f"http://{LOOPBACK}:{port}{path}") as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def refused(port: int) -> bool:
    try:
        await probe(port)
    except aiohttp.ClientConnectionError:
        return True
    return False


def with_server(
    healthy: Callable[[], bool] | ProxyHealth = lambda: True,
) -> Callable[
    [Callable[[ServiceHealthServer], Awaitable[None]]], Callable[[], Coroutine[Any, Any, None]]
]:
    def wrap(
        body: Callable[[ServiceHealthServer], Awaitable[None]],
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        async def main() -> None:
            hcs = ServiceHealthServer(healthy, addresses=(LOOPBACK,))
            try:
                await body(hcs)
            finally:
                await hcs.close()

        return main

    return wrap


# -- the response ----------------------------------------------------------------------


def test_body_is_upstreams_template_byte_for_byte() -> None:
    assert response_body(A, 2, True) == (
        b'{\n\t"service": {\n\t\t"namespace": "ns",\n\t\t"name": "a"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )
    assert response_body(B, 0, False).endswith(
        b'"localEndpoints": 0,\n\t"serviceProxyHealthy": false\n}'
    )


def test_status_headers_and_body_follow_endpoints_and_health() -> None:
    healthy = [True]
    port = free_port()

    @with_server(lambda: healthy[0])
    async def body(hcs: ServiceHealthServer) -> None:
        await hcs.sync_services({A: port})
        status, headers, data = await probe(port)
        assert status == 503  # no local endpoints yet
        assert data == response_body(A, 0, True)
        assert headers["Content-Type"] == "application/json"
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["X-Load-Balancing-Endpoint-Weight"] == "0"

        hcs.sync_endpoints({A: 3})
        status, headers, data = await probe(port)
        assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (200, "3")
        assert data == response_body(A, 3, True)

        healthy[0] = False
        status, headers, data = await probe(port)
        assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (503, "3")
        assert data == response_body(A, 3, False)

    run(body)


def test_any_path_and_method_is_answered() -> None:
    port = free_port()

    @with_server()
    async def body(hcs: ServiceHealthServer) -> None:
        await hcs.sync_services({A: port})
        hcs.sync_endpoints({A: 1})
        for path, method in (("/healthz", "GET"), ("/x/y", "POST"), ("/", "HEAD")):
            status, _, _ = await probe(port, path, method)
            assert status == 200, (path, method)

    run(body)


def test_proxy_health_drives_service_proxy_healthy() -> None:
    now = [1000.0]
    health = ProxyHealth(health_timeout=60.0, clock=lambda: now[0])
    health.node_eligible = False  # ignored here, as upstream's Health()
    port = free_port()

    @with_server(health)
    async def body(hcs: ServiceHealthServer) -> None:
        await hcs.sync_services({A: port})
        hcs.sync_endpoints({A: 1})
        assert (await probe(port))[0] == 200
        health.queued_update("IPv4")
        now[0] += 61.0  # queued longer than the timeout without a successful sync
        status, _, data = await probe(port)
        assert status == 503
        assert data == response_body(A, 1, False)
        health.updated("IPv4")
        assert (await probe(port))[0] == 200

    run(body)


# -- syncs -----------------------------------------------------------------------------


def test_sync_services_opens_closes_and_moves_listeners() -> None:
    port_a, port_b, port_b2 = free_port(), free_port(), free_port()

    @with_server()
    async def body(hcs: ServiceHealthServer) -> None:
        await hcs.sync_services({A: port_a, B: port_b})
        assert hcs.listening() == {A: port_a, B: port_b}
        assert hcs.bound_addresses(A) == [(LOOPBACK, port_a)]
        hcs.sync_endpoints({A: 1, B: 2})

        # B moves to another port; A is left alone and keeps its count.
        await hcs.sync_services({A: port_a, B: port_b2})
        assert await refused(port_b)
        assert (await probe(port_a))[0] == 200
        status, headers, _ = await probe(port_b2)
        assert (status, headers["X-Load-Balancing-Endpoint-Weight"]) == (503, "0")

        await hcs.sync_services({B: port_b2})
        assert hcs.listening() == {B: port_b2}
        assert await refused(port_a)

    run(body)


def test_sync_endpoints_defaults_to_zero_and_ignores_unknown_services() -> None:
    port = free_port()

    @with_server()
    async def body(hcs: ServiceHealthServer) -> None:
        await hcs.sync_services({A: port})
        hcs.sync_endpoints({A: 2, B: 5})
        assert hcs.endpoints(A) == 2
        assert hcs.endpoints(B) == 0
        hcs.sync_endpoints({})
        assert (await probe(port))[0] == 503
        assert hcs.endpoints(A) == 0

    run(body)


def test_a_busy_port_is_logged_skipped_and_retried(caplog: pytest.LogCaptureFixture) -> None:
    holder = socket.socket()
    holder.bind((LOOPBACK, 0))
    holder.listen()
    busy = int(holder.getsockname()[1])
    port_b = free_port()

    @with_server()
    async def body(hcs: ServiceHealthServer) -> None:
        with caplog.at_level(logging.ERROR, logger="kproxy.proxy.healthcheck"):
            await hcs.sync_services({A: busy, B: port_b})
        assert hcs.listening() == {B: port_b}  # the other service is not held up
        assert f"service=ns/a, port={busy}" in caplog.text
        holder.close()
        await hcs.sync_services({A: busy, B: port_b})
        assert hcs.listening() == {A: busy, B: port_b}
        hcs.sync_endpoints({A: 1})
        assert (await probe(busy))[0] == 200

    try:
        run(body)
    finally:
        holder.close()


def test_close_releases_every_port() -> None:
    port_a, port_b = free_port(), free_port()

    async def body() -> None:
        hcs = ServiceHealthServer(lambda: True, addresses=(LOOPBACK,))
        try:
            await hcs.sync_services({A: port_a, B: port_b})
        finally:
            await hcs.close()
        assert hcs.listening() == {}
        assert await refused(port_a)
        assert await refused(port_b)

    run(body)
