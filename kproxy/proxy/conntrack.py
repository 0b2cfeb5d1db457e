"""Stale UDP conntrack flows: which ones (pure) and their removal (thin reconciler).

UDP has no connection teardown, so a conntrack entry made while a Service's
traffic was DNAT'ed to an endpoint keeps steering packets to that endpoint for as
long as the client keeps sending, even after the endpoint is gone. Upstream's
reconciler (``pkg/proxy/conntrack/cleanup.go``, v1.32+) lists the table after a
sync and deletes exactly the flows that point at a non-serving endpoint; this
module is that reconciler.

:func:`stale_udp_flows` owns the decision and does no I/O. A UDP flow is stale when
its original destination is a UDP service frontend and its reply source (the
endpoint the kernel DNAT'ed to) is not a *serving* endpoint of that service port:

- frontend ``IP:port`` for the ClusterIP, every load-balancer VIP and every
  external IP, with the service port;
- frontend ``*:NodePort`` (upstream matches the port on any destination; pass
  ``node_ips`` to restrict it to the node's NodePort addresses).

Invariants, as upstream:

- serving, not ready: a terminating endpoint that still serves keeps its flows,
  and traffic policies and topology are ignored, so that changing them never
  breaks an existing UDP flow (a TCP connection survives them too);
- a service port with *no* serving endpoints is not skipped: every flow to it is
  stale (the fix of kubernetes#139628 / PR #139629; before it, flows made while
  endpoints existed survived a scale to zero forever under steady one-way
  traffic, because each packet refreshes the UDP timeout and is DNAT'ed before
  the REJECT rule that matches the service IP could see it);
- only flows the kernel listed are deleted, each by tuple and conntrack id.

:class:`ConntrackReconciler` lists, filters, deletes and records upstream's
``kubeproxy_conntrack_reconciler_sync_duration_seconds`` and
``kubeproxy_conntrack_reconciler_deleted_entries_total``. Like upstream it logs a
failure and returns, never failing the sync that triggered it; its verbs are
blocking netlink calls, so it runs where the mode's ``sync`` runs (a worker thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

from kproxy.kernel.conntrack import IPPROTO_UDP, ConntrackError, ConntrackVerbs, Flow
from kproxy.proxy.core import Snapshot
from kproxy.proxy.metrics import ProxyMetrics
from kproxy.proxy.types import (
    IPV4,
    IPV6,
    EndpointInfo,
    IPAddress,
    ServicePortInfo,
    ServicePortName,
    parse_ip_sloppy,
)

log = logging.getLogger(__name__)

__all__ = ["ConntrackReconciler", "stale_udp_flows"]


def _serving_ips(endpoints: Sequence[EndpointInfo]) -> frozenset[IPAddress]:
    ips: set[IPAddress] = set()
    for ep in endpoints:
        if ep.serving and (ip := parse_ip_sloppy(ep.ip)) is not None:
            ips.add(ip)
    return frozenset(ips)


def stale_udp_flows(
    services: Mapping[ServicePortName, ServicePortInfo],
    endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
    flows: Iterable[Flow],
    node_ips: Collection[IPAddress] | None = None,
) -> list[Flow]:
    """The UDP ``flows`` that point at a non-serving endpoint of a UDP service port.

    ``node_ips`` None matches NodePorts on any destination address (upstream);
    otherwise only flows to one of those addresses count as NodePort flows.
    The result keeps the order of ``flows`` and holds each flow once.
    """
    by_frontend: dict[tuple[IPAddress, int], frozenset[IPAddress]] = {}
    by_node_port: dict[int, frozenset[IPAddress]] = {}
    for spn, svc in services.items():
        if svc.protocol != "UDP":
            continue
        # Empty when scaled to zero: then every flow to the frontend is stale.
        serving = _serving_ips(endpoints.get(spn, ()))
        for vip in (svc.cluster_ip, *svc.load_balancer_vips, *svc.external_ips):
            by_frontend[(vip, svc.port)] = serving
        if svc.node_port:
            by_node_port[svc.node_port] = serving

    stale: list[Flow] = []
    for flow in flows:
        if flow.protocol != IPPROTO_UDP:
            continue
        serving_for_ip = by_frontend.get((flow.orig_dst, flow.orig_dport))
        if serving_for_ip is not None and flow.reply_src not in serving_for_ip:
            stale.append(flow)
            continue
        serving_for_port = by_node_port.get(flow.orig_dport)
        if (
            serving_for_port is not None
            and (node_ips is None or flow.orig_dst in node_ips)
            and flow.reply_src not in serving_for_port
        ):
            stale.append(flow)
    return stale


class ConntrackReconciler:
    """Deletes stale UDP flows of one IP family after a sync, with upstream's metrics."""

    def __init__(
        self,
        backend: ConntrackVerbs,
        metrics: ProxyMetrics | None = None,
        *,
        node_ips: Collection[IPAddress] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.node_ips = node_ips
        self.ip_family = IPV4 if backend.family == "ipv4" else IPV6
        self._clock = clock

    def after_sync(self, snapshot: Snapshot) -> int:
        """Reconcile when the snapshot's UDP endpoints changed (upstream's trigger)."""
        if not snapshot.conntrack_cleanup_required:
            return 0
        return self.reconcile(snapshot.services, snapshot.endpoints)

    def reconcile(
        self,
        services: Mapping[ServicePortName, ServicePortInfo],
        endpoints: Mapping[ServicePortName, Sequence[EndpointInfo]],
    ) -> int:
        """List, filter and delete; returns the number of flows deleted."""
        start = self._clock()
        deleted = 0
        try:
            flows = self.backend.list_flows(protocol=IPPROTO_UDP)
            stale = stale_udp_flows(services, endpoints, flows, self.node_ips)
            if stale:
                deleted = self.backend.delete(stale)
        except ConntrackError as e:
            deleted = e.deleted
            log.error(
                "Failed to reconcile conntrack entries (ipFamily=%s, entriesDeleted=%d): %s",
                self.ip_family,
                deleted,
                e,
            )
        else:
            log.debug(
                "Finished reconciling conntrack entries (ipFamily=%s, entriesDeleted=%d)",
                self.ip_family,
                deleted,
            )
        finally:
            if self.metrics is not None:
                elapsed = self._clock() - start
                self.metrics.conntrack_sync_duration.labels(ip_family=self.ip_family).observe(
                    elapsed
                )
        if self.metrics is not None and deleted:
            self.metrics.conntrack_deleted.labels(ip_family=self.ip_family).inc(deleted)
        return deleted
