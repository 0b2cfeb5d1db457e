"""The proxy core: what every proxy mode shares.

Owns the node-independent view of Services and EndpointSlices that a proxy mode
programs into the kernel:

- :mod:`kproxy.proxy.types` — the frozen snapshot types (service-port names,
  service-port info, endpoint info);
- :mod:`kproxy.proxy.services` — Service (plain JSON dict) → service ports, the
  service change tracker and the :class:`~kproxy.proxy.services.ServicePortMap`;
- :mod:`kproxy.proxy.endpoints` — the EndpointSlice cache, the endpoints change
  tracker and the :class:`~kproxy.proxy.endpoints.EndpointsMap`;
- :mod:`kproxy.proxy.topology` — which endpoints a node may use for a service
  (traffic policies, terminating fallback, topology hints);
- ``kproxy.proxy.iptables`` / ``ipvs`` / ``userspace`` — the modes.

Invariant: everything in this package except the thin mode appliers is pure (no
I/O, no kernel access), mirrors upstream kube-proxy's semantics, and never raises
on a malformed object: a bad object is logged with its name and skipped.
"""
