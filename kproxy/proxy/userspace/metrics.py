"""The userspace data path's own metrics (``kubeproxy_userspace_*``).

Upstream's userspace proxier exported only the sync metrics the proxy loop
already keeps (:class:`kproxy.proxy.metrics.ProxyMetrics`); the failure modes it
handled badly (fd exhaustion, failed dials, UDP client churn) are counted here
so that they are visible instead of fatal. They register on the proxy's
registry when given one, else on a private one (tests).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["UserspaceMetrics"]

_NS = "kubeproxy"


class UserspaceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        proto = ["protocol"]
        self.fd_exhausted = Counter(
            "userspace_fd_exhausted",
            "Times a proxy socket hit EMFILE/ENFILE and paused (accept) or dropped (UDP)",
            proto,
            namespace=_NS,
            registry=r,
        )
        self.dial_failures = Counter(
            "userspace_dial_failures",
            "Failed dials to an endpoint (each retry counts)",
            namespace=_NS,
            registry=r,
        )
        self.refused = Counter(
            "userspace_connections_refused",
            "Client connections reset because no endpoint could be reached",
            namespace=_NS,
            registry=r,
        )
        self.tcp_connections = Gauge(
            "userspace_tcp_connections",
            "TCP connections being relayed",
            namespace=_NS,
            registry=r,
        )
        self.udp_clients = Gauge(
            "userspace_udp_clients",
            "UDP client associations (one backend socket each)",
            namespace=_NS,
            registry=r,
        )
        self.udp_evictions = Counter(
            "userspace_udp_evictions",
            "UDP associations closed early because the client table was full",
            namespace=_NS,
            registry=r,
        )
        self.proxy_sockets = Gauge(
            "userspace_proxy_sockets",
            "Open proxy sockets (one per TCP/UDP service port)",
            proto,
            namespace=_NS,
            registry=r,
        )
