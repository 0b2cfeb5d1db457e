"""Service health-check servers: one HTTP listener per ``healthCheckNodePort``.

A LoadBalancer Service with ``externalTrafficPolicy: Local`` gets a
``healthCheckNodePort``; the cloud load balancer probes it on every node and
sends traffic only to nodes that answer 200. This module owns those listeners
(upstream ``pkg/proxy/healthcheck/service_health.go``):

- :meth:`ServiceHealthServer.sync_services` makes the given ``{service: port}``
  the open set: a listener whose service is gone or whose port changed is closed,
  a new one is opened, an unchanged one is left alone (its connections survive);
- :meth:`ServiceHealthServer.sync_endpoints` sets each service's count of local
  ready endpoints; a service missing from the map has 0; counts for services
  without a listener are ignored;
- every request, on any path and method, gets 200 when the count is ≥ 1 and the
  proxy is healthy (:meth:`ProxyHealth.status`, which ignores node eligibility,
  as upstream's ``Health()``), else 503, with upstream's headers
  (``Content-Type: application/json``, ``X-Content-Type-Options: nosniff``,
  ``X-Load-Balancing-Endpoint-Weight: <count>``) and upstream's body byte for byte
  (tab-indented JSON, no trailing newline).

Invariants: a listener binds every address given (``--nodeport-addresses``
resolved to node IPs) or, with none, all addresses of both families (Go's
wildcard); if any bind fails, the service's listeners are all closed, the failure
is logged with the service and port, and the service is left out so that the next
sync retries it (upstream). All methods run on the proxy's event loop thread.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from kproxy.proxy.health import ProxyHealth
from kproxy.proxy.types import NamespacedName

log = logging.getLogger(__name__)

__all__ = ["ServiceHealthServer", "response_body"]

# Upstream closes a listener and its connections at once; a load balancer's
# keep-alive probe must not hold a sync up.
SHUTDOWN_TIMEOUT_S = 1.0


def response_body(name: NamespacedName, count: int, healthy: bool) -> bytes:
    """Upstream's body: its dedented Go template, tab-indented, without final newline."""
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(name.namespace)},\n'
        f'\t\t"name": {json.dumps(name.name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {count},\n'
        f'\t"serviceProxyHealthy": {"true" if healthy else "false"}\n'
        "}"
    ).encode()


@dataclass
class _Instance:
    name: NamespacedName
    port: int
    runner: web.AppRunner
    endpoints: int = 0
    bound: list[tuple[str, int]] = field(default_factory=list)


class ServiceHealthServer:
    """The set of per-service health-check listeners of one proxy."""

    def __init__(
        self,
        health: ProxyHealth | Callable[[], bool],
        addresses: Sequence[str] = (),
    ) -> None:
        if isinstance(health, ProxyHealth):
            proxy_health = health
            self._healthy: Callable[[], bool] = lambda: proxy_health.status()[0]
        else:
            self._healthy = health
        self.addresses = tuple(addresses)
        self._services: dict[NamespacedName, _Instance] = {}

    # -- state -------------------------------------------------------------------------
    def listening(self) -> dict[NamespacedName, int]:
        """The services with open listeners, and their ports."""
        return {name: inst.port for name, inst in self._services.items()}

    def bound_addresses(self, name: NamespacedName) -> list[tuple[str, int]]:
        """The (host, port) sockets actually bound for ``name`` (empty if none)."""
        inst = self._services.get(name)
        return list(inst.bound) if inst else []

    def endpoints(self, name: NamespacedName) -> int:
        inst = self._services.get(name)
        return inst.endpoints if inst else 0

    # -- syncs -------------------------------------------------------------------------
    async def sync_services(self, services: Mapping[NamespacedName, int]) -> None:
        """Make ``services`` (service → healthCheckNodePort) the open set."""
        for name, inst in list(self._services.items()):
            if services.get(name) != inst.port:
                log.info("Closing healthcheck (service=%s, port=%d)", name, inst.port)
                del self._services[name]
                await inst.runner.cleanup()
        for name, port in services.items():
            if name in self._services:
                continue
            log.info("Opening healthcheck (service=%s, port=%d)", name, port)
            await self._open(name, port)

    def sync_endpoints(self, endpoints: Mapping[NamespacedName, int]) -> None:
        """Set the local ready endpoint counts (services not in ``endpoints`` get 0)."""
        for name, inst in self._services.items():
            inst.endpoints = endpoints.get(name, 0)

    async def close(self) -> None:
        await self.sync_services({})

    # -- listeners ---------------------------------------------------------------------
    async def _open(self, name: NamespacedName, port: int) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handler(name))
        runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT_S
        )
        await runner.setup()
        # Registered before the first bind: a probe that arrives while a later
        # address is still binding must see the service, not a closed healthcheck.
        inst = self._services[name] = _Instance(name, port, runner)
        hosts: Sequence[str | None] = self.addresses or (None,)
        try:
            for host in hosts:
                await web.TCPSite(runner, host, port).start()
        except OSError as e:
            # Close whatever opened, so that a retry (or the port's new owner) can bind.
            del self._services[name]
            await runner.cleanup()
            log.error(
                "Failed to start healthcheck (service=%s, port=%d, addresses=%s): %s",
                name,
                port,
                ",".join(self.addresses) or "*",
                e,
            )
            return
        inst.bound = [(str(a[0]), int(a[1])) for a in runner.addresses]

    def _handler(
        self, name: NamespacedName
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(_: web.Request) -> web.StreamResponse:
            inst = self._services.get(name)
            if inst is None:
                # Only between a close decision and the listener going away; upstream
                # logs and answers with an empty 200 as well.
                log.error("Received request for closed healthcheck (service=%s)", name)
                return web.Response()
            count = inst.endpoints
            healthy = self._healthy()
            return web.Response(
                status=200 if count != 0 and healthy else 503,
                body=response_body(name, count, healthy),
                headers={
                    "Content-Type": "application/json",
                    "X-Content-Type-Options": "nosniff",
                    "X-Load-Balancing-Endpoint-Weight": str(count),
                },
            )

        return handle
