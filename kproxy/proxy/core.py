"""Source events → snapshots: the part of the proxy every mode shares.

:class:`ProxyCore` implements :class:`kproxy.proxy.sources.Handler`.  It feeds
Service and EndpointSlice events to the change trackers, follows its own
Node (labels for topology, eligibility for ``/healthz``), and on each sync
hands the mode a :class:`Snapshot`: the current service-port and endpoint
maps plus which Services changed since the last one.

Invariants: the trackers are drained only by :meth:`snapshot`, so a change is
reported in exactly one snapshot; a change of the Node's topology labels
forces the next sync to be full (upstream's ``OnTopologyChange``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kproxy.proxy.endpoints import EndpointsChangeTracker, EndpointsMap
from kproxy.proxy.services import ServiceChangeTracker, ServicePortMap
from kproxy.proxy.types import IPV4, NamespacedName

log = logging.getLogger(__name__)

Obj = Mapping[str, Any]

TOPOLOGY_LABELS = ("topology.kubernetes.io/zone", "topology.kubernetes.io/region")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What one sync works from."""

    services: ServicePortMap
    endpoints: EndpointsMap
    changed: frozenset[NamespacedName]
    conntrack_cleanup_required: bool = False
    trigger_times: Mapping[NamespacedName, tuple[str, ...]] = field(default_factory=dict)
    topology_changed: bool = False


class ProxyCore:
    """Change trackers and snapshots for one node and IP family."""

    def __init__(self, node_name: str, family: str = IPV4) -> None:
        self.node_name = node_name
        self.family = family
        self.services = ServiceChangeTracker(family)
        self.endpoints = EndpointsChangeTracker(node_name, family)
        self.service_map = ServicePortMap()
        self.endpoints_map = EndpointsMap()
        self.node: Obj | None = None
        self.synced_once = False
        self._topology_changed = False
        # Called after every event that may need a sync (the runner's run()).
        self.on_change: Callable[[], None] = lambda: None

    # -- sources.Handler -------------------------------------------------
    def on_service(self, old: Obj | None, new: Obj | None) -> None:
        if self.services.update(old, new):
            self.on_change()

    def on_endpoint_slice(self, old: Obj | None, new: Obj | None) -> None:
        if new is not None:
            changed = self.endpoints.endpoint_slice_update(new)
        elif old is not None:
            changed = self.endpoints.endpoint_slice_update(old, remove=True)
        else:
            return
        if changed:
            self.on_change()

    def on_node(self, old: Obj | None, new: Obj | None) -> None:
        if self.topology_labels(old) != self.topology_labels(new):
            self._topology_changed = True
        self.node = new
        self.on_change()

    def synced(self) -> None:
        self.synced_once = True
        self.on_change()

    # -- snapshots -------------------------------------------------------
    @staticmethod
    def topology_labels(node: Obj | None) -> tuple[tuple[str, str], ...]:
        labels = ((node or {}).get("metadata") or {}).get("labels") or {}
        return tuple((k, str(labels[k])) for k in TOPOLOGY_LABELS if k in labels)

    @property
    def pending(self) -> tuple[int, int]:
        """(service changes, endpoint changes) not yet in a snapshot."""
        return self.services.pending, self.endpoints.pending

    def snapshot(self) -> Snapshot:
        """Apply pending changes and report what changed since the last snapshot."""
        svc = self.service_map.update(self.services)
        eps = self.endpoints_map.update(self.endpoints)
        topology, self._topology_changed = self._topology_changed, False
        return Snapshot(
            services=self.service_map,
            endpoints=self.endpoints_map,
            changed=svc.updated_services | eps.updated_services,
            conntrack_cleanup_required=eps.conntrack_cleanup_required,
            trigger_times=eps.last_change_trigger_times,
            topology_changed=topology,
        )

    def node_ips(self) -> tuple[str, ...]:
        """InternalIP/ExternalIP addresses of our Node, in status order."""
        addresses = ((self.node or {}).get("status") or {}).get("addresses") or []
        return tuple(
            str(a["address"])
            for a in addresses
            if isinstance(a, Mapping)
            and a.get("type") in ("InternalIP", "ExternalIP")
            and a.get("address")
        )
