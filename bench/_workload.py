"""The synthetic cluster the benches feed the proxy: Services with one EndpointSlice each.

Each bench picks its own Service shape and address plan (the IPVS bench avoids
``.0``/``.255`` endpoint addresses, which the kernel refuses as real servers); what
they share is the EndpointSlice of Service ``i`` and how a proxy core is fed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kproxy.proxy.core import ProxyCore

Obj = dict[str, Any]


def endpoint_slice(
    i: int, endpoints: int, address: Callable[[int], str], first: int | None = None
) -> Obj:
    """The one EndpointSlice of Service ``i``: ``endpoints`` ready pods on other nodes,
    at ``address(1 + i * endpoints + j)``; ``first`` replaces the first one's index
    (the churn step)."""
    base = 1 + i * endpoints
    addrs = [address(base + j) for j in range(endpoints)]
    if first is not None:
        addrs[0] = address(first)
    return {
        "metadata": {
            "namespace": f"ns{i % 50}",
            "name": f"svc{i}-1",
            "labels": {"kubernetes.io/service-name": f"svc{i}"},
        },
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": [a], "conditions": {"ready": True}, "nodeName": f"node{j}"}
            for j, a in enumerate(addrs)
        ],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


def build_core(
    node: str,
    services: int,
    service: Callable[[int], Obj],
    endpoint_slice: Callable[[int], Obj],
) -> ProxyCore:
    """A proxy core of ``node`` fed Services ``0..services-1`` and their slices through
    its event handlers, as an informer would."""
    core = ProxyCore(node)
    for i in range(services):
        core.on_service(None, service(i))
        core.on_endpoint_slice(None, endpoint_slice(i))
    return core
