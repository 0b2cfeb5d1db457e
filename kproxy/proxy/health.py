"""Proxy health (upstream ``ProxyHealthServer``) and its HTTP server.

State: per IP family, the time of the last successful sync and of the oldest
update queued since.  A family is unhealthy when an update has been queued
for longer than ``health_timeout`` (upstream: 2 × ``--iptables-sync-period``)
without a successful sync after it.  ``/healthz`` is also 503 when the Node is
being deleted or carries the cluster autoscaler's ``ToBeDeletedByClusterAutoscaler``
taint; ``/livez`` ignores node eligibility.

Served on ``--healthz-bind-address`` (default ``0.0.0.0:10256``) with
upstream's JSON and headers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from kproxy.proxy.metrics import ProxyMetrics

TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def go_time(ts: float) -> str:
    """Format like Go's ``time.Time.String()`` in UTC (without the monotonic part)."""
    dt = datetime.fromtimestamp(ts, UTC)
    nanos = round((ts - int(ts)) * 1e9) % 1_000_000_000
    frac = f".{nanos:09d}".rstrip("0").rstrip(".")
    return dt.strftime("%Y-%m-%d %H:%M:%S") + frac + " +0000 UTC"


class ProxyHealth:
    """Health bookkeeping shared by the sync loop and the HTTP handlers."""

    def __init__(self, health_timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.health_timeout = health_timeout
        self._clock = clock
        self._last_updated: dict[str, float] = {}
        self._oldest_pending: dict[str, float] = {}
        # Eligible while starting up, until a Node event says otherwise.
        self.node_eligible = True

    def queued_update(self, family: str) -> None:
        self._oldest_pending.setdefault(family, self._clock())

    def updated(self, family: str) -> None:
        self._oldest_pending.pop(family, None)
        self._last_updated[family] = self._clock()

    def sync_node(self, node: Mapping[str, Any] | None) -> None:
        """Track node eligibility from the Node object (None: node deleted)."""
        if node is None or node.get("metadata", {}).get("deletionTimestamp"):
            self.node_eligible = False
            return
        taints = node.get("spec", {}).get("taints") or []
        self.node_eligible = not any(t.get("key") == TO_BE_DELETED_TAINT for t in taints)

    def family_healthy(self, family: str, now: float) -> bool:
        queued = self._oldest_pending.get(family)
        return queued is None or now - queued < self.health_timeout

    def status(self) -> tuple[bool, float, dict[str, dict[str, Any]]]:
        """(healthy, last updated, per-family status) as of now."""
        now = self._clock()
        families = sorted(self._last_updated.keys() | self._oldest_pending.keys())
        per_family: dict[str, dict[str, Any]] = {}
        healthy = True
        for fam in families:
            ok = self.family_healthy(fam, now)
            healthy = healthy and ok
            per_family[fam] = {
                "lastUpdated": go_time(self._last_updated.get(fam, 0.0)),
                "healthy": ok,
            }
        last = max(self._last_updated.values(), default=0.0)
        return healthy, last, per_family

    def body(self, *, with_node: bool) -> tuple[int, dict[str, Any]]:
        healthy, last, per_family = self.status()
        now = self._clock()
        if with_node:
            healthy = healthy and self.node_eligible
        # Upstream reports "lastUpdated" as now while healthy, for compatibility
        # with releases where it meant "the sync loop last ran".
        out: dict[str, Any] = {
            "lastUpdated": go_time(now if healthy else last),
            "currentTime": go_time(now),
        }
        if with_node:
            out["nodeEligible"] = self.node_eligible
        out["healthy"] = healthy
        out["status"] = per_family
        return (200 if healthy else 503), out


def health_app(health: ProxyHealth, metrics: ProxyMetrics | None = None) -> web.Application:
    """The ``--healthz-bind-address`` server: ``/healthz`` and ``/livez``."""

    def handler(with_node: bool) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            code, body = health.body(with_node=with_node)
            if metrics is not None:
                counter = metrics.healthz if with_node else metrics.livez
                counter.labels(code=str(code)).inc()
            return web.Response(
                status=code,
                body=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "X-Content-Type-Options": "nosniff"},
            )

        return handle

    app = web.Application()
    app.router.add_get("/healthz", handler(True))
    app.router.add_get("/livez", handler(False))
    return app
