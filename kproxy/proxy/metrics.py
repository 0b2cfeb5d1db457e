"""Upstream kube-proxy's metrics (``kubeproxy_*``) and the metrics HTTP server.

Names, types, labels and buckets follow ``pkg/proxy/metrics``.  Each proxy
gets its own :class:`prometheus_client.CollectorRegistry`, so that several
proxies (tests, the one-machine cluster) never share counters.  prometheus
appends ``_total`` to counters itself, hence the bare counter names below.

The server on ``--metrics-bind-address`` (default ``127.0.0.1:10249``) serves
``/metrics``, ``/healthz`` (plain ``ok``), ``/proxyMode`` and ``/configz``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SUBSYSTEM = "kubeproxy"

# ExponentialBuckets(0.001, 2, 15)
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# 0.25, 0.5, 1..59 s, 60..115 s by 5, 120..300 s by 30 (network programming).
PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)

# The `_created` series are noise next to upstream's exposition.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class ProxyMetrics:
    """The metric families one proxy exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        fam = ["ip_family"]

        def hist(name: str, doc: str, buckets: tuple[float, ...] = SYNC_BUCKETS) -> Histogram:
            return Histogram(name, doc, fam, namespace=SUBSYSTEM, buckets=buckets, registry=r)

        self.sync_duration = hist(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"
        )
        self.sync_full_duration = hist(
            "sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
        )
        self.sync_partial_duration = hist(
            "sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
        )
        self.last_sync_timestamp = Gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            fam,
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.last_queued_timestamp = Gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            fam,
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.network_programming_duration = hist(
            "network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds",
            PROGRAMMING_BUCKETS,
        )
        self.endpoint_changes_pending = Gauge(
            "sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.endpoint_changes = Counter(
            "sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.service_changes_pending = Gauge(
            "sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.service_changes = Counter(
            "sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.restore_failures = Counter(
            "sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            fam,
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.partial_restore_failures = Counter(
            "sync_proxy_rules_iptables_partial_restore_failures",
            "Cumulative proxy iptables partial restore failures",
            fam,
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.iptables_total = Gauge(
            "sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by kube-proxy",
            ["table", "ip_family"],
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.iptables_last = Gauge(
            "sync_proxy_rules_iptables_last",
            "Number of iptables rules written by kube-proxy in last sync",
            ["table", "ip_family"],
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy", "ip_family"],
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.healthz = Counter(
            "proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            ["code"],
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.livez = Counter(
            "proxy_livez",
            "Cumulative proxy livez HTTP status",
            ["code"],
            namespace=SUBSYSTEM,
            registry=r,
        )
        self.conntrack_sync_duration = hist(
            "conntrack_reconciler_sync_duration_seconds",
            "ReconcileConntrackFlowsLatency latency in seconds",
        )
        self.conntrack_deleted = Counter(
            "conntrack_reconciler_deleted_entries",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            fam,
            namespace=SUBSYSTEM,
            registry=r,
        )

    def rules_synced(
        self,
        ip_family: str,
        written: Mapping[str, int],
        total: Mapping[str, int] | None = None,
        *,
        no_local: tuple[int, int] | None = None,
    ) -> None:
        """The gauges of one sync: rules written per table, rules owned after it
        (``total``, default: what was written) and, when given, the Services with no
        local endpoints (internal, external traffic policy)."""
        for table, n in written.items():
            self.iptables_last.labels(table=table, ip_family=ip_family).set(n)
        for table, n in (written if total is None else total).items():
            self.iptables_total.labels(table=table, ip_family=ip_family).set(n)
        if no_local is not None:
            for policy, n in zip(("internal", "external"), no_local, strict=True):
                self.no_local_endpoints.labels(traffic_policy=policy, ip_family=ip_family).set(n)

    def restore_failed(self, ip_family: str, *, partial: bool) -> None:
        """Count a failed ``iptables-restore`` (and, for a partial sync, the partial counter)."""
        self.restore_failures.labels(ip_family=ip_family).inc()
        if partial:
            self.partial_restore_failures.labels(ip_family=ip_family).inc()

    def exposition(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)


def metrics_app(
    metrics: ProxyMetrics, proxy_mode: str, configz: Callable[[], Mapping[str, Any]]
) -> web.Application:
    """The ``--metrics-bind-address`` server."""

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(),
            headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST},
        )

    async def get_mode(_: web.Request) -> web.Response:
        return web.Response(text=proxy_mode)

    async def get_healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_configz(_: web.Request) -> web.Response:
        body = {"kubeproxy.config.k8s.io": dict(configz())}
        return web.Response(text=json.dumps(body, default=str), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/proxyMode", get_mode)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/configz", get_configz)
    return app
